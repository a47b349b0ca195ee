//! What the `/ws` and socket.io sessions share: one login flow (log in, log out, token
//! expiry) that changes the hub's view of the connection the same way on both.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use super::AppState;
use crate::auth::logout_result;
use crate::error::{Error, ErrorKind, Result};
use crate::hub::ConnId;

/// A persistent connection's login. Cheap to clone; clones share the login.
#[derive(Clone)]
pub(super) struct SessionAuth {
    conn: ConnId,
    /// The client's address (for login limits).
    peer: Option<IpAddr>,
    /// Tells the session loop when the login expires.
    logins: UnboundedSender<Login>,
    /// The access token of the current login (a logout may name it).
    token: Arc<Mutex<Option<String>>>,
}

impl SessionAuth {
    pub(super) fn new(conn: ConnId, peer: Option<IpAddr>, logins: UnboundedSender<Login>) -> Self {
        Self {
            conn,
            peer,
            logins,
            token: Arc::default(),
        }
    }

    pub(super) fn peer(&self) -> Option<IpAddr> {
        self.peer
    }

    /// `create` on `authentication`: the connection is logged in for channels and calls.
    pub(super) async fn login(&self, state: &AppState, data: &Value) -> Result<Value> {
        let auth = state.services.authenticate(data, self.peer).await?;
        let expires_at = auth.principal.expires_at;
        state.hub.login(self.conn, auth.principal);
        let token = auth
            .result
            .get("accessToken")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Ok(mut current) = self.token.lock() {
            *current = token;
        }
        let _ = self.logins.send(Login::In { expires_at });
        Ok(auth.result)
    }

    /// `remove` on `authentication` (with the token, or null): leaves every user channel
    /// and answers with the authentication it ends, as Feathers does.
    pub(super) fn logout(&self, state: &AppState, named: &Value) -> Result<Value> {
        let principal = state
            .hub
            .principal(self.conn)
            .ok_or_else(|| Error::new(ErrorKind::NotAuthenticated, "Not authenticated"))?;
        let mut current = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if let (Value::String(named), Some(token)) = (named, current.as_deref())
            && named != token
        {
            return Err(Error::new(ErrorKind::NotAuthenticated, "Invalid access token"));
        }
        let token = current.take();
        drop(current);
        state.hub.logout(self.conn);
        let _ = self.logins.send(Login::Out);
        Ok(logout_result(token.as_deref(), &principal))
    }

    /// The login's token expired: the connection is anonymous from now on (the socket
    /// stays, as in Feathers).
    pub(super) fn expire(&self, state: &AppState) {
        if let Ok(mut current) = self.token.lock() {
            current.take();
        }
        state.hub.logout(self.conn);
    }
}

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
pub(super) fn instant_at(unix_seconds: u64) -> Instant {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let wait = Duration::from_secs(unix_seconds.saturating_sub(now));
    // A token "valid" for centuries: far enough (an Instant cannot hold every u64).
    Instant::now()
        .checked_add(wait)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400))
}
