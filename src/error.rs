//! The error every service call can end in, and its Feathers JSON form.
//!
//! Transports never build error JSON themselves: they call [`Error::to_json`] and use
//! [`Error::status`], so REST and WebSocket clients see the same shape.

use serde_json::{Map, Value, json};

/// The Feathers error classes quill answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    NotAuthenticated,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    Gone,
    /// A wait the client asked for did not end in time (Feathers `Timeout`).
    Timeout,
    TooManyRequests,
    GeneralError,
    Unavailable,
}

impl ErrorKind {
    /// The class name the Feathers client uses to rebuild the error.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::NotAuthenticated => "NotAuthenticated",
            Self::Forbidden => "Forbidden",
            Self::NotFound => "NotFound",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::Conflict => "Conflict",
            Self::Gone => "Gone",
            Self::Timeout => "Timeout",
            Self::TooManyRequests => "TooManyRequests",
            Self::GeneralError => "GeneralError",
            Self::Unavailable => "Unavailable",
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::NotAuthenticated => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict => 409,
            Self::Gone => 410,
            Self::Timeout => 408,
            Self::TooManyRequests => 429,
            Self::GeneralError => 500,
            Self::Unavailable => 503,
        }
    }

    /// Feathers' `className`: the kebab-case form of the name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::NotAuthenticated => "not-authenticated",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::Conflict => "conflict",
            Self::Gone => "gone",
            Self::Timeout => "timeout",
            Self::TooManyRequests => "too-many-requests",
            Self::GeneralError => "general-error",
            Self::Unavailable => "unavailable",
        }
    }
}

/// A failed service call, as the client sees it. Carries no SQL text and no secrets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} {}", kind.name(), message)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// Per-field messages (`errors` in Feathers JSON), e.g. which column violated a constraint.
    pub errors: Option<Map<String, Value>>,
    /// The database named a column or table quill's catalog has and the database no longer
    /// does: the catalog is stale (reload it and try again).
    pub(crate) schema_changed: bool,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            errors: None,
            schema_changed: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::MethodNotAllowed, message)
    }

    pub fn general(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::GeneralError, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// Adds a per-field message.
    pub fn with_field(mut self, field: &str, message: impl Into<String>) -> Self {
        self.errors
            .get_or_insert_with(Map::new)
            .insert(field.to_owned(), Value::String(message.into()));
        self
    }

    pub fn status(&self) -> u16 {
        self.kind.code()
    }

    /// `{ name, message, code, className, errors? }`, as `@feathersjs/errors` serializes.
    pub fn to_json(&self) -> Value {
        let mut body = json!({
            "name": self.kind.name(),
            "message": self.message,
            "code": self.kind.code(),
            "className": self.kind.class_name(),
        });
        if let (Some(errors), Value::Object(obj)) = (&self.errors, &mut body) {
            obj.insert("errors".into(), Value::Object(errors.clone()));
        }
        body
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feathers_json_has_name_code_and_class_name() {
        let e = Error::bad_request("bad").with_field("email", "already exists");
        assert_eq!(
            e.to_json(),
            json!({"name": "BadRequest", "message": "bad", "code": 400,
                   "className": "bad-request", "errors": {"email": "already exists"}})
        );
    }
}
