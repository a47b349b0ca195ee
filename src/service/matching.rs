//! Whether a row matches a query, decided in quill (for subscriptions) exactly as
//! PostgreSQL decides it for `find`.
//!
//! Each filter column compares as its type does in PostgreSQL: integers as integers,
//! `real`/`double precision`/`numeric` as numbers, booleans with PostgreSQL's spellings,
//! `uuid` as uuids (case and hyphens ignored, ordered by bytes), text by equality. What
//! cannot be made equal is refused in subscriptions ([`check`]) instead of answered
//! differently: ordering text (it follows the database's collation), and any operator on
//! other types (timestamps, dates, JSON, arrays, …). NULL behaves as in SQL: it matches
//! only `$ne` (`IS DISTINCT FROM`), a `null` test, and an empty `$nin`.
//! `tests/properties.rs` checks the equality against PostgreSQL with generated queries.

use std::cmp::Ordering;

use serde_json::Value;

use super::query::{CompareOp, Condition};
use crate::error::{Error, Result};

/// How a column's values compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Integer,
    Number,
    Bool,
    Uuid,
    Text,
    /// Compared by PostgreSQL only.
    Other,
}

impl ValueKind {
    /// The kind of a column, from its type as `format_type` prints it.
    pub fn of(sql_type: &str) -> ValueKind {
        match sql_type {
            "smallint" | "integer" | "bigint" => ValueKind::Integer,
            "real" | "double precision" => ValueKind::Number,
            t if t.starts_with("numeric") => ValueKind::Number,
            "boolean" => ValueKind::Bool,
            "uuid" => ValueKind::Uuid,
            "text" => ValueKind::Text,
            t if t.starts_with("character varying") => ValueKind::Text,
            _ => ValueKind::Other,
        }
    }
}

/// A query value as the column's type reads it; `None` if PostgreSQL would refuse it.
#[derive(Debug, Clone, PartialEq)]
enum Typed {
    Integer(i64),
    Number(f64),
    Bool(bool),
    Text(String),
}

fn typed(kind: ValueKind, text: &str) -> Option<Typed> {
    match kind {
        ValueKind::Integer => text.trim().parse().ok().map(Typed::Integer),
        ValueKind::Number => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .map(Typed::Number),
        ValueKind::Bool => pg_bool(text).map(Typed::Bool),
        ValueKind::Uuid => uuid(text).map(Typed::Text),
        ValueKind::Text => Some(Typed::Text(text.to_owned())),
        ValueKind::Other => None,
    }
}

/// A row's cell as the same type.
fn cell(kind: ValueKind, value: &Value) -> Option<Typed> {
    match (kind, value) {
        (ValueKind::Integer, Value::Number(n)) => n.as_i64().map(Typed::Integer),
        (ValueKind::Number, Value::Number(n)) => n.as_f64().map(Typed::Number),
        (ValueKind::Bool, Value::Bool(b)) => Some(Typed::Bool(*b)),
        (ValueKind::Uuid, Value::String(s)) => uuid(s).map(Typed::Text),
        (ValueKind::Text, Value::String(s)) => Some(Typed::Text(s.clone())),
        _ => None,
    }
}

/// PostgreSQL's boolean input: `t`, `true`, `y`, `yes`, `on`, `1` and their opposites, any
/// case, trimmed (and unambiguous prefixes, which quill refuses rather than guess).
fn pg_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// A uuid as 32 lowercase hex digits (PostgreSQL accepts hyphens, braces and any case;
/// its order is the bytes', which is this text's order).
fn uuid(text: &str) -> Option<String> {
    let hex: String = text
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

fn order(a: &Typed, b: &Typed) -> Option<Ordering> {
    match (a, b) {
        (Typed::Integer(x), Typed::Integer(y)) => Some(x.cmp(y)),
        (Typed::Number(x), Typed::Number(y)) => x.partial_cmp(y),
        (Typed::Bool(x), Typed::Bool(y)) => Some(x.cmp(y)),
        (Typed::Text(x), Typed::Text(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        _ => None,
    }
}

fn kind_of(kinds: &[(String, ValueKind)], column: &str) -> ValueKind {
    kinds
        .iter()
        .find(|(c, _)| c == column)
        .map_or(ValueKind::Other, |(_, k)| *k)
}

/// Refuses what cannot be evaluated as PostgreSQL would; names the column and why.
pub(super) fn check(conditions: &[Condition], kinds: &[(String, ValueKind)]) -> Result<()> {
    for condition in conditions {
        let refuse = |column: &str, why: &str| {
            Err(
                Error::bad_request(format!("a subscription cannot filter '{column}' this way: {why}"))
                    .with_field(column, why),
            )
        };
        match condition {
            Condition::IsNull { .. } => {}
            Condition::Compare { column, op, value } => {
                let kind = kind_of(kinds, column);
                if kind == ValueKind::Other {
                    return refuse(
                        column,
                        "only numbers, booleans, uuids and text (by equality) can be filtered in subscriptions",
                    );
                }
                if kind == ValueKind::Text && !matches!(op, CompareOp::Eq | CompareOp::Ne) {
                    return refuse(
                        column,
                        "text order follows the database's collation; use equality or $in",
                    );
                }
                if typed(kind, value).is_none() {
                    return refuse(column, "not a value of the column's type");
                }
            }
            Condition::In { column, values, .. } => {
                let kind = kind_of(kinds, column);
                if kind == ValueKind::Other {
                    return refuse(
                        column,
                        "only numbers, booleans, uuids and text can be filtered in subscriptions",
                    );
                }
                if values.iter().any(|v| typed(kind, v).is_none()) {
                    return refuse(column, "not a value of the column's type");
                }
            }
            Condition::Or(branches) => {
                for branch in branches {
                    check(branch, kinds)?;
                }
            }
        }
    }
    Ok(())
}

pub(super) fn all_match(conditions: &[Condition], kinds: &[(String, ValueKind)], row: &Value) -> bool {
    conditions.iter().all(|c| condition_matches(c, kinds, row))
}

fn condition_matches(condition: &Condition, kinds: &[(String, ValueKind)], row: &Value) -> bool {
    match condition {
        Condition::Compare { column, op, value } => {
            let kind = kind_of(kinds, column);
            let cell = row.get(column).filter(|v| !v.is_null()).and_then(|v| cell(kind, v));
            let (Some(cell), Some(wanted)) = (cell, typed(kind, value)) else {
                // NULL is only "distinct from" a value.
                return *op == CompareOp::Ne && row.get(column).is_none_or(Value::is_null);
            };
            let Some(order) = order(&cell, &wanted) else {
                return false;
            };
            match op {
                CompareOp::Eq => order.is_eq(),
                CompareOp::Ne => order.is_ne(),
                CompareOp::Lt => order.is_lt(),
                CompareOp::Lte => order.is_le(),
                CompareOp::Gt => order.is_gt(),
                CompareOp::Gte => order.is_ge(),
            }
        }
        Condition::IsNull { column, negated } => row.get(column).is_none_or(Value::is_null) != *negated,
        Condition::In {
            column,
            negated,
            values,
        } => {
            // `x = ANY('{}')` is false even for NULL, so an empty `$nin` matches every row.
            if values.is_empty() {
                return *negated;
            }
            let kind = kind_of(kinds, column);
            let Some(cell) = row.get(column).filter(|v| !v.is_null()).and_then(|v| cell(kind, v)) else {
                return false;
            };
            let found = values
                .iter()
                .filter_map(|v| typed(kind, v))
                .any(|v| order(&cell, &v).is_some_and(Ordering::is_eq));
            found != *negated
        }
        Condition::Or(branches) => branches.iter().any(|b| all_match(b, kinds, row)),
    }
}
