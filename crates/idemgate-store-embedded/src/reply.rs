//! Answering callers: one wake-up per caller runtime per batch, not one per operation.
//!
//! Why: a caller awaits its answer on a oneshot; when the writer thread sends it, tokio schedules
//! the caller's task from outside its runtime, and for a current-thread runtime (the proxy runs
//! one per CPU) that means a write to the runtime's eventfd every time, plus waking its thread if
//! it sleeps in `epoll_wait`. With ~17 fresh requests per batch under load, that was two such
//! system calls per request on the writer thread (`perf`, `raw_syscalls:sys_enter`).
//!
//! So, when the store is built with
//! [`batched_wakeups`](crate::EmbeddedStoreBuilder::batched_wakeups), a caller on a
//! current-thread runtime hands the writer a [`Mailbox`] of that runtime along
//! with its oneshot. The writer puts a batch's answers into their mailboxes and wakes each
//! mailbox once ([`Delivery`]); a pump task on the caller's runtime then sends the answers on
//! their oneshots, which wakes the callers from inside their own runtime (no system call).
//!
//! A mailbox never holds an answer nobody will deliver: the pump closes it when it is dropped
//! (its runtime shut down), delivering what is queued, and a closed mailbox refuses answers,
//! which are then sent directly. Callers on other runtimes (multi-thread, or none) get their
//! answers directly, as before.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use idemgate::store::StoreError;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{Notify, oneshot};

use crate::writer::Output;

/// What a caller gets back.
pub(crate) type Answer = Result<Output, StoreError>;

/// The sending half of a caller's answer.
pub(crate) struct Reply {
    tx: oneshot::Sender<Answer>,
    mailbox: Option<Arc<Mailbox>>,
}

impl Reply {
    /// A reply for a caller on the current runtime, and the receiver it awaits; `batched`:
    /// through the runtime's mailbox when it has one.
    pub(crate) fn channel(batched: bool) -> (Reply, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        let mailbox = if batched { current_mailbox() } else { None };
        (Reply { tx, mailbox }, rx)
    }

    /// Answers at once, with a wake-up of its own (rare answers: pings, purges, errors).
    pub(crate) fn send(self, answer: Answer) {
        let _ = self.tx.send(answer);
    }
}

/// The answers of one batch, delivered with one wake-up per mailbox when it is dropped.
#[derive(Default)]
pub(crate) struct Delivery {
    woken: Vec<Arc<Mailbox>>,
}

impl Delivery {
    pub(crate) fn add(&mut self, reply: Reply, answer: Answer) {
        let Some(mailbox) = reply.mailbox else {
            let _ = reply.tx.send(answer);
            return;
        };
        if mailbox.put(reply.tx, answer) && !self.woken.iter().any(|m| Arc::ptr_eq(m, &mailbox)) {
            self.woken.push(mailbox);
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        for mailbox in self.woken.drain(..) {
            mailbox.wake.notify_one();
        }
    }
}

/// Answers waiting for one runtime's pump.
pub(crate) struct Mailbox {
    answers: Mutex<Vec<(oneshot::Sender<Answer>, Answer)>>,
    /// Cleared by the pump's closer before it takes the lock to drain, and read under the lock
    /// by `put`: an answer is either queued before that drain or sent directly.
    open: AtomicBool,
    wake: Notify,
}

impl Mailbox {
    fn new() -> Mailbox {
        Mailbox {
            answers: Mutex::new(Vec::new()),
            open: AtomicBool::new(true),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(oneshot::Sender<Answer>, Answer)>> {
        // Every critical section leaves the queue whole; a poisoned lock is safe to keep using.
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an answer for the pump (`true`), or sends it at once if the pump is gone.
    fn put(&self, tx: oneshot::Sender<Answer>, answer: Answer) -> bool {
        let mut queue = self.lock();
        if self.open.load(Ordering::Acquire) {
            queue.push((tx, answer));
            return true;
        }
        drop(queue);
        let _ = tx.send(answer);
        false
    }
}

/// Sends what the writer put into the mailbox, on the runtime it was spawned on, until that
/// runtime drops it. The mailbox comes wrapped in its closer as an argument, so that even a pump
/// dropped before its first poll closes it.
async fn pump(mut closer: CloseOnDrop) {
    loop {
        closer.mailbox.wake.notified().await;
        std::mem::swap(&mut closer.spare, &mut *closer.mailbox.lock());
        for (tx, answer) in closer.spare.drain(..) {
            let _ = tx.send(answer);
        }
    }
}

struct CloseOnDrop {
    mailbox: Arc<Mailbox>,
    spare: Vec<(oneshot::Sender<Answer>, Answer)>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.mailbox.open.store(false, Ordering::Release);
        let answers = std::mem::take(&mut *self.mailbox.lock());
        for (tx, answer) in answers.into_iter().chain(self.spare.drain(..)) {
            let _ = tx.send(answer);
        }
    }
}

thread_local! {
    /// The mailbox of the current-thread runtime this thread last called from.
    static MAILBOX: RefCell<Option<(tokio::runtime::Id, Arc<Mailbox>)>> = const { RefCell::new(None) };
}

/// The current runtime's mailbox (made, with its pump, on first use), if it is a current-thread
/// runtime.
fn current_mailbox() -> Option<Arc<Mailbox>> {
    let handle = Handle::try_current().ok()?;
    if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
        return None;
    }
    let id = handle.id();
    MAILBOX.with(|slot| {
        let mut slot = slot.borrow_mut();
        if let Some((of, mailbox)) = slot.as_ref()
            && *of == id
            && mailbox.open.load(Ordering::Acquire)
        {
            return Some(mailbox.clone());
        }
        let mailbox = Arc::new(Mailbox::new());
        drop(handle.spawn(pump(CloseOnDrop {
            mailbox: mailbox.clone(),
            spare: Vec::new(),
        })));
        *slot = Some((id, mailbox.clone()));
        Some(mailbox)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pong() -> Answer {
        Ok(Output::Pong)
    }

    #[test]
    fn a_current_thread_caller_is_answered_through_its_runtimes_pump() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (replies, receivers): (Vec<_>, Vec<_>) =
                (0..3).map(|_| Reply::channel(true)).unzip();
            assert!(replies.iter().all(|r| r.mailbox.is_some()));
            let writer = std::thread::spawn(move || {
                let mut delivery = Delivery::default();
                for reply in replies {
                    delivery.add(reply, pong());
                }
                assert_eq!(delivery.woken.len(), 1, "one mailbox, woken once");
            });
            for rx in receivers {
                assert!(matches!(rx.await, Ok(Ok(Output::Pong))));
            }
            writer.join().unwrap();
        });
    }

    #[test]
    fn answers_are_never_stranded_when_the_runtime_goes_away() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (reply, rx) = rt.block_on(async { Reply::channel(true) });
        let mailbox = reply.mailbox.clone().unwrap();
        // Queued but not yet pumped when the runtime (and its pump) is dropped.
        let mut delivery = Delivery::default();
        delivery.add(reply, pong());
        std::mem::forget(delivery);
        drop(rt);
        assert!(!mailbox.open.load(Ordering::Acquire));
        assert!(matches!(rx.blocking_recv(), Ok(Ok(Output::Pong))));
        // A reply made for the gone runtime's mailbox is now answered directly.
        let (tx, rx) = oneshot::channel();
        let mut delivery = Delivery::default();
        delivery.add(
            Reply {
                tx,
                mailbox: Some(mailbox),
            },
            pong(),
        );
        assert!(delivery.woken.is_empty());
        assert!(matches!(rx.blocking_recv(), Ok(Ok(Output::Pong))));
    }

    #[test]
    fn a_new_runtime_on_the_same_thread_gets_its_own_mailbox() {
        let first = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (a, _) = first.block_on(async { Reply::channel(true) });
        let second = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (b, _) = second.block_on(async { Reply::channel(true) });
        assert!(!Arc::ptr_eq(&a.mailbox.unwrap(), &b.mailbox.unwrap()));
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let (c, _) = multi.block_on(async { Reply::channel(true) });
        assert!(
            c.mailbox.is_none(),
            "multi-thread callers are answered directly"
        );
        let (d, _) = Reply::channel(true);
        assert!(d.mailbox.is_none(), "so are callers outside any runtime");
        let (e, _) = first.block_on(async { Reply::channel(false) });
        assert!(
            e.mailbox.is_none(),
            "and every caller unless the store asks for batching"
        );
    }
}
