//! A small payments API behind idemgate's [`IdempotencyLayer`], the shape of the Stripe-style
//! APIs the layer is made for.
//!
//! - `POST /payments` with a JSON body `{"amount": 1000, "currency": "EUR", "customer": "cus_1"}`
//!   "charges" the customer (a counter and a short sleep stand in for the card processor) and
//!   answers `201 Created` with `Location: /payments/{id}` and the payment as JSON. It
//!   **requires** an `Idempotency-Key` (400 without one), and the key is scoped by the
//!   `Authorization` header, so two API keys that happen to send the same idempotency key never
//!   see each other's payments. A POST without `Authorization` gets 400 `scope-missing`.
//! - `GET /payments/{id}` returns a payment to the API key that created it. GET is not
//!   protected: it is safe to repeat anyway.
//!
//! See the crate's README for a walk-through of a retried payment with curl.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idemgate::IdempotencyLayer;
use idemgate::policy::{MethodPolicy, Policy};
use idemgate::scope::{AuthorizationScope, MissingScope};
use idemgate::store::MemoryStore;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// How long a charge takes unless configured otherwise: long enough to fire a concurrent
/// duplicate by hand with curl, short enough not to annoy.
pub const DEFAULT_CHARGE_DELAY: Duration = Duration::from_secs(1);

/// The body of `POST /payments`.
#[derive(Clone, Debug, Deserialize)]
pub struct NewPayment {
    /// In the currency's minor unit (cents), so no float ever holds money.
    pub amount: u64,
    /// ISO 4217 code, e.g. `EUR`.
    pub currency: String,
    /// Who is charged.
    pub customer: String,
}

/// A payment as the API returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payment {
    /// `pay_` and a number.
    pub id: String,
    /// In the currency's minor unit.
    pub amount: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// Who was charged.
    pub customer: String,
    /// Always `succeeded` here: the pretend processor never declines.
    pub status: String,
    /// Unix seconds.
    pub created: u64,
}

/// The application's state: the payments and the pretend card processor.
#[derive(Clone)]
pub struct PaymentsApi {
    ledger: Arc<Ledger>,
}

struct Ledger {
    // Keyed by payment id; each payment remembers which API key made it, so one caller cannot
    // read another's payments. A std Mutex: it is never held across an await.
    payments: Mutex<HashMap<String, (String, Payment)>>,
    // Every charge ever sent to the "processor": what the idempotency layer must keep at one per
    // payment, however often a client retries.
    charges: AtomicU64,
    next_id: AtomicU64,
    charge_delay: Duration,
}

impl PaymentsApi {
    /// An empty ledger whose charges take `charge_delay`.
    pub fn new(charge_delay: Duration) -> Self {
        PaymentsApi {
            ledger: Arc::new(Ledger {
                payments: Mutex::new(HashMap::new()),
                charges: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                charge_delay,
            }),
        }
    }

    /// How many charges have been started so far.
    pub fn charges(&self) -> u64 {
        self.ledger.charges.load(Ordering::SeqCst)
    }

    /// The HTTP API, with a fresh in-memory idempotency store.
    pub fn router(&self) -> Router {
        let store = Arc::new(MemoryStore::builder().build());
        self.router_with_layer(idempotency_layer(store))
    }

    /// The HTTP API behind the given idempotency layer (e.g. over another store).
    pub fn router_with_layer(&self, layer: IdempotencyLayer) -> Router {
        Router::new()
            .route("/payments", post(create_payment))
            .route("/payments/{id}", get(get_payment))
            // `Router::layer` wraps the routes, so every POST /payments goes through it; the
            // 404 fallback does not need to.
            .layer(layer)
            .with_state(self.clone())
    }
}

/// The idempotency settings of this API: POST only, a key is required, scoped by the
/// `Authorization` header, and a POST without credentials is refused rather than sharing the
/// anonymous scope with every other unauthenticated caller.
pub fn idempotency_layer(store: Arc<MemoryStore>) -> IdempotencyLayer {
    let policy = Policy {
        require_key: true,
        on_missing_scope: MissingScope::Reject,
        // Keys are kept a day (the default), like Stripe's.
        ..Policy::default()
    };
    IdempotencyLayer::builder(store)
        .policy(MethodPolicy::new(policy).methods([Method::POST]))
        .scope(AuthorizationScope)
        .build()
}

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests end.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The application's own errors (idemgate's are `application/problem+json`; these are plain
/// JSON, so a client can tell them apart).
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn caller(headers: &HeaderMap) -> Result<String, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "missing Authorization".into()))
}

fn validate(new: &NewPayment) -> Result<(), ApiError> {
    let bad = |m: &str| Err(ApiError(StatusCode::BAD_REQUEST, m.to_owned()));
    if new.amount == 0 {
        return bad("amount must be a positive integer in the currency's minor unit");
    }
    if new.currency.len() != 3 || !new.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return bad("currency must be an ISO 4217 code such as EUR");
    }
    if new.customer.trim().is_empty() {
        return bad("customer must not be empty");
    }
    Ok(())
}

async fn create_payment(
    State(api): State<PaymentsApi>,
    headers: HeaderMap,
    body: Result<Json<NewPayment>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let owner = caller(&headers)?;
    // axum answers a bad JSON body with 422 by default; 400 here keeps 422 meaning one thing
    // to clients of this API: "idempotency key reused for a different request".
    let Json(new) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    validate(&new)?;

    let ledger = &api.ledger;
    // The charge: counted first (the processor has it from here on), then its latency.
    ledger.charges.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(ledger.charge_delay).await;

    let n = ledger.next_id.fetch_add(1, Ordering::SeqCst);
    let payment = Payment {
        id: format!("pay_{n:06}"),
        amount: new.amount,
        currency: new.currency,
        customer: new.customer,
        status: "succeeded".into(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    ledger
        .payments
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(payment.id.clone(), (owner, payment.clone()));
    tracing::info!(id = %payment.id, amount = payment.amount, currency = %payment.currency, "charged");

    let location = HeaderValue::from_str(&format!("/payments/{}", payment.id))
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "bad payment id".into()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(payment),
    ))
}

async fn get_payment(
    State(api): State<PaymentsApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Payment>, ApiError> {
    let owner = caller(&headers)?;
    let payments = api
        .ledger
        .payments
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match payments.get(&id) {
        // Another caller's payment is "not found", not "forbidden": its existence is private.
        Some((o, p)) if *o == owner => Ok(Json(p.clone())),
        _ => Err(ApiError(StatusCode::NOT_FOUND, "no such payment".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = NewPayment {
            amount: 1,
            currency: "EUR".into(),
            customer: "cus_1".into(),
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            NewPayment {
                amount: 0,
                ..ok.clone()
            },
            NewPayment {
                currency: "eur".into(),
                ..ok.clone()
            },
            NewPayment {
                currency: "EURO".into(),
                ..ok.clone()
            },
            NewPayment {
                customer: " ".into(),
                ..ok.clone()
            },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
