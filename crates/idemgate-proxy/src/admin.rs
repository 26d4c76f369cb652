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
//! `Authorization: Bearer <token>`. Every error is `{"error": "..."}`, also an unknown route,
//! a wrong method, a bad query or a body over the limit. A `resolve` response is held to what
//! idemgate would replay: a final status (200–599), valid header fields, none of those it
//! never stores (`content-length`, hop-by-hop fields, `date`, `set-cookie`, …).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{BytesRejection, QueryRejection};
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
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
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
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(e.status(), e.body_text()),
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

async fn resolve(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return error(e.status(), e.body_text()),
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
            // A replay is a final response: hyper refuses to send a 1xx as one.
            if !(200..=599).contains(&status) {
                return error(StatusCode::BAD_REQUEST, "status must be 200..=599");
            }
            let headers = match replayable_headers(headers) {
                Ok(headers) => headers,
                Err(refused) => return error(StatusCode::BAD_REQUEST, refused),
            };
            let ttl = match ttl.as_deref().map(crate::units::parse_duration) {
                None => Duration::from_secs(24 * 3600),
                Some(Ok(d)) => d,
                Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
            };
            let head = ResponseHead { status, headers };
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

/// The fields of an operator's response as a stored head holds them (names lowercase), or
/// why one is refused: a field a replay could not send (a replay would skip it silently, so
/// the operator would not learn of it otherwise) or one idemgate never replays.
fn replayable_headers(headers: Vec<(String, String)>) -> Result<Vec<(String, Bytes)>, String> {
    headers
        .into_iter()
        .map(|(name, value)| {
            let parsed = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a valid header name"))?;
            if http::HeaderValue::from_bytes(value.as_bytes()).is_err() {
                return Err(format!("the value of {name:?} is not a valid header value"));
            }
            if idemgate::layer::never_replayed(parsed.as_str()) {
                return Err(format!(
                    "idemgate never replays {:?}: it describes one connection or moment, is \
                     computed on replay, or is a credential",
                    parsed.as_str()
                ));
            }
            Ok((parsed.as_str().to_owned(), Bytes::from(value.into_bytes())))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn admin() -> axum::Router {
        router(AdminState {
            store: Arc::new(idemgate::store::MemoryStore::new()),
            metrics: Arc::new(Metrics::new()),
            token: None,
        })
    }

    /// The status and the `error` member of the JSON answer to `method path` with `body`.
    async fn call(method: &str, path: &str, body: impl Into<axum::body::Body>) -> (u16, String) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap_or_else(|e| panic!("{e}"));
        let response = admin()
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {});
        let status = response.status().as_u16();
        let kind = response.headers().get("content-type").cloned();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let json: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("{method} {path}: {status} {kind:?} not JSON ({e}): {bytes:?}")
        });
        let message = json["error"].as_str().unwrap_or_default().to_owned();
        assert!(!message.is_empty(), "{method} {path}: {json}");
        (status, message)
    }

    const ID: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[tokio::test]
    async fn every_error_is_json_with_an_error_member() {
        let (status, _) = call("GET", "/no-such-route", "").await;
        assert_eq!(status, 404);
        let (status, _) = call("PUT", &format!("/keys/{ID}"), "").await;
        assert_eq!(status, 405);
        let (status, message) = call("DELETE", &format!("/keys/{ID}?force=maybe"), "").await;
        assert_eq!(status, 400);
        assert!(message.contains("force"), "{message}");
        let (status, _) = call("GET", "/keys/zz", "").await;
        assert_eq!(status, 400);
        // Past axum's default body limit (2 MiB).
        let huge = vec![b'a'; 3 << 20];
        let (status, _) = call("POST", &format!("/keys/{ID}/resolve"), huge).await;
        assert_eq!(status, 413);
        let (status, _) = call("POST", &format!("/keys/{ID}/resolve"), "{bad").await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn a_resolve_response_must_be_one_idemgate_would_replay() {
        let respond = |status: u16, headers: Value| {
            json!({"action": "respond", "status": status, "headers": headers, "body": "{}"})
                .to_string()
        };
        let refused = [
            (respond(100, json!([])), "status"),
            (respond(600, json!([])), "status"),
            (respond(201, json!([["bad name", "v"]])), "bad name"),
            (respond(201, json!([["x-a", "v\r\nx-b: injected"]])), "x-a"),
            (
                respond(201, json!([["Content-Length", "2"]])),
                "content-length",
            ),
            (respond(201, json!([["connection", "close"]])), "connection"),
            (respond(201, json!([["set-cookie", "s=1"]])), "set-cookie"),
        ];
        for (body, named) in refused {
            let (status, message) =
                call("POST", &format!("/keys/{ID}/resolve"), body.clone()).await;
            assert_eq!(status, 400, "{body}: {message}");
            assert!(message.contains(named), "{body}: {message}");
        }
        // A valid answer gets past the checks to the store, which has no such record.
        let (status, message) = call(
            "POST",
            &format!("/keys/{ID}/resolve"),
            respond(201, json!([["content-type", "application/json"]])),
        )
        .await;
        assert_eq!(status, 404, "{message}");
    }
}
