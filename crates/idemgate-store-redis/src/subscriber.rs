//! Wait mode (SPEC §7): one pub/sub connection per store feeding a [`WatchHub`].
//!
//! The scripts publish on the record's own name (`…{hex}`) whenever they complete, release,
//! delete, resolve or replace a lapsed lease. A [`watch`](Subscriber::watch) registers in the hub
//! first and then subscribes to the record's channel, returning only once the server confirmed
//! the subscription: the caller's re-read after it cannot miss a change.
//!
//! Channels nobody waits on any more are unsubscribed by a periodic sweep. After the connection
//! drops, a resync task subscribes again to every awaited channel and then wakes every waiter
//! ([`WatchHub::notify_all`]) so each re-reads the record it waits on: changes published while
//! the connection was down are not lost, only delivered as "re-read".

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use idemgate::record::RecordId;
use idemgate::store::{StoreError, Watch, WatchHub};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Mutex, OnceCell, mpsc};

use crate::conn::{Conn, ConnOptions, Target};

const SWEEP_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct Subscriber {
    target: Target,
    timeout: Duration,
    dead_connection_timeout: Duration,
    /// Builds a channel name from a record id (the store's key naming).
    channel: Box<dyn Fn(&RecordId) -> String + Send + Sync>,
    hub: WatchHub,
    /// Opened at the first `watch`, so stores that never wait hold no pub/sub connection.
    conn: OnceCell<Conn>,
    /// The channels the server has confirmed. The lock serializes subscribe, unsubscribe and
    /// resync, so a sweep cannot unsubscribe a channel a new waiter just relied on.
    subscribed: Mutex<HashSet<RecordId>>,
}

impl Subscriber {
    pub(crate) fn new(
        target: Target,
        timeout: Duration,
        dead_connection_timeout: Duration,
        channel: Box<dyn Fn(&RecordId) -> String + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Subscriber {
            target,
            timeout,
            dead_connection_timeout,
            channel,
            hub: WatchHub::new(),
            conn: OnceCell::new(),
            subscribed: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) async fn watch(
        self: &Arc<Self>,
        id: &RecordId,
        max_waiters: usize,
    ) -> Result<Option<Watch>, StoreError> {
        let Some(watch) = self.hub.watch(id, max_waiters) else {
            return Ok(None);
        };
        let confirmed = tokio::time::timeout(self.timeout, async {
            let conn = self.connection().await?;
            let mut pause = Duration::from_millis(10);
            loop {
                let mut subscribed = self.subscribed.lock().await;
                if subscribed.contains(id) {
                    return Ok(());
                }
                match conn.subscribe(&[(self.channel)(id)]).await {
                    Ok(()) => {
                        subscribed.insert(*id);
                        return Ok(());
                    }
                    // After Redis was away, redis-rs' connection manager answers the first
                    // command with the failure of its last reconnect attempt and only then
                    // reconnects: without another try, the first waiter after every outage
                    // would get a 409 instead of waiting. SUBSCRIBE is idempotent, and the
                    // whole loop is bounded by the timeout.
                    Err(e) if is_connection_error(&e) => {
                        drop(subscribed);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(200));
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match confirmed {
            Ok(Ok(())) => Ok(Some(watch)),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "redis subscribe failed: {e}"
            ))),
            Err(_) => Err(StoreError::Unavailable(
                "redis subscribe was not confirmed in time".into(),
            )),
        }
    }

    async fn connection(self: &Arc<Self>) -> Result<&Conn, redis::RedisError> {
        self.conn
            .get_or_try_init(|| async {
                let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
                let conn = Conn::open(
                    &self.target,
                    ConnOptions {
                        timeout: self.timeout,
                        response_timeout: self.timeout,
                        push: Some(move |info: PushInfo| {
                            let _ = tx.send(info);
                        }),
                        dead_connection_timeout: self.dead_connection_timeout,
                    },
                )
                .await?;
                tokio::spawn(pushes(Arc::downgrade(self), rx));
                tokio::spawn(sweep(Arc::downgrade(self)));
                Ok(conn)
            })
            .await
    }

    fn on_message(&self, channel: &Value) {
        let name = match channel {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return,
        };
        if let Some(id) = id_of_channel(&name) {
            self.hub.notify(&id);
        }
    }

    /// Subscribes again to every awaited channel, then wakes every waiter. Retries with backoff
    /// until it succeeds or the store is gone: it holds the subscriber only during an attempt,
    /// so a store dropped while Redis is down does not leave it retrying forever.
    async fn resync(sub: Weak<Self>) {
        let mut delay = Duration::from_millis(50);
        loop {
            let Some(this) = sub.upgrade() else { return };
            let Some(conn) = this.conn.get() else { return };
            let mut subscribed = this.subscribed.lock().await;
            subscribed.clear();
            let awaited = this.hub.awaited();
            let channels: Vec<String> = awaited.iter().map(|id| (this.channel)(id)).collect();
            let done = tokio::time::timeout(this.timeout, conn.subscribe(&channels)).await;
            if let Ok(Ok(())) = done {
                subscribed.extend(awaited);
                drop(subscribed);
                this.hub.notify_all();
                return;
            }
            drop(subscribed);
            drop(this);
            tracing::debug!("redis pub/sub resubscribe failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// Delivers pushes to the hub; a disconnection starts a resync.
async fn pushes(sub: Weak<Subscriber>, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(info) = rx.recv().await {
        let Some(sub) = sub.upgrade() else { return };
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(channel) = info.data.first() {
                    sub.on_message(channel);
                }
            }
            PushKind::Disconnection => {
                tracing::info!("redis pub/sub connection lost; resubscribing");
                tokio::spawn(Subscriber::resync(Arc::downgrade(&sub)));
            }
            _ => {}
        }
    }
}

/// Unsubscribes channels that no waiter needs any more.
async fn sweep(sub: Weak<Subscriber>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(sub) = sub.upgrade() else { return };
        let Some(conn) = sub.conn.get() else { continue };
        let mut subscribed = sub.subscribed.lock().await;
        let awaited: HashSet<RecordId> = sub.hub.awaited().into_iter().collect();
        let stale: Vec<RecordId> = subscribed.difference(&awaited).copied().collect();
        if stale.is_empty() {
            continue;
        }
        let channels: Vec<String> = stale.iter().map(|id| (sub.channel)(id)).collect();
        if let Ok(Ok(())) = tokio::time::timeout(sub.timeout, conn.unsubscribe(&channels)).await {
            for id in &stale {
                subscribed.remove(id);
            }
        }
    }
}

/// Whether `e` is about the connection (refused, dropped, broken) rather than an answer of the
/// server: worth another try on the connection the manager is re-establishing.
fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped()
}

/// The record id inside a channel name `…{hex}`.
pub(crate) fn id_of_channel(name: &str) -> Option<RecordId> {
    let open = name.rfind('{')?;
    let close = name[open..].find('}')? + open;
    RecordId::from_hex(&name[open + 1..close])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_parse() {
        let id = RecordId([0xab; 32]);
        assert_eq!(
            id_of_channel(&format!("t1:idemgate:{{{}}}", id.to_hex())),
            Some(id)
        );
        assert_eq!(id_of_channel("idemgate:{zz}"), None);
        assert_eq!(id_of_channel("nothing"), None);
    }
}
