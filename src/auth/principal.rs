//! Who is calling: Feathers' `connection.user` / `params.user`.

use serde_json::Value;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The user's id, as text (`sub` in the JWT).
    pub id: String,
    pub role: Option<String>,
    /// The user as clients may see it (hidden fields stripped), or the external token's
    /// claims.
    pub user: Value,
    /// When the token expires (seconds since the epoch).
    pub expires_at: Option<u64>,
}

impl Principal {
    pub fn has_role(&self, role: &str) -> bool {
        self.role.as_deref() == Some(role)
    }
}
