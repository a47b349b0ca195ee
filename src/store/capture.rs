//! Installs quill's capture triggers on a table. Idempotent, and safe when several quill
//! instances start at once: they serialize on an advisory lock and skip what exists.

use sqlx::{AssertSqlSafe, PgPool};

use super::catalog::Table;
use super::sql::quote_ident;

/// A SQL string literal (the id column's name, as a trigger argument).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[derive(Debug, thiserror::Error)]
#[error("cannot install change capture on {table}")]
pub struct CaptureError {
    table: String,
    #[source]
    source: sqlx::Error,
}

/// The triggers, by name: (name, event, transition table clause). The update trigger also
/// gets the id column, to pair old and new rows.
const TRIGGERS: [(&str, &str, &str); 4] = [
    ("quill_capture_insert", "INSERT", "REFERENCING NEW TABLE AS quill_new"),
    (
        UPDATE_TRIGGER,
        "UPDATE",
        "REFERENCING OLD TABLE AS quill_old NEW TABLE AS quill_new",
    ),
    ("quill_capture_delete", "DELETE", "REFERENCING OLD TABLE AS quill_old"),
    // TRUNCATE triggers have no transition tables: one change for the whole table.
    ("quill_capture_truncate", "TRUNCATE", ""),
];

const UPDATE_TRIGGER: &str = "quill_capture_update";

/// Makes sure the capture triggers exist on `table` (and re-makes an update trigger of an
/// older quill, which logged no old rows).
pub async fn install_capture(pool: &PgPool, table: &Table) -> Result<(), CaptureError> {
    let err = |source| CaptureError {
        table: format!("{}.{}", table.schema, table.name),
        source,
    };
    let id = &table.id().name;
    let present: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger
         WHERE tgrelid = to_regclass($1) AND tgname = ANY($2)
           AND (tgname <> $3 OR (tgfoid = 'quill.capture_update'::regproc AND tgnargs = 1
                                 AND tgargs = convert_to($4, 'UTF8') || '\\x00'::bytea))",
    )
    .bind(&table.qualified)
    .bind(TRIGGERS.iter().map(|t| t.0).collect::<Vec<_>>())
    .bind(UPDATE_TRIGGER)
    .bind(id)
    .fetch_one(pool)
    .await
    .map_err(err)?;
    let recorded: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM quill.captured
                        WHERE table_schema = $1 AND table_name = $2 AND id_column IS NOT DISTINCT FROM $3)",
    )
    .bind(&table.schema)
    .bind(&table.name)
    .bind(id)
    .fetch_one(pool)
    .await
    .map_err(err)?;
    if present == TRIGGERS.len() as i64 && recorded {
        return Ok(());
    }
    let mut tx = pool.begin().await.map_err(err)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('quill.install_capture'))")
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    for (name, event, transition) in TRIGGERS {
        let function = if name == UPDATE_TRIGGER {
            format!("quill.capture_update({})", quote_literal(id))
        } else {
            "quill.capture()".to_owned()
        };
        let sql = format!(
            "CREATE OR REPLACE TRIGGER {name} AFTER {event} ON {table} {transition} \
             FOR EACH STATEMENT EXECUTE FUNCTION {function}",
            name = quote_ident(name),
            table = table.qualified,
        );
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await.map_err(err)?;
    }
    // So that the DDL event trigger recreates capture on a table dropped and created again.
    sqlx::query(
        "INSERT INTO quill.captured (table_schema, table_name, id_column) VALUES ($1, $2, $3)
         ON CONFLICT (table_schema, table_name) DO UPDATE SET id_column = EXCLUDED.id_column",
    )
    .bind(&table.schema)
    .bind(&table.name)
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(())
}
