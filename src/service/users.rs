//! The users service as authentication sees it ([`crate::auth::Users`]).

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use super::query::{CompareOp, Condition, Query};
use super::{Service, fits_key};
use crate::auth::{Principal, Users, id_text};
use crate::error::Result;
use crate::store::Store;

pub(super) struct UsersTable {
    service: Arc<Service>,
    store: Store,
}

impl UsersTable {
    pub(super) fn new(service: Arc<Service>, store: Store) -> Self {
        Self { service, store }
    }
}

impl Users for UsersTable {
    fn service(&self) -> &str {
        &self.service.name
    }

    fn has_column(&self, column: &str) -> bool {
        self.service.table().column(column).is_some()
    }

    fn find_by<'a>(&'a self, column: &'a str, value: &'a str) -> BoxFuture<'a, Result<Option<Value>>> {
        async move {
            let query = Query {
                filter: vec![Condition::Compare {
                    column: column.to_owned(),
                    op: CompareOp::Eq,
                    value: value.to_owned(),
                }],
                ..Query::default()
            };
            Ok(self
                .store
                .select(&self.service.table(), &query, None, Some(1))
                .await?
                .pop())
        }
        .boxed()
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Value>>> {
        async move {
            let table = self.service.table();
            // An id that cannot be of the key's type names nobody.
            if !fits_key(table.id().key_kind, id) {
                return Ok(None);
            }
            Ok(self
                .store
                .select(&table, &Query::default(), Some(id), None)
                .await?
                .pop())
        }
        .boxed()
    }

    fn id_of(&self, row: &Value) -> Option<String> {
        id_text(row, &self.service.table().id().name)
    }

    fn present(&self, reader: &Principal, row: &mut Value) {
        self.service.strip_for(Some(reader), row);
    }
}
