//! The README's walk-through over real TCP against a PostgreSQL started here: an order and its
//! stored response commit together; the retry replays it and creates nothing; a retry with
//! another body is refused; a duplicate sent while the first is in flight gets 409.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use axum_postgres_transactional::OrdersApi;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemgate_store_tests::servers::postgres::PostgresServer;

struct Resp {
    status: u16,
    replayed: bool,
    json: serde_json::Value,
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Resp {
    let mut b = axum::http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("request took longer than 20 s")
        .expect("transport error");
    let status = resp.status().as_u16();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        replayed,
        json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_and_its_outcome_commit_together_and_the_retry_replays() {
    let pg = tokio::task::block_in_place(PostgresServer::start);
    let url = tokio::task::block_in_place(|| pg.create_database("orders"));
    let api = OrdersApi::connect(&url, Duration::from_secs(1))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = api.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let order = r#"{"customer":"ada","amount_cents":4200}"#;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders")
            .fetch_one(api.pool())
            .await
            .unwrap()
    };

    // No key: the route requires one.
    let r = send(&client, addr, "POST", "/orders", None, order).await;
    assert_eq!(r.status, 400);
    assert_eq!(count().await, 0);

    let first = send(&client, addr, "POST", "/orders", Some("order-1"), order).await;
    assert_eq!(first.status, 201, "{}", first.json);
    assert!(!first.replayed);
    assert_eq!(count().await, 1);
    let payment_key = first.json["payment_key"].as_str().unwrap().to_owned();
    assert_eq!(payment_key.len(), 64);

    // The retry replays the stored response and creates nothing.
    let retry = send(&client, addr, "POST", "/orders", Some("order-1"), order).await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed);
    assert_eq!(retry.json, first.json);
    assert_eq!(count().await, 1);

    // The same key for another order is refused.
    let other = r#"{"customer":"ada","amount_cents":1}"#;
    let r = send(&client, addr, "POST", "/orders", Some("order-1"), other).await;
    assert_eq!(r.status, 422);
    assert_eq!(count().await, 1);

    // The order is there to read.
    let id = first.json["id"].as_i64().unwrap();
    let shown = send(&client, addr, "GET", &format!("/orders/{id}"), None, "").await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.json["amount_cents"], 4200);

    // A validation failure writes nothing and is stored like any answer.
    let bad = r#"{"customer":"bob","amount_cents":0}"#;
    let r = send(&client, addr, "POST", "/orders", Some("order-2"), bad).await;
    assert_eq!(r.status, 422);
    let r = send(&client, addr, "POST", "/orders", Some("order-2"), bad).await;
    assert_eq!(r.status, 422);
    assert!(r.replayed);
    assert_eq!(count().await, 1);

    server.abort();
    drop(api);
    tokio::task::block_in_place(move || drop(pg));
}
