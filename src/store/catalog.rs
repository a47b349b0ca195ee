//! What quill knows about a table, read from the Postgres catalog at start-up.
//!
//! Every identifier that reaches SQL comes from here, never from a request.

use sqlx::PgPool;

use super::sql::quote_ident;

/// Why a configured table cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("service '{service}': table {schema}.{table} does not exist")]
    MissingTable {
        service: String,
        schema: String,
        table: String,
    },
    #[error("service '{service}': {schema}.{table} is not a plain table (views cannot be captured)")]
    NotATable {
        service: String,
        schema: String,
        table: String,
    },
    #[error("service '{service}': table {schema}.{table} has no column '{column}'")]
    MissingColumn {
        service: String,
        schema: String,
        table: String,
        column: String,
    },
    /// Events and calls name a row by its id: without a unique, non-null id quill could
    /// merge or misroute rows.
    #[error("service '{service}': table {schema}.{table} cannot be served safely: {why}")]
    NoUniqueId {
        service: String,
        schema: String,
        table: String,
        why: String,
    },
    #[error("cannot read the catalog")]
    Database(#[from] sqlx::Error),
}

/// Why `id_column` cannot identify rows of `qualified`, if it cannot: it must be the
/// primary key, or NOT NULL with a single-column unique index (composite keys are not
/// supported: an event names its row by one value).
async fn id_problem(pool: &PgPool, qualified: &str, id_column: &str) -> Result<Option<String>, CatalogError> {
    let (primary, unique_not_null): (Option<Vec<String>>, bool) = sqlx::query_as(
        "SELECT
           (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_index i
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
            WHERE i.indrelid = to_regclass($1) AND i.indisprimary),
           EXISTS (SELECT 1 FROM pg_index i
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnkeyatts = 1
              AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = $2 AND a.attnotnull)",
    )
    .bind(qualified)
    .bind(id_column)
    .fetch_one(pool)
    .await?;
    if unique_not_null {
        return Ok(None);
    }
    Ok(Some(match primary {
        None => format!(
            "it has no primary key, and its id column '{id_column}' is not NOT NULL with a unique index; add a primary key"
        ),
        Some(key) if key.len() > 1 => format!(
            "its primary key ({}) is composite, which quill does not support, and '{id_column}' is not unique on its own; add a single-column key and set `id`",
            key.join(", ")
        ),
        Some(key) => format!(
            "its id column '{id_column}' is not unique (the primary key is '{}'); set `id` to a unique column",
            key.join(", ")
        ),
    }))
}

/// A column and what quill needs to bind values to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The type as Postgres prints it (`format_type`), used in `CAST($n AS <type>)`.
    pub sql_type: String,
    /// The type's name in `pg_type` (`int8`, `text`, `_text` for `text[]`), as Supabase
    /// clients expect it in a change's column list.
    pub type_name: String,
    /// Values of this column cannot be written (GENERATED ALWAYS).
    pub read_only: bool,
    /// The database fills it in: an identity, a serial (a `nextval` default) or a
    /// generated column. Clients do not write it unless the service lets them.
    pub server_generated: bool,
    /// It has a default (so an INSERT may leave it out).
    pub has_default: bool,
    /// It may be NULL.
    pub nullable: bool,
    pub key_kind: KeyKind,
}

/// How an id in a URL is checked before it reaches SQL, so that a string for an integer key
/// is a 404 (as in Feathers) rather than a cast error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Integer,
    Uuid,
    Other,
}

/// A captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// `"schema"."name"`, quoted.
    pub qualified: String,
    pub columns: Vec<Column>,
    /// Index of the id column in `columns`.
    id: usize,
    /// The table's OID: a new one means the table was dropped and created again.
    oid: u32,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Whether a row (as `row_to_json` made it) has exactly this table's columns.
    pub fn fits(&self, row: &serde_json::Value) -> bool {
        row.as_object()
            .is_some_and(|fields| fields.len() == self.columns.len() && fields.keys().all(|k| self.column(k).is_some()))
    }

    pub fn id(&self) -> &Column {
        &self.columns[self.id]
    }

    /// Reads a table's columns; fails with a message naming what is missing.
    pub async fn load(
        pool: &PgPool,
        service: &str,
        schema: &str,
        name: &str,
        id_column: &str,
        extra_columns: &[String],
    ) -> Result<Table, CatalogError> {
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(name));
        let missing = || CatalogError::MissingTable {
            service: service.into(),
            schema: schema.into(),
            table: name.into(),
        };
        let kind: Option<(String, sqlx::postgres::types::Oid)> =
            sqlx::query_as("SELECT relkind::text, oid FROM pg_class WHERE oid = to_regclass($1)")
                .bind(&qualified)
                .fetch_optional(pool)
                .await?;
        let Some((kind, oid)) = kind else {
            return Err(missing());
        };
        match kind.as_str() {
            "r" | "p" => {}
            _ => {
                return Err(CatalogError::NotATable {
                    service: service.into(),
                    schema: schema.into(),
                    table: name.into(),
                });
            }
        }
        type Attribute = (String, String, String, String, String, bool, bool, bool);
        let rows: Vec<Attribute> = sqlx::query_as(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attidentity::text,
                    a.attgenerated::text, t.typname::text, a.atthasdef,
                    COALESCE(pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%', false), NOT a.attnotnull
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
        )
        .bind(&qualified)
        .fetch_all(pool)
        .await?;
        let columns: Vec<Column> = rows
            .into_iter()
            .map(
                |(name, sql_type, identity, generated, typname, has_default, serial, nullable)| Column {
                    name,
                    sql_type,
                    read_only: identity == "a" || generated == "s",
                    server_generated: !identity.is_empty() || generated == "s" || serial,
                    has_default: has_default || !identity.is_empty(),
                    nullable,
                    key_kind: match typname.as_str() {
                        "int2" | "int4" | "int8" => KeyKind::Integer,
                        "uuid" => KeyKind::Uuid,
                        _ => KeyKind::Other,
                    },
                    type_name: typname,
                },
            )
            .collect();
        let missing_column = |column: &str| CatalogError::MissingColumn {
            service: service.into(),
            schema: schema.into(),
            table: name.into(),
            column: column.into(),
        };
        let id = columns
            .iter()
            .position(|c| c.name == id_column)
            .ok_or_else(|| missing_column(id_column))?;
        if let Some(column) = extra_columns
            .iter()
            .find(|c| !columns.iter().any(|col| &col.name == *c))
        {
            return Err(missing_column(column));
        }
        if let Some(why) = id_problem(pool, &qualified, id_column).await? {
            return Err(CatalogError::NoUniqueId {
                service: service.into(),
                schema: schema.into(),
                table: name.into(),
                why,
            });
        }
        Ok(Table {
            schema: schema.into(),
            name: name.into(),
            qualified,
            columns,
            id,
            oid: oid.0,
        })
    }

    /// A table described in code, without asking the catalog: for fuzzers and tests of the
    /// query and SQL layers. Columns are (name, type as `format_type` prints it); `id`
    /// must be one of them.
    pub fn described(schema: &str, name: &str, id: &str, columns: &[(&str, &str)]) -> Option<Table> {
        let columns: Vec<Column> = columns
            .iter()
            .map(|(n, t)| Column {
                name: (*n).into(),
                sql_type: (*t).into(),
                type_name: type_name_of(t),
                read_only: false,
                server_generated: false,
                has_default: false,
                nullable: true,
                key_kind: match *t {
                    "smallint" | "integer" | "bigint" => KeyKind::Integer,
                    "uuid" => KeyKind::Uuid,
                    _ => KeyKind::Other,
                },
            })
            .collect();
        let id = columns.iter().position(|c| c.name == id)?;
        Some(Table {
            schema: schema.into(),
            name: name.into(),
            qualified: format!("{}.{}", quote_ident(schema), quote_ident(name)),
            columns,
            id,
            oid: 0,
        })
    }
}

/// The `pg_type` name of a type as `format_type` prints it, for tables described in code.
fn type_name_of(sql_type: &str) -> String {
    if let Some(element) = sql_type.strip_suffix("[]") {
        return format!("_{}", type_name_of(element));
    }
    match sql_type {
        "smallint" => "int2",
        "integer" => "int4",
        "bigint" => "int8",
        "real" => "float4",
        "double precision" => "float8",
        "boolean" => "bool",
        "timestamp with time zone" => "timestamptz",
        "timestamp without time zone" => "timestamp",
        other => other,
    }
    .to_owned()
}
