//! The shared conformance suite against a standalone `redis-server` started by this binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

fn harness() -> &'static support::RedisHarness {
    support::standalone()
}

idemgate_store_tests::conformance_tests!(harness());
