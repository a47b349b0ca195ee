//! Method access rules: who may call a method, and on which rows.

use serde_json::Value;

use crate::auth::Principal;
use crate::error::{Error, ErrorKind, Result};

/// One access rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, logged in or not.
    Public,
    /// Any logged-in caller.
    Authenticated,
    /// A logged-in caller, on rows whose column equals the caller's id.
    Owner(String),
    /// A logged-in caller with this role.
    Role(String),
    /// Nobody: the method is disabled.
    Nobody,
}

impl Rule {
    pub fn parse(text: &str) -> Result<Rule, String> {
        match text {
            "public" => Ok(Rule::Public),
            "authenticated" => Ok(Rule::Authenticated),
            "none" => Ok(Rule::Nobody),
            _ => match text.split_once(':') {
                Some(("owner", column)) if !column.is_empty() => Ok(Rule::Owner(column.to_owned())),
                Some(("role", role)) if !role.is_empty() => Ok(Rule::Role(role.to_owned())),
                _ => Err(format!(
                    "unknown access rule '{text}' (use public, authenticated, owner:<column>, role:<name> or none)"
                )),
            },
        }
    }

    /// Whether this rule lets `caller` see or touch `row` (for field visibility).
    pub fn admits_row(&self, caller: Option<&Principal>, row: &Value) -> bool {
        match (self, caller) {
            (Rule::Public, _) => true,
            (Rule::Authenticated, Some(_)) => true,
            (Rule::Role(role), Some(p)) => p.has_role(role),
            (Rule::Owner(column), Some(p)) => owns(p, row, column),
            _ => false,
        }
    }
}

impl Rule {
    /// Whether the rule admits the caller whatever the row (an `owner:` rule depends on it).
    pub fn admits_every_row(&self, caller: Option<&Principal>) -> bool {
        match (self, caller) {
            (Rule::Public, _) | (Rule::Authenticated, Some(_)) => true,
            (Rule::Role(role), Some(p)) => p.has_role(role),
            _ => false,
        }
    }
}

/// Whether `row[column]` is the caller's id (compared as text, so `7` and `"7"` match).
pub fn owns(caller: &Principal, row: &Value, column: &str) -> bool {
    match row.get(column) {
        Some(Value::String(s)) => *s == caller.id,
        Some(Value::Number(n)) => n.to_string() == caller.id,
        _ => false,
    }
}

/// What a method call may do after the rules are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Any row.
    All,
    /// Only rows where one of these columns equals the caller's id.
    Own(Vec<String>),
}

/// The rules of one method: any rule that grants is enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodAccess(pub Vec<Rule>);

impl MethodAccess {
    pub fn check(&self, caller: Option<&Principal>) -> Result<Grant> {
        let rules = &self.0;
        if rules.iter().all(|r| *r == Rule::Nobody) {
            return Err(Error::method_not_allowed("this method is disabled"));
        }
        let full = rules.iter().any(|rule| match (rule, caller) {
            (Rule::Public, _) => true,
            (Rule::Authenticated, Some(_)) => true,
            (Rule::Role(role), Some(p)) => p.has_role(role),
            _ => false,
        });
        if full {
            return Ok(Grant::All);
        }
        let Some(_) = caller else {
            return Err(Error::new(ErrorKind::NotAuthenticated, "Not authenticated"));
        };
        let own: Vec<String> = rules
            .iter()
            .filter_map(|r| match r {
                Rule::Owner(column) => Some(column.clone()),
                _ => None,
            })
            .collect();
        if own.is_empty() {
            Err(Error::new(ErrorKind::Forbidden, "You are not allowed to do this"))
        } else {
            Ok(Grant::Own(own))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(id: &str, role: Option<&str>) -> Principal {
        Principal {
            id: id.into(),
            role: role.map(Into::into),
            user: json!({}),
            expires_at: None,
        }
    }

    #[test]
    fn rules_grant_refuse_or_narrow_to_own_rows() {
        let rules = MethodAccess(vec![Rule::Owner("id".into()), Rule::Role("admin".into())]);
        assert_eq!(rules.check(None).expect_err("anonymous").status(), 401);
        assert_eq!(rules.check(Some(&user("1", Some("admin")))), Ok(Grant::All));
        assert_eq!(rules.check(Some(&user("1", None))), Ok(Grant::Own(vec!["id".into()])));
        let role_only = MethodAccess(vec![Rule::Role("admin".into())]);
        assert_eq!(
            role_only
                .check(Some(&user("1", Some("user"))))
                .expect_err("not admin")
                .status(),
            403
        );
        assert_eq!(
            MethodAccess(vec![Rule::Nobody]).check(None).expect_err("off").status(),
            405
        );
        assert_eq!(MethodAccess(vec![Rule::Public]).check(None), Ok(Grant::All));
    }

    #[test]
    fn bad_rules_are_named() {
        assert!(Rule::parse("owner:").is_err());
        assert!(Rule::parse("admins").expect_err("unknown").contains("admins"));
        assert_eq!(Rule::parse("role:admin"), Ok(Rule::Role("admin".into())));
    }

    #[test]
    fn ownership_compares_ids_as_text() {
        assert!(owns(&user("7", None), &json!({"user_id": 7}), "user_id"));
        assert!(!owns(&user("7", None), &json!({"user_id": 8}), "user_id"));
        assert!(!owns(&user("7", None), &json!({"user_id": null}), "user_id"));
    }
}
