//! The tower layer: the whole request flow of SPEC §5–§8 in front of any HTTP service.
//!
//! ```text
//! validate key ─► scope ─► buffer body + fingerprint ─► acquire
//!    ├─ Acquired      ─► execute (in a task idemgate owns), renewing the lease ─► complete | release
//!    ├─ Completed     ─► replay, with `Idempotent-Replayed: true`
//!    ├─ InFlight      ─► 409 + Retry-After, or wait for the outcome
//!    ├─ Mismatch      ─► 422
//!    └─ store error   ─► 503 + Retry-After (or execute unprotected with `fail_open`)
//! ```
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use axum::{Router, routing::post};
//! use idemgate::{IdempotencyLayer, store::MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = Arc::new(MemoryStore::builder().build());
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { (axum::http::StatusCode::CREATED, "charged") }))
//!     .layer(IdempotencyLayer::new(store));
//!
//! use tower::ServiceExt;
//! let request = || {
//!     axum::http::Request::post("/payments")
//!         .header("idempotency-key", "\"order-42\"")
//!         .body(axum::body::Body::from("{\"amount\":100}"))
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), 201);
//! let retry = app.oneshot(request()).await.unwrap();
//! assert_eq!(retry.status(), 201);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # }
//! ```
//!
//! # What the inner service sees
//!
//! A protected request reaches the inner service with its body already buffered (it had to be
//! read to fingerprint it) as [`RequestBody`]; unprotected requests stream through untouched.
//!
//! # Telling the layer what happened upstream
//!
//! A service that forwards requests (the proxy) can attach an [`OutcomeHint`] to its response's
//! extensions: [`OutcomeHint::NotSent`] releases the key (nothing happened), and
//! [`OutcomeHint::NoResponse`] records the outcome as unknown (or releases it, by the route's
//! `ambiguous` policy).
//!
//! # Learning what the layer did with one request
//!
//! Metrics come through the [`Observer`](crate::observe::Observer). For a per-request (access)
//! log, put a [`ReportOutcome`](crate::observe::ReportOutcome) in the request's extensions: the
//! layer takes it out and calls it once with the request's outcome and record id.

mod attempt;
mod body;
mod finisher;
mod replay;
mod service;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use replay::{REPLAYED, never_replayed, storable_head};
pub use service::{Idempotency, IdempotencyLayer, IdempotencyLayerBuilder, ResponseFuture};

/// What a forwarding inner service knows about a failed attempt, attached to its response's
/// extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeHint {
    /// The request never left (connect refused, DNS, TLS, refused stream): release the key;
    /// this response goes to this client only.
    NotSent,
    /// The request was sent but no response head came back (timeout, reset, EOF): the effect
    /// is unknown. The response (a 502 or 504 problem) is what retries get, unless the route's
    /// `ambiguous` policy releases the key.
    NoResponse,
    /// The inner service already settled the record itself, inside its own transaction (the
    /// PostgreSQL transactional mode), or must leave it alone (its lease was lost, or its commit's
    /// result is unknown): the layer neither completes nor releases it.
    Settled,
}

/// The attempt a protected request executes under, in the request's extensions, for inner
/// services that settle the record themselves (the PostgreSQL transactional mode) or derive a
/// downstream idempotency key from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptInfo {
    /// The record.
    pub record_id: crate::record::RecordId,
    /// This attempt's token: only it may complete the record.
    pub token: crate::record::Token,
    /// The retention the layer would give the outcome.
    pub ttl: std::time::Duration,
}
