//! The admin API (SPEC §9), on its own listener: health, readiness, metrics, and key
//! inspection, deletion and resolution. Every mutation is logged with the record id.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | 200 `ok` |
//! | `GET /readyz` | 200 `ready`, or 503 with the store's reason |
//! | `GET /metrics` | Prometheus text |
//! | `GET /keys/{id}` | 200 record JSON, 404 |
//! | `DELETE /keys/{id}[?force=true]` | 200 `{"id","deleted":true}`, 404, 409 (in flight, no force) |
//! | `POST /keys/{id}/resolve` | body `{"action":"release"}` or `{"action":"respond","status":201,"headers":[["name","value"]],"body":"…","ttl":"24h"}`: 200 `{"id","resolved":true}`, 404, 409 (not outcome-unknown) |
//! | `POST /purge-expired` | 200 `{"purged":n}` |
//!
//! When a token is configured, every route but `/healthz` and `/readyz` needs
//! `Authorization: Bearer <token>`. Errors are `{"error": "..."}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use idemgate::record::{Outcome, Record, RecordId, ResponseHead};
use idemgate::store::{Deletion, Resolution, Resolved, Store, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::metrics::Metrics;

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The store (the same one the proxy uses).
    pub store: Arc<dyn Store>,
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The bearer token, if one is required.
    pub token: Option<Arc<str>>,
}

/// The admin router.
pub fn router(state: AdminState) -> axum::Router {
    let protected = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/keys/{id}", get(show).delete(delete))
        .route("/keys/{id}/resolve", post(resolve))
        .route("/purge-expired", post(purge))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .merge(protected)
        .with_state(state)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

fn store_error(e: &StoreError) -> Response {
    match e {
        StoreError::Corrupt(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({"error": "admin token required"})),
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn ready(State(state): State<AdminState>) -> Response {
    match state.store.readiness().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store not ready: {e}"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

fn parse_id(id: &str) -> Result<RecordId, Box<Response>> {
    RecordId::from_hex(id).ok_or_else(|| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "the record id is 64 hex digits",
        ))
    })
}

fn head_json(h: &ResponseHead) -> Value {
    json!({
        "status": h.status,
        "headers": h.headers.iter().map(|(n, v)| json!([n, String::from_utf8_lossy(v)])).collect::<Vec<_>>(),
    })
}

/// The JSON form of a record, as `GET /keys/{id}` returns it.
pub fn record_json(id: &RecordId, record: &Record) -> Value {
    match record {
        Record::InFlight(f) => json!({
            "id": id.to_hex(),
            "state": "in_flight",
            "fingerprint": hex::encode(f.fingerprint.0),
            "lease_expires_at_ms": f.lease_expires_at.0,
            "holder": f.holder.0,
        }),
        Record::Completed(c) => {
            let outcome = match &c.outcome {
                Outcome::Response { head, body } => {
                    let mut o = head_json(head);
                    o["kind"] = json!("response");
                    o["body_bytes"] = json!(body.len());
                    match std::str::from_utf8(body) {
                        Ok(s) => o["body"] = json!(s),
                        Err(_) => o["body_hex"] = json!(hex::encode(body)),
                    }
                    o
                }
                Outcome::BodyNotStored { head } => {
                    let mut o = head_json(head);
                    o["kind"] = json!("body_not_stored");
                    o
                }
                Outcome::BodyIncomplete { head } => {
                    let mut o = head_json(head);
                    o["kind"] = json!("body_incomplete");
                    o
                }
                Outcome::Problem { kind, status } => json!({
                    "kind": match kind {
                        idemgate::record::StoredProblemKind::OutcomeUnknown => "outcome_unknown",
                        idemgate::record::StoredProblemKind::HandlerFailed => "handler_failed",
                    },
                    "status": status,
                }),
            };
            json!({
                "id": id.to_hex(),
                "state": "completed",
                "fingerprint": hex::encode(c.fingerprint.0),
                "expires_at_ms": c.expires_at.0,
                "outcome": outcome,
            })
        }
    }
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match state.store.get(&id).await {
        Ok(Some(record)) => Json(record_json(&id, &record)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such record"),
        Err(e) => store_error(&e),
    }
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match state.store.delete(&id, q.force).await {
        Ok(Deletion::Deleted) => {
            state.metrics.admin_mutation("delete");
            tracing::warn!(record_id = %id, force = q.force, "admin: record deleted");
            Json(json!({"id": id.to_hex(), "deleted": true})).into_response()
        }
        Ok(Deletion::NotFound) => error(StatusCode::NOT_FOUND, "no such record"),
        Ok(Deletion::InFlightNeedsForce) => error(
            StatusCode::CONFLICT,
            "the record is in flight: deleting it lets a retry execute while the first attempt may still be running; add ?force=true",
        ),
        Err(e) => store_error(&e),
    }
}

/// `POST /keys/{id}/resolve` body.
#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum ResolveBody {
    Release,
    Respond {
        status: u16,
        #[serde(default)]
        headers: Vec<(String, String)>,
        #[serde(default)]
        body: String,
        #[serde(default)]
        ttl: Option<String>,
    },
}

async fn resolve(State(state): State<AdminState>, Path(id): Path<String>, body: Bytes) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let parsed: ResolveBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "body must be {{\"action\":\"release\"}} or {{\"action\":\"respond\",\"status\":…}}: {e}"
                ),
            );
        }
    };
    let (resolution, action) = match parsed {
        ResolveBody::Release => (Resolution::Release, "resolve_release"),
        ResolveBody::Respond {
            status,
            headers,
            body,
            ttl,
        } => {
            if !(100..=999).contains(&status) {
                return error(StatusCode::BAD_REQUEST, "status must be 100..=999");
            }
            let ttl = match ttl.as_deref().map(crate::units::parse_duration) {
                None => Duration::from_secs(24 * 3600),
                Some(Ok(d)) => d,
                Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
            };
            let head = ResponseHead {
                status,
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), Bytes::from(v.into_bytes())))
                    .collect(),
            };
            (
                Resolution::Respond {
                    outcome: Outcome::Response {
                        head,
                        body: Bytes::from(body.into_bytes()),
                    },
                    ttl,
                },
                "resolve_respond",
            )
        }
    };
    match state.store.resolve(&id, resolution).await {
        Ok(Resolved::Resolved) => {
            state.metrics.admin_mutation(action);
            tracing::warn!(record_id = %id, action, "admin: outcome-unknown record resolved");
            Json(json!({"id": id.to_hex(), "resolved": true})).into_response()
        }
        Ok(Resolved::NotFound) => error(StatusCode::NOT_FOUND, "no such record"),
        Ok(Resolved::NotOutcomeUnknown) => error(
            StatusCode::CONFLICT,
            "the record is not an outcome-unknown placeholder; nothing changed",
        ),
        Err(e) => store_error(&e),
    }
}

async fn purge(State(state): State<AdminState>) -> Response {
    match state.store.purge_expired().await {
        Ok(n) => {
            state.metrics.admin_mutation("purge_expired");
            tracing::info!(purged = n, "admin: expired records purged");
            Json(json!({"purged": n})).into_response()
        }
        Err(e) => store_error(&e),
    }
}
