//! Services: Feathers method semantics (find, get, create, update, patch, remove) over the
//! store, independent of any transport. REST, `/ws` and tests all call [`Services::call`].

pub mod query;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use sqlx::PgPool;

use crate::config::{Config, Multi};
use crate::error::{Error, Result};
use crate::store::{CaptureError, CatalogError, KeyKind, Store, Table, Target, WriteMode, install_capture};
use query::Query;

/// The Feathers service methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Find,
    Get,
    Create,
    Update,
    Patch,
    Remove,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "find" => Method::Find,
            "get" => Method::Get,
            "create" => Method::Create,
            "update" => Method::Update,
            "patch" => Method::Patch,
            "remove" => Method::Remove,
            _ => return None,
        })
    }
}

/// One method call, as any transport decodes it.
#[derive(Debug, Clone)]
pub struct ServiceCall {
    pub service: String,
    pub method: Method,
    /// The row id; `None` (or JSON null) for find, create and multi patch/remove.
    pub id: Option<Value>,
    pub data: Option<Value>,
    pub query: Value,
}

/// Why the services could not be set up at start-up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// One configured service.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub table: Table,
    multi: Multi,
    paginate: Option<(u32, u32)>,
    hidden: Vec<String>,
}

impl Service {
    /// Removes hidden fields. Every row that leaves quill, in a response or an event,
    /// passes through here.
    pub fn strip(&self, row: &mut Value) {
        if let Value::Object(fields) = row {
            for name in &self.hidden {
                fields.remove(name);
            }
        }
    }
}

/// All services, by name and by table.
pub struct Services {
    store: Store,
    by_name: HashMap<String, Arc<Service>>,
    by_table: HashMap<(String, String), Vec<Arc<Service>>>,
}

impl Services {
    /// Reads every configured table from the catalog and installs capture on it.
    pub async fn build(pool: PgPool, config: &Config) -> Result<Services, SetupError> {
        let mut by_name = HashMap::new();
        let mut by_table: HashMap<(String, String), Vec<Arc<Service>>> = HashMap::new();
        for (name, sc) in &config.services {
            let (schema, table_name) = sc.table_name(name);
            let table = Table::load(&pool, name, &schema, &table_name, &sc.id, &sc.hidden).await?;
            install_capture(&pool, &table).await?;
            let service = Arc::new(Service {
                name: Arc::from(name.as_str()),
                table,
                multi: sc.multi.clone(),
                paginate: sc.paginate.sizes(),
                hidden: sc.hidden.clone(),
            });
            by_table.entry((schema, table_name)).or_default().push(service.clone());
            by_name.insert(name.clone(), service);
        }
        Ok(Services {
            store: Store::new(pool),
            by_name,
            by_table,
        })
    }

    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Service>> {
        self.by_name.get(name)
    }

    /// The services that serve a table (usually one).
    pub fn for_table(&self, schema: &str, table: &str) -> &[Arc<Service>] {
        self.by_table
            .get(&(schema.to_owned(), table.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Runs one method call.
    pub async fn call(&self, call: ServiceCall) -> Result<Value> {
        let service = self
            .by_name
            .get(&call.service)
            .ok_or_else(|| Error::not_found(format!("Service '{}' not found", call.service)))?;
        let table = &service.table;
        let query = Query::parse(&call.query, table)?;
        let id = match call.id {
            None | Some(Value::Null) => None,
            Some(id) => Some(id_text(&id, table)?),
        };
        let mut result = match call.method {
            Method::Find => self.find(service, &query).await?,
            Method::Get => {
                let id = id.ok_or_else(|| Error::bad_request("get needs an id"))?;
                self.get_one(service, &query, &id).await?
            }
            Method::Create => self.create(service, call.data).await?,
            Method::Update => {
                let id = id.ok_or_else(|| {
                    Error::bad_request("You can not replace multiple instances. Did you mean 'patch'?")
                })?;
                let data = write_data(service, call.data, "update")?;
                self.write_one(service, &query, &id, &data, WriteMode::Replace).await?
            }
            Method::Patch => {
                let data = write_data(service, call.data, "patch")?;
                match id {
                    Some(id) => self.write_one(service, &query, &id, &data, WriteMode::Patch).await?,
                    None => {
                        if !service.multi.allows("patch") {
                            return Err(Error::method_not_allowed("Can not patch multiple entries"));
                        }
                        let target = Target {
                            id: None,
                            filter: &query.filter,
                        };
                        if data.is_empty() {
                            Value::Array(self.store.select(table, &query, None, None).await?)
                        } else {
                            Value::Array(self.store.update(table, target, &data, WriteMode::Patch).await?)
                        }
                    }
                }
            }
            Method::Remove => match id {
                Some(id) => {
                    let target = Target {
                        id: Some(&id),
                        filter: &query.filter,
                    };
                    let mut rows = self.store.delete(table, target).await?;
                    rows.pop().ok_or_else(|| no_record(&id))?
                }
                None => {
                    if !service.multi.allows("remove") {
                        return Err(Error::method_not_allowed("Can not remove multiple entries"));
                    }
                    let target = Target {
                        id: None,
                        filter: &query.filter,
                    };
                    Value::Array(self.store.delete(table, target).await?)
                }
            },
        };
        present(service, &mut result, query.select.as_deref());
        Ok(result)
    }

    async fn find(&self, service: &Service, query: &Query) -> Result<Value> {
        let table = &service.table;
        match service.paginate {
            None => Ok(Value::Array(self.store.select(table, query, None, query.limit).await?)),
            Some((default, max)) => {
                let limit = query.limit.unwrap_or(i64::from(default)).min(i64::from(max));
                let total = self.store.count(table, &query.filter).await?;
                let data = if limit == 0 {
                    Vec::new()
                } else {
                    self.store.select(table, query, None, Some(limit)).await?
                };
                Ok(json!({ "total": total, "limit": limit, "skip": query.skip, "data": data }))
            }
        }
    }

    async fn get_one(&self, service: &Service, query: &Query, id: &str) -> Result<Value> {
        let mut rows = self.store.select(&service.table, query, Some(id), None).await?;
        rows.pop().ok_or_else(|| no_record(id))
    }

    async fn create(&self, service: &Service, data: Option<Value>) -> Result<Value> {
        match data {
            Some(Value::Object(row)) => {
                check_columns(service, &row, false)?;
                let mut rows = self.store.insert(&service.table, &[row]).await?;
                rows.pop().ok_or_else(|| Error::general("insert returned no row"))
            }
            Some(Value::Array(items)) => {
                if !service.multi.allows("create") {
                    return Err(Error::method_not_allowed("Can not create multiple entries"));
                }
                let rows = items
                    .into_iter()
                    .map(|item| match item {
                        Value::Object(row) => check_columns(service, &row, false).map(|()| row),
                        _ => Err(Error::bad_request("every item to create must be an object")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Value::Array(self.store.insert(&service.table, &rows).await?))
            }
            _ => Err(Error::bad_request(
                "create needs an object or an array of objects as data",
            )),
        }
    }

    async fn write_one(
        &self,
        service: &Service,
        query: &Query,
        id: &str,
        data: &Map<String, Value>,
        mode: WriteMode,
    ) -> Result<Value> {
        if data.is_empty() && mode == WriteMode::Patch {
            return self.get_one(service, query, id).await;
        }
        let target = Target {
            id: Some(id),
            filter: &query.filter,
        };
        let mut rows = self.store.update(&service.table, target, data, mode).await?;
        rows.pop().ok_or_else(|| no_record(id))
    }
}

/// Applies `$select` (the id is always kept, as in Feathers) and strips hidden fields.
fn present(service: &Service, result: &mut Value, select: Option<&[String]>) {
    let id = &service.table.id().name;
    let one = |row: &mut Value| {
        if let (Some(select), Value::Object(fields)) = (select, &mut *row) {
            fields.retain(|k, _| k == id || select.iter().any(|s| s == k));
        }
        service.strip(row);
    };
    match result {
        Value::Array(rows) => rows.iter_mut().for_each(one),
        Value::Object(page) if page.contains_key("total") && page.contains_key("data") => {
            if let Some(Value::Array(rows)) = page.get_mut("data") {
                rows.iter_mut().for_each(one);
            }
        }
        row => one(row),
    }
}

fn no_record(id: &str) -> Error {
    Error::not_found(format!("No record found for id '{id}'"))
}

/// The id as text for `CAST($n AS <id type>)`. An id that cannot be of the key's type names
/// no row, so it is a 404, as in Feathers' SQL adapters.
fn id_text(id: &Value, table: &Table) -> Result<String> {
    let text = match id {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(Error::bad_request("id must be a string or a number")),
    };
    let fits = match table.id().key_kind {
        KeyKind::Integer => text.trim().parse::<i64>().is_ok(),
        KeyKind::Uuid => is_uuid(&text),
        KeyKind::Other => true,
    };
    if fits { Ok(text) } else { Err(no_record(&text)) }
}

fn is_uuid(s: &str) -> bool {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// The data of an update or patch: an object of known, writable columns, without the id
/// (Feathers never changes a row's id through update or patch).
fn write_data(service: &Service, data: Option<Value>, method: &str) -> Result<Map<String, Value>> {
    let Some(Value::Object(mut row)) = data else {
        return Err(Error::bad_request(format!("{method} needs an object as data")));
    };
    row.remove(&service.table.id().name);
    check_columns(service, &row, true)?;
    Ok(row)
}

fn check_columns(service: &Service, row: &Map<String, Value>, id_removed: bool) -> Result<()> {
    for key in row.keys() {
        match service.table.column(key) {
            None => {
                return Err(
                    Error::bad_request(format!("'{key}' is not a column of '{}'", service.name))
                        .with_field(key, "no such column"),
                );
            }
            Some(c) if c.read_only && !(id_removed && c.name == service.table.id().name) => {
                return Err(Error::bad_request(format!("'{key}' cannot be written")).with_field(key, "read-only"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
