//! Authentication: local strategy (argon2id passwords), JWTs (quill's own and, optionally,
//! an external issuer's), login rate limits, and the [`Principal`] every call carries.
//!
//! Feathers-shaped: `create` on `authentication` with `{strategy: "local", email, password}`
//! or `{strategy: "jwt", accessToken}` answers `{accessToken, authentication, user}`.

mod api_key;
mod jwt;
mod limit;
pub mod password;
mod principal;
mod users;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::get_current_timestamp;

use serde_json::{Value, json};

pub use api_key::{KeyHolder, KeyRefused, issue_api_key};
pub use jwt::{Claims, JwtError, generate_secret};
pub use limit::network_of;
pub use principal::Principal;
pub use users::Users;

use crate::config::AuthConfig;
use crate::error::{Error, ErrorKind, Result};
use jwt::{ExternalTokens, Tokens};
use limit::LoginLimiter;

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("authentication: service '{0}' is not configured")]
    NoService(String),
    #[error("authentication: the users table has no column '{0}'")]
    NoColumn(String),
    #[error(transparent)]
    External(#[from] JwtError),
}

/// A successful login: the Feathers result and the caller it established.
pub struct Authenticated {
    pub result: Value,
    pub principal: Principal,
}

/// Logs users in and turns tokens into principals.
pub struct Authenticator {
    users: Arc<dyn Users>,
    username_field: String,
    password_field: String,
    role_field: Option<String>,
    tokens: Tokens,
    external: Option<ExternalTokens>,
    limiter: LoginLimiter,
    hash_policy: password::HashPolicy,
    /// Recently checked tokens, so that REST requests do not load the user every time.
    /// Entries live a few seconds and go at once when their user's row changes.
    recent: Mutex<HashMap<String, (Principal, Instant)>>,
}

/// How long a checked token is trusted without loading its user again.
const RECENT_FOR: Duration = Duration::from_secs(10);
const RECENT_MAX: usize = 10_000;

fn invalid_login() -> Error {
    Error::new(ErrorKind::NotAuthenticated, "Invalid login")
}

fn not_authenticated(message: &str) -> Error {
    Error::new(ErrorKind::NotAuthenticated, message)
}

impl Authenticator {
    pub fn new(config: &AuthConfig, secret: &str, users: Arc<dyn Users>) -> Result<Self, AuthSetupError> {
        for column in [
            Some(&config.username_field),
            Some(&config.password_field),
            config.role_field.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !users.has_column(column) {
                return Err(AuthSetupError::NoColumn(column.clone()));
            }
        }
        Ok(Self {
            tokens: Tokens::new(secret.as_bytes(), config),
            external: config.external.as_ref().map(ExternalTokens::new).transpose()?,
            limiter: LoginLimiter::new(config.rate_limit),
            hash_policy: config.password_hash,
            recent: Mutex::new(HashMap::new()),
            username_field: config.username_field.clone(),
            password_field: config.password_field.clone(),
            role_field: config.role_field.clone(),
            users,
        })
    }

    /// The name of the users service.
    pub fn users_service(&self) -> &str {
        self.users.service()
    }

    /// Whether `service` is the users service.
    pub fn is_users_service(&self, service: &str) -> bool {
        self.users.service() == service
    }

    /// A users row's id, as text.
    pub fn user_id_of(&self, row: &Value) -> Option<String> {
        self.users.id_of(row)
    }

    pub fn password_field(&self) -> &str {
        &self.password_field
    }

    pub fn username_field(&self) -> &str {
        &self.username_field
    }

    /// Counts a sign-up from `address`; false when it has used up its sign-ups.
    pub fn signup_allowed(&self, address: IpAddr) -> bool {
        self.limiter.signup(address)
    }

    /// `create` on `authentication`.
    pub async fn login(&self, data: &Value, address: Option<IpAddr>) -> Result<Authenticated> {
        match data.get("strategy").and_then(Value::as_str) {
            Some("local") => self.local(data, address).await,
            Some("jwt") => {
                let token = data
                    .get("accessToken")
                    .and_then(Value::as_str)
                    .ok_or_else(|| not_authenticated("No access token"))?;
                let principal = self.principal(token).await?;
                let payload = self.tokens.verify(token).map(|c| json!(c)).unwrap_or(Value::Null);
                Ok(Authenticated {
                    result: json!({
                        "accessToken": token,
                        "authentication": { "strategy": "jwt", "accessToken": token, "payload": payload },
                        "user": principal.user,
                    }),
                    principal,
                })
            }
            Some(other) => Err(not_authenticated(&format!("Invalid authentication strategy '{other}'"))),
            None => Err(not_authenticated(
                "Invalid authentication information (no `strategy` set)",
            )),
        }
    }

    async fn local(&self, data: &Value, address: Option<IpAddr>) -> Result<Authenticated> {
        let username = data
            .get(&self.username_field)
            .and_then(Value::as_str)
            .unwrap_or_default();
        let password = data
            .get(&self.password_field)
            .and_then(Value::as_str)
            .unwrap_or_default();
        // Nothing to check, nothing to count: such an attempt can never succeed, costs no
        // hash, and must not fill the limiter with keys for free.
        if username.is_empty() || password.is_empty() {
            return Err(invalid_login());
        }
        if !self.limiter.begin_login(address, username) {
            return Err(Error::new(
                ErrorKind::TooManyRequests,
                "Too many failed login attempts, try again later",
            ));
        }
        let row = self.users.find_by(&self.username_field, username).await?;
        let stored = row
            .as_ref()
            .and_then(|r| r.get(&self.password_field))
            .and_then(Value::as_str)
            .map(str::to_owned);
        // Unknown user and wrong password cost the same and answer the same.
        let verified = password::verify(password.to_owned(), stored, self.hash_policy).await;
        let (true, Some(row)) = (verified, row) else {
            return Err(invalid_login());
        };
        self.limiter.login_succeeded(address, username);
        let id = self.users.id_of(&row).ok_or_else(invalid_login)?;
        let (token, claims) = self
            .tokens
            .issue(&id)
            .map_err(|_| Error::general("cannot issue a token"))?;
        let principal = self
            .principal_from_row(&row, Some(claims.exp))
            .ok_or_else(invalid_login)?;
        Ok(Authenticated {
            result: json!({
                "accessToken": token,
                "authentication": { "strategy": "local", "accessToken": token, "payload": claims },
                "user": principal.user,
            }),
            principal,
        })
    }

    /// The caller a token stands for. quill's tokens name a user who must still exist;
    /// external tokens carry their user in their claims.
    pub async fn principal(&self, token: &str) -> Result<Principal> {
        let now = Instant::now();
        if let Ok(recent) = self.recent.lock()
            && let Some((principal, at)) = recent.get(token)
            && now.duration_since(*at) < RECENT_FOR
            && principal.expires_at.is_none_or(|exp| exp > get_current_timestamp())
        {
            return Ok(principal.clone());
        }
        let principal = self.check(token).await?;
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() >= RECENT_MAX {
                recent.retain(|_, (_, at)| now.duration_since(*at) < RECENT_FOR);
                if recent.len() >= RECENT_MAX {
                    recent.clear();
                }
            }
            recent.insert(token.to_owned(), (principal.clone(), now));
        }
        Ok(principal)
    }

    /// A user's row changed or went away: their tokens are checked afresh from now on.
    pub fn forget_user(&self, id: &str) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.retain(|_, (principal, _)| principal.id != id);
        }
    }

    /// The users table was emptied: every token is checked afresh from now on.
    pub fn forget_everyone(&self) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.clear();
        }
    }

    async fn check(&self, token: &str) -> Result<Principal> {
        match self.tokens.verify(token) {
            Ok(claims) => {
                let row = self
                    .users
                    .get(&claims.sub)
                    .await
                    .map_err(|e| {
                        if e.status() >= 500 {
                            e
                        } else {
                            not_authenticated("User not found")
                        }
                    })?
                    .ok_or_else(|| not_authenticated("User not found"))?;
                self.principal_from_row(&row, Some(claims.exp))
                    .ok_or_else(|| not_authenticated("User not found"))
            }
            Err(JwtError::Expired) => Err(not_authenticated("Token expired")),
            Err(own) => match &self.external {
                Some(external) => match external.verify(token) {
                    Ok(user) => Ok(Principal {
                        id: user.id,
                        role: user.role,
                        user: Value::Object(user.claims),
                        expires_at: user.expires_at,
                    }),
                    Err(JwtError::Expired) => Err(not_authenticated("Token expired")),
                    Err(_) => Err(not_authenticated("Invalid token")),
                },
                None => {
                    tracing::debug!(error = %own, "token rejected");
                    Err(not_authenticated("Invalid token"))
                }
            },
        }
    }

    /// The principal a users row makes (also used when a user's row changes).
    pub fn principal_from_row(&self, row: &Value, expires_at: Option<u64>) -> Option<Principal> {
        let id = self.users.id_of(row)?;
        // External users' id space is theirs: a local row with such an id (a text id a
        // client chose) is nobody, or it would own the external user's rows and channels.
        if self.external.as_ref().is_some_and(|e| id.starts_with(e.id_prefix())) {
            return None;
        }
        let role = self
            .role_field
            .as_ref()
            .and_then(|f| row.get(f))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut principal = Principal {
            id,
            role,
            user: Value::Null,
            expires_at,
        };
        // The user object goes back to the user at every login: what they may see of their
        // own row, as any read of it would show.
        let mut user = row.clone();
        self.users.present(&principal, &mut user);
        if let Value::Object(fields) = &mut user {
            fields.remove(&self.password_field);
        }
        principal.user = user;
        Some(principal)
    }
}

/// What a logout answers, as Feathers: the authentication it ends (REST, `/ws` and
/// socket.io alike).
pub fn logout_result(token: Option<&str>, principal: &Principal) -> Value {
    json!({
        "accessToken": token,
        "authentication": { "strategy": "jwt", "accessToken": token },
        "user": principal.user,
    })
}

/// A row's id as text.
pub fn id_text(row: &Value, id_column: &str) -> Option<String> {
    match row.get(id_column)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
