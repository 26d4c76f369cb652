//! The connections the store runs its own statements on, when it made its pool itself.
//!
//! Why not sqlx's pool for them: sqlx tests every connection given back with a ping (a round
//! trip, in a task of its own) whatever happened on it, so each statement cost two round trips
//! and 14–26 % of the PostgreSQL rows' throughput (BENCHMARKS). Here a connection whose
//! statement was answered goes straight back to the idle list. One whose statement met the
//! operation's deadline or lost its connection is closed ([`Checked::discard`]): it may have
//! gone dark, and is never reused. One whose caller gave up mid-statement (its future dropped,
//! e.g. a client that went away) is brought back to a known state in a task of its own, with a
//! ping bounded by [`RECOVER_TIMEOUT`], and reused; closing it instead would cost a new
//! server process per abandoned request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a connection may sit idle before it is closed (what the store's sqlx pool used).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long closing an idle connection politely (a `Terminate` message) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection abandoned mid-statement may take to answer its ping (the statement's
/// own end included) before it is closed instead.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Up to `max` connections made with one set of options, idle ones reused newest first (so a
/// quiet spell lets the rest age out).
pub(crate) struct StatementConns {
    opts: PgConnectOptions,
    slots: Arc<Semaphore>,
    max: u32,
    acquire_timeout: Duration,
    idle: Mutex<Vec<(PgConnection, Instant)>>,
}

/// A connection checked out for one statement (or one migration), holding its place among
/// the `max`. End it with [`give_back`](Checked::give_back) after an answer, or
/// [`discard`](Checked::discard) when the connection may be broken; dropped otherwise (a
/// caller that gave up), it is recovered in the background.
pub(crate) struct Checked {
    /// `None` only once given back or discarded.
    conn: Option<PgConnection>,
    conns: Arc<StatementConns>,
    slot: Option<OwnedSemaphorePermit>,
}

impl StatementConns {
    pub(crate) fn new(opts: PgConnectOptions, max: u32, acquire_timeout: Duration) -> Arc<Self> {
        Arc::new(StatementConns {
            opts,
            slots: Arc::new(Semaphore::new(max as usize)),
            max,
            acquire_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The most connections open at once.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// An idle connection or a new one, within `acquire_timeout` (else `PoolTimedOut`, as
    /// sqlx's pool answers).
    pub(crate) async fn acquire(self: &Arc<Self>) -> Result<Checked, sqlx::Error> {
        let started = Instant::now();
        let slot =
            match tokio::time::timeout(self.acquire_timeout, self.slots.clone().acquire_owned())
                .await
            {
                Err(_) => return Err(sqlx::Error::PoolTimedOut),
                Ok(Err(_)) => return Err(sqlx::Error::PoolClosed),
                Ok(Ok(slot)) => slot,
            };
        let conn = match self.take_idle() {
            Some(conn) => conn,
            None => {
                let left = self.acquire_timeout.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, self.opts.connect()).await {
                    Err(_) => return Err(sqlx::Error::PoolTimedOut),
                    Ok(connected) => connected?,
                }
            }
        };
        Ok(Checked {
            conn: Some(conn),
            conns: self.clone(),
            slot: Some(slot),
        })
    }

    fn take_idle(&self) -> Option<PgConnection> {
        let mut stale = Vec::new();
        let fresh = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            // Oldest first: the newest is fresh if any is; the stale ones go.
            let keep_from = idle.partition_point(|(_, since)| since.elapsed() >= IDLE_TIMEOUT);
            stale.extend(idle.drain(..keep_from).map(|(conn, _)| conn));
            idle.pop().map(|(conn, _)| conn)
        };
        for conn in stale {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await;
            });
        }
        fresh
    }

    fn put(&self, conn: PgConnection) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((conn, Instant::now()));
    }
}

impl Checked {
    /// The connection (`PoolClosed` never happens: it is there until given back).
    pub(crate) fn conn(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// After an answer (a row, or an error from the server, which leaves the connection
    /// ready): back to the idle list, before its place is freed so the next caller finds it.
    pub(crate) fn give_back(mut self) {
        if let Some(conn) = self.conn.take() {
            self.conns.put(conn);
        }
    }

    /// After a lost connection or no answer in time: closed now, never reused.
    pub(crate) fn discard(mut self) {
        drop(self.conn.take());
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Abandoned mid-statement: wait (bounded) for it to be ready again, keeping its place
        // meanwhile. Outside a runtime (at shutdown) it is simply closed.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (conns, slot) = (self.conns.clone(), self.slot.take());
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(RECOVER_TIMEOUT, conn.ping()).await {
                conns.put(conn);
            }
            drop(slot);
        });
    }
}
