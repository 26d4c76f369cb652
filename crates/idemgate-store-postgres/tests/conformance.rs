//! The shared store conformance suite against a throwaway PostgreSQL server (one per test
//! binary); each case gets its own table in one database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idemgate::record::RecordId;
use idemgate_store_postgres::PostgresStore;
use idemgate_store_tests::servers::postgres::PostgresServer;
use idemgate_store_tests::{Harness, async_trait};

struct PgHarness {
    url: String,
}

static NEXT_TABLE: AtomicU64 = AtomicU64::new(0);

impl PgHarness {
    fn builder(&self) -> idemgate_store_postgres::PostgresStoreBuilder {
        let n = NEXT_TABLE.fetch_add(1, Ordering::Relaxed);
        let table = format!("conf_{n}");
        PostgresStore::builder(self.url.clone())
            .channel(table.clone())
            .table(table)
            .max_connections(4)
            .reaper_interval(None)
    }
}

#[async_trait]
impl Harness for PgHarness {
    type Store = PostgresStore;

    async fn fresh(&self) -> PostgresStore {
        self.builder().connect().await.expect("connect")
    }

    async fn lapse_leases(&self, store: PostgresStore, lease: Duration) -> PostgresStore {
        // Leases are judged by the database clock, which runs with ours on this machine.
        tokio::time::sleep(lease + Duration::from_millis(50)).await;
        store
    }

    async fn corrupt(&self, store: &PostgresStore, id: &RecordId) {
        // An outcome in a format this build does not know (version byte 0xff), as a newer
        // build or a lost encryption key would leave it.
        let sql = format!(
            "INSERT INTO {t} (id, state, fingerprint, token, lease_expires_at, holder, \
                              origin_token, outcome, outcome_unknown, expires_at) \
             VALUES ($1, 2, $2, NULL, NULL, NULL, $3, $4, false, now() + interval '1 hour') \
             ON CONFLICT (id) DO UPDATE SET state = 2, outcome = excluded.outcome, \
               outcome_unknown = false, expires_at = excluded.expires_at, \
               origin_token = excluded.origin_token",
            t = store.table()
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&id.0[..])
            .bind(&[7u8; 32][..])
            .bind(&[9u8; 16][..])
            .bind(&b"\xffnot a record"[..])
            .execute(store.pool())
            .await
            .expect("corrupt");
    }

    async fn tiny(&self) -> PostgresStore {
        self.builder()
            .max_rows(Some(8))
            .capacity_check_interval(Duration::from_millis(20))
            .connect()
            .await
            .expect("connect tiny")
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(300)
    }
}

fn harness() -> &'static PgHarness {
    static H: OnceLock<PgHarness> = OnceLock::new();
    H.get_or_init(|| {
        let server = PostgresServer::shared();
        PgHarness {
            url: server.create_unique_database("conformance"),
        }
    })
}

idemgate_store_tests::conformance_tests!(harness());
