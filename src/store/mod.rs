//! The only module that talks SQL to the data tables: runs [`sql`] statements over a pool
//! and turns database errors into Feathers errors that never carry SQL text.

mod capture;
mod catalog;
mod connections;
mod sql;

use serde_json::{Map, Value};
use sqlx::Arguments;
use sqlx::postgres::{PgArguments, PgDatabaseError};
use sqlx::query::{QueryAs, QueryScalar};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres};

pub use capture::{CaptureError, install_capture};
pub use catalog::{CatalogError, Column, KeyKind, Table};
pub use sql::{Target, WriteMode};

use crate::error::{Error, ErrorKind, Result};
use crate::service::query::{Condition, Query};
use connections::Connections;
use sql::{Bind, Statement};

/// Reads and writes service tables.
#[derive(Clone)]
pub struct Store {
    /// quill's own work: snapshots, capture installs, readiness.
    pool: PgPool,
    /// Service calls: as many connections as `pool`, with the same options.
    calls: Connections,
}

impl Store {
    pub fn new(pool: PgPool) -> std::result::Result<Self, sqlx::Error> {
        let size = pool.options().get_max_connections() as usize;
        let calls = Connections::new((*pool.connect_options()).clone(), size)?;
        Ok(Self { pool, calls })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One round trip on a connection of the pool service calls use (for readiness).
    pub async fn ping(&self) -> std::result::Result<(), sqlx::Error> {
        let mut call = self.calls.get().await?;
        let outcome = sqlx::query("SELECT 1").execute(call.conn()).await.map(drop);
        call.release(&outcome);
        outcome
    }

    pub async fn select(
        &self,
        table: &Table,
        query: &Query,
        id: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Vec<Value>> {
        let st = sql::select(table, query, id, limit);
        let query = rows(&st)?;
        let mut call = self.calls.get().await.map_err(db_error)?;
        let outcome = query.fetch_all(call.conn()).await;
        call.release(&outcome);
        outcome.map(unwrap_rows).map_err(db_error)
    }

    pub async fn count(&self, table: &Table, filter: &[Condition]) -> Result<i64> {
        let st = sql::count(table, filter);
        let args = arguments(&st.binds).map_err(db_error)?;
        let query = sqlx::query_scalar_with::<_, i64, _>(AssertSqlSafe(st.sql), args);
        let mut call = self.calls.get().await.map_err(db_error)?;
        let outcome = query.fetch_one(call.conn()).await;
        call.release(&outcome);
        outcome.map_err(db_error)
    }

    /// Inserts rows; several rows go in one transaction, so either all or none are written.
    pub async fn insert(&self, table: &Table, items: &[Map<String, Value>]) -> Result<Written> {
        let statements = items
            .iter()
            .map(|item| written(&sql::insert(table, item)))
            .collect::<Result<Vec<_>>>()?;
        let mut call = self.calls.get().await.map_err(db_error)?;
        let outcome = match <[_; 1]>::try_from(statements) {
            // One statement is atomic by itself: no BEGIN and COMMIT round trips.
            Ok([insert]) => insert.fetch_one(call.conn()).await.map(|row| vec![row]),
            Err(statements) => insert_all(call.conn(), statements).await,
        };
        call.release(&outcome);
        outcome.map(Written::from).map_err(db_error)
    }

    pub async fn update(
        &self,
        table: &Table,
        target: Target<'_>,
        row: &Map<String, Value>,
        mode: WriteMode<'_>,
    ) -> Result<Written> {
        let st = sql::update(table, target, row, mode);
        self.write(written(&st)?).await
    }

    pub async fn delete(&self, table: &Table, target: Target<'_>) -> Result<Written> {
        let st = sql::delete(table, target);
        self.write(written(&st)?).await
    }

    /// Runs one write statement on a call connection.
    async fn write(&self, statement: WriteQuery) -> Result<Written> {
        let mut call = self.calls.get().await.map_err(db_error)?;
        let outcome = statement.fetch_all(call.conn()).await;
        call.release(&outcome);
        outcome.map(Written::from).map_err(db_error)
    }
}

/// Several inserts in one transaction, so either all or none are written.
async fn insert_all(
    conn: &mut PgConnection,
    statements: Vec<WriteQuery>,
) -> std::result::Result<Vec<(Json<Value>, String)>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let mut out = Vec::with_capacity(statements.len());
    for insert in statements {
        match insert.fetch_one(&mut *tx).await {
            Ok(row) => out.push(row),
            Err(e) => {
                // Rolled back now, not when the connection is next used: a pooled
                // connection must not hold a transaction (and its locks) meanwhile.
                tx.rollback().await?;
                return Err(e);
            }
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// The rows a write returned, and the id of the transaction that wrote them (`None` when
/// it wrote no row): a client may wait until that transaction reaches its subscriptions.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub rows: Vec<Value>,
    pub txid: Option<u64>,
}

impl From<Vec<(Json<Value>, String)>> for Written {
    fn from(rows: Vec<(Json<Value>, String)>) -> Self {
        let txid = rows.first().and_then(|(_, txid)| txid.parse().ok());
        Self {
            rows: rows.into_iter().map(|(row, _)| row.0).collect(),
            txid,
        }
    }
}

/// A write statement (ending in `RETURNING row_to_json(t)`) that also returns its
/// transaction's id.
type WriteQuery = QueryAs<'static, Postgres, (Json<Value>, String), PgArguments>;

/// `st` as a [`WriteQuery`].
fn written(st: &Statement) -> Result<WriteQuery> {
    let sql = format!("{}, pg_current_xact_id()::text", st.sql);
    let args = arguments(&st.binds).map_err(db_error)?;
    Ok(sqlx::query_as_with(AssertSqlSafe(sql), args))
}

/// The cursor a snapshot reads through (one per transaction).
const SCAN_CURSOR: &str = "quill_scan";

/// Opens a cursor over every row matching `filter`, in id order, in the transaction on
/// `conn`: [`scan_page`] then reads it page by page, so a table of any size is read in
/// bounded memory, all in the transaction's snapshot.
pub async fn open_scan(conn: &mut PgConnection, table: &Table, filter: &[Condition]) -> Result<()> {
    let query = Query {
        filter: filter.to_vec(),
        ..Query::default()
    };
    let mut st = sql::select(table, &query, None, None);
    st.sql = format!("DECLARE {SCAN_CURSOR} NO SCROLL CURSOR FOR {}", st.sql);
    rows(&st)?.fetch_all(&mut *conn).await.map_err(db_error)?;
    Ok(())
}

/// The next `size` rows of the cursor [`open_scan`] opened; fewer (or none) at the end.
pub async fn scan_page(conn: &mut PgConnection, size: u32) -> Result<Vec<Value>> {
    let sql = format!("FETCH {size} FROM {SCAN_CURSOR}");
    sqlx::query_scalar::<_, Json<Value>>(AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map(unwrap_rows)
        .map_err(db_error)
}

fn rows(st: &Statement) -> Result<QueryScalar<'static, Postgres, Json<Value>, PgArguments>> {
    let args = arguments(&st.binds).map_err(db_error)?;
    Ok(sqlx::query_scalar_with(AssertSqlSafe(st.sql.clone()), args))
}

/// A statement's values, encoded once, for any of the query shapes above.
fn arguments(binds: &[Bind]) -> std::result::Result<PgArguments, sqlx::Error> {
    let mut args = PgArguments::default();
    for b in binds {
        match b {
            Bind::Text(s) => args.add(s.as_str()),
            Bind::TextArray(items) => args.add(items.as_slice()),
            Bind::Json(v) => args.add(Json(v)),
            Bind::Int(n) => args.add(*n),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

fn unwrap_rows(rows: Vec<Json<Value>>) -> Vec<Value> {
    rows.into_iter().map(|r| r.0).collect()
}

/// The SELECT a `find` runs: its text and how many values it binds. For fuzzers and
/// tests: the builder must never panic, and values never go into the text.
pub fn find_sql(table: &Table, query: &Query, limit: Option<i64>) -> (String, usize) {
    let st = sql::select(table, query, None, limit);
    (st.sql, st.binds.len())
}

/// Maps a database error to what the client may know: constraint and type errors are the
/// client's (400, naming the column), lost connections are 503, the rest is logged and a 500.
pub(crate) fn db_error(err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::Database(db) => {
            let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() else {
                return general(&err);
            };
            let code = pg.code();
            let column = pg.column().map(str::to_owned).or_else(|| key_column(pg.detail()));
            match code {
                "23505" => field_error(column, "already exists", "a row with this value already exists"),
                "23502" => field_error(column, "must not be null", "a required value is missing"),
                "23503" => field_error(
                    column,
                    "refers to a row that does not exist",
                    "a referenced row does not exist",
                ),
                "23514" => {
                    let constraint = pg.constraint().unwrap_or("check");
                    Error::bad_request(format!("value violates the check constraint '{constraint}'"))
                }
                "23P01" => Error::bad_request("value conflicts with an existing row"),
                c if c.starts_with("22") => Error::bad_request(format!("invalid value: {}", pg.message())),
                // undefined column or table: changed under a running quill
                "42703" | "42P01" => Error {
                    schema_changed: true,
                    ..Error::unavailable("the table changed while quill was running; try again shortly")
                },
                // insufficient privilege on the table
                "42501" => Error::new(ErrorKind::Forbidden, "the database refused this operation"),
                c if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                    Error::unavailable("the database is unavailable, try again shortly")
                }
                _ => general(&err),
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            Error::unavailable("the database is unavailable, try again shortly")
        }
        _ => general(&err),
    }
}

/// A constraint error: the message names no column (the service decides whether the
/// caller may know it: see `errors`, which the service layer filters).
fn field_error(column: Option<String>, what: &str, generic: &str) -> Error {
    match column {
        Some(c) => Error::bad_request(generic).with_field(&c, what),
        None => Error::bad_request(generic),
    }
}

/// The column list of `Key (email)=(...) already exists.`, without the value.
fn key_column(detail: Option<&str>) -> Option<String> {
    let rest = detail?.strip_prefix("Key (")?;
    let end = rest.find(")=")?;
    Some(rest[..end].to_owned())
}

fn general(err: &sqlx::Error) -> Error {
    tracing::error!(error = %err, "database error");
    Error::general("internal error")
}

#[cfg(test)]
mod tests {
    use super::key_column;

    #[test]
    fn key_column_names_the_column_without_the_value() {
        assert_eq!(
            key_column(Some("Key (email)=(a@b.c) already exists.")),
            Some("email".into())
        );
        assert_eq!(key_column(Some("something else")), None);
    }
}
