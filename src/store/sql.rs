//! The one place SQL text is assembled. Identifiers come from the catalog ([`Table`]) and
//! are quoted by [`quote_ident`]; every value is a bind parameter, cast to its column's type
//! by Postgres. Nothing from a request is ever spliced into the text.

use serde_json::{Map, Value};

use super::catalog::Table;
use crate::service::query::{CompareOp, Condition, Query};

/// Quotes an identifier the way Postgres' `quote_ident` does.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A value to bind, in the order of its `$n`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Bind {
    Text(String),
    TextArray(Vec<String>),
    Json(Value),
    Int(i64),
}

/// SQL text plus its binds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Statement {
    pub sql: String,
    pub binds: Vec<Bind>,
}

/// Which rows a write or a read targets: one id (plus the query's conditions, as Feathers
/// applies `params.query` to id methods too) or only the conditions.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub id: Option<&'a str>,
    pub filter: &'a [Condition],
}

/// How an UPDATE treats columns the data leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode<'a> {
    /// PATCH: only the given columns change.
    Patch,
    /// PUT: the row is replaced; columns not given go back to their default (or NULL),
    /// except those in `keep`.
    Replace { keep: &'a [String] },
}

struct Builder<'a> {
    table: &'a Table,
    sql: String,
    binds: Vec<Bind>,
}

impl<'a> Builder<'a> {
    fn new(table: &'a Table) -> Self {
        Self {
            table,
            sql: String::with_capacity(256),
            binds: Vec::new(),
        }
    }

    fn bind(&mut self, value: Bind) -> String {
        self.binds.push(value);
        format!("${}", self.binds.len())
    }

    fn push(&mut self, text: &str) {
        self.sql.push_str(text);
    }

    /// `t."column"`, for a column the query layer has already checked exists.
    fn column(&self, name: &str) -> String {
        format!("t.{}", quote_ident(name))
    }

    fn cast(&mut self, column: &str, value: Bind) -> String {
        let ty = self
            .table
            .column(column)
            .map(|c| c.sql_type.clone())
            .unwrap_or_else(|| "text".into());
        let array = matches!(value, Bind::TextArray(_));
        let param = self.bind(value);
        if array {
            format!("CAST({param} AS {ty}[])")
        } else {
            format!("CAST({param} AS {ty})")
        }
    }

    fn conditions(&mut self, conditions: &[Condition]) -> String {
        if conditions.is_empty() {
            return "TRUE".into();
        }
        let parts: Vec<String> = conditions.iter().map(|c| self.condition(c)).collect();
        parts.join(" AND ")
    }

    fn condition(&mut self, condition: &Condition) -> String {
        match condition {
            Condition::Compare { column, op, value } => {
                let lhs = self.column(column);
                let rhs = self.cast(column, Bind::Text(value.clone()));
                let op = match op {
                    CompareOp::Eq => "=",
                    CompareOp::Ne => "IS DISTINCT FROM",
                    CompareOp::Lt => "<",
                    CompareOp::Lte => "<=",
                    CompareOp::Gt => ">",
                    CompareOp::Gte => ">=",
                };
                format!("{lhs} {op} {rhs}")
            }
            Condition::IsNull { column, negated } => {
                let not = if *negated { " NOT" } else { "" };
                format!("{} IS{not} NULL", self.column(column))
            }
            Condition::In {
                column,
                negated,
                values,
            } => {
                let lhs = self.column(column);
                let rhs = self.cast(column, Bind::TextArray(values.clone()));
                if *negated {
                    format!("NOT ({lhs} = ANY({rhs}))")
                } else {
                    format!("{lhs} = ANY({rhs})")
                }
            }
            Condition::Or(branches) if branches.is_empty() => "FALSE".into(),
            Condition::Or(branches) => {
                let parts: Vec<String> = branches.iter().map(|b| format!("({})", self.conditions(b))).collect();
                format!("({})", parts.join(" OR "))
            }
        }
    }

    fn target(&mut self, target: Target<'_>) -> String {
        let mut clause = self.conditions(target.filter);
        if let Some(id) = target.id {
            let id_name = self.table.id().name.clone();
            let lhs = self.column(&id_name);
            let rhs = self.cast(&id_name, Bind::Text(id.to_owned()));
            clause = format!("{lhs} = {rhs} AND ({clause})");
        }
        clause
    }

    fn finish(self) -> Statement {
        Statement {
            sql: self.sql,
            binds: self.binds,
        }
    }
}

/// `SELECT row_to_json(t) ...` with the query's filter, order and page.
pub(crate) fn select(table: &Table, query: &Query, id: Option<&str>, limit: Option<i64>) -> Statement {
    let mut b = Builder::new(table);
    let target = Target {
        id,
        filter: &query.filter,
    };
    let clause = b.target(target);
    b.push(&format!(
        "SELECT row_to_json(t) FROM {} AS t WHERE {clause}",
        table.qualified
    ));
    let mut order: Vec<String> = query
        .sort
        .iter()
        .map(|s| format!("{} {}", b.column(&s.column), if s.descending { "DESC" } else { "ASC" }))
        .collect();
    // A stable tie-breaker, so that pages never repeat or skip rows.
    let id_name = &table.id().name;
    if !query.sort.iter().any(|s| &s.column == id_name) {
        order.push(format!("{} ASC", b.column(id_name)));
    }
    b.push(&format!(" ORDER BY {}", order.join(", ")));
    if let Some(limit) = limit {
        let p = b.bind(Bind::Int(limit));
        b.push(&format!(" LIMIT {p}"));
    }
    if query.skip > 0 {
        let p = b.bind(Bind::Int(query.skip));
        b.push(&format!(" OFFSET {p}"));
    }
    b.finish()
}

/// `SELECT count(*)` over the query's filter.
pub(crate) fn count(table: &Table, filter: &[Condition]) -> Statement {
    let mut b = Builder::new(table);
    let clause = b.conditions(filter);
    b.push(&format!("SELECT count(*) FROM {} AS t WHERE {clause}", table.qualified));
    b.finish()
}

/// INSERT of one row. Postgres converts the JSON object to the row type itself
/// (`jsonb_populate_record`), so every column type, arrays and JSON included, just works.
pub(crate) fn insert(table: &Table, row: &Map<String, Value>) -> Statement {
    let mut b = Builder::new(table);
    if row.is_empty() {
        b.push(&format!(
            "INSERT INTO {} AS t DEFAULT VALUES RETURNING row_to_json(t)",
            table.qualified
        ));
        return b.finish();
    }
    let columns: Vec<String> = row.keys().map(|k| quote_ident(k)).collect();
    let columns = columns.join(", ");
    let p = b.bind(Bind::Json(Value::Object(row.clone())));
    b.push(&format!(
        "INSERT INTO {q} AS t ({columns}) SELECT {columns} FROM jsonb_populate_record(NULL::{q}, {p}) RETURNING row_to_json(t)",
        q = table.qualified
    ));
    b.finish()
}

/// UPDATE of the target rows. A `Replace` tags the transaction so the trigger records
/// `updated` instead of `patched`.
pub(crate) fn update(table: &Table, target: Target<'_>, row: &Map<String, Value>, mode: WriteMode<'_>) -> Statement {
    let mut b = Builder::new(table);
    let id_name = &table.id().name;
    let mut sets: Vec<String> = row.keys().map(|k| format!("{c} = r.{c}", c = quote_ident(k))).collect();
    if let WriteMode::Replace { keep } = mode {
        sets.extend(
            table
                .columns
                .iter()
                .filter(|c| &c.name != id_name && !c.read_only && !row.contains_key(&c.name))
                .filter(|c| !keep.contains(&c.name))
                .map(|c| format!("{} = DEFAULT", quote_ident(&c.name))),
        );
    }
    let p = b.bind(Bind::Json(Value::Object(row.clone())));
    let clause = b.target(target);
    let tag = match mode {
        // set_config(..., true) lasts until the end of this statement's transaction.
        WriteMode::Replace { .. } => ", (SELECT set_config('quill.method', 'update', true)) AS quill_tag",
        WriteMode::Patch => "",
    };
    b.push(&format!(
        "UPDATE {q} AS t SET {sets} FROM jsonb_populate_record(NULL::{q}, {p}) AS r{tag} WHERE {clause} RETURNING row_to_json(t)",
        q = table.qualified,
        sets = sets.join(", "),
    ));
    b.finish()
}

/// DELETE of the target rows.
pub(crate) fn delete(table: &Table, target: Target<'_>) -> Statement {
    let mut b = Builder::new(table);
    let clause = b.target(target);
    b.push(&format!(
        "DELETE FROM {} AS t WHERE {clause} RETURNING row_to_json(t)",
        table.qualified
    ));
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> Table {
        Table::described("public", "we\"ird", "id", &[("id", "bigint"), ("name", "text")]).expect("table")
    }

    #[test]
    fn identifiers_are_quoted_and_values_bound() {
        let q = Query::parse(
            &json!({"name": "x'; drop table t; --", "$sort": {"name": -1}}),
            &table(),
        )
        .expect("valid");
        let st = select(&table(), &q, None, Some(10));
        assert_eq!(
            st.sql,
            "SELECT row_to_json(t) FROM \"public\".\"we\"\"ird\" AS t WHERE t.\"name\" = CAST($1 AS text) \
             ORDER BY t.\"name\" DESC, t.\"id\" ASC LIMIT $2"
        );
        assert_eq!(st.binds[0], Bind::Text("x'; drop table t; --".into()));
    }

    #[test]
    fn replace_tags_the_transaction_and_resets_missing_columns_but_the_kept_ones() {
        let row = json!({"name": "a"});
        let wide = Table::described(
            "public",
            "t",
            "id",
            &[("id", "bigint"), ("name", "text"), ("kept", "text"), ("other", "text")],
        )
        .expect("table");
        let st = update(
            &wide,
            Target {
                id: Some("1"),
                filter: &[],
            },
            row.as_object().expect("object"),
            WriteMode::Replace {
                keep: &["kept".to_owned()],
            },
        );
        assert!(
            st.sql.contains("set_config('quill.method', 'update', true)"),
            "{}",
            st.sql
        );
        assert!(st.sql.contains(r#""other" = DEFAULT"#), "{}", st.sql);
        assert!(!st.sql.contains(r#""kept" = DEFAULT"#), "{}", st.sql);
        let patch = update(
            &table(),
            Target {
                id: Some("1"),
                filter: &[],
            },
            row.as_object().expect("object"),
            WriteMode::Patch,
        );
        assert!(!patch.sql.contains("set_config"));
    }
}
