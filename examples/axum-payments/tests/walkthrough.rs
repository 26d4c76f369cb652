//! The README's walk-through of a retried payment, over real TCP against the running app.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum_payments::{Payment, PaymentsApi, serve};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Long enough that a duplicate sent right after the charge starts lands while it is in flight.
const CHARGE_DELAY: Duration = Duration::from_secs(1);

const ALICE: &str = "Bearer sk_test_alice";
const BOB: &str = "Bearer sk_test_bob";

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn problem_type(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{:?}",
            self.body
        );
        self.json()["type"].as_str().unwrap().to_owned()
    }
}

#[derive(Clone)]
struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Api {
    fn new(addr: SocketAddr) -> Self {
        Api {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&v).unwrap())
            }
            None => Bytes::new(),
        };
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            self.client.request(req.body(Full::new(body)).unwrap()),
        )
        .await
        .expect("request timed out")
        .expect("request failed");
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn pay(&self, auth: &str, key: &str, body: Value) -> Reply {
        self.send(Method::POST, "/payments", Some(auth), Some(key), Some(body))
            .await
    }
}

async fn start() -> (PaymentsApi, Api, oneshot::Sender<()>) {
    let app = PaymentsApi::new(CHARGE_DELAY);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let router = app.router();
    tokio::spawn(async move {
        serve(listener, router, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (app, Api::new(addr), stop)
}

async fn wait_for_charges(app: &PaymentsApi, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.charges() < n {
        assert!(
            Instant::now() < deadline,
            "charge {n} never started (charges: {})",
            app.charges()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_payment_walkthrough() {
    let (app, api, stop) = start().await;
    let order = json!({"amount": 1000, "currency": "EUR", "customer": "cus_42"});

    // 1. The first POST charges once and creates the payment.
    let first = api.pay(ALICE, "\"order-42\"", order.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let payment: Payment = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(payment.amount, 1000);
    assert_eq!(payment.currency, "EUR");
    assert_eq!(payment.customer, "cus_42");
    let location = first.header("location").unwrap().to_owned();
    assert_eq!(location, format!("/payments/{}", payment.id));
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(app.charges(), 1);

    // 2. The same POST again (a retry after a lost response): the stored response, marked as
    // replayed, and no second charge. The bare-token spelling of the key is the same key.
    let retry = api.pay(ALICE, "order-42", order.clone()).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.header("location"), Some(location.as_str()));
    assert_eq!(retry.body, first.body);
    assert_eq!(app.charges(), 1);

    // The payment exists once.
    let fetched = api
        .send(Method::GET, &location, Some(ALICE), None, None)
        .await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Payment>(&fetched.body).unwrap(),
        payment
    );

    // 3. The same key with a different amount: 422, nothing executed.
    let changed = api
        .pay(
            ALICE,
            "\"order-42\"",
            json!({"amount": 2000, "currency": "EUR", "customer": "cus_42"}),
        )
        .await;
    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(changed.problem_type().ends_with("/key-reused"));
    assert_eq!(app.charges(), 1);

    // 4. A concurrent duplicate: 409 with Retry-After while the first is being charged; once it
    // is done, the retry gets its response.
    let order2 = json!({"amount": 500, "currency": "USD", "customer": "cus_7"});
    let first2 = tokio::spawn({
        let api = api.clone();
        let order2 = order2.clone();
        async move { api.pay(ALICE, "\"order-43\"", order2).await }
    });
    wait_for_charges(&app, 2).await;
    let dup = api.pay(ALICE, "\"order-43\"", order2.clone()).await;
    assert_eq!(dup.status, StatusCode::CONFLICT, "{:?}", dup.body);
    assert!(dup.problem_type().ends_with("/request-in-flight"));
    let retry_after: u64 = dup.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let first2 = first2.await.unwrap();
    assert_eq!(first2.status, StatusCode::CREATED);
    let later = api.pay(ALICE, "\"order-43\"", order2.clone()).await;
    assert_eq!(later.status, StatusCode::CREATED);
    assert_eq!(later.header("idempotent-replayed"), Some("true"));
    assert_eq!(later.body, first2.body);
    assert_eq!(app.charges(), 2);

    // 5. Keys are scoped by Authorization: another API key's "order-42" is its own payment, and
    // it cannot read Alice's.
    let bob = api.pay(BOB, "\"order-42\"", order.clone()).await;
    assert_eq!(bob.status, StatusCode::CREATED);
    assert_eq!(bob.header("idempotent-replayed"), None);
    assert_ne!(bob.body, first.body);
    assert_eq!(app.charges(), 3);
    let peek = api
        .send(Method::GET, &location, Some(BOB), None, None)
        .await;
    assert_eq!(peek.status, StatusCode::NOT_FOUND);

    // 6. Refused before anything runs: no key, no credentials.
    let no_key = api
        .send(
            Method::POST,
            "/payments",
            Some(ALICE),
            None,
            Some(order.clone()),
        )
        .await;
    assert_eq!(no_key.status, StatusCode::BAD_REQUEST);
    assert!(no_key.problem_type().ends_with("/key-missing"));
    let no_auth = api
        .send(
            Method::POST,
            "/payments",
            None,
            Some("\"order-44\""),
            Some(order.clone()),
        )
        .await;
    assert_eq!(no_auth.status, StatusCode::BAD_REQUEST);
    assert!(no_auth.problem_type().ends_with("/scope-missing"));
    assert_eq!(app.charges(), 3);

    let _ = stop.send(());
}
