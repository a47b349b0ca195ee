//! Passwords: argon2id hashes in PHC format. Hashing runs on the blocking pool, so a login
//! storm never stalls the async workers.

use argon2::{Algorithm, Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

use crate::error::{Error, Result};

/// Hashes a password (argon2id, random salt).
pub async fn hash(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
    })
    .await
    .map_err(|_| Error::general("password hashing failed"))?
    .map_err(|_| Error::general("password hashing failed"))
}

/// Checks a password against a stored hash. A missing or malformed hash never matches, and
/// still costs one hash, so a wrong email and a wrong password take the same time.
pub async fn verify(password: String, stored: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        let stored = stored.filter(|s| is_hash(s)).unwrap_or_else(|| DUMMY.to_owned());
        let ok = matches!(
            Argon2::default().verify_password(password.as_bytes(), stored.as_str()),
            Ok(())
        );
        ok && stored != DUMMY
    })
    .await
    .unwrap_or(false)
}

/// Whether a value already is an argon2 hash (so it is stored as it is, not hashed again).
pub fn is_hash(value: &str) -> bool {
    PasswordHash::new(value)
        .is_ok_and(|h| Algorithm::try_from(h.algorithm.as_str()).is_ok() && h.salt.is_some() && h.hash.is_some())
}

/// A real argon2id hash of a random string: verifying against it costs what a real check
/// costs. (Its password is not known to anyone.)
const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$0N6ee5gUMhYg7J3ZVBvJgGMRYBOfwi6NrQq8dydJs8Y";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_are_recognized() {
        let h = hash("s3cret".into()).await.expect("hash");
        assert!(h.starts_with("$argon2id$") && is_hash(&h));
        assert!(verify("s3cret".into(), Some(h.clone())).await);
        assert!(!verify("wrong".into(), Some(h)).await);
        assert!(!verify("s3cret".into(), None).await);
        assert!(
            !verify("s3cret".into(), Some("s3cret".into())).await,
            "plain text never matches"
        );
        assert!(is_hash(DUMMY));
        assert!(!is_hash("$argon2id$nonsense"));
    }
}
