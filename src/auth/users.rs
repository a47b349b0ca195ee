//! Where the users are, as authentication needs them: found by username or id, named by
//! their id, shown to a reader. The users service implements it (`service::users`), so
//! `auth` knows nothing of services, queries or SQL.

use futures::future::BoxFuture;
use serde_json::Value;

use super::Principal;
use crate::error::Result;

pub trait Users: Send + Sync {
    /// The name of the service whose rows are the users.
    fn service(&self) -> &str;

    fn has_column(&self, column: &str) -> bool;

    /// The row whose `column` equals `value`, every column included (the password too).
    fn find_by<'a>(&'a self, column: &'a str, value: &'a str) -> BoxFuture<'a, Result<Option<Value>>>;

    /// The row with this id, if there is one.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Value>>>;

    /// A row's id, as text.
    fn id_of(&self, row: &Value) -> Option<String>;

    /// Removes from a users row what `reader` may not see.
    fn present(&self, reader: &Principal, row: &mut Value);
}
