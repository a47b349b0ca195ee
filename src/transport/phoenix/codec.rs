//! Phoenix channel messages as Supabase Realtime clients frame them: `vsn=2.0.0` JSON arrays
//! `[join_ref, ref, topic, event, payload]` (with binary frames for broadcasts the client
//! sends), `vsn=1.0.0` JSON objects `{topic, event, payload, ref, join_ref}`.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::event::ChangeRecord;
use crate::hub::Topic;

/// The serializer a connection asked for with `vsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Vsn {
    /// Objects; Phoenix's default when `vsn` is absent.
    V1,
    /// Arrays: realtime-js's default.
    V2,
}

impl Vsn {
    /// `vsn` from the query string; `None` for a version no serializer speaks.
    pub(super) fn parse(vsn: Option<&str>) -> Option<Vsn> {
        match vsn {
            None => Some(Vsn::V1),
            Some(v) if v.starts_with("1.") => Some(Vsn::V1),
            Some(v) if v.starts_with("2.") => Some(Vsn::V2),
            Some(_) => None,
        }
    }
}

/// One message from the client.
#[derive(Debug, PartialEq)]
pub(super) struct Message {
    pub(super) join_ref: Option<String>,
    pub(super) reference: Option<String>,
    pub(super) topic: String,
    pub(super) event: String,
    pub(super) payload: Value,
}

/// Why a frame is not a message.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(super) enum DecodeError {
    #[error("not a Phoenix message: {0}")]
    Shape(&'static str),
    #[error("not JSON: {0}")]
    Json(String),
    #[error("binary frames are broadcasts only (kind 3)")]
    BinaryKind,
    /// A broadcast with a binary payload: its refs and topic, to answer it.
    #[error("a broadcast with a binary payload is not supported; send JSON")]
    BinaryPayload(Box<Message>),
}

/// A text frame.
pub(super) fn decode_text(vsn: Vsn, text: &str) -> Result<Message, DecodeError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    let reference = |v: Option<&Value>| -> Result<Option<String>, DecodeError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(DecodeError::Shape("refs are strings")),
        }
    };
    let text_of = |v: Option<&Value>, what: &'static str| -> Result<String, DecodeError> {
        v.and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(DecodeError::Shape(what))
    };
    match (vsn, value) {
        (Vsn::V2, Value::Array(mut items)) if items.len() == 5 => {
            let payload = items.pop().unwrap_or(Value::Null);
            Ok(Message {
                join_ref: reference(items.first())?,
                reference: reference(items.get(1))?,
                topic: text_of(items.get(2), "the topic is a string")?,
                event: text_of(items.get(3), "the event is a string")?,
                payload,
            })
        }
        (Vsn::V2, _) => Err(DecodeError::Shape("expected [join_ref, ref, topic, event, payload]")),
        (Vsn::V1, Value::Object(mut fields)) => Ok(Message {
            join_ref: reference(fields.get("join_ref"))?,
            reference: reference(fields.get("ref"))?,
            topic: text_of(fields.get("topic"), "the topic is a string")?,
            event: text_of(fields.get("event"), "the event is a string")?,
            payload: fields.remove("payload").unwrap_or(Value::Null),
        }),
        (Vsn::V1, _) => Err(DecodeError::Shape("expected {topic, event, payload, ref}")),
    }
}

/// A binary frame: realtime-js sends `channel.send({type: 'broadcast', ...})` as kind 3,
/// `[3, join_ref len, ref len, topic len, event len, metadata len, encoding]` then those
/// fields and the payload (encoding 1: JSON).
pub(super) fn decode_binary(frame: &[u8]) -> Result<Message, DecodeError> {
    let Some((header, rest)) = frame.split_first_chunk::<7>() else {
        return Err(DecodeError::Shape("short binary frame"));
    };
    let [kind, join_ref_len, ref_len, topic_len, event_len, meta_len, encoding] = *header;
    if kind != 3 {
        return Err(DecodeError::BinaryKind);
    }
    let mut rest = rest;
    let mut field = |len: u8| -> Result<&[u8], DecodeError> {
        let len = usize::from(len);
        if rest.len() < len {
            return Err(DecodeError::Shape("binary frame shorter than its header says"));
        }
        let (head, tail) = rest.split_at(len);
        rest = tail;
        Ok(head)
    };
    let utf8 = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Shape("fields are UTF-8"));
    let join_ref = utf8(field(join_ref_len)?)?;
    let reference = utf8(field(ref_len)?)?;
    let topic = utf8(field(topic_len)?)?;
    let user_event = utf8(field(event_len)?)?;
    let meta = field(meta_len)?.to_vec();
    let payload = rest;
    if encoding != 1 {
        return Err(DecodeError::BinaryPayload(Box::new(Message {
            join_ref: Some(join_ref).filter(|r| !r.is_empty()),
            reference: Some(reference).filter(|r| !r.is_empty()),
            topic,
            event: "broadcast".into(),
            payload: Value::Null,
        })));
    }
    let payload: Value = serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
    let mut message = json!({ "type": "broadcast", "event": user_event, "payload": payload });
    if !meta.is_empty()
        && let Ok(meta) = serde_json::from_slice::<Value>(&meta)
    {
        message["meta"] = meta;
    }
    Ok(Message {
        join_ref: Some(join_ref).filter(|r| !r.is_empty()),
        reference: Some(reference).filter(|r| !r.is_empty()),
        topic,
        event: "broadcast".into(),
        payload: message,
    })
}

/// Encodes a message from the server. V1 frames carry no `join_ref` (Phoenix's V1
/// serializer drops it).
pub(super) fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Value,
) -> Bytes {
    let frame = match vsn {
        Vsn::V2 => json!([join_ref, reference, topic, event, payload]),
        Vsn::V1 => json!({ "topic": topic, "event": event, "payload": payload, "ref": reference }),
    };
    // Serializing a Value cannot fail.
    Bytes::from(serde_json::to_vec(&frame).unwrap_or_default())
}

/// A reply to a push: `phx_reply` with `{status, response}`.
pub(super) fn reply(vsn: Vsn, to: &Message, status: &str, response: Value) -> Bytes {
    let payload = json!({ "status": status, "response": response });
    encode(
        vsn,
        to.join_ref.as_deref(),
        to.reference.as_deref(),
        &to.topic,
        "phx_reply",
        &payload,
    )
}

/// A change for a channel: `postgres_changes` with the ids of the bindings it matched and
/// the record, whose bytes are shared by every receiver with the same view.
pub(super) fn postgres_changes(vsn: Vsn, topic: &Topic, matched: u64, record: &ChangeRecord) -> Bytes {
    let ids: Vec<i64> = topic.matched_ids(matched).collect();
    let topic = serde_json::to_string(&*topic.name).unwrap_or_default();
    let ids = serde_json::to_string(&ids).unwrap_or_default();
    let (head, tail): (&[u8], &[u8]) = match vsn {
        Vsn::V2 => (b"[null,null,", b"]"),
        Vsn::V1 => (b"{\"topic\":", b",\"ref\":null}"),
    };
    let event: &[u8] = match vsn {
        Vsn::V2 => b",\"postgres_changes\",",
        Vsn::V1 => b",\"event\":\"postgres_changes\",\"payload\":",
    };
    let mut out = Vec::with_capacity(record.data.len() + topic.len() + ids.len() + 80);
    for part in [
        head,
        topic.as_bytes(),
        event,
        b"{\"ids\":",
        ids.as_bytes(),
        b",\"data\":",
        &record.data,
        b"}",
        tail,
    ] {
        out.extend_from_slice(part);
    }
    Bytes::from(out)
}

/// A broadcast as the receivers get it: the sender's message, unchanged.
pub(super) fn broadcast(vsn: Vsn, topic: &str, message: &[u8]) -> Option<Bytes> {
    let message = serde_json::from_slice::<&RawValue>(message).ok()?;
    let frame = match vsn {
        Vsn::V2 => serde_json::to_vec(&(None::<()>, None::<()>, topic, "broadcast", message)),
        Vsn::V1 => {
            serde_json::to_vec(&json!({ "topic": topic, "event": "broadcast", "payload": message, "ref": null }))
        }
    };
    frame.ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_serializers_read_a_join() {
        let v2 = decode_text(Vsn::V2, r#"["6","6","realtime:room","phx_join",{"config":{}}]"#).expect("v2");
        let v1 = decode_text(
            Vsn::V1,
            r#"{"topic":"realtime:room","event":"phx_join","payload":{"config":{}},"ref":"6","join_ref":"6"}"#,
        )
        .expect("v1");
        assert_eq!(v1, v2);
        assert_eq!(v2.join_ref.as_deref(), Some("6"));
        let heartbeat = decode_text(Vsn::V2, r#"[null,"8","phoenix","heartbeat",{}]"#).expect("heartbeat");
        assert_eq!(heartbeat.join_ref, None);
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(decode_text(Vsn::V2, "{}").is_err());
        assert!(decode_text(Vsn::V2, r#"["1","1",3,"x",{}]"#).is_err());
        assert!(decode_text(Vsn::V2, "[1,2").is_err());
        assert!(decode_text(Vsn::V1, "[]").is_err());
        assert!(decode_binary(&[3, 1]).is_err());
        assert_eq!(decode_binary(&[4, 0, 0, 0, 0, 0, 1]), Err(DecodeError::BinaryKind));
        // A header that claims more than the frame holds.
        assert!(decode_binary(&[3, 200, 0, 0, 0, 0, 1, b'x']).is_err());
    }

    #[test]
    fn a_binary_broadcast_becomes_the_message_receivers_get() {
        let mut frame = vec![3, 1, 1, 13, 2, 0, 1];
        frame.extend_from_slice(b"12realtime:roomev{\"a\":1}");
        let message = decode_binary(&frame).expect("kind 3");
        assert_eq!(message.join_ref.as_deref(), Some("1"));
        assert_eq!(message.reference.as_deref(), Some("2"));
        assert_eq!(message.topic, "realtime:room");
        assert_eq!(message.event, "broadcast");
        assert_eq!(
            message.payload,
            json!({"type": "broadcast", "event": "ev", "payload": {"a": 1}})
        );
        let mut raw = frame.clone();
        raw[6] = 0;
        let Err(DecodeError::BinaryPayload(to)) = decode_binary(&raw) else {
            panic!("a binary payload is refused");
        };
        assert_eq!(
            (to.reference.as_deref(), to.topic.as_str()),
            (Some("2"), "realtime:room")
        );
    }

    #[test]
    fn server_frames_have_each_serializers_shape() {
        let push = encode(Vsn::V2, None, None, "realtime:r", "system", &json!({"a": 1}));
        assert_eq!(&push[..], br#"[null,null,"realtime:r","system",{"a":1}]"#);
        let push = encode(Vsn::V1, Some("6"), None, "realtime:r", "system", &json!({}));
        assert_eq!(
            serde_json::from_slice::<Value>(&push).expect("json"),
            json!({"topic": "realtime:r", "event": "system", "payload": {}, "ref": null})
        );
        let topic = Topic::new("realtime:\"q\"".into(), vec![11, 22, 33]);
        let record = ChangeRecord {
            seq: 1,
            data: Bytes::from_static(br#"{"type":"INSERT"}"#),
        };
        let v2: Value = serde_json::from_slice(&postgres_changes(Vsn::V2, &topic, 0b101, &record)).expect("json");
        assert_eq!(
            v2,
            json!([null, null, "realtime:\"q\"", "postgres_changes", {"ids": [11, 33], "data": {"type": "INSERT"}}])
        );
        let v1: Value = serde_json::from_slice(&postgres_changes(Vsn::V1, &topic, 0b10, &record)).expect("json");
        assert_eq!(v1["payload"]["ids"], json!([22]));
        assert_eq!(v1["ref"], Value::Null);
        let b = broadcast(
            Vsn::V2,
            "realtime:r",
            br#"{"type":"broadcast","event":"e","payload":{}}"#,
        )
        .expect("json");
        assert_eq!(
            &b[..],
            br#"[null,null,"realtime:r","broadcast",{"type":"broadcast","event":"e","payload":{}}]"#
        );
    }
}
