//! In-process fan-out of record changes for wait mode (SPEC §7).
//!
//! Each backend keeps one [`WatchHub`] per process and calls [`WatchHub::notify`] when it learns
//! that a record changed: the memory store directly, Redis from its one pub/sub connection,
//! PostgreSQL from its one LISTEN connection. Waiters hold a [`Watch`], never a store connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::record::RecordId;

const SHARDS: usize = 64;

/// Per-process registry of waiters, keyed by record.
#[derive(Clone)]
pub struct WatchHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    // A sender per awaited record; its receiver count is the number of waiters. Sharded so
    // waiters on different keys do not contend; std Mutex because no lock is held across await.
    shards: Vec<Mutex<HashMap<RecordId, watch::Sender<u64>>>>,
    // Records with a sender, across all shards: lets `notify` skip the lock in the common case
    // of a completion nobody waits for.
    awaited: AtomicUsize,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::new()
    }
}

impl WatchHub {
    /// An empty hub.
    pub fn new() -> Self {
        WatchHub {
            inner: Arc::new(HubInner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                awaited: AtomicUsize::new(0),
            }),
        }
    }

    fn shard(&self, id: &RecordId) -> &Mutex<HashMap<RecordId, watch::Sender<u64>>> {
        &self.inner.shards[id.0[0] as usize % SHARDS]
    }

    /// Subscribes to `id`; `None` when `max_waiters` already wait on it.
    pub fn watch(&self, id: &RecordId, max_waiters: usize) -> Option<Watch> {
        let mut shard = lock(self.shard(id));
        let sender = shard.entry(*id).or_insert_with(|| {
            self.inner.awaited.fetch_add(1, Ordering::SeqCst);
            watch::channel(0).0
        });
        let waiting = sender.receiver_count();
        if waiting >= max_waiters {
            if waiting == 0 {
                shard.remove(id);
                self.inner.awaited.fetch_sub(1, Ordering::SeqCst);
            }
            return None;
        }
        let receiver = sender.subscribe();
        Some(Watch {
            receiver: Some(receiver),
            cleanup: Some((self.clone(), *id)),
        })
    }

    /// Wakes every waiter on `id`.
    pub fn notify(&self, id: &RecordId) {
        // A waiter registers (under the shard lock) before it re-reads the record, and the
        // record is changed before this runs: a zero here means no waiter can miss this change.
        if self.inner.awaited.load(Ordering::SeqCst) == 0 {
            return;
        }
        let shard = lock(self.shard(id));
        if let Some(sender) = shard.get(id) {
            sender.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Wakes every waiter on every record, e.g. after a subscriber connection was re-established
    /// and notifications may have been missed: each waiter re-reads its record.
    pub fn notify_all(&self) {
        for shard in &self.inner.shards {
            for sender in lock(shard).values() {
                sender.send_modify(|g| *g = g.wrapping_add(1));
            }
        }
    }

    /// The records that currently have waiters (for backends that subscribe per record).
    pub fn awaited(&self) -> Vec<RecordId> {
        self.inner
            .shards
            .iter()
            .flat_map(|s| lock(s).keys().copied().collect::<Vec<_>>())
            .collect()
    }

    /// How many waiters `id` has.
    pub fn waiters(&self, id: &RecordId) -> usize {
        lock(self.shard(id))
            .get(id)
            .map_or(0, |s| s.receiver_count())
    }

    fn unsubscribe(&self, id: &RecordId, receiver: watch::Receiver<u64>) {
        let mut shard = lock(self.shard(id));
        drop(receiver);
        if shard.get(id).is_some_and(|s| s.receiver_count() == 0) {
            shard.remove(id);
            self.inner.awaited.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves the map consistent (every operation is a single
    // insert/remove/send), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A subscription to one record's changes.
pub struct Watch {
    receiver: Option<watch::Receiver<u64>>,
    cleanup: Option<(WatchHub, RecordId)>,
}

impl Watch {
    /// A subscription that never fires (for stores without notifications).
    pub fn never() -> Self {
        Watch {
            receiver: None,
            cleanup: None,
        }
    }

    /// Resolves at the next change after the subscription was made (or after the last
    /// `changed` returned).
    pub async fn changed(&mut self) {
        match self.receiver.as_mut() {
            Some(r) => {
                if r.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let (Some((hub, id)), Some(receiver)) = (self.cleanup.take(), self.receiver.take()) {
            hub.unsubscribe(&id, receiver);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn notify_after_subscribe_is_not_lost() {
        let hub = WatchHub::new();
        let id = RecordId([1; 32]);
        let mut w = hub.watch(&id, 10).unwrap_or_else(Watch::never);
        hub.notify(&id);
        tokio::time::timeout(Duration::from_secs(1), w.changed())
            .await
            .unwrap_or_else(|_| panic!("notification lost"));
    }

    #[tokio::test]
    async fn bounded_and_cleaned_up() {
        let hub = WatchHub::new();
        let id = RecordId([2; 32]);
        let a = hub.watch(&id, 2);
        let b = hub.watch(&id, 2);
        assert!(a.is_some() && b.is_some());
        assert!(hub.watch(&id, 2).is_none());
        drop(a);
        drop(b);
        assert_eq!(hub.waiters(&id), 0);
        assert!(hub.awaited().is_empty());
    }
}
