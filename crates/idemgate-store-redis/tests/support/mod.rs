//! The conformance harness for both deployments: a server (or Cluster) started once per test
//! binary, and a key prefix of its own for every fresh store so cases never see each other.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idemgate::record::RecordId;
use idemgate_store_redis::RedisStore;
use idemgate_store_tests::servers::redis::{RedisCluster, RedisServer};
use idemgate_store_tests::{Harness, async_trait};

/// Headroom above the memory a fresh server already uses: a few hundred 1 KiB records.
const TINY_HEADROOM: u64 = 512 * 1024;

enum Deployment {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

impl Deployment {
    fn url(&self) -> String {
        match self {
            Deployment::Standalone(s) => s.url(),
            Deployment::Cluster(c) => c.url(),
        }
    }

    /// A node to run `redis-cli -c` against (it follows MOVED on Cluster).
    fn node(&self) -> &RedisServer {
        match self {
            Deployment::Standalone(s) => s,
            Deployment::Cluster(c) => &c.nodes()[0],
        }
    }
}

pub struct RedisHarness {
    main: Deployment,
    tiny: OnceLock<Deployment>,
    cluster: bool,
}

pub fn standalone() -> &'static RedisHarness {
    static H: OnceLock<RedisHarness> = OnceLock::new();
    H.get_or_init(|| RedisHarness {
        main: Deployment::Standalone(
            RedisServer::builder()
                .config("maxmemory-policy noeviction")
                .start(),
        ),
        tiny: OnceLock::new(),
        cluster: false,
    })
}

pub fn cluster() -> &'static RedisHarness {
    static H: OnceLock<RedisHarness> = OnceLock::new();
    H.get_or_init(|| RedisHarness {
        main: Deployment::Cluster(RedisCluster::start(3)),
        tiny: OnceLock::new(),
        cluster: true,
    })
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn prefix() -> String {
    format!("c{}:idemgate:", NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn connect(url: String) -> RedisStore {
    RedisStore::builder(url)
        .key_prefix(prefix())
        .connect()
        .await
        .expect("connect to the test Redis")
}

/// Caps `maxmemory` at what the node uses now plus `TINY_HEADROOM`, with `noeviction`.
fn make_tiny(node: &RedisServer) {
    let info = node.cli(&["info", "memory"]);
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory");
    let max = (used + TINY_HEADROOM).to_string();
    node.cli(&["config", "set", "maxmemory-policy", "noeviction"]);
    let out = node.cli(&["config", "set", "maxmemory", &max]);
    assert!(out.contains("OK"), "CONFIG SET maxmemory: {out}");
}

#[async_trait]
impl Harness for RedisHarness {
    type Store = RedisStore;

    async fn fresh(&self) -> RedisStore {
        connect(self.main.url()).await
    }

    async fn lapse_leases(&self, store: RedisStore, lease: Duration) -> RedisStore {
        // Leases are judged by the server clock: just wait past them.
        tokio::time::sleep(lease + Duration::from_millis(100)).await;
        store
    }

    async fn corrupt(&self, store: &RedisStore, id: &RecordId) {
        let key = store.key(id);
        // The suite corrupts records of `fresh` stores only, which live on the main deployment.
        let out = self
            .main
            .node()
            .cli(&["-c", "set", &key, "not an idemgate record"]);
        assert!(out.contains("OK"), "SET garbage: {out}");
    }

    async fn tiny(&self) -> RedisStore {
        let cluster = self.cluster;
        let tiny = self.tiny.get_or_init(|| {
            if cluster {
                // All slots on one node, so every record lands where the memory cap is.
                let c = RedisCluster::builder(3).all_slots_on_first_node().start();
                make_tiny(&c.nodes()[0]);
                Deployment::Cluster(c)
            } else {
                let s = RedisServer::start();
                make_tiny(&s);
                Deployment::Standalone(s)
            }
        });
        connect(tiny.url()).await
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(300)
    }
}
