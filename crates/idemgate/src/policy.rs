//! Per-request policy: whether a request is protected, and how (SPEC §9 "per route").
//!
//! The layer asks a [`PolicyResolver`] for each request. `None` means the request is not
//! protected and passes through untouched (e.g. GET, or a path no route covers). The default
//! resolver, [`MethodPolicy`], protects POST and PATCH with one [`Policy`].
//!
//! ```
//! use idemgate::policy::{MethodPolicy, Policy, PolicyResolver};
//! use std::time::Duration;
//!
//! let policy = Policy { require_key: true, ttl: Duration::from_secs(3600), ..Policy::default() };
//! let resolver = MethodPolicy::new(policy);
//! let (parts, _) = http::Request::post("/payments").body(()).unwrap().into_parts();
//! assert!(resolver.resolve(&parts).is_some());
//! let (parts, _) = http::Request::get("/payments").body(()).unwrap().into_parts();
//! assert!(resolver.resolve(&parts).is_none());
//! ```

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode, request::Parts};

use crate::fingerprint::FingerprintOptions;
use crate::key::KeyRules;
use crate::scope::MissingScope;
use crate::store::LeaseExpiry;

/// What a concurrent duplicate gets (SPEC §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    /// 409 with `Retry-After` at once.
    Conflict,
    /// Wait up to `max` for the first attempt's outcome, then 409.
    Wait {
        /// The longest a duplicate waits.
        max: Duration,
    },
}

/// What a failed inner service (panic or `Err`) leaves behind (layer only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnError {
    /// Store a 500 `handler-failed` problem; retries get it.
    #[default]
    Store,
    /// Release the key; a retry executes again.
    Release,
}

/// What a request that was sent but got no response head leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Ambiguous {
    /// Store outcome-unknown: at most once (IETF httpapi #41).
    #[default]
    Store,
    /// Release: for upstreams that are idempotent themselves.
    Release,
}

/// How one request is protected.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Whether a request without a key gets 400 instead of passing through.
    pub require_key: bool,
    /// Key syntax and length rules.
    pub key: KeyRules,
    /// What happens when the request carries no caller identity.
    pub on_missing_scope: MissingScope,
    /// Retention of a completed outcome.
    pub ttl: Duration,
    /// Lease length; renewed every third of it.
    pub lease: Duration,
    /// The longest an attempt may hold its lease before it is written off as outcome-unknown.
    pub max_lease_hold: Duration,
    /// The client's deadline: past it the client gets 504 `outcome-pending` while the attempt
    /// goes on (up to `max_lease_hold`). `None`: the client waits for the outcome.
    pub client_deadline: Option<Duration>,
    /// What a fingerprint covers.
    pub fingerprint: FingerprintOptions,
    /// Statuses that mean "not processed, try again": the key is released, not stored.
    pub release_statuses: Vec<StatusCode>,
    /// What a lapsed lease becomes.
    pub on_lease_expiry: LeaseExpiry,
    /// What a failed inner service leaves behind.
    pub on_error: OnError,
    /// What an ambiguous upstream failure leaves behind (see [`crate::OutcomeHint`]).
    pub ambiguous: Ambiguous,
    /// Concurrent duplicates: conflict or wait.
    pub concurrency: Concurrency,
    /// The most waiters per key in wait mode; past it, 409.
    pub max_waiters_per_key: usize,
    /// Largest request body, in bytes, that a protected request may have.
    pub max_request_body: u64,
    /// How long a request body may stall.
    pub request_body_timeout: Duration,
    /// Largest response body, in bytes, that is stored for replay.
    pub max_stored_response: usize,
    /// Largest decoded body when a replay must be decoded for a client that does not accept
    /// its content coding.
    pub max_decoded_replay: usize,
    /// Response headers that are never stored (besides `Date`, `Age`, hop-by-hop headers and
    /// those named in `Connection`, `Set-Cookie`, and names containing `token` or `secret`).
    pub header_deny: Vec<String>,
    /// Headers stored even though the built-in rules would drop them.
    pub header_allow: Vec<String>,
    /// On store errors, execute the request unprotected instead of answering 503.
    pub fail_open: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            require_key: false,
            key: KeyRules::default(),
            on_missing_scope: MissingScope::Anonymous,
            ttl: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(30),
            max_lease_hold: Duration::from_secs(5 * 60),
            client_deadline: None,
            fingerprint: FingerprintOptions::default(),
            release_statuses: vec![
                StatusCode::REQUEST_TIMEOUT,
                StatusCode::TOO_EARLY,
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::SERVICE_UNAVAILABLE,
            ],
            on_lease_expiry: LeaseExpiry::OutcomeUnknown,
            on_error: OnError::Store,
            ambiguous: Ambiguous::Store,
            concurrency: Concurrency::Conflict,
            max_waiters_per_key: 100,
            max_request_body: 10 * 1024 * 1024,
            request_body_timeout: Duration::from_secs(30),
            max_stored_response: 1024 * 1024,
            max_decoded_replay: 16 * 1024 * 1024,
            header_deny: Vec::new(),
            header_allow: Vec::new(),
            fail_open: false,
        }
    }
}

/// Decides, per request, whether and how it is protected.
pub trait PolicyResolver: Send + Sync + 'static {
    /// The policy for this request, or `None` to pass it through untouched.
    fn resolve(&self, parts: &Parts) -> Option<Arc<Policy>>;
}

impl<F> PolicyResolver for F
where
    F: Fn(&Parts) -> Option<Arc<Policy>> + Send + Sync + 'static,
{
    fn resolve(&self, parts: &Parts) -> Option<Arc<Policy>> {
        self(parts)
    }
}

/// One policy for a set of methods (POST and PATCH by default).
#[derive(Clone, Debug)]
pub struct MethodPolicy {
    methods: Vec<Method>,
    policy: Arc<Policy>,
}

impl MethodPolicy {
    /// Protects POST and PATCH with `policy`.
    pub fn new(policy: Policy) -> Self {
        MethodPolicy {
            methods: vec![Method::POST, Method::PATCH],
            policy: Arc::new(policy),
        }
    }

    /// Protects these methods instead.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }
}

impl Default for MethodPolicy {
    fn default() -> Self {
        MethodPolicy::new(Policy::default())
    }
}

impl PolicyResolver for MethodPolicy {
    fn resolve(&self, parts: &Parts) -> Option<Arc<Policy>> {
        self.methods
            .contains(&parts.method)
            .then(|| self.policy.clone())
    }
}
