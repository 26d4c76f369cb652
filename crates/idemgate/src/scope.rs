//! Whose key is it (SPEC §2).
//!
//! The store never looks a record up by the client's key alone: the key is combined with the
//! caller's identity (a [`Scope`]) into a [`RecordId`], so two callers that happen to send the
//! same key never see each other's records. A [`ScopeResolver`] finds that identity in the
//! request: [`AuthorizationScope`] (the proxy's default), [`HeaderScope`] (an identity header
//! set by a trusted edge), or any closure `Fn(&Parts) -> Result<Option<Scope>, ScopeError>`.
//!
//! ```
//! use idemgate::key::parse_key;
//! use idemgate::scope::{AuthorizationScope, ScopeResolver};
//!
//! let (alice, _) = http::Request::post("/orders")
//!     .header("authorization", "Bearer sk_live_alice")
//!     .body(())
//!     .unwrap()
//!     .into_parts();
//! let (bob, _) = http::Request::post("/orders")
//!     .header("authorization", "Bearer sk_live_bob")
//!     .body(())
//!     .unwrap()
//!     .into_parts();
//! let key = parse_key(b"order-42", &Default::default()).unwrap();
//! let a = AuthorizationScope.resolve(&alice).unwrap().unwrap();
//! let b = AuthorizationScope.resolve(&bob).unwrap().unwrap();
//! assert_ne!(a.record_id(&key), b.record_id(&key));
//! assert!(!format!("{a:?}").contains("sk_live"), "Debug never shows the credential");
//! ```

use bytes::Bytes;
use std::borrow::Cow;

use http::request::Parts;
use http::{HeaderName, header::AUTHORIZATION};

use crate::key::IdempotencyKey;
use crate::record::RecordId;

/// A caller identity: the kind (part of the record id) and the value (never stored or logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Scope {
    /// e.g. `authorization`, `header:x-tenant`, `jwt-claim:sub`, `anonymous`.
    pub kind: Cow<'static, str>,
    /// The identity's bytes.
    pub value: Bytes,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value is a credential: never print it.
        f.debug_struct("Scope")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Scope {
    /// A scope of the given kind and value.
    ///
    /// The kind becomes part of every record id: keep it stable across releases, and distinct
    /// between resolvers whose values could collide.
    pub fn new(kind: impl Into<Cow<'static, str>>, value: impl Into<Bytes>) -> Self {
        Scope {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// The anonymous scope used under `on_missing_scope = anonymous`.
    pub fn anonymous() -> Self {
        Scope {
            kind: "anonymous".into(),
            value: Bytes::new(),
        }
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

/// The `Authorization` header value (the proxy's default): kind `authorization`.
///
/// Suits long-lived API keys (Stripe-style). A rotated or refreshed credential is a new scope,
/// so a retry sent with a new credential does not find the first attempt's record: for OAuth
/// access tokens that refresh during a retry window, scope by a verified JWT claim instead
/// (see [`looks_like_jwt`]).
///
/// An absent or blank header is no identity (`Ok(None)`, and `on_missing_scope` decides). More
/// than one `Authorization` field line is refused as [`ScopeError::Invalid`]: the field is a
/// singleton, and which line the upstream would honour is unknowable.
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthorizationScope;

impl AuthorizationScope {
    /// The scope kind this resolver produces.
    pub const KIND: &'static str = "authorization";
}

impl ScopeResolver for AuthorizationScope {
    fn resolve(&self, parts: &Parts) -> Result<Option<Scope>, ScopeError> {
        single_header(
            parts,
            &AUTHORIZATION,
            "more than one Authorization field line",
        )
        .map(|v| {
            v.map(|value| Scope {
                kind: Cow::Borrowed(Self::KIND),
                value,
            })
        })
    }
}

/// An identity header set by a trusted layer in front (e.g. `X-Tenant-Id`): kind
/// `header:<lowercase name>`.
///
/// **Only safe when a trusted edge strips this header from client requests** and sets it
/// itself after authenticating the caller. Otherwise any client can send another caller's
/// value and read that caller's stored responses by guessing their keys. The proxy enables
/// it only with an explicit `trust_scope_header`.
///
/// An absent or blank header is no identity; more than one field line is
/// [`ScopeError::Invalid`].
#[derive(Clone, Debug)]
pub struct HeaderScope {
    name: HeaderName,
    /// `header:<name>`, built once so resolving costs one copy, not a format.
    kind: Cow<'static, str>,
}

impl HeaderScope {
    /// Scopes by the value of `name`. See the type's docs for when this is safe.
    pub fn new(name: HeaderName) -> Self {
        // `HeaderName` is always lower case, so the kind is the same however the name was
        // spelled in the configuration.
        let kind = Cow::Owned(format!("header:{}", name.as_str()));
        HeaderScope { name, kind }
    }

    /// The header this resolver reads.
    pub fn header_name(&self) -> &HeaderName {
        &self.name
    }

    /// The scope kind this resolver produces, `header:<lowercase name>`.
    pub fn kind(&self) -> &str {
        &self.kind
    }
}

impl ScopeResolver for HeaderScope {
    fn resolve(&self, parts: &Parts) -> Result<Option<Scope>, ScopeError> {
        single_header(
            parts,
            &self.name,
            "more than one field line for the scope header",
        )
        .map(|v| {
            v.map(|value| Scope {
                kind: self.kind.clone(),
                value,
            })
        })
    }
}

/// The value of a singleton header: `None` when absent or blank. The error message is fixed
/// text, never the value (which is a credential).
fn single_header(
    parts: &Parts,
    name: &HeaderName,
    repeated: &'static str,
) -> Result<Option<Bytes>, ScopeError> {
    let mut values = parts.headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ScopeError::Invalid(repeated.to_owned()));
    }
    let bytes = first.as_bytes();
    if bytes.iter().all(|b| matches!(b, b' ' | b'\t')) {
        return Ok(None);
    }
    Ok(Some(Bytes::copy_from_slice(bytes)))
}

/// Whether an `Authorization` value is a `Bearer` JWT: three base64url segments separated by
/// dots (the signature may be empty, as in an unsecured JWT).
///
/// The engine uses this to log, once, that `jwt-claim` scoping suits such tokens better than
/// `authorization` (a refreshed token would otherwise start a new scope mid-retry). It is a
/// shape check only: nothing is decoded or verified.
pub fn looks_like_jwt(authorization_value: &[u8]) -> bool {
    let v = authorization_value.trim_ascii();
    let Some(space) = v.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (scheme, rest) = v.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return false;
    }
    let token = rest.trim_ascii_start();
    let mut segments = token.split(|&b| b == b'.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return false;
    };
    let base64url = |s: &[u8]| {
        s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !header.is_empty()
        && !payload.is_empty()
        && base64url(header)
        && base64url(payload)
        && base64url(signature)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::key::{KeyRules, parse_key};

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::post("/orders");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn key(s: &str) -> IdempotencyKey {
        parse_key(s.as_bytes(), &KeyRules::default()).unwrap()
    }

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz";

    #[test]
    fn authorization_scope() {
        let p = parts(&[("Authorization", "Bearer sk_live_1")]);
        let s = AuthorizationScope.resolve(&p).unwrap().unwrap();
        assert_eq!(s.kind, "authorization");
        assert_eq!(&s.value[..], b"Bearer sk_live_1");

        assert_eq!(AuthorizationScope.resolve(&parts(&[])).unwrap(), None);
        assert_eq!(
            AuthorizationScope
                .resolve(&parts(&[("authorization", "")]))
                .unwrap(),
            None
        );
        assert_eq!(
            AuthorizationScope
                .resolve(&parts(&[("authorization", " ")]))
                .unwrap(),
            None
        );

        let two = parts(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        let err = AuthorizationScope.resolve(&two).unwrap_err();
        assert!(!err.to_string().contains("Bearer"));
    }

    #[test]
    fn header_scope() {
        let r = HeaderScope::new(HeaderName::from_static("x-tenant-id"));
        assert_eq!(r.kind(), "header:x-tenant-id");
        let s = r
            .resolve(&parts(&[("X-Tenant-Id", "acme")]))
            .unwrap()
            .unwrap();
        assert_eq!(s.kind, "header:x-tenant-id");
        assert_eq!(&s.value[..], b"acme");
        assert_eq!(
            r.resolve(&parts(&[("authorization", "Bearer x")])).unwrap(),
            None
        );
        let two = parts(&[("x-tenant-id", "a"), ("x-tenant-id", "b")]);
        assert!(r.resolve(&two).is_err());

        let upper = HeaderScope::new(HeaderName::from_bytes(b"X-Tenant-ID").unwrap());
        assert_eq!(upper.kind(), "header:x-tenant-id");
    }

    #[test]
    fn record_ids_are_per_scope() {
        let k = key("order-42");
        let auth_a = AuthorizationScope
            .resolve(&parts(&[("authorization", "a")]))
            .unwrap();
        let auth_a2 = AuthorizationScope
            .resolve(&parts(&[("authorization", "a")]))
            .unwrap();
        let auth_b = AuthorizationScope
            .resolve(&parts(&[("authorization", "b")]))
            .unwrap();
        let tenant = HeaderScope::new(HeaderName::from_static("x-tenant"));
        let hdr_a = tenant.resolve(&parts(&[("x-tenant", "a")])).unwrap();
        let other = HeaderScope::new(HeaderName::from_static("x-org"));
        let org_a = other.resolve(&parts(&[("x-org", "a")])).unwrap();
        let (auth_a, auth_a2, auth_b, hdr_a, org_a) = (
            auth_a.unwrap(),
            auth_a2.unwrap(),
            auth_b.unwrap(),
            hdr_a.unwrap(),
            org_a.unwrap(),
        );

        assert_eq!(
            auth_a.record_id(&k),
            auth_a2.record_id(&k),
            "same caller, same record"
        );
        let ids = [
            auth_a.record_id(&k),
            auth_b.record_id(&k),
            hdr_a.record_id(&k),
            org_a.record_id(&k),
            Scope::anonymous().record_id(&k),
            Scope::new("anonymous", Bytes::from_static(b"a")).record_id(&k),
        ];
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                assert_ne!(ids[i], ids[j], "scopes {i} and {j} share a record id");
            }
        }
        assert_ne!(auth_a.record_id(&k), auth_a.record_id(&key("order-43")));
        // Both spellings of a key are one record.
        assert_eq!(auth_a.record_id(&key("\"order-42\"")), auth_a.record_id(&k));
    }

    #[test]
    fn closures_are_resolvers() {
        let r = |p: &Parts| -> Result<Option<Scope>, ScopeError> {
            Ok(p.headers
                .get("x-user")
                .map(|v| Scope::new("user", Bytes::copy_from_slice(v.as_bytes()))))
        };
        let s = r.resolve(&parts(&[("x-user", "u1")])).unwrap().unwrap();
        assert_eq!(s, Scope::new("user", Bytes::from_static(b"u1")));
        let boxed: Box<dyn ScopeResolver> = Box::new(r);
        assert_eq!(boxed.resolve(&parts(&[])).unwrap(), None);
    }

    #[test]
    fn debug_never_shows_credentials() {
        let secret = "Bearer sk_live_TOPSECRET";
        let p = parts(&[("authorization", secret), ("x-tenant", "TENANTSECRET")]);
        let a = AuthorizationScope.resolve(&p).unwrap().unwrap();
        let h = HeaderScope::new(HeaderName::from_static("x-tenant"))
            .resolve(&p)
            .unwrap()
            .unwrap();
        for shown in [
            format!("{a:?}"),
            format!("{a:#?}"),
            format!("{h:?}"),
            format!("{:?}", Some(&h)),
        ] {
            assert!(
                !shown.contains("TOPSECRET") && !shown.contains("TENANTSECRET"),
                "{shown}"
            );
            assert!(shown.contains("kind"), "{shown}");
        }
    }

    #[test]
    fn jwt_shape() {
        let yes = [
            format!("Bearer {JWT}"),
            format!("bearer {JWT}"),
            format!("BEARER   {JWT} "),
            "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.".to_owned(),
        ];
        for v in &yes {
            assert!(looks_like_jwt(v.as_bytes()), "{v}");
        }
        let no = [
            JWT.to_owned(),
            format!("Basic {JWT}"),
            format!("Bearer {JWT}.extra"),
            "Bearer sk_live_123".to_owned(),
            "Bearer a.b".to_owned(),
            "Bearer .b.c".to_owned(),
            "Bearer a..c".to_owned(),
            "Bearer a+b.c/d.e=".to_owned(),
            "Bearer".to_owned(),
            "Bearer ".to_owned(),
            String::new(),
        ];
        for v in &no {
            assert!(!looks_like_jwt(v.as_bytes()), "{v}");
        }
    }
}
