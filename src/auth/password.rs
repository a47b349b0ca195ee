//! Passwords: argon2id hashes in PHC format, made only by quill with its own parameters.
//!
//! Hashing is deliberately expensive, so it runs on the blocking pool, at most one hash per
//! core at a time: a sign-up or login flood waits its turn (cheaply, as parked tasks)
//! instead of taking every core and the memory of many hashes at once.

use std::sync::OnceLock;

use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::config::HashLimits;
use crate::error::{Error, Result};

/// The longest password accepted, in bytes (argon2 takes any length; the bound keeps a
/// request from making quill hash megabytes).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// The most expensive stored hash quill runs (see [`HashLimits`]). A hash written by
/// another program (an import through SQL) verifies if its parameters are within these; a
/// costlier one is refused without being run, since its cost was chosen by whoever wrote it.
pub type HashPolicy = HashLimits;

impl HashLimits {
    fn allows(&self, hash: &PasswordHash) -> bool {
        let Ok(params) = Params::try_from(hash) else {
            return false;
        };
        params.m_cost() <= self.max_memory_kib
            && params.t_cost() <= self.max_time_cost
            && params.p_cost() <= self.max_parallelism
    }
}

/// One hash per core at a time.
fn hashing() -> &'static Semaphore {
    static HASHING: OnceLock<Semaphore> = OnceLock::new();
    HASHING.get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// Runs one hash computation on the blocking pool, in turn.
async fn in_turn<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let _turn = hashing().acquire().await.ok()?;
    tokio::task::spawn_blocking(work).await.ok()
}

/// The password a client sent, if it is one: a string of 1 to [`MAX_PASSWORD_BYTES`] bytes.
pub fn accepted(value: &Value) -> Result<String> {
    match value {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_PASSWORD_BYTES => Ok(s.clone()),
        _ => Err(Error::bad_request(format!(
            "the password must be a string of 1 to {MAX_PASSWORD_BYTES} bytes"
        ))),
    }
}

/// Hashes a password (argon2id with quill's parameters, random salt).
pub async fn hash(password: String) -> Result<String> {
    in_turn(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
    })
    .await
    .ok_or_else(|| Error::general("password hashing failed"))?
    .map_err(|_| Error::general("password hashing failed"))
}

/// Checks a password against a stored hash. A missing or malformed hash, or one costlier
/// than `policy`, never matches and still costs one ordinary hash, so a wrong email and a
/// wrong password take the same time.
pub async fn verify(password: String, stored: Option<String>, policy: HashPolicy) -> bool {
    in_turn(move || {
        let usable = stored.as_deref().and_then(|s| match PasswordHash::new(s) {
            Ok(hash) if is_argon2(&hash) && policy.allows(&hash) => Some(hash),
            Ok(hash) if is_argon2(&hash) => {
                tracing::warn!("a stored password hash is costlier than the hash policy allows; it is not checked");
                None
            }
            _ => None,
        });
        match usable {
            Some(hash) => Argon2::default().verify_password(password.as_bytes(), &hash).is_ok(),
            None => {
                let dummy = PasswordHash::new(DUMMY).ok();
                let _ = dummy.map(|d| Argon2::default().verify_password(password.as_bytes(), &d));
                false
            }
        }
    })
    .await
    .unwrap_or(false)
}

fn is_argon2(hash: &PasswordHash) -> bool {
    Algorithm::try_from(hash.algorithm.as_str()).is_ok() && hash.salt.is_some() && hash.hash.is_some()
}

/// A real argon2id hash of a random string, with quill's parameters: verifying against it
/// costs what a real check costs. (Its password is not known to anyone.)
const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$0N6ee5gUMhYg7J3ZVBvJgGMRYBOfwi6NrQq8dydJs8Y";

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_plain_text_or_garbage_never_does() {
        let policy = HashPolicy::default();
        let h = hash("s3cret".into()).await.expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("s3cret".into(), Some(h.clone()), policy).await);
        assert!(!verify("wrong".into(), Some(h), policy).await);
        assert!(!verify("s3cret".into(), None, policy).await);
        assert!(
            !verify("s3cret".into(), Some("s3cret".into()), policy).await,
            "plain text"
        );
        assert!(!verify("s3cret".into(), Some("$argon2id$nonsense".into()), policy).await);
    }

    #[tokio::test]
    async fn a_stored_hash_costlier_than_the_policy_is_not_run() {
        // A cheap hash with the right password, checked under a policy that allows less.
        let params = Params::new(1024, 3, 1, None).expect("params");
        let stored = Argon2::new(Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_with_salt("pw".as_bytes(), b"saltsaltsaltsalt")
            .expect("hash")
            .to_string();
        let strict = HashPolicy {
            max_time_cost: 2,
            ..HashPolicy::default()
        };
        assert!(
            verify("pw".into(), Some(stored.clone()), HashPolicy::default()).await,
            "within the default"
        );
        assert!(!verify("pw".into(), Some(stored), strict).await, "over the time cost");
    }

    #[test]
    fn only_strings_of_sane_length_are_passwords() {
        assert_eq!(accepted(&json!("pw")).expect("ok"), "pw");
        for bad in [
            json!(12345678),
            json!(""),
            json!(null),
            json!(["pw"]),
            json!("x".repeat(1025)),
        ] {
            assert!(accepted(&bad).is_err(), "{bad}");
        }
    }
}
