//! The one LISTEN connection per store (wait mode, SPEC §7).
//!
//! Change statements send `pg_notify(channel, hex record id)` in the same statement; this task
//! turns each notification into [`WatchHub::notify`]. When the connection is lost it
//! reconnects with backoff and then calls [`WatchHub::notify_all`]: notifications sent while
//! it was away are gone, so every waiter re-reads its record. A connection quiet for the
//! check interval must answer a `SELECT 1`, or it counts as lost: TCP alone may take many
//! minutes to notice a peer that vanished without a word.

use std::time::Duration;

use idemgate::record::RecordId;
use idemgate::store::{StoreError, WatchHub};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::task::JoinHandle;

use crate::store::map_err;

/// Connects and LISTENs (returning only once listening, or the error), then spawns the task
/// that feeds `hub`.
pub(crate) async fn start(
    opts: PgConnectOptions,
    acquire_timeout: Duration,
    check_every: Duration,
    channel: String,
    hub: WatchHub,
) -> Result<JoinHandle<()>, StoreError> {
    let listener = connect(&opts, acquire_timeout, &channel).await?;
    Ok(tokio::spawn(run(
        listener,
        opts,
        acquire_timeout,
        check_every,
        channel,
        hub,
    )))
}

async fn connect(
    opts: &PgConnectOptions,
    acquire_timeout: Duration,
    channel: &str,
) -> Result<PgListener, StoreError> {
    // A pool of one per listener instance, so a connection stuck in a dead listener's cleanup
    // never blocks the next one.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(opts.clone());
    let work = async {
        let mut l = PgListener::connect_with(&pool).await?;
        // We reconnect ourselves, so that we know when to wake every waiter.
        l.eager_reconnect(false);
        l.ignore_pool_close_event(true);
        l.listen(channel).await?;
        Ok::<_, sqlx::Error>(l)
    };
    match tokio::time::timeout(acquire_timeout * 3, work).await {
        Ok(Ok(l)) => Ok(l),
        Ok(Err(e)) => Err(map_err(e, false)),
        Err(_) => Err(StoreError::Timeout {
            maybe_applied: false,
        }),
    }
}

/// Whether the connection answers a query within `timeout`.
async fn answers(listener: &mut PgListener, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&mut *listener)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "postgres store: the LISTEN connection's check failed");
            false
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "postgres store: the LISTEN connection did not answer its check in time"
            );
            false
        }
    }
}

async fn run(
    mut listener: PgListener,
    opts: PgConnectOptions,
    acquire_timeout: Duration,
    check_every: Duration,
    channel: String,
    hub: WatchHub,
) {
    loop {
        // Receiving is cancel-safe (sqlx 0.8.1 on), so a quiet spell can end it for a check.
        let received = match tokio::time::timeout(check_every, listener.try_recv()).await {
            Ok(received) => received,
            Err(_) if answers(&mut listener, acquire_timeout * 3).await => continue,
            Err(_) => Ok(None),
        };
        match received {
            Ok(Some(n)) => match RecordId::from_hex(n.payload()) {
                Some(id) => hub.notify(&id),
                None => tracing::debug!(
                    payload = n.payload(),
                    "postgres store: ignoring foreign notification"
                ),
            },
            Ok(None) | Err(_) => {
                tracing::warn!("postgres store: LISTEN connection lost; reconnecting");
                // Wake waiters now too: while we are away they would otherwise sleep until
                // their lease deadline.
                hub.notify_all();
                drop(listener);
                let mut backoff = Duration::from_millis(50);
                listener = loop {
                    tokio::time::sleep(backoff).await;
                    match connect(&opts, acquire_timeout, &channel).await {
                        Ok(l) => break l,
                        Err(e) => {
                            tracing::debug!(error = %e, "postgres store: LISTEN reconnect failed");
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                };
                tracing::info!("postgres store: LISTEN connection re-established");
                hub.notify_all();
            }
        }
    }
}
