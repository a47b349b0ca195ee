//! One service as configured: its table, Feathers options, access rules, stamps, write
//! roles and delivery policy, checked against the catalog at start-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;

use super::Method;
use super::access::{Grant, MethodAccess, Rule};
use crate::auth::Principal;
use crate::channel::{EventFilter, Policy, Publisher, TemplatePublisher, Visibility};
use crate::config::{Access, Multi, ServiceConfig};
use crate::error::{Error, ErrorKind};
use crate::service::query::{CompareOp, Condition, Query};
use crate::store::{Column, Table};

/// What the server writes into a stamped column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// The caller's id.
    UserId,
    /// The caller's role.
    UserRole,
}

/// One configured service.
pub struct Service {
    pub name: Arc<str>,
    /// Reloaded when the table's shape changes under a running quill.
    table: RwLock<Arc<Table>>,
    pub(super) multi: Multi,
    pub(super) paginate: Option<(u32, u32)>,
    hidden: Vec<String>,
    access: HashMap<&'static str, MethodAccess>,
    pub(super) stamps: Vec<(String, Stamp)>,
    pub(super) write_roles: Vec<(String, Vec<String>)>,
    /// Who receives this service's events and what they see.
    pub policy: Policy,
    /// On the users service: the password column, hashed on every write.
    pub(super) password_field: Option<String>,
    /// Why the table, read anew, no longer fits the configuration (`None` while it fits).
    misfit: Mutex<Option<String>>,
    /// Clients may choose ids (and other identity or serial values) on create.
    pub(super) client_ids: bool,
    /// A multi patch or remove may go without a query.
    pub(super) multi_all_rows: bool,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

const METHODS: [(&str, Method); 6] = [
    ("find", Method::Find),
    ("get", Method::Get),
    ("create", Method::Create),
    ("update", Method::Update),
    ("patch", Method::Patch),
    ("remove", Method::Remove),
];

/// What Rust code embedding quill adds to a service (see `gateway::Extensions`).
#[derive(Default, Clone)]
pub struct ServiceExtensions {
    pub publisher: Option<Arc<dyn Publisher>>,
    pub filters: Vec<Arc<dyn EventFilter>>,
}

impl Service {
    /// Builds a service from its config; every column the config names must exist.
    pub fn build(
        name: &str,
        config: &ServiceConfig,
        table: Table,
        password_field: Option<String>,
        extensions: ServiceExtensions,
    ) -> Result<Service, String> {
        let column = |c: &str, what: &str| {
            if table.column(c).is_some() {
                Ok(())
            } else {
                Err(format!(
                    "service '{name}': {what} names column '{c}', which {}.{} does not have",
                    table.schema, table.name
                ))
            }
        };
        let mut hidden = config.hidden.clone();
        if let Some(field) = &password_field
            && !hidden.contains(field)
        {
            hidden.push(field.clone());
        }
        let mut access = HashMap::new();
        for (method_name, method) in METHODS {
            let rules = match &config.access {
                Some(Access::All(rules)) => Some(rules.list()),
                Some(Access::PerMethod(per)) => match method {
                    Method::Find => per.find.as_ref(),
                    Method::Get => per.get.as_ref(),
                    Method::Create => per.create.as_ref(),
                    Method::Update => per.update.as_ref(),
                    Method::Patch => per.patch.as_ref(),
                    Method::Remove => per.remove.as_ref(),
                }
                .map(|r| r.list()),
                None => None,
            };
            let rules = match rules {
                Some(rules) => rules.iter().map(|r| Rule::parse(r)).collect::<Result<Vec<_>, _>>()?,
                // Safe defaults: sign-up is public on the users service, the rest needs a login.
                None if method == Method::Create && password_field.is_some() => vec![Rule::Public],
                None => vec![Rule::Authenticated],
            };
            for rule in &rules {
                if let Rule::Owner(c) = rule {
                    column(c, "an owner: rule")?;
                }
            }
            access.insert(method_name, MethodAccess(rules));
        }
        // Nothing but the client can set an id without a default.
        let client_ids = config.client_ids.unwrap_or(!table.id().has_default);
        let mut stamps = Vec::new();
        for (c, source) in &config.stamp {
            column(c, "stamp")?;
            let stamp = match source.as_str() {
                "id" => Stamp::UserId,
                "role" => Stamp::UserRole,
                other => {
                    return Err(format!(
                        "service '{name}': stamp '{c}' must be \"id\" or \"role\", not '{other}'"
                    ));
                }
            };
            stamps.push((c.clone(), stamp));
        }
        for c in config.write_roles.keys() {
            column(c, "write_roles")?;
        }
        let mut restricted = Vec::new();
        for (c, rules) in &config.visible_to {
            column(c, "visible_to")?;
            let rules = rules.iter().map(|r| Rule::parse(r)).collect::<Result<Vec<_>, _>>()?;
            restricted.push((c.clone(), rules));
        }
        let templates = config
            .publish
            .clone()
            .unwrap_or_else(|| vec![crate::channel::AUTHENTICATED.to_owned()]);
        let template = TemplatePublisher::parse(&templates).map_err(|e| format!("service '{name}': {e}"))?;
        for field in template.fields() {
            column(field, "a publish template")?;
        }
        let publisher: Arc<dyn Publisher> = match extensions.publisher {
            Some(custom) => custom,
            None => Arc::new(template),
        };
        Ok(Service {
            name: Arc::from(name),
            table: RwLock::new(Arc::new(table)),
            multi: config.multi.clone(),
            paginate: config.paginate.sizes(),
            hidden,
            access,
            stamps,
            write_roles: config.write_roles.iter().map(|(c, r)| (c.clone(), r.clone())).collect(),
            policy: Policy {
                id_column: Arc::from(config.id.as_str()),
                publisher,
                filters: extensions.filters,
                visibility: Visibility::new(restricted).map_err(|e| format!("service '{name}': {e}"))?,
            },
            password_field,
            misfit: Mutex::new(None),
            client_ids,
            multi_all_rows: config.multi_all_rows,
        })
    }

    /// Removes hidden fields. Every row that leaves quill, in a response or an event,
    /// passes through here.
    /// The table as quill last read it from the catalog.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The columns its configuration names (they must stay in the table).
    pub(crate) fn configured_columns(&self) -> Vec<String> {
        let mut columns = self.hidden.clone();
        columns.extend(self.stamps.iter().map(|(c, _)| c.clone()));
        columns.extend(self.write_roles.iter().map(|(c, _)| c.clone()));
        columns
    }

    /// Takes a table read anew from the catalog (same schema, name and configured columns).
    pub(crate) fn replace_table(&self, table: Table) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    /// What a client may not write itself: the id and server-generated columns (unless
    /// the service takes client ids), and hidden columns other than the password.
    pub(super) fn client_may_not_write(&self, column: &Column) -> Option<&'static str> {
        if column.read_only {
            return Some("read-only");
        }
        let table = self.table();
        if !self.client_ids && (column.name == table.id().name || column.server_generated) {
            return Some("set by the server");
        }
        None
    }

    /// A hidden column other than the password: clients neither write it nor learn its name.
    pub(super) fn is_hidden_from_writers(&self, column: &str) -> bool {
        self.is_hidden(column) && self.password_field.as_deref() != Some(column)
    }

    /// The columns a `PUT` keeps as they are when it does not name them: what clients
    /// do not write (server-generated, hidden), stamps, and `write_roles` columns the
    /// caller may not write. Everything else goes back to its default, as in Feathers.
    pub(super) fn kept_on_replace(&self, caller: Option<&Principal>) -> Vec<String> {
        let table = self.table();
        let mut kept: Vec<String> = table
            .columns
            .iter()
            .filter(|c| c.server_generated || self.is_hidden(&c.name))
            .map(|c| c.name.clone())
            .collect();
        kept.extend(self.stamps.iter().map(|(c, _)| c.clone()));
        for (column, roles) in &self.write_roles {
            if !caller.is_some_and(|c| roles.iter().any(|r| c.has_role(r))) {
                kept.push(column.clone());
            }
        }
        kept
    }

    /// An error as the caller may see it: a constraint error never names a hidden column.
    pub(super) fn conceal(&self, mut error: Error) -> Error {
        if let Some(errors) = &mut error.errors {
            // A column the client itself named and was told does not exist stays: hidden
            // ones answer exactly as unknown ones.
            errors.retain(|field, why| !self.is_hidden(field) || why == "no such column");
            if errors.is_empty() {
                error.errors = None;
            }
        }
        error
    }

    /// The columns a client can read: every column but the hidden ones, each with whether
    /// every reader sees it (`visible_to` columns are stripped for some).
    pub fn readable_columns(&self) -> Vec<(Column, bool)> {
        let table = self.table();
        table
            .columns
            .iter()
            .filter(|c| !self.is_hidden(&c.name))
            .map(|c| (c.clone(), self.policy.visibility.sees_everywhere(None, &c.name)))
            .collect()
    }

    /// The columns a client may send on create (stamps are set by the server; `write_roles`
    /// columns are listed, only some roles may send them).
    pub fn writable_columns(&self) -> Vec<Column> {
        let table = self.table();
        table
            .columns
            .iter()
            .filter(|c| self.client_may_not_write(c).is_none() && !self.is_hidden_from_writers(&c.name))
            .filter(|c| !self.stamps.iter().any(|(s, _)| *s == c.name))
            .cloned()
            .collect()
    }

    /// The roles that may write `column`, if only some may.
    pub fn write_roles_of(&self, column: &str) -> Option<&[String]> {
        self.write_roles
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, r)| r.as_slice())
    }

    /// `find`'s page sizes (default, max), or `None` when it answers plain arrays.
    pub fn page_sizes(&self) -> Option<(u32, u32)> {
        self.paginate
    }

    /// Whether `method` (`create`, `patch`, `remove`) may work on many rows at once.
    pub fn allows_multi(&self, method: &str) -> bool {
        self.multi.allows(method)
    }

    /// Whether anyone, logged in or not, may call `method`.
    pub fn is_public(&self, method: Method) -> bool {
        self.access(method).0.contains(&Rule::Public)
    }

    /// Whether nobody may call `method`.
    pub fn is_disabled(&self, method: Method) -> bool {
        self.access(method).0.iter().all(|r| *r == Rule::Nobody)
    }

    /// Records whether the table, read anew, fits the configuration; true when that
    /// changed (or the reason did), so it is reported once, not at every check.
    pub(crate) fn set_misfit(&self, reason: Option<String>) -> bool {
        let mut misfit = self.misfit.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *misfit != reason;
        *misfit = reason;
        changed
    }

    /// The table no longer fits the configuration: rows that do not fit the catalog need
    /// not ask for it to be read again (the periodic check and the DDL trigger do).
    pub(crate) fn is_misfit(&self) -> bool {
        self.misfit.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Removes hidden fields and every field the catalog does not know: a column added
    /// while quill runs is never sent before quill has read it (and knows whether it is
    /// hidden or restricted).
    pub fn strip(&self, row: &mut Value) {
        if let Value::Object(fields) = row {
            let table = self.table();
            fields.retain(|name, _| table.column(name).is_some() && !self.is_hidden(name));
        }
    }

    /// Everything a caller may not see: hidden fields, then fields restricted by `visible_to`.
    pub fn strip_for(&self, caller: Option<&Principal>, row: &mut Value) {
        self.strip(row);
        self.policy.visibility.strip_for(caller, row);
    }

    pub fn is_hidden(&self, column: &str) -> bool {
        self.hidden.iter().any(|h| h == column)
    }

    /// Refuses filters and sorts on fields the caller cannot see in every row: hidden
    /// ones (`password[$lt]=…` would let a client bisect a hash) and `visible_to` ones it
    /// does not see everywhere. (`$select` of such a field is allowed and stripped.) The
    /// error does not name the field.
    pub fn check_queryable(&self, query: &Query, caller: Option<&Principal>) -> Result<(), Error> {
        let visibility = &self.policy.visibility;
        for column in query.filter_columns() {
            // A hidden column answers as one that does not exist.
            if self.is_hidden(column) {
                return Err(
                    Error::bad_request(format!("Invalid query parameter '{column}': no such column"))
                        .with_field(column, "no such column"),
                );
            }
            if !visibility.sees_everywhere(caller, column) {
                return Err(Error::bad_request("a field you cannot see cannot be queried"));
            }
        }
        Ok(())
    }

    /// Whether the caller may read the rows a snapshot with this query holds (its `find`
    /// rules); which rows it gets is then up to its channels. A caller who may find only
    /// its own rows must pin the query to them (`owner column = its id`).
    pub fn check_readable(&self, caller: Option<&Principal>, query: Option<&Query>) -> Result<(), Error> {
        let Grant::Own(columns) = self.access(Method::Find).check(caller)? else {
            return Ok(());
        };
        let pinned = |c: &Principal| {
            query.is_some_and(|q| {
                q.filter.iter().any(|condition| {
                    matches!(condition, Condition::Compare { column, op: CompareOp::Eq, value }
                        if columns.contains(column) && *value == c.id)
                })
            })
        };
        if caller.is_some_and(pinned) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Forbidden,
            format!(
                "you may find only your own rows: add {} = your id to the query",
                columns.join(" or ")
            ),
        ))
    }

    pub(super) fn access(&self, method: Method) -> &MethodAccess {
        let name = METHODS.iter().find(|(_, m)| *m == method).map_or("find", |(n, _)| n);
        // Every method is inserted by `build`.
        &self.access[name]
    }
}
