//! Services: Feathers method semantics (find, get, create, update, patch, remove) over the
//! store, independent of any transport. REST, `/ws` and tests all call [`Services::call`].

pub mod access;
mod definition;
pub mod matching;
pub mod query;
mod users;
pub mod watch;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use sqlx::PgPool;

use std::net::IpAddr;

pub use definition::{Service, ServiceExtensions, Stamp};

use crate::auth::{AuthSetupError, Authenticated, Authenticator, Principal, password};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::store::{CaptureError, CatalogError, KeyKind, Store, Table, Target, WriteMode, Written, install_capture};
use access::Grant;
use query::{CompareOp, Condition, Query};
use users::UsersTable;

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
    /// `params.user`: who is calling, if anyone.
    pub caller: Option<Arc<Principal>>,
    /// The client's address (behind trusted proxies, the one they report), if known.
    pub address: Option<IpAddr>,
}

/// Why the services could not be set up at start-up.
/// What a call answers: its result, and for a write the id of the transaction that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub result: Value,
    pub txid: Option<u64>,
}

impl From<Value> for Outcome {
    fn from(result: Value) -> Self {
        Self { result, txid: None }
    }
}

impl From<Written> for Outcome {
    /// Many rows: the array of them.
    fn from(written: Written) -> Self {
        Self {
            result: Value::Array(written.rows),
            txid: written.txid,
        }
    }
}

/// The one row a single-row write returned (the last, if several), with its txid.
fn one(mut written: Written) -> Option<Outcome> {
    let row = written.rows.pop()?;
    Some(Outcome {
        result: row,
        txid: written.txid,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error("{0}")]
    Config(String),
    #[error("cannot set up the connection pool for service calls")]
    Pool(#[source] sqlx::Error),
    #[error("authentication needs a JWT secret: set QUILL_JWT_SECRET or authentication.jwt_secret")]
    NoSecret,
    #[error("the JWT secret is {0} bytes; it must be at least 32 (e.g. `openssl rand -hex 32`)")]
    ShortSecret(usize),
}

/// The shortest JWT secret accepted.
const MIN_SECRET_BYTES: usize = 32;

/// All services, by name and by table, and the authenticator.
pub struct Services {
    store: Store,
    by_name: HashMap<String, Arc<Service>>,
    by_table: HashMap<(String, String), Vec<Arc<Service>>>,
    auth: Option<Authenticator>,
    /// Poked when a table may have changed shape (see [`watch`]).
    schema_changed: Arc<tokio::sync::Notify>,
    /// The most rows an unpaginated `find` returns.
    max_find_rows: i64,
}

impl Services {
    /// Reads every configured table from the catalog, checks the config against it and
    /// installs capture.
    pub async fn build(
        pool: PgPool,
        config: &Config,
        mut extensions: HashMap<String, ServiceExtensions>,
    ) -> Result<Services, SetupError> {
        let auth_config = config.authentication.as_ref();
        if let Some(auth) = auth_config
            && !config.services.contains_key(&auth.service)
        {
            return Err(AuthSetupError::NoService(auth.service.clone()).into());
        }
        let mut by_name = HashMap::new();
        let mut by_table: HashMap<(String, String), Vec<Arc<Service>>> = HashMap::new();
        for (name, sc) in &config.services {
            let (schema, table_name) = sc.table_name(name);
            let table = Table::load(&pool, name, &schema, &table_name, &sc.id, &sc.hidden).await?;
            let password_field = auth_config
                .filter(|a| &a.service == name)
                .map(|a| a.password_field.clone());
            let ext = extensions.remove(name).unwrap_or_default();
            let service = Service::build(name, sc, table, password_field, ext).map_err(SetupError::Config)?;
            install_capture(&pool, &service.table()).await?;
            let service = Arc::new(service);
            by_table.entry((schema, table_name)).or_default().push(service.clone());
            by_name.insert(name.clone(), service);
        }
        // Capture pairs a table's old and new rows by one id column.
        for ((schema, table), services) in &by_table {
            if let [first, rest @ ..] = services.as_slice()
                && let Some(other) = rest.iter().find(|s| s.table().id().name != first.table().id().name)
            {
                return Err(SetupError::Config(format!(
                    "services '{}' and '{}' serve {schema}.{table} with different ids ('{}', '{}'): one table has one id",
                    first.name,
                    other.name,
                    first.table().id().name,
                    other.table().id().name
                )));
            }
        }
        if let Some(unknown) = extensions.keys().next() {
            return Err(SetupError::Config(format!(
                "extensions name service '{unknown}', which is not configured"
            )));
        }
        let store = Store::new(pool).map_err(SetupError::Pool)?;
        let auth = match auth_config {
            None => None,
            Some(auth) => {
                let secret = auth
                    .jwt_secret
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .ok_or(SetupError::NoSecret)?;
                // HS256 with a short secret can be brute-forced offline from one token.
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(SetupError::ShortSecret(secret.len()));
                }
                let entity = by_name
                    .get(&auth.service)
                    .cloned()
                    .ok_or_else(|| AuthSetupError::NoService(auth.service.clone()))?;
                let users = Arc::new(UsersTable::new(entity, store.clone()));
                Some(Authenticator::new(auth, secret, users)?)
            }
        };
        Ok(Services {
            store,
            by_name,
            by_table,
            auth,
            schema_changed: Arc::default(),
            max_find_rows: i64::try_from(config.limits.max_find_rows).unwrap_or(i64::MAX),
        })
    }

    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// Whether service calls can reach the database now.
    pub async fn ping_database(&self) -> Result<(), sqlx::Error> {
        self.store.ping().await
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Service>> {
        self.by_name.get(name)
    }

    /// Every service, by name.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Service>> {
        let mut services: Vec<&Arc<Service>> = self.by_name.values().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        services.into_iter()
    }

    /// The authenticator, if authentication is configured.
    pub fn auth(&self) -> Option<&Authenticator> {
        self.auth.as_ref()
    }

    /// `create` on `authentication`.
    pub async fn authenticate(&self, data: &Value, address: Option<IpAddr>) -> Result<Authenticated> {
        match &self.auth {
            Some(auth) => auth.login(data, address).await,
            None => Err(Error::not_found("Service 'authentication' not found")),
        }
    }

    /// The caller a bearer token stands for.
    pub async fn principal(&self, token: &str) -> Result<Principal> {
        match &self.auth {
            Some(auth) => auth.principal(token).await,
            None => Err(Error::new(
                ErrorKind::NotAuthenticated,
                "authentication is not configured",
            )),
        }
    }

    /// The services that serve a table (usually one).
    pub fn for_table(&self, schema: &str, table: &str) -> &[Arc<Service>] {
        self.by_table
            .get(&(schema.to_owned(), table.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Runs one method call: access rules, then Feathers semantics, then what the caller
    /// may see of the result.
    pub async fn call(&self, call: ServiceCall) -> Result<Outcome> {
        match self.call_once(call.clone()).await {
            // The table changed under us: read it again and try once more.
            Err(e) if e.schema_changed => {
                if let Some(service) = self.by_name.get(&call.service) {
                    self.refresh(service).await;
                }
                self.call_once(call).await
            }
            outcome => outcome,
        }
    }

    /// What wakes the schema watch: the listener pokes it on a DDL notification.
    pub fn schema_changed(&self) -> Arc<tokio::sync::Notify> {
        self.schema_changed.clone()
    }

    /// A logged row whose columns are not the catalog's means the table changed: have it
    /// read again (the row is stripped to the known columns meanwhile).
    pub fn check_row_shape(&self, service: &Service, row: &Value) {
        if !service.is_misfit() && !service.table().fits(row) {
            self.schema_changed.notify_one();
        }
    }

    /// Reads every service's table from the catalog again (see [`Services::refresh`]);
    /// returns how many no longer fit their configuration.
    pub async fn refresh_all(&self) -> usize {
        let mut misfits = 0;
        for service in self.by_name.values() {
            self.refresh(service).await;
            misfits += usize::from(service.is_misfit());
        }
        misfits
    }

    /// Reads a service's table from the catalog again. A changed table is taken (a new
    /// column is sent once it is known; a dropped one is no longer named in SQL), and capture
    /// is installed again if the table was dropped and created anew. A table that no longer
    /// has a configured column keeps its last catalog (its calls fail with 503) and the
    /// error says what to fix.
    pub async fn refresh(&self, service: &Service) {
        let current = service.table();
        let loaded = Table::load(
            self.pool(),
            &service.name,
            &current.schema,
            &current.name,
            &current.id().name,
            &service.configured_columns(),
        )
        .await;
        match loaded {
            Ok(table) => {
                if service.set_misfit(None) {
                    tracing::info!(service = %service.name, "the table fits the configuration again");
                }
                if let Err(e) = install_capture(self.pool(), &table).await {
                    tracing::error!(service = %service.name, error = %e, "cannot install change capture again");
                }
                if table != *current {
                    tracing::info!(service = %service.name, "the table changed; its catalog was read again");
                    service.replace_table(table);
                }
            }
            Err(CatalogError::Database(e)) => {
                tracing::warn!(service = %service.name, error = %e, "cannot read the table's catalog again");
            }
            Err(e) => {
                if service.set_misfit(Some(e.to_string())) {
                    tracing::error!(
                        service = %service.name,
                        error = %e,
                        "the table no longer fits the configuration; update the configuration and restart"
                    );
                }
            }
        }
    }

    /// A create on the users service by somebody not logged in is a sign-up: limited per
    /// client address; each account of a multi create counts.
    fn check_signup(&self, service: &Service, address: Option<IpAddr>, accounts: usize) -> Result<()> {
        let (Some(auth), Some(address)) = (&self.auth, address) else {
            return Ok(());
        };
        if auth.is_users_service(&service.name) && !(0..accounts).all(|_| auth.signup_allowed(address)) {
            return Err(Error::new(
                ErrorKind::TooManyRequests,
                "Too many sign-ups, try again later",
            ));
        }
        Ok(())
    }

    async fn call_once(&self, call: ServiceCall) -> Result<Outcome> {
        let service = self
            .by_name
            .get(&call.service)
            .ok_or_else(|| Error::not_found(format!("Service '{}' not found", call.service)))?;
        let caller = call.caller.as_deref();
        let grant = service.access(call.method).check(caller)?;
        if call.method == Method::Create && caller.is_none() {
            let accounts = match &call.data {
                Some(Value::Array(items)) => items.len().max(1),
                _ => 1,
            };
            self.check_signup(service, call.address, accounts)?;
        }
        let table = &service.table();
        let mut query = Query::parse(&call.query, table)?;
        service.check_queryable(&query, caller)?;
        let many = call.id.as_ref().is_none_or(Value::is_null);
        if many
            && matches!(call.method, Method::Patch | Method::Remove)
            && query.filter.is_empty()
            && !service.multi_all_rows
            && service.multi.allows(if call.method == Method::Patch {
                "patch"
            } else {
                "remove"
            })
        {
            return Err(Error::bad_request(
                "a multi patch or remove needs a query (set multi_all_rows = true to allow one over every row)",
            ));
        }
        if let (Grant::Own(columns), Some(caller)) = (&grant, caller) {
            query.filter.push(owner_condition(table, columns, &caller.id));
        }
        let id = match call.id {
            None | Some(Value::Null) => None,
            Some(id) => Some(id_text(&id, table)?),
        };
        let outcome = self
            .run(service, call.method, &query, id.as_deref(), call.data, caller, &grant)
            .await
            .map_err(|e| service.conceal(e));
        let mut result = match (outcome, &grant, &id) {
            // A row that exists but is not the caller's: forbidden, not missing.
            (Err(e), Grant::Own(_), Some(id)) if e.kind == ErrorKind::NotFound => {
                let exists = !self
                    .store
                    .select(table, &Query::default(), Some(id), None)
                    .await?
                    .is_empty();
                return Err(if exists {
                    Error::new(ErrorKind::Forbidden, "You are not allowed to do this")
                } else {
                    e
                });
            }
            (outcome, _, _) => outcome?,
        };
        present(service, &mut result.result, query.select.as_deref(), caller);
        Ok(result)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        service: &Service,
        method: Method,
        query: &Query,
        id: Option<&str>,
        data: Option<Value>,
        caller: Option<&Principal>,
        grant: &Grant,
    ) -> Result<Outcome> {
        let table = &service.table();
        Ok(match method {
            Method::Find => self.find(service, query).await?.into(),
            Method::Get => {
                let id = id.ok_or_else(|| Error::bad_request("get needs an id"))?;
                self.get_one(service, query, id).await?.into()
            }
            Method::Create => self.create(service, data, caller, grant).await?,
            Method::Update => {
                let id = id.ok_or_else(|| {
                    Error::bad_request("You can not replace multiple instances. Did you mean 'patch'?")
                })?;
                let data = write_data(service, data, method, caller).await?;
                let keep = service.kept_on_replace(caller);
                self.write_one(service, query, id, &data, WriteMode::Replace { keep: &keep })
                    .await?
            }
            Method::Patch => {
                let data = write_data(service, data, method, caller).await?;
                match id {
                    Some(id) => self.write_one(service, query, id, &data, WriteMode::Patch).await?,
                    None => {
                        if !service.multi.allows("patch") {
                            return Err(Error::method_not_allowed("Can not patch multiple entries"));
                        }
                        let target = Target {
                            id: None,
                            filter: &query.filter,
                        };
                        if data.is_empty() {
                            Value::Array(self.store.select(table, query, None, None).await?).into()
                        } else {
                            self.store.update(table, target, &data, WriteMode::Patch).await?.into()
                        }
                    }
                }
            }
            Method::Remove => match id {
                Some(id) => {
                    let target = Target {
                        id: Some(id),
                        filter: &query.filter,
                    };
                    one(self.store.delete(table, target).await?).ok_or_else(|| no_record(id))?
                }
                None => {
                    if !service.multi.allows("remove") {
                        return Err(Error::method_not_allowed("Can not remove multiple entries"));
                    }
                    let target = Target {
                        id: None,
                        filter: &query.filter,
                    };
                    self.store.delete(table, target).await?.into()
                }
            },
        })
    }

    async fn find(&self, service: &Service, query: &Query) -> Result<Value> {
        let table = &service.table();
        match service.paginate {
            // Unpaginated, still bounded: one call never reads a whole big table.
            None => {
                let limit = query.limit.unwrap_or(self.max_find_rows).min(self.max_find_rows);
                Ok(Value::Array(self.store.select(table, query, None, Some(limit)).await?))
            }
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
        let mut rows = self.store.select(&service.table(), query, Some(id), None).await?;
        rows.pop().ok_or_else(|| no_record(id))
    }

    async fn create(
        &self,
        service: &Service,
        data: Option<Value>,
        caller: Option<&Principal>,
        grant: &Grant,
    ) -> Result<Outcome> {
        let (items, many) = match data {
            Some(Value::Object(row)) => (vec![row], false),
            Some(Value::Array(items)) => {
                if !service.multi.allows("create") {
                    return Err(Error::method_not_allowed("Can not create multiple entries"));
                }
                let rows = items
                    .into_iter()
                    .map(|item| match item {
                        Value::Object(row) => Ok(row),
                        _ => Err(Error::bad_request("every item to create must be an object")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                (rows, true)
            }
            _ => {
                return Err(Error::bad_request(
                    "create needs an object or an array of objects as data",
                ));
            }
        };
        let mut rows = Vec::with_capacity(items.len());
        for item in items {
            let row = prepare_write(service, item, Method::Create, caller).await?;
            if let (Grant::Own(columns), Some(caller)) = (grant, caller)
                && !columns
                    .iter()
                    .any(|c| row.get(c).is_some_and(|v| access::owns(caller, &json!({c: v}), c)))
            {
                return Err(Error::new(ErrorKind::Forbidden, "You may only create rows you own"));
            }
            rows.push(row);
        }
        let created = self.store.insert(&service.table(), &rows).await?;
        if many {
            Ok(created.into())
        } else {
            one(created).ok_or_else(|| Error::general("insert returned no row"))
        }
    }

    async fn write_one(
        &self,
        service: &Service,
        query: &Query,
        id: &str,
        data: &Map<String, Value>,
        mode: WriteMode<'_>,
    ) -> Result<Outcome> {
        if data.is_empty() && mode == WriteMode::Patch {
            return self.get_one(service, query, id).await.map(Outcome::from);
        }
        let target = Target {
            id: Some(id),
            filter: &query.filter,
        };
        let written = self.store.update(&service.table(), target, data, mode).await?;
        one(written).ok_or_else(|| no_record(id))
    }
}

/// `column = caller id` for any of the owner columns that can hold the id (an external
/// user's `ext:…` id owns no row of an integer column; none at all is FALSE).
fn owner_condition(table: &Table, columns: &[String], caller_id: &str) -> Condition {
    Condition::Or(
        columns
            .iter()
            .filter(|c| table.column(c).is_some_and(|c| fits_key(c.key_kind, caller_id)))
            .map(|c| {
                vec![Condition::Compare {
                    column: c.clone(),
                    op: CompareOp::Eq,
                    value: caller_id.to_owned(),
                }]
            })
            .collect(),
    )
}

/// Applies `$select` (the id is always kept, as in Feathers) and removes everything the
/// caller may not see.
fn present(service: &Service, result: &mut Value, select: Option<&[String]>, caller: Option<&Principal>) {
    let table = service.table();
    let id = &table.id().name;
    let one = |row: &mut Value| {
        if let (Some(select), Value::Object(fields)) = (select, &mut *row) {
            fields.retain(|k, _| k == id || select.iter().any(|s| s == k));
        }
        service.strip_for(caller, row);
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
    if fits_key(table.id().key_kind, &text) {
        Ok(text)
    } else {
        Err(no_record(&text))
    }
}

/// Whether `text` can be a value of a column of this kind.
fn fits_key(kind: KeyKind, text: &str) -> bool {
    match kind {
        KeyKind::Integer => text.trim().parse::<i64>().is_ok(),
        KeyKind::Uuid => is_uuid(text),
        KeyKind::Other => true,
    }
}

fn is_uuid(s: &str) -> bool {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// The data of an update or patch: an object of known, writable columns, without the id
/// (Feathers never changes a row's id through update or patch).
async fn write_data(
    service: &Service,
    data: Option<Value>,
    method: Method,
    caller: Option<&Principal>,
) -> Result<Map<String, Value>> {
    let Some(Value::Object(mut row)) = data else {
        let name = if method == Method::Update { "update" } else { "patch" };
        return Err(Error::bad_request(format!("{name} needs an object as data")));
    };
    row.remove(&service.table().id().name);
    prepare_write(service, row, method, caller).await
}

/// Checks and completes a row to write: known writable columns, write roles, server
/// stamps, and the password hashed.
async fn prepare_write(
    service: &Service,
    mut row: Map<String, Value>,
    method: Method,
    caller: Option<&Principal>,
) -> Result<Map<String, Value>> {
    check_columns(service, &row)?;
    for (column, roles) in &service.write_roles {
        let allowed = caller.is_some_and(|c| roles.iter().any(|r| c.has_role(r)));
        if row.contains_key(column) && !allowed {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!("'{column}' can only be set by: {}", roles.join(", ")),
            )
            .with_field(column, "not allowed"));
        }
    }
    // Stamped when the row is made; an update or patch keeps the stamp (an admin who edits
    // a message does not become its author).
    for (column, stamp) in &service.stamps {
        row.remove(column);
        if method != Method::Create {
            continue;
        }
        let value = match (stamp, caller) {
            (Stamp::UserId, Some(c)) => {
                let kind = service.table().column(column).map_or(KeyKind::Other, |c| c.key_kind);
                if !fits_key(kind, &c.id) {
                    return Err(Error::bad_request(format!("'{column}' cannot hold this user's id"))
                        .with_field(column, "cannot hold this user's id"));
                }
                Some(Value::String(c.id.clone()))
            }
            (Stamp::UserRole, Some(c)) => c.role.clone().map(Value::String),
            (_, None) => None,
        };
        if let Some(value) = value {
            row.insert(column.clone(), value);
        }
    }
    if let Some(field) = &service.password_field
        && let Some(value) = row.get(field)
    {
        // Always quill's own hash with quill's parameters: a client never stores a hash
        // (its cost would be the attacker's choice) or plain text.
        let hashed = password::hash(password::accepted(value)?).await?;
        row.insert(field.clone(), Value::String(hashed));
    }
    Ok(row)
}

/// Every key must be a column the client may write.
fn check_columns(service: &Service, row: &Map<String, Value>) -> Result<()> {
    let table = service.table();
    for key in row.keys() {
        let no_such_column = || {
            Error::bad_request(format!("'{key}' is not a column of '{}'", service.name))
                .with_field(key, "no such column")
        };
        // A hidden column answers as one that does not exist: its name is not for clients.
        let Some(column) = table.column(key).filter(|c| !service.is_hidden_from_writers(&c.name)) else {
            return Err(no_such_column());
        };
        if let Some(why) = service.client_may_not_write(column) {
            return Err(Error::bad_request(format!("'{key}' cannot be written: {why}")).with_field(key, why));
        }
    }
    Ok(())
}
