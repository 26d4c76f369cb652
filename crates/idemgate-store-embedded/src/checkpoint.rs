//! Checkpoints: writing the records changed since the last one into the file, durably, on a
//! thread of their own so that batches keep being logged and answered meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use idemgate::store::StoreError;
use redb::{Database, Durability};

use crate::state::Overlay;
use crate::tables::{META, META_WAL_GENERATION, WriteTables};
use crate::writer::store_err;

/// How long after a failed checkpoint the next attempt starts.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Writes `states` into the file in one durable commit that also records `next_generation` as
/// the first log generation the file does not hold.
pub(crate) fn write(
    db: &Database,
    states: &Overlay,
    next_generation: u64,
    quick_repair: bool,
) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(store_err)?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| StoreError::Unavailable(format!("embedded store: {e}")))?;
    txn.set_quick_repair(quick_repair);
    {
        let mut tables = WriteTables::open(&txn).map_err(store_err)?;
        // In key order, each B-tree leaf is visited in one run instead of at random (the
        // overlay is a hash map): ~9 % less checkpoint CPU on a young file (BENCHMARKS).
        let mut in_key_order: Vec<_> = states.iter().collect();
        in_key_order.sort_unstable_by_key(|(id, _)| id.0);
        for (id, state) in in_key_order {
            tables.set_state(id, state).map_err(store_err)?;
        }
        let mut meta = txn.open_table(META).map_err(store_err)?;
        meta.insert(META_WAL_GENERATION, next_generation)
            .map_err(store_err)?;
    }
    txn.commit().map_err(store_err)
}

fn injected() -> StoreError {
    StoreError::Unavailable("embedded store: checkpoint failure injected for tests".into())
}

/// Checkpoints are background work: on a busy machine the writer and the request workers should
/// get the CPU first. On Linux a nice value is per thread, and raising it needs no privilege.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(None, 10) {
        tracing::debug!(error = %e, "embedded store: could not lower the checkpoint thread's priority");
    }
}

struct Job {
    states: Arc<Overlay>,
    next_generation: u64,
}

/// The checkpoint thread, as the writer drives it: one checkpoint at a time.
pub(crate) struct Checkpointer {
    jobs: Option<Sender<Job>>,
    done: Receiver<Result<(), StoreError>>,
    thread: Option<JoinHandle<()>>,
    quick_repair: bool,
    running: bool,
    /// A failed checkpoint to start again at this time.
    retry: Option<(Instant, Job)>,
    /// Fault injection for tests: while set, every checkpoint fails.
    failing: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Starts the thread.
    pub(crate) fn spawn(db: Arc<Database>, quick_repair: bool) -> std::io::Result<Checkpointer> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let failing = Arc::new(AtomicBool::new(false));
        let fail = failing.clone();
        let thread = std::thread::Builder::new()
            .name("idemgate-checkpoint".into())
            .spawn(move || {
                lower_priority();
                for job in job_rx {
                    let result = if fail.load(Ordering::Relaxed) {
                        Err(injected())
                    } else {
                        write(&db, &job.states, job.next_generation, quick_repair)
                    };
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Checkpointer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            quick_repair,
            running: false,
            retry: None,
            failing,
        })
    }

    /// Fault injection for tests: makes every checkpoint fail (or work again).
    pub(crate) fn fail_for_tests(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// Writes `states` on the calling thread (the checkpoint at close).
    pub(crate) fn write_now(
        &self,
        db: &Database,
        states: &Overlay,
        next_generation: u64,
    ) -> Result<(), StoreError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(injected());
        }
        write(db, states, next_generation, self.quick_repair)
    }

    /// Whether a checkpoint is being written now.
    pub(crate) fn is_running(&self) -> bool {
        self.running
    }

    /// Hands `states` to the thread; `next_generation` is the log generation being written
    /// while it runs.
    pub(crate) fn start(&mut self, states: Arc<Overlay>, next_generation: u64) {
        let job = Job {
            states,
            next_generation,
        };
        match &self.jobs {
            Some(jobs) => match jobs.send(job) {
                Ok(()) => self.running = true,
                // The thread is gone (only a panic could do that): try again later, which
                // keeps failing visibly in the log rather than silently.
                Err(std::sync::mpsc::SendError(job)) => {
                    tracing::error!("embedded store: the checkpoint thread has stopped");
                    self.retry = Some((Instant::now() + RETRY_AFTER, job));
                }
            },
            None => self.retry = Some((Instant::now() + RETRY_AFTER, job)),
        }
    }

    /// The result of the running checkpoint once it has finished (waiting for it when `wait`),
    /// `None` while it runs or when none does. A failed one is started again after a pause.
    pub(crate) fn finished(&mut self, wait: bool) -> Option<Result<(), StoreError>> {
        if !self.running {
            if let Some((at, _)) = &self.retry
                && (wait || Instant::now() >= *at)
                && let Some((_, job)) = self.retry.take()
            {
                self.start(job.states, job.next_generation);
            }
            if !self.running {
                return None;
            }
        }
        let result = if wait {
            self.done.recv().map_err(|_| TryRecvError::Disconnected)
        } else {
            self.done.try_recv()
        };
        let result = match result {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => Err(StoreError::Unavailable(
                "embedded store: the checkpoint thread has stopped".into(),
            )),
        };
        self.running = false;
        Some(result)
    }

    /// Arranges for a failed checkpoint of `states` to be tried again after a pause.
    pub(crate) fn retry_later(&mut self, states: Arc<Overlay>, next_generation: u64) {
        self.retry = Some((
            Instant::now() + RETRY_AFTER,
            Job {
                states,
                next_generation,
            },
        ));
    }

    /// Ends the thread (after the checkpoint it is writing, if any).
    pub(crate) fn stop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("embedded store: the checkpoint thread panicked");
        }
    }
}
