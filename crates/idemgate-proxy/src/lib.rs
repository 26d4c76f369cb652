//! idemgate as a reverse proxy: `idemgate serve` puts Idempotency-Key enforcement (SPEC §1–§9)
//! in front of an HTTP API written in any language.
//!
//! The proxy **is** [`idemgate::IdempotencyLayer`] wrapped around an upstream-forwarding tower
//! service ([`forward::Forwarder`]), served by hyper-util's HTTP/1.1 + h2c server
//! ([`server::Server`]), configured from a TOML file, `IDEMGATE_*` variables and flags
//! ([`config`]), with per-route policies ([`routes`]), an admin API ([`admin`]) and Prometheus
//! metrics ([`metrics`]).

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod client_body;
pub mod client_request_body;
pub mod client_timeouts;
pub mod config;
pub mod demo;
pub mod forward;
pub mod keys;
pub mod metrics;
pub mod parser_refusals;
pub mod pool;
pub mod request_head;
pub mod routes;
pub mod scope;
pub mod server;
pub mod store;
pub mod units;

/// Exit code for a bad configuration or command line (`EX_USAGE`).
pub const EX_USAGE: i32 = 64;
