//! The store conformance suite against the in-memory store, directly and through a
//! fault-injecting wrapper that only delays operations (delays must not change any answer).

use std::time::Duration;

use idemgate::record::RecordId;
use idemgate::store::MemoryStore;
use idemgate_store_tests::{FaultyHarness, Harness, async_trait};

/// The memory store's harness: leases lapse by a new holder epoch, never by the clock.
struct MemoryHarness;

#[async_trait]
impl Harness for MemoryHarness {
    type Store = MemoryStore;

    async fn fresh(&self) -> MemoryStore {
        MemoryStore::new()
    }

    async fn lapse_leases(&self, store: MemoryStore, _lease: Duration) -> MemoryStore {
        store.lapse_all_leases();
        store
    }

    async fn corrupt(&self, store: &MemoryStore, id: &RecordId) {
        store.insert_unreadable(id);
    }

    async fn tiny(&self) -> MemoryStore {
        MemoryStore::builder().capacity_bytes(4096).build()
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(300)
    }
}

mod memory {
    use super::*;
    idemgate_store_tests::conformance_tests!(MemoryHarness);
}

mod memory_delayed {
    use super::*;
    idemgate_store_tests::conformance_tests!(FaultyHarness::delays(
        MemoryHarness,
        0x1de_9a7e,
        Duration::from_millis(15),
    ));
}
