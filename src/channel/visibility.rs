//! Fields only some readers may see (`visible_to`), as a bit set per reader: a "view".
//! Events are serialized once per distinct view, not once per connection.

use serde_json::Value;

use crate::auth::Principal;
use crate::service::access::Rule;

/// Restricted fields and who may see them. At most 64 fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visibility {
    restricted: Vec<(String, Vec<Rule>)>,
}

impl Visibility {
    pub fn new(restricted: Vec<(String, Vec<Rule>)>) -> Result<Self, String> {
        if restricted.len() > 64 {
            return Err("visible_to supports at most 64 fields".into());
        }
        Ok(Self { restricted })
    }

    /// Bit i is set when `user` may see restricted field i of `row`.
    pub fn view(&self, user: Option<&Principal>, row: &Value) -> u64 {
        self.restricted
            .iter()
            .enumerate()
            .filter(|(_, (_, rules))| rules.iter().any(|r| r.admits_row(user, row)))
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }

    pub fn is_full(&self, view: u64) -> bool {
        let all = if self.restricted.len() == 64 {
            u64::MAX
        } else {
            (1u64 << self.restricted.len()) - 1
        };
        view & all == all
    }

    /// Removes the restricted fields the view does not include.
    pub fn apply(&self, row: &mut Value, view: u64) {
        if let Value::Object(fields) = row {
            for (i, (name, _)) in self.restricted.iter().enumerate() {
                if view & (1 << i) == 0 {
                    fields.remove(name);
                }
            }
        }
    }

    /// Whether `user` sees `field` in every row it reads, so it may filter or sort on it (a
    /// field it sees only in its own rows would let it bisect other rows' values).
    pub fn sees_everywhere(&self, user: Option<&Principal>, field: &str) -> bool {
        self.restricted
            .iter()
            .filter(|(name, _)| name == field)
            .all(|(_, rules)| rules.iter().any(|r| r.admits_every_row(user)))
    }

    /// Strips a row for one reader (responses).
    pub fn strip_for(&self, user: Option<&Principal>, row: &mut Value) {
        if !self.restricted.is_empty() {
            let view = self.view(user, row);
            self.apply(row, view);
        }
    }
}
