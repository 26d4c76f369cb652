//! Shared helpers for the black-box tests of `idemgate serve`: the real binary as a child
//! process, real HTTP upstreams (a counting hyper server and a raw fault-injecting one), and an
//! HTTP client.
//!
//! Every process and server started here is stopped on `Drop`, so a failing assertion never
//! leaves anything running.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod fault;
pub mod h2c;
pub mod held;
pub mod process;
pub mod upstream;

pub use client::{Client, Req, Resp, assert_a_failing_streamed_body_is_a_400, raw_exchange};
pub use fault::{Fault, FaultUpstream, closed_port};
pub use h2c::{H2Fault, H2cUpstream};
pub use process::{Proxy, ProxyBuilder, run_idemgate};
pub use upstream::Upstream;

use std::time::Duration;

/// The problem `type` URI prefix (the core crate's `problem::TYPE_PREFIX`).
pub const PROBLEM_PREFIX: &str = "https://idemgate.dev/problems/";

/// Asserts `r` is the problem response `slug` with `status`, with a well-formed RFC 9457 body.
pub fn assert_problem(r: &client::Resp, status: u16, slug: &str) {
    assert_eq!(
        r.status,
        status,
        "expected {status} {slug}, got {}",
        r.summary()
    );
    assert_eq!(
        r.problem().as_deref(),
        Some(slug),
        "expected problem {slug}, got {}",
        r.summary()
    );
    let body = r.json();
    assert_eq!(
        body["status"],
        status,
        "problem body status: {}",
        r.summary()
    );
    assert!(body["title"].is_string() && body["detail"].is_string());
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns the last result.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The hex record id the proxy uses for `key` under the anonymous scope (no `Authorization`).
pub fn anonymous_record_id(key: &str) -> String {
    idemgate::record::RecordId::derive("anonymous", b"", key.as_bytes()).to_hex()
}
