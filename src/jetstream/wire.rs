//! How a change travels on the stream: a JSON body, and headers that let a publisher find
//! where the stream ends (and an instance skip a message) without reading the body.

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::change::Change;
use crate::event::EventKind;

/// The tick of the message's change (or, for a gap, the tick the reader moved to).
pub(super) const TICK: &str = "Quill-Tick";
/// The change's seq (absent on a gap).
pub(super) const SEQ: &str = "Quill-Seq";
/// On the last message of a publisher's batch: every change of every tick up to this one
/// is in the stream.
pub(super) const THROUGH: &str = "Quill-Through";

/// The stream the publisher appended to (its creation time): a stream deleted and made
/// again is another stream, whatever its sequences say.
pub(super) const STREAM: &str = "Quill-Stream";

/// A message body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum Record {
    Change(Box<ChangeIn>),
    /// A change too big for one NATS message: read it from the change log by seq.
    Reference {
        seq: i64,
        tick: i64,
    },
    /// The publisher's reader found changes pruned before it read them: they are lost.
    Gap {
        after_tick: i64,
    },
    /// The first message of a stream: its publisher started after `through` (an instance
    /// that had not got that far has missed the ticks in between).
    Start {
        through: i64,
    },
}

/// A change as it arrives.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ChangeIn {
    seq: i64,
    tick: i64,
    schema: String,
    table: String,
    kind: String,
    row: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    old: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    us: Option<i64>,
}

impl ChangeIn {
    pub(super) fn into_change(self) -> Result<Change, String> {
        Ok(Change {
            kind: EventKind::parse(&self.kind).ok_or_else(|| format!("unknown kind '{}'", self.kind))?,
            seq: self.seq,
            tick: self.tick,
            table_schema: self.schema,
            table_name: self.table,
            row: self.row,
            old: self.old,
            written_us: self.us,
        })
    }
}

/// What the publisher sends for a change, borrowing it.
#[derive(Serialize)]
#[serde(tag = "t", rename = "change")]
struct ChangeOut<'a> {
    seq: i64,
    tick: i64,
    schema: &'a str,
    table: &'a str,
    kind: &'static str,
    row: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    us: Option<i64>,
}

/// Room left for the headers and the protocol line within `max_payload`.
const HEADROOM: usize = 512;

/// The body and headers of a change; a reference when the change does not fit
/// `max_payload`.
pub(super) fn change_message(
    change: &Change,
    through: Option<i64>,
    stream: &str,
    max_payload: usize,
) -> (HeaderMap, Bytes) {
    let out = ChangeOut {
        seq: change.seq,
        tick: change.tick,
        schema: &change.table_schema,
        table: &change.table_name,
        kind: change.kind.as_str(),
        row: &change.row,
        old: change.old.as_ref(),
        us: change.written_us,
    };
    // Serializing plain JSON values cannot fail; a failure would send a reference.
    let body = serde_json::to_vec(&out).unwrap_or_default();
    let body = if body.is_empty() || body.len() + HEADROOM > max_payload {
        encode(&Record::Reference {
            seq: change.seq,
            tick: change.tick,
        })
    } else {
        body
    };
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, format!("c{}", change.seq));
    headers.insert(TICK, change.tick.to_string());
    headers.insert(SEQ, change.seq.to_string());
    headers.insert(STREAM, stream);
    if let Some(through) = through {
        headers.insert(THROUGH, through.to_string());
    }
    (headers, Bytes::from(body))
}

/// A gap after `after_tick`; the reader continues after `through`.
pub(super) fn gap_message(after_tick: i64, through: i64, stream: &str) -> (HeaderMap, Bytes) {
    marker_message(
        format!("g{after_tick}-{through}"),
        through,
        stream,
        &Record::Gap { after_tick },
    )
}

/// The first message of an empty stream, whose publisher starts after `through`.
pub(super) fn start_message(through: i64, stream: &str) -> (HeaderMap, Bytes) {
    marker_message(format!("s{stream}"), through, stream, &Record::Start { through })
}

/// A message that carries no change: every tick through `through` is in the stream.
fn marker_message(id: String, through: i64, stream: &str, record: &Record) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(STREAM, stream);
    headers.insert(NATS_MESSAGE_ID, id);
    headers.insert(TICK, through.to_string());
    headers.insert(THROUGH, through.to_string());
    (headers, Bytes::from(encode(record)))
}

fn encode(record: &Record) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

/// The identity of a stream incarnation, as the [`STREAM`] header carries it.
pub(super) fn stream_id(created: time::OffsetDateTime) -> String {
    created.unix_timestamp_nanos().to_string()
}

/// A message's `Nats-Msg-Id`.
pub(super) fn message_id(headers: &HeaderMap) -> Option<String> {
    headers.get(NATS_MESSAGE_ID).map(|id| id.as_str().to_owned())
}

/// The numeric header `name`, if present and well formed.
pub(super) fn header(headers: Option<&HeaderMap>, name: &str) -> Option<i64> {
    headers?.get(name)?.as_str().parse().ok()
}

impl Record {
    pub(super) fn decode(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(row: Value) -> Change {
        Change {
            seq: 41,
            tick: 7,
            table_schema: "public".into(),
            table_name: "messages".into(),
            kind: EventKind::Patched,
            row,
            old: Some(json!({"id": 1, "text": "before"})),
            written_us: Some(1_700_000_000_000_000),
        }
    }

    #[test]
    fn a_change_round_trips_through_its_message() {
        let original = change(json!({"id": 1, "text": "after"}));
        let (headers, body) = change_message(&original, Some(7), "1", 1 << 20);
        assert_eq!(header(Some(&headers), TICK), Some(7));
        assert_eq!(header(Some(&headers), SEQ), Some(41));
        assert_eq!(header(Some(&headers), THROUGH), Some(7));
        let Ok(Record::Change(decoded)) = Record::decode(&body) else {
            panic!("not a change record");
        };
        assert_eq!(decoded.into_change(), Ok(original));
    }

    #[test]
    fn a_change_too_big_for_one_message_becomes_a_reference() {
        let big = change(json!({"id": 1, "text": "x".repeat(2000)}));
        let (headers, body) = change_message(&big, None, "1", 1024);
        assert!(body.len() < 100);
        assert_eq!(header(Some(&headers), THROUGH), None);
        assert!(matches!(
            Record::decode(&body),
            Ok(Record::Reference { seq: 41, tick: 7 })
        ));
    }
}
