//! `postgres_changes` bindings of a channel join: `{event, schema, table?, filter?}`, their
//! ids, and Supabase's filter syntax (`column=op.value`, ANDed by commas) turned into a
//! Feathers query, so that a binding matches rows exactly as `find` and `/ws` do.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::auth::Principal;
use crate::event::EventKind;
use crate::hub::KindSet;
use crate::service::query::Query;
use crate::service::{Service, Services};

/// One binding as the client sent it.
#[derive(Debug, Clone)]
pub(super) struct Binding {
    /// The client's object, echoed (with `id`) in the join reply.
    pub(super) params: Map<String, Value>,
    pub(super) id: i64,
    pub(super) event: String,
    pub(super) schema: String,
    pub(super) table: Option<String>,
    pub(super) filter: Option<String>,
}

/// What a binding reaches once resolved: each served table it names, with its filter.
pub(super) struct Resolved {
    pub(super) service: Arc<Service>,
    pub(super) kinds: KindSet,
    pub(super) query: Option<Arc<Query>>,
}

/// Reads `config.postgres_changes`; a malformed list is a join error.
pub(super) fn parse(list: Option<&Value>) -> Result<Vec<Binding>, String> {
    let items = match list {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("`postgres_changes` must be a list of bindings".into()),
    };
    items
        .iter()
        .map(|item| {
            let Value::Object(params) = item else {
                return Err("each `postgres_changes` binding must be an object".to_owned());
            };
            let text = |key: &str| -> Result<Option<String>, String> {
                match params.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(format!("`{key}` of a `postgres_changes` binding must be a string")),
                }
            };
            let event = text("event")?.unwrap_or_else(|| "*".into());
            let schema = text("schema")?.unwrap_or_else(|| "public".into());
            Ok(Binding {
                id: id_of(params),
                params: params.clone(),
                event,
                schema,
                table: text("table")?.filter(|t| t != "*"),
                filter: text("filter")?.filter(|f| !f.trim().is_empty()),
            })
        })
        .collect()
}

/// A stable id for a binding: the same parameters get the same id (on every instance), in
/// Supabase's range (27 bits), never 0 (the client ignores a 0 id).
fn id_of(params: &Map<String, Value>) -> i64 {
    let text = serde_json::to_string(params).unwrap_or_default();
    // FNV-1a, 32 bits.
    let hash = text
        .bytes()
        .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    i64::from((hash & 0x07ff_ffff).max(1))
}

impl Binding {
    /// The event kinds: `INSERT`, `UPDATE`, `DELETE`; anything else is every change, as on
    /// Supabase (a `TRUNCATE` is not among them).
    pub(super) fn kinds(&self) -> KindSet {
        match self.event.to_ascii_uppercase().as_str() {
            "INSERT" => KindSet::of(&[EventKind::Created]),
            "UPDATE" => KindSet::of(&[EventKind::Updated, EventKind::Patched]),
            "DELETE" => KindSet::of(&[EventKind::Removed]),
            _ => KindSet::of(&[
                EventKind::Created,
                EventKind::Updated,
                EventKind::Patched,
                EventKind::Removed,
            ]),
        }
    }

    /// The served tables the binding names, each with its filter checked for `caller` as a
    /// `/ws` subscription's query is. The error is the `system` message Supabase sends.
    pub(super) fn resolve(&self, services: &Services, caller: Option<&Principal>) -> Result<Vec<Resolved>, String> {
        let conditions = match &self.filter {
            None => Vec::new(),
            Some(filter) => parse_filter(filter).map_err(|e| format!("Error parsing `filter` params: {e}"))?,
        };
        let targets: Vec<Arc<Service>> = services
            .all()
            .filter(|s| {
                let table = s.table();
                (self.schema == "*" || table.schema == self.schema)
                    && self.table.as_ref().is_none_or(|t| *t == table.name)
            })
            .cloned()
            .collect();
        // One service per table (the first configured), so a change reaches a binding once.
        let mut seen = Vec::new();
        let targets: Vec<Arc<Service>> = targets
            .into_iter()
            .filter(|s| {
                let table = s.table();
                let key = (table.schema.clone(), table.name.clone());
                let first = !seen.contains(&key);
                seen.push(key);
                first
            })
            .collect();
        if targets.is_empty() {
            return Err(format!(
                "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [{}]",
                self.describe(&conditions)
            ));
        }
        let query_json = feathers_query(&conditions).map_err(|e| format!("Error parsing `filter` params: {e}"))?;
        targets
            .into_iter()
            .map(|service| {
                let query = match &query_json {
                    None => None,
                    Some(q) => {
                        let checked = Query::parse(q, &service.table())
                            .and_then(|query| service.check_queryable(&query, caller).map(|()| query))
                            .and_then(|query| query.check_matchable().map(|()| query))
                            .map_err(|e| {
                                format!(
                                    "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [{}]. Exception: {}",
                                    self.describe(&conditions),
                                    e.message
                                )
                            })?;
                        Some(Arc::new(checked))
                    }
                };
                Ok(Resolved {
                    service,
                    kinds: self.kinds(),
                    query,
                })
            })
            .collect()
    }

    /// The parameters as Supabase prints them in its errors.
    fn describe(&self, conditions: &[Condition]) -> String {
        let event = match self.event.to_ascii_uppercase().as_str() {
            e @ ("INSERT" | "UPDATE" | "DELETE") => e.to_owned(),
            _ => "*".to_owned(),
        };
        let filters: Vec<String> = conditions
            .iter()
            .map(|c| format!("{{{:?}, {:?}, {:?}, {}}}", c.column, c.op, c.value, c.negated))
            .collect();
        format!(
            "event: {event}, schema: {}, table: {}, filters: [{}], select: nil",
            self.schema,
            self.table.as_deref().unwrap_or("*"),
            filters.join(", ")
        )
    }
}

/// One `column=op.value` of a filter.
#[derive(Debug, Clone, PartialEq)]
struct Condition {
    column: String,
    op: String,
    value: String,
    negated: bool,
}

/// Splits on commas outside `()` and `"…"`.
fn split_top(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    let mut current = String::new();
    for c in text.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
}

/// `"a,b"` → `a,b` with `\"` and `\\` unescaped; other values as they are.
fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    c => out.push(c),
                }
            }
            out
        }
        None => value.to_owned(),
    }
}

/// The operators quill evaluates exactly as PostgreSQL would (the ones `find` has).
const OPERATORS: [&str; 8] = ["eq", "neq", "lt", "lte", "gt", "gte", "in", "is"];
/// Supabase's other operators: understood, but refused with a clear message.
const UNSUPPORTED: [&str; 5] = ["like", "ilike", "match", "imatch", "isdistinct"];

fn parse_filter(filter: &str) -> Result<Vec<Condition>, String> {
    split_top(filter)
        .iter()
        .map(|segment| {
            if segment.trim().is_empty() {
                return Err("filter must not contain empty segments (check for extra commas)".to_owned());
            }
            let Some((column, rest)) = segment.split_once('=') else {
                return Err(format!("[{segment:?}]"));
            };
            let (negated, rest) = match rest.strip_prefix("not.") {
                Some(rest) => (true, rest),
                None => (false, rest),
            };
            let Some((op, value)) = rest.split_once('.') else {
                return Err(format!("[{rest:?}]"));
            };
            if UNSUPPORTED.contains(&op) {
                return Err(format!(
                    "the `{op}` operator is not supported by quill (use eq, neq, lt, lte, gt, gte, in or is)"
                ));
            }
            if !OPERATORS.contains(&op) {
                return Err(format!("[{op:?}, {value:?}]"));
            }
            if op == "in" && !(value.len() >= 2 && value.starts_with('(') && value.ends_with(')')) {
                return Err("`in` filter value must be wrapped by parentheses".to_owned());
            }
            if op == "is" && !matches!(value, "null" | "true" | "false") {
                return Err(format!("`is` takes null, true or false, not {value:?}"));
            }
            // `IS NOT TRUE` holds for NULL too, which `find` has no single operator for.
            if op == "is" && negated && value != "null" {
                return Err(format!(
                    "`not.is.{value}` is not supported by quill: use `neq.{value}` or `is.null`"
                ));
            }
            Ok(Condition {
                column: column.trim().to_owned(),
                op: op.to_owned(),
                value: if op == "in" { value.to_owned() } else { unquote(value) },
                negated,
            })
        })
        .collect()
}

/// The Feathers query of a filter's conditions (all ANDed); `None` without conditions.
fn feathers_query(conditions: &[Condition]) -> Result<Option<Value>, String> {
    if conditions.is_empty() {
        return Ok(None);
    }
    let mut query = Map::new();
    for c in conditions {
        let entry = query.entry(c.column.clone()).or_insert_with(|| json!({}));
        if c.op == "is" && c.value == "null" && !c.negated {
            // `column IS NULL`: a plain null in Feathers, alone on its column.
            if entry.as_object().is_some_and(|ops| !ops.is_empty()) {
                return Err(format!(
                    "`is.null` on `{}` cannot be combined with other conditions on it",
                    c.column
                ));
            }
            *entry = Value::Null;
            continue;
        }
        let (op, operand) = match (c.op.as_str(), c.negated) {
            ("is", true) if c.value == "null" => ("$ne", Value::Null),
            ("eq" | "is", false) | ("neq", true) => ("$in", json!([c.value])),
            ("eq" | "is", true) | ("neq", false) => ("$ne", json!(c.value)),
            ("lt", false) | ("gte", true) => ("$lt", json!(c.value)),
            ("lte", false) | ("gt", true) => ("$lte", json!(c.value)),
            ("gt", false) | ("lte", true) => ("$gt", json!(c.value)),
            ("gte", false) | ("lt", true) => ("$gte", json!(c.value)),
            ("in", negated) => {
                let inner = &c.value[1..c.value.len() - 1];
                let values: Vec<Value> = split_top(inner)
                    .iter()
                    .map(|v| Value::from(unquote(v.trim())))
                    .collect();
                (if negated { "$nin" } else { "$in" }, Value::Array(values))
            }
            (other, _) => return Err(format!("[{other:?}, {:?}]", c.value)),
        };
        let Value::Object(ops) = entry else {
            return Err(format!(
                "`is.null` on `{}` cannot be combined with other conditions on it",
                c.column
            ));
        };
        if ops.insert(op.to_owned(), operand).is_some() {
            return Err(format!("two `{}` conditions on `{}`", c.op, c.column));
        }
    }
    Ok(Some(Value::Object(query)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_of(filter: &str) -> Value {
        feathers_query(&parse_filter(filter).expect("parses"))
            .expect("consistent")
            .expect("conditions")
    }

    #[test]
    fn each_operator_becomes_the_feathers_operator() {
        assert_eq!(query_of("room=eq.lobby"), json!({"room": {"$in": ["lobby"]}}));
        assert_eq!(query_of("n=neq.5"), json!({"n": {"$ne": "5"}}));
        assert_eq!(query_of("n=lt.5"), json!({"n": {"$lt": "5"}}));
        assert_eq!(query_of("n=lte.5"), json!({"n": {"$lte": "5"}}));
        assert_eq!(query_of("n=gt.5"), json!({"n": {"$gt": "5"}}));
        assert_eq!(query_of("n=gte.5"), json!({"n": {"$gte": "5"}}));
        assert_eq!(query_of("id=in.(1,2,3)"), json!({"id": {"$in": ["1", "2", "3"]}}));
        assert_eq!(query_of("id=not.in.(1,2)"), json!({"id": {"$nin": ["1", "2"]}}));
        assert_eq!(query_of("n=not.lt.5"), json!({"n": {"$gte": "5"}}));
        assert_eq!(query_of("body=is.null"), json!({"body": null}));
        assert_eq!(query_of("body=not.is.null"), json!({"body": {"$ne": null}}));
        assert_eq!(query_of("flag=is.true"), json!({"flag": {"$in": ["true"]}}));
        assert!(parse_filter("flag=not.is.true").is_err());
        assert_eq!(query_of("id=gt.0,id=lt.100"), json!({"id": {"$gt": "0", "$lt": "100"}}));
        assert_eq!(query_of(r#"room=eq."a,b""#), json!({"room": {"$in": ["a,b"]}}));
        assert_eq!(query_of(r#"room=in.("a,b",c)"#), json!({"room": {"$in": ["a,b", "c"]}}));
        assert_eq!(
            query_of(r#"room=eq."say \"hi\"""#),
            json!({"room": {"$in": ["say \"hi\""]}})
        );
    }

    #[test]
    fn bad_filters_get_supabases_messages() {
        assert_eq!(parse_filter("wrong"), Err(r#"["wrong"]"#.to_owned()));
        assert_eq!(parse_filter("id=eq5"), Err(r#"["eq5"]"#.to_owned()));
        assert_eq!(parse_filter("id=foo.hey"), Err(r#"["foo", "hey"]"#.to_owned()));
        assert_eq!(
            parse_filter("id=in.1"),
            Err("`in` filter value must be wrapped by parentheses".to_owned())
        );
        assert!(
            parse_filter("id=eq.1,,n=eq.2")
                .expect_err("empty")
                .contains("empty segments")
        );
        assert!(
            parse_filter("body=like.%a%")
                .expect_err("like")
                .contains("not supported")
        );
    }

    #[test]
    fn bindings_keep_what_the_client_sent_and_get_stable_ids() {
        let list = json!([
            {"event": "*", "schema": "public", "table": "messages"},
            {"event": "INSERT", "schema": "public", "table": "messages", "filter": "room=eq.lobby"}
        ]);
        let bindings = parse(Some(&list)).expect("bindings");
        let again = parse(Some(&list)).expect("bindings");
        assert_eq!(bindings.len(), 2);
        assert_eq!(bindings[0].id, again[0].id);
        assert_ne!(bindings[0].id, bindings[1].id);
        assert!(bindings.iter().all(|b| b.id > 0 && b.id < (1 << 27)));
        assert_eq!(bindings[1].filter.as_deref(), Some("room=eq.lobby"));
        assert_eq!(Value::Object(bindings[1].params.clone()), list[1]);
        assert!(parse(Some(&json!({}))).is_err());
        assert!(parse(Some(&json!([{"event": 1}]))).is_err());
        assert_eq!(bindings[1].kinds(), KindSet::of(&[EventKind::Created]));
        let update = Binding {
            event: "update".into(),
            ..bindings[0].clone()
        };
        assert_eq!(update.kinds(), KindSet::of(&[EventKind::Updated, EventKind::Patched]));
    }
}
