//! An orders API whose business write (an `orders` row) and stored idempotency outcome commit
//! in one PostgreSQL transaction: a retried `POST /orders` either finds both (and replays the
//! response) or neither (and runs again). See the README for the walk-through and the limits.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idemgate::IdempotencyLayer;
use idemgate::policy::{MethodPolicy, Policy};
use idemgate_store_postgres::PostgresStore;
use idemgate_store_postgres::transactional::{Transactional, TxHandle};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The `orders` table. `payment_key` is the idempotency key this API would send to its payment
/// provider: derived from the idempotency record, so a re-execution after a rollback sends the
/// same one, and `UNIQUE` so the database refuses a second order for one record outright.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders ( \
    id bigserial PRIMARY KEY, \
    customer text NOT NULL, \
    amount_cents bigint NOT NULL CHECK (amount_cents > 0), \
    payment_key text UNIQUE, \
    created_at timestamptz NOT NULL DEFAULT now())";

/// Why the API could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// The API: the application's pool, the idempotency store and the transactional adapter.
#[derive(Clone)]
pub struct OrdersApi {
    tx: Transactional,
}

impl OrdersApi {
    /// Connects to `database_url`, creates the `orders` table and the idempotency records
    /// table if needed. `lease` is the idempotency lease (renewed every third of it).
    pub async fn connect(database_url: &str, lease: Duration) -> Result<Self, StartError> {
        // The application's pool: where each request's transaction runs.
        let app_pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(2))
            .connect(database_url)
            .await
            .map_err(|e| StartError(format!("database: {e}")))?;
        sqlx::raw_sql(SCHEMA)
            .execute(&app_pool)
            .await
            .map_err(|e| StartError(format!("creating the orders table: {e}")))?;
        // The lease pool: the store's own and small; acquire and renew commit on their own on
        // it, so a duplicate sees the in-flight record at once (409), never a lock.
        let store = PostgresStore::builder(database_url)
            .max_connections(4)
            .connect()
            .await
            .map_err(|e| StartError(format!("idempotency store: {e}")))?;
        let policy = Policy {
            require_key: true,
            lease,
            ..Policy::default()
        };
        Ok(OrdersApi {
            tx: Transactional::new(app_pool, store).policy(policy),
        })
    }

    /// The application's pool.
    pub fn pool(&self) -> &PgPool {
        self.tx.app_pool()
    }

    /// `POST /orders` (idempotent, transactional) and `GET /orders/{id}`.
    pub fn router(&self) -> Router {
        let idempotency = IdempotencyLayer::builder(Arc::new(self.tx.store().clone()))
            .policy(MethodPolicy::new(self.tx.layer_policy()))
            .build();
        // The transactional layer sits inside the idempotency layer, on this route only: it
        // needs the attempt the idempotency layer puts in the request, and GETs need no
        // transaction of their own.
        let create = post(create_order)
            .layer::<_, std::convert::Infallible>(self.tx.layer())
            .layer::<_, std::convert::Infallible>(idempotency);
        Router::new()
            .route("/orders", create)
            .route("/orders/{id}", get(show_order))
            .with_state(self.tx.app_pool().clone())
    }
}

/// The body of `POST /orders`.
#[derive(Debug, Deserialize)]
pub struct NewOrder {
    /// Who orders.
    pub customer: String,
    /// How much, in cents (> 0).
    pub amount_cents: i64,
}

/// Creates an order inside the request's transaction. Whatever it answers is stored with the
/// order in the same commit.
async fn create_order(mut tx: TxHandle, Json(order): Json<NewOrder>) -> Response {
    if order.amount_cents <= 0 {
        // Writes nothing; the 422 is stored like any answer, so a retry gets it again.
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": "amount_cents must be positive" })),
        )
            .into_response();
    }
    // A stable key for the payment provider: the same for every attempt of this request.
    let payment_key = tx.downstream_key("payments");
    let inserted: Result<(i64, String), sqlx::Error> = sqlx::query_as(
        "INSERT INTO orders (customer, amount_cents, payment_key) VALUES ($1, $2, $3) \
         RETURNING id, created_at::text",
    )
    .bind(&order.customer)
    .bind(order.amount_cents)
    .bind(&payment_key)
    .fetch_one(&mut *tx)
    .await;
    match inserted {
        Ok((id, created_at)) => (
            StatusCode::CREATED,
            [("location", format!("/orders/{id}"))],
            Json(json!({
                "id": id,
                "customer": order.customer,
                "amount_cents": order.amount_cents,
                "payment_key": payment_key,
                "created_at": created_at,
            })),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "inserting the order failed");
            // 503 is a release status: T rolls back and the key is released, so the client's
            // retry runs again.
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "try again" })),
            )
                .into_response()
        }
    }
}

async fn show_order(State(pool): State<PgPool>, Path(id): Path<i64>) -> Response {
    let row: Result<Option<(i64, String, i64)>, sqlx::Error> =
        sqlx::query_as("SELECT id, customer, amount_cents FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(&pool)
            .await;
    match row {
        Ok(Some((id, customer, amount_cents))) => Json(json!({
            "id": id, "customer": customer, "amount_cents": amount_cents
        }))
        .into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => {
            tracing::error!(error = %e, "reading an order failed");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}
