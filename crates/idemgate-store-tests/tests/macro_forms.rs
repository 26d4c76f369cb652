//! Proves the macro takes the forms backends use: an async expression (`.await`) giving a
//! `&'static` harness shared by every test of the binary, as a server-backed harness does.

use std::sync::OnceLock;
use std::time::Duration;

use idemgate::record::RecordId;
use idemgate::store::MemoryStore;
use idemgate_store_tests::{Harness, async_trait};

struct Shared {
    lease: Duration,
}

#[async_trait]
impl Harness for Shared {
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
        MemoryStore::builder().capacity_bytes(8 << 10).build()
    }
    fn lease(&self) -> Duration {
        self.lease
    }
}

async fn shared() -> &'static Shared {
    static HARNESS: OnceLock<Shared> = OnceLock::new();
    tokio::task::yield_now().await;
    HARNESS.get_or_init(|| Shared {
        lease: Duration::from_millis(200),
    })
}

idemgate_store_tests::conformance_tests!(shared().await);
