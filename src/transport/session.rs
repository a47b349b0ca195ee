//! What the `/ws` and socket.io sessions share: login state changes and token expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// A change to a session's login, reported by the task that made it.
pub(super) enum Login {
    In { expires_at: Option<u64> },
    Out,
}

impl Login {
    /// When the session must log out again.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self {
            Login::In { expires_at } => expires_at.map(instant_at),
            Login::Out => None,
        }
    }
}

/// Sleeps until the deadline, or forever without one.
pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A Unix time as an `Instant`.
fn instant_at(unix_seconds: u64) -> Instant {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Instant::now() + Duration::from_secs(unix_seconds.saturating_sub(now))
}
