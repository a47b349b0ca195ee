//! An event as Supabase Realtime sends it to `postgres_changes` subscribers: the `data` of a
//! `postgres_changes` frame, rendered once per view.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::event::{ChangeRecord, EventKind, ServiceEvent};
use crate::store::Table;

/// The record of an event whose row (and old row) are already in the reader's view; `None`
/// for a truncate, which Supabase does not send.
pub(super) fn render(
    event: &ServiceEvent,
    table: &Table,
    row: &Value,
    old: Option<&Value>,
) -> Option<Arc<ChangeRecord>> {
    let (kind, record, old_record) = match event.kind {
        EventKind::Created => ("INSERT", Some(row), None),
        // The old row as with `REPLICA IDENTITY FULL`; null when the log has none.
        EventKind::Updated | EventKind::Patched => ("UPDATE", Some(row), Some(old.unwrap_or(&Value::Null))),
        // The removed row is the old record; Supabase sends no `record` for a delete.
        EventKind::Removed => ("DELETE", None, Some(row)),
        EventKind::Truncated => return None,
    };
    let shows = |name: &str| {
        [record, old_record]
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .any(|fields| fields.contains_key(name))
    };
    let columns: Vec<Value> = table
        .columns
        .iter()
        // Only the columns this reader is shown (new or old row): hidden ones are not named.
        .filter(|c| shows(&c.name))
        .map(|c| serde_json::json!({ "name": c.name, "type": c.type_name }))
        .collect();
    let mut data = serde_json::Map::new();
    data.insert("schema".into(), Value::from(table.schema.as_str()));
    data.insert("table".into(), Value::from(table.name.as_str()));
    data.insert(
        "commit_timestamp".into(),
        event.written_us.map_or(Value::Null, |us| Value::from(timestamp(us))),
    );
    data.insert("type".into(), Value::from(kind));
    data.insert("columns".into(), Value::Array(columns));
    data.insert("errors".into(), Value::Null);
    if let Some(record) = record {
        data.insert("record".into(), record.clone());
    }
    if let Some(old_record) = old_record {
        data.insert("old_record".into(), old_record.clone());
    }
    // Serializing a Value into a Vec cannot fail.
    let bytes = serde_json::to_vec(&Value::Object(data)).unwrap_or_default();
    Some(Arc::new(ChangeRecord {
        seq: event.position.seq,
        data: Bytes::from(bytes),
    }))
}

/// Microseconds since the epoch as Supabase writes a commit time:
/// `2026-11-28T07:06:03.669Z` (UTC, milliseconds).
pub(crate) fn timestamp(unix_us: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;

    fn table() -> Table {
        Table::described(
            "public",
            "messages",
            "id",
            &[
                ("id", "bigint"),
                ("room", "text"),
                ("tags", "text[]"),
                ("secret", "text"),
            ],
        )
        .expect("id is a column")
    }

    fn event(kind: EventKind, old: Option<Value>) -> ServiceEvent {
        ServiceEvent {
            service: Arc::from("messages"),
            kind,
            data: serde_json::json!({"id": 1, "room": "lobby", "tags": ["a"]}),
            old,
            position: Position { tick: 1, seq: 7 },
            written_us: Some(1_764_313_563_669_123),
        }
    }

    fn rendered(event: &ServiceEvent) -> Value {
        let record = render(event, &table(), &event.data, event.old.as_ref()).expect("a row event");
        serde_json::from_slice(&record.data).expect("JSON")
    }

    #[test]
    fn a_timestamp_is_utc_with_milliseconds() {
        assert_eq!(timestamp(1_764_313_563_669_123), "2025-11-28T07:06:03.669Z");
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn an_insert_names_the_shown_columns_in_table_order() {
        let data = rendered(&event(EventKind::Created, None));
        assert_eq!(
            data,
            serde_json::json!({
                "schema": "public", "table": "messages", "commit_timestamp": "2025-11-28T07:06:03.669Z",
                "type": "INSERT",
                "columns": [{"name": "id", "type": "int8"}, {"name": "room", "type": "text"}, {"name": "tags", "type": "_text"}],
                "errors": null,
                "record": {"id": 1, "room": "lobby", "tags": ["a"]},
            })
        );
        let keys: Vec<&String> = data.as_object().expect("object").keys().collect();
        assert_eq!(
            keys,
            [
                "schema",
                "table",
                "commit_timestamp",
                "type",
                "columns",
                "errors",
                "record"
            ]
        );
    }

    #[test]
    fn an_update_carries_the_old_row_and_a_delete_only_the_old_row() {
        let old = serde_json::json!({"id": 1, "room": "hall", "tags": []});
        let update = rendered(&event(EventKind::Patched, Some(old.clone())));
        assert_eq!(update["type"], "UPDATE");
        assert_eq!(update["old_record"], old);
        assert_eq!(update["record"]["room"], "lobby");
        let without_old = rendered(&event(EventKind::Updated, None));
        assert_eq!(without_old["old_record"], Value::Null);
        let delete = rendered(&event(EventKind::Removed, None));
        assert_eq!(delete["type"], "DELETE");
        assert_eq!(delete["old_record"]["room"], "lobby");
        assert!(delete.get("record").is_none());
    }

    #[test]
    fn a_truncate_has_no_record() {
        let e = event(EventKind::Truncated, None);
        assert!(render(&e, &table(), &e.data, None).is_none());
    }
}
