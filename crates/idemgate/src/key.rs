//! The `Idempotency-Key` header (SPEC §1). STUB: to be implemented.

use http::HeaderMap;

/// Syntax and length rules for keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRules {
    /// Fewest characters after unescaping (default 1).
    pub min_len: usize,
    /// Most characters after unescaping (default 255).
    pub max_len: usize,
    /// Accept sf-strings only, not bare tokens.
    pub strict: bool,
}

impl Default for KeyRules {
    fn default() -> Self {
        KeyRules { min_len: 1, max_len: 255, strict: false }
    }
}

/// A validated key: its characters after unescaping.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key's characters.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a key was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// More than one `Idempotency-Key` field line.
    #[error("more than one Idempotency-Key field line")]
    Repeated,
    /// Not an sf-string (nor, unless strict, a bare token).
    #[error("malformed Idempotency-Key: {0}")]
    Malformed(&'static str),
    /// Too short or too long after unescaping.
    #[error("Idempotency-Key length {len} outside {min}..={max}")]
    Length {
        /// The key's length.
        len: usize,
        /// The minimum.
        min: usize,
        /// The maximum.
        max: usize,
    },
}

/// Reads the key from a request's headers: `Ok(None)` when absent.
pub fn key_from_headers(headers: &HeaderMap, rules: &KeyRules) -> Result<Option<IdempotencyKey>, KeyError> {
    let _ = (headers, rules);
    todo!()
}

/// Parses one field value.
pub fn parse_key(value: &[u8], rules: &KeyRules) -> Result<IdempotencyKey, KeyError> {
    let _ = (value, rules);
    todo!()
}
