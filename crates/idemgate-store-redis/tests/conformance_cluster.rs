//! The shared conformance suite against a 3-master Redis Cluster started by this binary.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

fn harness() -> &'static support::RedisHarness {
    support::cluster()
}

idemgate_store_tests::conformance_tests!(harness());
