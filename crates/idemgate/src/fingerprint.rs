//! Request fingerprints (SPEC §3). STUB: to be implemented.

use http::{HeaderName, request::Parts};

use crate::record::Fingerprint;

/// What a fingerprint covers besides method, path, query, `Content-Type` and body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FingerprintOptions {
    /// Extra request headers (e.g. `Host`, `API-Version`).
    pub headers: Vec<HeaderName>,
    /// Compare JSON bodies canonically (RFC 8785) instead of byte for byte.
    pub json: Option<JsonFingerprint>,
}

/// JSON-canonical body comparison.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonFingerprint {
    /// JSON pointers (RFC 6901) of members left out, e.g. `/client_timestamp`.
    pub ignore: Vec<String>,
}

/// The fingerprint of a request.
pub fn fingerprint(parts: &Parts, body: &[u8], options: &FingerprintOptions) -> Fingerprint {
    let _ = (parts, body, options);
    todo!()
}
