//! Entry points for the fuzzers (`fuzz/`) and the property tests: each takes raw client
//! input and runs it through what a transport does with it, up to the SQL text of the
//! `find` it would run. None may panic, whatever the input; each answers with the Feathers
//! error a client would get.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::service::query::Query;
use crate::store::{Table, find_sql};
use crate::transport::CallArgs;
use crate::transport::ws::Request;

/// The demo's messages table, as the query layer sees it.
pub fn messages_table() -> Table {
    Table::described(
        "public",
        "messages",
        "id",
        &[
            ("id", "bigint"),
            ("text", "text"),
            ("user_id", "bigint"),
            ("created_at", "timestamp with time zone"),
            ("tags", "text[]"),
            ("meta", "jsonb"),
            ("done", "boolean"),
            ("score", "numeric"),
        ],
    )
    .unwrap_or_else(|| unreachable!("the id is among the columns"))
}

/// A Feathers query (`params.query`) parsed and built into the SQL of a `find`.
pub fn find(query: &Value) -> Result<(String, usize)> {
    let table = messages_table();
    let query = Query::parse(query, &table)?;
    Ok(find_sql(&table, &query, query.limit))
}

/// A `/ws` text frame: decoded, and its query (if any) built into SQL.
pub fn ws_frame(text: &str) -> Result<()> {
    let request = Request::decode(text).map_err(|refused| refused.1)?;
    if let Some(query) = request.rest.get("query") {
        find(query)?;
    }
    Ok(())
}

/// A socket.io event as its JSON array (`["find", "messages", {...}]`): decoded into a
/// call, and its query built into SQL.
pub fn socketio_event(text: &str) -> Result<()> {
    let mut items = match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(items)) if !items.is_empty() => items,
        _ => return Err(Error::bad_request("an event is a non-empty JSON array")),
    };
    let Value::String(event) = items.remove(0) else {
        return Err(Error::bad_request("an event's name is a string"));
    };
    let call = CallArgs::decode(&event, Ok(items))?;
    find(&call.query)?;
    Ok(())
}
