//! The connections that service calls run on. sqlx's own pool makes one more round trip
//! each time a connection goes back (a ping that flushes whatever an interrupted query left
//! behind); this pool takes a connection back as it is, but only one whose statement ran
//! to its end outside a transaction: any other is closed at once, so a pooled connection
//! is always idle between statements.

use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// A connection older than this is replaced when it is next taken (sqlx's default
/// lifetime): long-lived backends only grow.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// ... and one unused for this long (sqlx's default idle timeout): after a quiet spell the
/// server may have dropped it.
const MAX_IDLE: Duration = Duration::from_secs(10 * 60);
/// How long a call waits for a free connection, or for a new one to connect.
const WAIT: Duration = Duration::from_secs(5);

/// A pool of connections for service calls.
#[derive(Clone)]
pub(crate) struct Connections {
    pool: Pool<Manager>,
}

struct Manager {
    options: PgConnectOptions,
}

/// A pooled connection.
struct Pooled {
    conn: PgConnection,
}

impl managed::Manager for Manager {
    type Type = Pooled;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Pooled, sqlx::Error> {
        let conn = PgConnection::connect_with(&self.options).await?;
        Ok(Pooled { conn })
    }

    async fn recycle(&self, _: &mut Pooled, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if metrics.age() > MAX_LIFETIME {
            return Err(RecycleError::message("past its lifetime"));
        }
        if metrics.last_used() > MAX_IDLE {
            return Err(RecycleError::message("idle too long"));
        }
        Ok(())
    }
}

impl Connections {
    /// A pool of at most `size` connections made with `options`; none is opened yet.
    pub(crate) fn new(options: PgConnectOptions, size: usize) -> Result<Self, sqlx::Error> {
        let pool = Pool::builder(Manager { options })
            .max_size(size.max(1))
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
        Ok(Self { pool })
    }

    /// A connection of the pool, for one or more statements; see [`Checkout::release`].
    pub(crate) async fn get(&self) -> Result<Checkout, sqlx::Error> {
        match self.pool.get().await {
            Ok(pooled) => Ok(Checkout(Some(pooled))),
            Err(PoolError::Backend(e)) => Err(e),
            Err(PoolError::Timeout(_)) => Err(sqlx::Error::PoolTimedOut),
            Err(PoolError::Closed) => Err(sqlx::Error::PoolClosed),
            Err(e) => Err(sqlx::Error::Configuration(Box::new(e))),
        }
    }
}

/// A connection taken from the pool. It goes back only through [`Checkout::release`];
/// dropped otherwise (its call was cancelled mid-statement), it is closed.
pub(crate) struct Checkout(Option<Object<Manager>>);

impl Checkout {
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        // `release` and `drop` take the connection out, and both consume the checkout.
        &mut self
            .0
            .as_mut()
            .expect("a checkout holds its connection until it is consumed")
            .conn
    }

    /// Gives the connection back after a statement ran to its end (and any transaction
    /// was committed or rolled back), unless it failed for a reason other than the
    /// database's answer to that statement: a broken socket, a protocol error, or the
    /// server closing the session (a restart). Those connections are closed.
    /// sqlx reads whatever is left of an answer before the next statement.
    pub(crate) fn release<T>(mut self, outcome: &Result<T, sqlx::Error>) {
        let reusable = match outcome {
            Ok(_) | Err(sqlx::Error::RowNotFound) => true,
            Err(sqlx::Error::Database(e)) => !e.code().is_some_and(|code| ends_session(&code)),
            Err(_) => false,
        };
        if reusable {
            // Dropping the object returns it to the pool.
            self.0.take();
        }
    }
}

/// SQLSTATEs with which the server ends the session: connection exceptions (08) and
/// operator intervention (57P: shutdown, crash, restart).
fn ends_session(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P")
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Out of the pool, and closed as it drops: it may hold half a statement.
            drop(Object::take(conn));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ends_session;

    #[test]
    fn a_server_shutdown_or_connection_error_ends_the_session_but_a_constraint_does_not() {
        for code in ["57P01", "57P02", "57P03", "08006", "08003"] {
            assert!(ends_session(code), "{code}");
        }
        for code in ["23505", "22P02", "42501", "40001", "57014"] {
            assert!(!ends_session(code), "{code}");
        }
    }
}
