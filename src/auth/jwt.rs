//! JSON Web Tokens: quill's own (HS256) and, optionally, an external issuer's.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode, get_current_timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{AuthConfig, ExternalJwt};

/// Why a token or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    #[error("the token has no usable '{0}' claim")]
    MissingClaim(String),
    #[error("invalid key for external tokens: {0}")]
    Key(String),
}

impl From<jsonwebtoken::errors::Error> for JwtError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => JwtError::Expired,
            _ => JwtError::Invalid(e),
        }
    }
}

/// The claims of quill's tokens, as Feathers writes them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iat: u64,
    pub exp: u64,
    pub aud: String,
    pub iss: String,
    pub sub: String,
    pub jti: String,
}

/// Issues and checks quill's own tokens.
pub(super) struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// The same checks without a subject: API keys (`role: "anon"`) have none.
    key_validation: Validation,
    expires_in: u64,
    audience: String,
    issuer: String,
}

impl Tokens {
    pub(super) fn new(secret: &[u8], config: &AuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_audience(&[&config.audience]);
        validation.set_issuer(&[&config.issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.validate_nbf = true;
        let mut key_validation = validation.clone();
        key_validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            key_validation,
            expires_in: config.expires_in_seconds,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
        }
    }

    pub(super) fn issue(&self, subject: &str) -> Result<(String, Claims), JwtError> {
        let now = get_current_timestamp();
        let claims = Claims {
            iat: now,
            exp: now + self.expires_in,
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            jti: random_hex(16),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, claims))
    }

    /// Checks signature (HS256 only: `none` and other algorithms fail), expiry, audience
    /// and issuer.
    pub(super) fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        Ok(decode::<Claims>(token, &self.decoding, &self.validation)?.claims)
    }

    /// Checks a token as [`Tokens::verify`] does, but `sub` may be missing: the claims.
    pub(super) fn verify_key(&self, token: &str) -> Result<Map<String, Value>, jsonwebtoken::errors::Error> {
        Ok(decode::<Map<String, Value>>(token, &self.decoding, &self.key_validation)?.claims)
    }

    /// An API key: `role` and no subject, valid for `valid_for` seconds (Supabase's anon
    /// key, signed with quill's secret).
    pub(super) fn issue_key(&self, role: &str, valid_for: u64) -> Result<String, JwtError> {
        let now = get_current_timestamp();
        let claims = serde_json::json!({
            "iss": self.issuer,
            "aud": self.audience,
            "role": role,
            "iat": now,
            "exp": now.saturating_add(valid_for),
        });
        Ok(encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?)
    }
}

/// Checks tokens of another issuer and maps their claims to a user.
pub(super) struct ExternalTokens {
    key: DecodingKey,
    validation: Validation,
    id_claim: String,
    role_claim: Option<String>,
    id_prefix: String,
}

/// What an external token says about its user.
pub(super) struct ExternalUser {
    pub id: String,
    pub role: Option<String>,
    pub claims: Map<String, Value>,
    pub expires_at: Option<u64>,
}

impl ExternalTokens {
    pub(super) fn new(config: &ExternalJwt) -> Result<Self, JwtError> {
        let algorithm: Algorithm = config
            .algorithm
            .parse()
            .map_err(|_| JwtError::Key(format!("unknown algorithm '{}'", config.algorithm)))?;
        let key = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let secret = config
                    .secret
                    .as_deref()
                    .ok_or_else(|| JwtError::Key("HS* needs 'secret'".into()))?;
                DecodingKey::from_secret(secret.as_bytes())
            }
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
                let pem = config
                    .public_key_pem
                    .as_deref()
                    .ok_or_else(|| JwtError::Key("RS* needs 'public_key_pem'".into()))?;
                DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| JwtError::Key(e.to_string()))?
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                let pem = config
                    .public_key_pem
                    .as_deref()
                    .ok_or_else(|| JwtError::Key("ES* needs 'public_key_pem'".into()))?;
                DecodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| JwtError::Key(e.to_string()))?
            }
            other => return Err(JwtError::Key(format!("algorithm {other:?} is not supported"))),
        };
        if config.id_prefix.is_empty() {
            return Err(JwtError::Key(
                "id_prefix must not be empty: external users need their own id space".into(),
            ));
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_audience(&[&config.audience]);
        validation.set_issuer(&[&config.issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        Ok(Self {
            key,
            validation,
            id_claim: config.id_claim.clone(),
            role_claim: config.role_claim.clone(),
            id_prefix: config.id_prefix.clone(),
        })
    }

    /// What every external user's id starts with.
    pub(super) fn id_prefix(&self) -> &str {
        &self.id_prefix
    }

    /// Checks signature, expiry, not-before, audience and issuer: the claims.
    pub(super) fn verify_claims(&self, token: &str) -> Result<Map<String, Value>, jsonwebtoken::errors::Error> {
        Ok(decode::<Map<String, Value>>(token, &self.key, &self.validation)?.claims)
    }

    /// The claim that names the user's role, if one is configured.
    pub(super) fn role_claim(&self) -> Option<&str> {
        self.role_claim.as_deref()
    }

    /// Whether the claims name a user (the id claim is there).
    pub(super) fn names_user(&self, claims: &Map<String, Value>) -> bool {
        claims.contains_key(&self.id_claim)
    }

    /// Checks signature, expiry, not-before, audience and issuer; the id is prefixed.
    pub(super) fn verify(&self, token: &str) -> Result<ExternalUser, JwtError> {
        let claims = self.verify_claims(token)?;
        let id = match claims.get(&self.id_claim) {
            Some(Value::String(s)) if !s.is_empty() => format!("{}{s}", self.id_prefix),
            Some(Value::Number(n)) => format!("{}{n}", self.id_prefix),
            _ => return Err(JwtError::MissingClaim(self.id_claim.clone())),
        };
        let role = self
            .role_claim
            .as_ref()
            .and_then(|c| claims.get(c))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let expires_at = claims.get("exp").and_then(Value::as_u64);
        Ok(ExternalUser {
            id,
            role,
            claims,
            expires_at,
        })
    }
}

/// `n` random bytes as hex, from the OS generator.
pub(super) fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    // The OS generator failing is not recoverable; an all-zero value would be worse than
    // a visible error, so fall back to time-based noise only for the jti, never for keys.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes().iter().cycle().take(n).copied().collect();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh secret for the demo: 32 random bytes, or an error if the OS cannot give them.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        toml::from_str("service = \"users\"").expect("defaults")
    }

    #[test]
    fn tokens_round_trip_and_forgeries_fail() {
        let tokens = Tokens::new(b"0123456789abcdef0123456789abcdef", &config());
        let (token, claims) = tokens.issue("42").expect("issue");
        assert_eq!(tokens.verify(&token).expect("valid").sub, "42");
        assert_eq!(claims.exp - claims.iat, 86_400);
        let other = Tokens::new(b"another secret, another issuer...", &config());
        assert!(other.verify(&token).is_err(), "wrong secret");
        // alg: none with the same claims
        let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        let payload = token.split('.').nth(1).expect("payload");
        assert!(tokens.verify(&format!("{header}.{payload}.")).is_err(), "alg none");
        assert!(tokens.verify("garbage").is_err());
    }
}
