//! The connections that service calls run on. sqlx's own pool makes one more round trip
//! each time a connection goes back (a ping that flushes whatever an interrupted query left
//! behind); this pool hands a connection back as it is, and a query that did not run to
//! its end closes its connection instead, so a pooled connection is always idle between
//! statements.

use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// A connection older than this is closed when it comes back (sqlx's default lifetime):
/// long-lived backends only grow.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
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

/// A pooled connection, and whether its last checkout ended between statements.
struct Pooled {
    conn: PgConnection,
    idle: bool,
}

impl managed::Manager for Manager {
    type Type = Pooled;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Pooled, sqlx::Error> {
        let conn = PgConnection::connect_with(&self.options).await?;
        Ok(Pooled { conn, idle: true })
    }

    /// Runs when a connection is taken again: one that was not released (its call was
    /// cancelled mid-statement, or the socket broke) is closed here, not reused.
    async fn recycle(&self, pooled: &mut Pooled, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if !pooled.idle {
            return Err(RecycleError::message("its last statement did not finish"));
        }
        if metrics.age() > MAX_LIFETIME {
            return Err(RecycleError::message("past its lifetime"));
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
            Ok(mut pooled) => {
                pooled.idle = false;
                Ok(Checkout(pooled))
            }
            Err(PoolError::Backend(e)) => Err(e),
            Err(PoolError::Timeout(_)) => Err(sqlx::Error::PoolTimedOut),
            Err(PoolError::Closed) => Err(sqlx::Error::PoolClosed),
            Err(e) => Err(sqlx::Error::Configuration(Box::new(e))),
        }
    }
}

/// A connection taken from the pool. It goes back when dropped, but is used again only if
/// it was released after its last statement ran to its end.
pub(crate) struct Checkout(Object<Manager>);

impl Checkout {
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.0.conn
    }

    /// Marks the connection reusable after a statement ran to its end, unless it failed for
    /// a reason other than the database's answer (a broken socket, a protocol error).
    /// sqlx reads whatever is left of an answer before the next statement.
    pub(crate) fn release<T>(mut self, outcome: &Result<T, sqlx::Error>) {
        self.0.idle = matches!(
            outcome,
            Ok(_) | Err(sqlx::Error::Database(_) | sqlx::Error::RowNotFound)
        );
    }
}
