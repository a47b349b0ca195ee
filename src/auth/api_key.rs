//! Supabase-style API keys and access tokens: a JWT with `role: "anon"` and no subject is an
//! anonymous client; one that names a user is that user. quill's own secret signs them, or
//! the configured external issuer does.

use jsonwebtoken::errors::ErrorKind as JwtKind;
use serde_json::{Map, Value};

use super::{Authenticator, Principal};

/// Who a key or access token stands for.
#[derive(Debug, Clone)]
pub enum KeyHolder {
    /// `role: "anon"`: an anonymous connection, until the key expires.
    Anonymous {
        expires_at: Option<u64>,
    },
    User(Principal),
}

impl KeyHolder {
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            KeyHolder::Anonymous { expires_at } => *expires_at,
            KeyHolder::User(principal) => principal.expires_at,
        }
    }

    pub fn principal(&self) -> Option<&Principal> {
        match self {
            KeyHolder::Anonymous { .. } => None,
            KeyHolder::User(principal) => Some(principal),
        }
    }
}

/// Why a key or token was refused; the messages are Supabase's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefused {
    #[error("Token has expired")]
    Expired,
    #[error("The token provided is not a valid JWT")]
    Malformed,
    #[error("Failed to validate JWT signature")]
    Signature,
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    #[error("The token's audience or issuer is not this server's")]
    WrongIssuer,
    #[error("Role '{0}' is not supported: use an anon key or a user's token")]
    Role(String),
    #[error("User not found")]
    UnknownUser,
    #[error("Cannot check the token now, try again")]
    Unavailable,
}

impl KeyRefused {
    /// The code Supabase puts before the message in a join error.
    pub fn code(&self) -> &'static str {
        match self {
            KeyRefused::Malformed => "MalformedJWT",
            KeyRefused::Signature => "JwtSignatureError",
            KeyRefused::Unavailable => "UnableToConnectToProject",
            _ => "InvalidJWTToken",
        }
    }
}

fn refused(e: &jsonwebtoken::errors::Error) -> KeyRefused {
    match e.kind() {
        JwtKind::ExpiredSignature => KeyRefused::Expired,
        JwtKind::InvalidSignature | JwtKind::InvalidAlgorithm | JwtKind::ImmatureSignature => KeyRefused::Signature,
        JwtKind::MissingRequiredClaim(_) => KeyRefused::MissingClaims,
        JwtKind::InvalidAudience | JwtKind::InvalidIssuer => KeyRefused::WrongIssuer,
        _ => KeyRefused::Malformed,
    }
}

impl Authenticator {
    /// Who a Supabase-style API key or access token stands for.
    pub async fn key_holder(&self, token: &str) -> Result<KeyHolder, KeyRefused> {
        if jsonwebtoken::decode_header(token).is_err() {
            return Err(KeyRefused::Malformed);
        }
        let own = self.tokens.verify_key(token);
        let (claims, role_claim, names_user) = match (&own, &self.external) {
            (Ok(claims), _) => (claims.clone(), "role", claims.contains_key("sub")),
            // Expired or malformed as quill's: the external issuer cannot make it valid.
            (Err(e), _) if matches!(e.kind(), JwtKind::ExpiredSignature) => return Err(KeyRefused::Expired),
            (Err(e), None) => return Err(refused(e)),
            (Err(_), Some(external)) => {
                let claims = external.verify_claims(token).map_err(|e| refused(&e))?;
                let names_user = external.names_user(&claims);
                (claims, external.role_claim().unwrap_or("role"), names_user)
            }
        };
        if names_user {
            return match self.principal(token).await {
                Ok(principal) => Ok(KeyHolder::User(principal)),
                Err(e) if e.status() >= 500 => Err(KeyRefused::Unavailable),
                Err(_) => Err(KeyRefused::UnknownUser),
            };
        }
        anonymous(&claims, role_claim)
    }
}

/// Mints an API key for `role` with quill's secret (only `anon` means anything to quill):
/// what `quill token` prints, for `createClient(url, key)`.
pub fn issue_api_key(
    config: &crate::config::AuthConfig,
    secret: &str,
    role: &str,
    valid_for_seconds: u64,
) -> Result<String, super::JwtError> {
    super::jwt::Tokens::new(secret.as_bytes(), config).issue_key(role, valid_for_seconds)
}

fn anonymous(claims: &Map<String, Value>, role_claim: &str) -> Result<KeyHolder, KeyRefused> {
    let expires_at = claims.get("exp").and_then(Value::as_u64);
    match claims.get(role_claim).and_then(Value::as_str) {
        Some("anon") => Ok(KeyHolder::Anonymous { expires_at }),
        Some(other) => Err(KeyRefused::Role(other.to_owned())),
        None => Err(KeyRefused::MissingClaims),
    }
}
