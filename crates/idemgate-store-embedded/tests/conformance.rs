//! The shared store conformance suite against the embedded store. `lapse_leases` is a real
//! restart: the file is closed and opened again, which starts a new instance epoch. The suite
//! runs three times: directly, with a checkpoint after every batch (so that records are read
//! back from the file, from a running checkpoint and from memory, in every mix), and through
//! the fault-injecting wrapper with random delays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idemgate::record::RecordId;
use idemgate_store_embedded::{EmbeddedStore, EmbeddedStoreBuilder};
use idemgate_store_tests::{FaultyHarness, Harness, async_trait};

/// One temp folder per test; each `fresh`/`tiny` store gets its own file in it.
struct EmbeddedHarness {
    dir: tempfile::TempDir,
    files: AtomicUsize,
    checkpoint_interval: Option<Duration>,
}

impl EmbeddedHarness {
    fn new() -> Self {
        EmbeddedHarness {
            dir: tempfile::tempdir().expect("temp dir"),
            files: AtomicUsize::new(0),
            checkpoint_interval: None,
        }
    }

    /// Checkpoints as often as the writer can start them.
    fn checkpointing() -> Self {
        EmbeddedHarness {
            checkpoint_interval: Some(Duration::ZERO),
            ..Self::new()
        }
    }

    fn next_path(&self) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("store-{n}.redb"))
    }

    /// The settings every (re)open of a normal store uses. The suite's requests keep records
    /// for 1 h, and it checks that a lapsed lease's placeholder is kept for that long; a lease
    /// that lapses by a restart is converted at open, before any request names a retention, so
    /// the store's configured retention for those is set to the same hour.
    fn builder(&self, path: PathBuf) -> EmbeddedStoreBuilder {
        let builder = EmbeddedStore::builder(path).lapsed_retention(Duration::from_secs(3600));
        match self.checkpoint_interval {
            Some(d) => builder.checkpoint_interval(d),
            None => builder,
        }
    }
}

#[async_trait]
impl Harness for EmbeddedHarness {
    type Store = EmbeddedStore;

    async fn fresh(&self) -> EmbeddedStore {
        self.builder(self.next_path())
            .open()
            .expect("open a fresh embedded store")
    }

    async fn lapse_leases(&self, store: EmbeddedStore, _lease: Duration) -> EmbeddedStore {
        let path = store.path().to_path_buf();
        let epoch = store.open_report().epoch;
        store.close().await;
        let store = self
            .builder(path)
            .open()
            .expect("reopen the embedded store");
        assert_eq!(
            store.open_report().epoch,
            epoch + 1,
            "a reopen starts a new epoch"
        );
        store
    }

    async fn corrupt(&self, store: &EmbeddedStore, id: &RecordId) {
        store
            .write_raw_for_tests(id, b"\x7fnot a record".to_vec())
            .await
            .expect("write garbage");
    }

    async fn tiny(&self) -> EmbeddedStore {
        self.builder(self.next_path())
            .max_file_bytes(Some(256 * 1024))
            .open()
            .expect("open a tiny embedded store")
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(300)
    }
}

mod embedded {
    use super::*;
    idemgate_store_tests::conformance_tests!(EmbeddedHarness::new());
}

mod embedded_checkpointing {
    use super::*;
    idemgate_store_tests::conformance_tests!(EmbeddedHarness::checkpointing());
}

/// Delays change timing only, never an answer: the whole suite must still pass.
mod embedded_delayed {
    use super::*;
    idemgate_store_tests::conformance_tests!(FaultyHarness::delays(
        EmbeddedHarness::new(),
        0x00e3_bedd,
        Duration::from_millis(15),
    ));
}
