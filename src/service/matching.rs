//! Whether a row matches a query, decided in quill (for subscriptions) exactly as
//! PostgreSQL decides it for `find`.
//!
//! Each filter column compares as its type does in PostgreSQL: `smallint`/`integer`/
//! `bigint` as integers in their range, `double precision` as doubles (NaN above every
//! number, as in PostgreSQL), booleans with PostgreSQL's spellings, `uuid` as uuids in the
//! forms PostgreSQL reads (ordered by bytes), `text` and unbounded `character varying` by
//! equality. What cannot be made equal is refused in subscriptions ([`check`]) instead of
//! answered differently: ordering text (it follows the database's collation), `numeric`
//! and `real` (JSON numbers lose their precision; a `real` cast rounds), bounded types
//! (`varchar(n)`, `numeric(p,s)` cast the value), and other types (timestamps, dates,
//! JSON, arrays, …). NULL behaves as in SQL: it matches only `$ne` (`IS DISTINCT FROM`), a
//! `null` test, and an empty `$nin`. `tests/properties.rs` checks the equality against
//! PostgreSQL with generated queries.

use std::cmp::Ordering;

use serde_json::Value;

use super::query::{CompareOp, Condition};
use crate::error::{Error, Result};

/// How a column's values compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// An integer type, with its range.
    Integer(i64, i64),
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
            "smallint" => ValueKind::Integer(i16::MIN.into(), i16::MAX.into()),
            "integer" => ValueKind::Integer(i32::MIN.into(), i32::MAX.into()),
            "bigint" => ValueKind::Integer(i64::MIN, i64::MAX),
            "double precision" => ValueKind::Number,
            "boolean" => ValueKind::Bool,
            "uuid" => ValueKind::Uuid,
            "text" | "character varying" => ValueKind::Text,
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

/// PostgreSQL trims ASCII whitespace only around numbers and booleans.
fn trim(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_ascii_whitespace())
}

fn typed(kind: ValueKind, text: &str) -> Option<Typed> {
    match kind {
        ValueKind::Integer(min, max) => trim(text)
            .parse::<i64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .map(Typed::Integer),
        ValueKind::Number => double(trim(text)).map(Typed::Number),
        ValueKind::Bool => pg_bool(text).map(Typed::Bool),
        ValueKind::Uuid => uuid(text).map(Typed::Text),
        ValueKind::Text => Some(Typed::Text(text.to_owned())),
        ValueKind::Other => None,
    }
}

/// A finite double in decimal or exponent notation; not one PostgreSQL would refuse as out
/// of range (an underflow to zero such as `1e-400`). NaN and infinities are refused in
/// queries (quill would have to spell them exactly as PostgreSQL does).
fn double(text: &str) -> Option<f64> {
    let digits_and_signs = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    let n: f64 = text.parse().ok().filter(|_| digits_and_signs)?;
    let underflow = n == 0.0
        && text
            .split(['e', 'E'])
            .next()?
            .bytes()
            .any(|b| (b'1'..=b'9').contains(&b));
    (n.is_finite() && !underflow).then_some(n)
}

/// A row's cell as the same type.
fn cell(kind: ValueKind, value: &Value) -> Option<Typed> {
    match (kind, value) {
        (ValueKind::Integer(..), Value::Number(n)) => n.as_i64().map(Typed::Integer),
        (ValueKind::Number, Value::Number(n)) => n.as_f64().map(Typed::Number),
        // row_to_json writes these as strings.
        (ValueKind::Number, Value::String(s)) => match s.as_str() {
            "NaN" => Some(Typed::Number(f64::NAN)),
            "Infinity" => Some(Typed::Number(f64::INFINITY)),
            "-Infinity" => Some(Typed::Number(f64::NEG_INFINITY)),
            _ => None,
        },
        (ValueKind::Bool, Value::Bool(b)) => Some(Typed::Bool(*b)),
        (ValueKind::Uuid, Value::String(s)) => uuid(s).map(Typed::Text),
        (ValueKind::Text, Value::String(s)) => Some(Typed::Text(s.clone())),
        _ => None,
    }
}

/// PostgreSQL's boolean input: `t`, `true`, `y`, `yes`, `on`, `1` and their opposites, any
/// case, trimmed (and unambiguous prefixes, which quill refuses rather than guess).
fn pg_bool(text: &str) -> Option<bool> {
    match trim(text).to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// A uuid as 32 lowercase hex digits, if PostgreSQL reads it: optionally in one pair of
/// braces, a hyphen allowed after any group of four digits, any case, no whitespace. Its
/// order is the bytes', which is this text's order.
fn uuid(text: &str) -> Option<String> {
    let inner = match text.strip_prefix('{') {
        Some(rest) => rest.strip_suffix('}')?,
        None => text,
    };
    let mut hex = String::with_capacity(32);
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if !c.is_ascii_hexdigit() {
            return None;
        }
        hex.push(c.to_ascii_lowercase());
        if hex.len().is_multiple_of(4) && hex.len() < 32 && chars.peek() == Some(&'-') {
            chars.next();
        }
    }
    (hex.len() == 32).then_some(hex)
}

fn order(a: &Typed, b: &Typed) -> Option<Ordering> {
    match (a, b) {
        (Typed::Integer(x), Typed::Integer(y)) => Some(x.cmp(y)),
        // PostgreSQL: NaN equals NaN and sorts above every other value.
        (Typed::Number(x), Typed::Number(y)) => Some(match (x.is_nan(), y.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => x.partial_cmp(y)?,
        }),
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
                        "only integers, doubles, booleans, uuids and text (by equality) can be filtered in subscriptions",
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
                        "only integers, doubles, booleans, uuids and text can be filtered in subscriptions",
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
