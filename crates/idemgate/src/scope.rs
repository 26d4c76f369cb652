//! Whose key is it (SPEC §2). STUB: to be implemented.

use bytes::Bytes;
use http::request::Parts;

use crate::key::IdempotencyKey;
use crate::record::RecordId;

/// A caller identity: the kind (part of the record id) and the value (never stored or logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Scope {
    /// e.g. `authorization`, `header:x-tenant`, `jwt-claim:sub`, `anonymous`.
    pub kind: std::borrow::Cow<'static, str>,
    /// The identity's bytes.
    pub value: Bytes,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value is a credential: never print it.
        f.debug_struct("Scope").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Scope {
    /// The anonymous scope used under `on_missing_scope = anonymous`.
    pub fn anonymous() -> Self {
        Scope { kind: "anonymous".into(), value: Bytes::new() }
    }

    /// The record id of `key` in this scope.
    pub fn record_id(&self, key: &IdempotencyKey) -> RecordId {
        RecordId::derive(&self.kind, &self.value, key.as_str().as_bytes())
    }
}

/// Why no scope could be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// An identity was present but could not be verified.
    #[error("caller identity invalid: {0}")]
    Invalid(String),
}

/// What happens when a protected request carries no identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MissingScope {
    /// Use the shared anonymous scope.
    #[default]
    Anonymous,
    /// 400 `scope-missing`.
    Reject,
    /// Pass the request through unprotected.
    Passthrough,
}

/// Finds the caller identity of a request.
pub trait ScopeResolver: Send + Sync + 'static {
    /// `Ok(None)` when the request carries no identity.
    fn resolve(&self, parts: &Parts) -> Result<Option<Scope>, ScopeError>;
}

impl<F> ScopeResolver for F
where
    F: Fn(&Parts) -> Result<Option<Scope>, ScopeError> + Send + Sync + 'static,
{
    fn resolve(&self, parts: &Parts) -> Result<Option<Scope>, ScopeError> {
        self(parts)
    }
}

/// The `Authorization` header value (the proxy's default).
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthorizationScope;

impl ScopeResolver for AuthorizationScope {
    fn resolve(&self, parts: &Parts) -> Result<Option<Scope>, ScopeError> {
        let _ = parts;
        todo!()
    }
}
