//! Feathers query syntax → a typed [`Query`], checked against the table's columns.
//!
//! Input is JSON: typed values from the WebSocket, or all-strings from a REST query string
//! (see `transport::qs`). Values are kept as text and cast to the column's type by Postgres,
//! so `"5"` and `5` mean the same thing and a bad value is a 400, not a panic.

use serde_json::{Map, Value};

use super::matching::{self, ValueKind};
use crate::error::{Error, Result};
use crate::store::Table;

/// A `find`/`get`/multi-`patch`/multi-`remove` query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    /// Conditions joined by AND.
    pub filter: Vec<Condition>,
    pub sort: Vec<Sort>,
    /// `$limit`; `None` when the client gave none.
    pub limit: Option<i64>,
    pub skip: i64,
    /// `$select`; `None` for every column.
    pub select: Option<Vec<String>>,
    /// How the filter's columns compare, for evaluating it in quill (subscriptions).
    pub(crate) kinds: Vec<(String, ValueKind)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Compare {
        column: String,
        op: CompareOp,
        value: String,
    },
    IsNull {
        column: String,
        negated: bool,
    },
    In {
        column: String,
        negated: bool,
        values: Vec<String>,
    },
    /// Any one branch holds; each branch is an AND of conditions.
    Or(Vec<Vec<Condition>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Lte,
    Gt,
    Gte,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sort {
    pub column: String,
    pub descending: bool,
}

impl Query {
    /// Parses a Feathers query object. `null` or a missing query is an empty query.
    pub fn parse(query: &Value, table: &Table) -> Result<Query> {
        let obj = match query {
            Value::Null => return Ok(Query::default()),
            Value::Object(obj) => obj,
            _ => return Err(Error::bad_request("query must be an object")),
        };
        let mut q = Query::default();
        for (key, value) in obj {
            match key.as_str() {
                "$limit" => q.limit = Some(parse_count("$limit", value)?),
                "$skip" => q.skip = parse_count("$skip", value)?,
                "$sort" => q.sort = parse_sort(value, table)?,
                "$select" => q.select = Some(parse_select(value, table)?),
                _ => {}
            }
        }
        q.filter = parse_conditions(obj, table, true)?;
        let mut columns = Vec::new();
        condition_columns(&q.filter, &mut columns);
        for column in columns {
            if !q.kinds.iter().any(|(c, _)| c == column)
                && let Some(found) = table.column(column)
            {
                q.kinds.push((column.to_owned(), ValueKind::of(&found.sql_type)));
            }
        }
        Ok(q)
    }

    /// Whether a row (as JSON) meets the filter, evaluated in quill (subscriptions): as
    /// PostgreSQL decides it for `find`, for the filters [`Query::check_matchable`] admits.
    pub fn matches(&self, row: &Value) -> bool {
        matching::all_match(&self.filter, &self.kinds, row)
    }

    /// Refuses a filter quill cannot evaluate exactly as PostgreSQL would (see
    /// [`matching`]); a subscription's query must pass.
    pub fn check_matchable(&self) -> Result<()> {
        matching::check(&self.filter, &self.kinds)
    }

    /// The columns the query filters or sorts on.
    pub fn filter_columns(&self) -> impl Iterator<Item = &str> {
        let mut out = Vec::new();
        condition_columns(&self.filter, &mut out);
        out.extend(self.sort.iter().map(|s| s.column.as_str()));
        out.into_iter()
    }

    /// Every column the query reads (filter, sort and select).
    pub fn columns(&self) -> Vec<&str> {
        self.filter_columns()
            .chain(self.select.iter().flatten().map(String::as_str))
            .collect()
    }
}

pub(crate) fn condition_columns<'a>(conditions: &'a [Condition], out: &mut Vec<&'a str>) {
    for c in conditions {
        match c {
            Condition::Compare { column, .. } | Condition::IsNull { column, .. } | Condition::In { column, .. } => {
                out.push(column)
            }
            Condition::Or(branches) => branches.iter().for_each(|b| condition_columns(b, out)),
        }
    }
}

const PAGING_KEYS: [&str; 4] = ["$limit", "$skip", "$sort", "$select"];

fn parse_conditions(obj: &Map<String, Value>, table: &Table, top: bool) -> Result<Vec<Condition>> {
    let mut out = Vec::new();
    for (key, value) in obj {
        if top && PAGING_KEYS.contains(&key.as_str()) {
            continue;
        }
        match key.as_str() {
            "$or" => out.push(Condition::Or(parse_branches("$or", value, table)?)),
            "$and" => {
                for branch in parse_branches("$and", value, table)? {
                    out.extend(branch);
                }
            }
            k if k.starts_with('$') => {
                return Err(Error::bad_request(format!("Invalid query parameter {k}")));
            }
            column => {
                check_column(column, table)?;
                parse_field(column, value, &mut out)?;
            }
        }
    }
    Ok(out)
}

fn parse_branches(op: &str, value: &Value, table: &Table) -> Result<Vec<Vec<Condition>>> {
    let Value::Array(items) = value else {
        return Err(Error::bad_request(format!("{op} must be an array")));
    };
    items
        .iter()
        .map(|item| match item {
            Value::Object(obj) => parse_conditions(obj, table, false),
            _ => Err(Error::bad_request(format!("{op} must be an array of objects"))),
        })
        .collect()
}

fn parse_field(column: &str, value: &Value, out: &mut Vec<Condition>) -> Result<()> {
    let ops = match value {
        Value::Object(ops) => ops,
        Value::Null => {
            out.push(Condition::IsNull {
                column: column.to_owned(),
                negated: false,
            });
            return Ok(());
        }
        scalar => {
            out.push(Condition::Compare {
                column: column.to_owned(),
                op: CompareOp::Eq,
                value: scalar_text(column, scalar)?,
            });
            return Ok(());
        }
    };
    for (op, operand) in ops {
        let compare = match op.as_str() {
            "$in" | "$nin" => {
                out.push(Condition::In {
                    column: column.to_owned(),
                    negated: op == "$nin",
                    values: list_text(column, op, operand)?,
                });
                continue;
            }
            "$ne" if operand.is_null() => {
                out.push(Condition::IsNull {
                    column: column.to_owned(),
                    negated: true,
                });
                continue;
            }
            "$ne" => CompareOp::Ne,
            "$lt" => CompareOp::Lt,
            "$lte" => CompareOp::Lte,
            "$gt" => CompareOp::Gt,
            "$gte" => CompareOp::Gte,
            other => {
                return Err(Error::bad_request(format!("Invalid query parameter {other}")));
            }
        };
        if operand.is_null() {
            return Err(Error::bad_request(format!("{op} on '{column}' needs a value")));
        }
        out.push(Condition::Compare {
            column: column.to_owned(),
            op: compare,
            value: scalar_text(column, operand)?,
        });
    }
    Ok(())
}

/// A scalar as the text Postgres will cast to the column's type.
fn scalar_text(column: &str, value: &Value) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(Error::bad_request(format!("invalid value for '{column}'"))),
    }
}

fn list_text(column: &str, op: &str, value: &Value) -> Result<Vec<String>> {
    match value {
        Value::Array(items) => items.iter().map(|v| scalar_text(column, v)).collect(),
        // qs turns a one-element list into a plain value when it is written as `$in=x`
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(vec![scalar_text(column, value)?]),
        _ => Err(Error::bad_request(format!("{op} on '{column}' needs a list"))),
    }
}

fn check_column(column: &str, table: &Table) -> Result<()> {
    if table.column(column).is_some() {
        Ok(())
    } else {
        Err(
            Error::bad_request(format!("Invalid query parameter '{column}': no such column"))
                .with_field(column, "no such column"),
        )
    }
}

fn parse_count(name: &str, value: &Value) -> Result<i64> {
    let n = match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n >= 0 => Ok(n),
        _ => Err(Error::bad_request(format!("{name} must be a non-negative integer"))),
    }
}

fn parse_sort(value: &Value, table: &Table) -> Result<Vec<Sort>> {
    let Value::Object(fields) = value else {
        return Err(Error::bad_request("$sort must be an object like {\"name\": 1}"));
    };
    fields
        .iter()
        .map(|(column, dir)| {
            check_column(column, table)?;
            let dir = match dir {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse::<i64>().ok(),
                _ => None,
            };
            match dir {
                Some(1) => Ok(Sort {
                    column: column.clone(),
                    descending: false,
                }),
                Some(-1) => Ok(Sort {
                    column: column.clone(),
                    descending: true,
                }),
                _ => Err(Error::bad_request(format!("$sort for '{column}' must be 1 or -1"))),
            }
        })
        .collect()
}

fn parse_select(value: &Value, table: &Table) -> Result<Vec<String>> {
    let names: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        Value::String(_) => vec![value],
        _ => return Err(Error::bad_request("$select must be a list of column names")),
    };
    names
        .into_iter()
        .map(|v| match v {
            Value::String(column) => {
                check_column(column, table)?;
                Ok(column.clone())
            }
            _ => Err(Error::bad_request("$select must be a list of column names")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Table;
    use serde_json::json;

    fn table() -> Table {
        Table::described(
            "public",
            "people",
            "id",
            &[("id", "bigint"), ("name", "text"), ("age", "integer")],
        )
        .expect("table")
    }

    #[test]
    fn equality_operators_and_paging_parse() {
        let q = Query::parse(
            &json!({"name": "a", "age": {"$gte": "18", "$ne": null}, "$limit": "5", "$sort": {"age": "-1"}}),
            &table(),
        )
        .expect("valid query");
        assert_eq!(q.limit, Some(5));
        assert_eq!(
            q.sort,
            vec![Sort {
                column: "age".into(),
                descending: true
            }]
        );
        assert_eq!(q.filter.len(), 3);
    }

    #[test]
    fn unknown_column_and_operator_are_bad_requests() {
        for bad in [
            json!({"nope": 1}),
            json!({"name": {"$regex": "x"}}),
            json!({"$where": "1=1"}),
            json!({"$sort": {"name; drop table x": 1}}),
            json!({"$select": ["name\""]}),
            json!({"$limit": "-1"}),
        ] {
            let err = Query::parse(&bad, &table()).expect_err("must be rejected");
            assert_eq!(err.status(), 400, "{bad}");
        }
    }

    #[test]
    fn subscription_queries_match_rows_in_memory() {
        let q = Query::parse(
            &json!({"age": {"$gte": 18}, "$or": [{"name": "a"}, {"name": {"$in": ["b", "c"]}}]}),
            &table(),
        )
        .expect("valid");
        assert!(q.matches(&json!({"age": 18, "name": "c"})));
        assert!(!q.matches(&json!({"age": 17, "name": "a"})));
        assert!(!q.matches(&json!({"age": 30, "name": "d"})));
        assert!(!q.matches(&json!({"age": null, "name": "a"})));
        let ne = Query::parse(&json!({"age": {"$ne": 5}}), &table()).expect("valid");
        assert!(ne.matches(&json!({"age": null})) && !ne.matches(&json!({"age": 5})));
    }

    #[test]
    fn or_branches_nest() {
        let q = Query::parse(&json!({"$or": [{"name": "a"}, {"age": {"$lt": 3}}]}), &table()).expect("valid");
        assert!(matches!(&q.filter[..], [Condition::Or(b)] if b.len() == 2));
    }
}
