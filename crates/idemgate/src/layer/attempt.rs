//! One acquired attempt, driven by the request's own future and, once the client's answer is
//! known or the client vanishes first, by a task idemgate owns (SPEC §5: the client may vanish;
//! the work may not).
//!
//! The attempt calls the inner service, drives the whole response body, renews the lease every
//! third of it, and stores the outcome (or releases the key) whether or not the client still
//! reads. The client gets the response as soon as it is known; for a body that streams, it gets
//! the frames as they arrive and sees the end of the body only once the outcome is stored, so a
//! retry sent after a complete response always finds it.

use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower_service::Service;

use super::OutcomeHint;
use super::body::{BoxError, ClientFlow, RequestBody, ResponseBody};
use super::finisher::{self, FinishOp};
use super::replay::storable_head;
use super::service::{Reporter, Shared, with_tries};
use crate::observe::{RequestOutcome, StoreOp};
use crate::policy::{Ambiguous, OnError, Policy};
use crate::problem::{Problem, ProblemKind};
use crate::record::{Outcome, RecordId, StoredProblemKind, Token};
use crate::store::{Renewal, StoreError};

/// Bodies with an exact size up to this are collected before the client gets the response, so
/// the common small response costs no channel and is stored before it is sent.
const COLLECT_LIMIT: u64 = 64 * 1024;

/// Bytes queued for a slow client before the attempt waits for it. Only a body too large to
/// store ever waits: its outcome is already stored by then, so a slow reader never holds up
/// storing an outcome or makes the key read as in flight.
const CLIENT_BUFFER: usize = 1024 * 1024;

/// How often a failed outcome-unknown write-off is tried again while the attempt still hangs.
const PLACEHOLDER_RETRY: Duration = Duration::from_secs(1);

pub(crate) struct Attempt<S, B> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) inner: S,
    pub(crate) request: Request<RequestBody<B>>,
    pub(crate) id: RecordId,
    pub(crate) token: Token,
    pub(crate) policy: Arc<Policy>,
    pub(crate) respond: oneshot::Sender<Response<ResponseBody>>,
    pub(crate) reporter: Reporter,
}

/// What is left to do once the inner service is done: the store operation, and the part of the
/// client's answer that waits for it.
struct Driven {
    op: FinishOp,
    outcome: RequestOutcome,
    after: AfterFinish,
}

enum AfterFinish {
    /// Send this response (it was held back until the outcome was stored).
    Respond(
        oneshot::Sender<Response<ResponseBody>>,
        Response<ResponseBody>,
    ),
    /// Close the client's streamed body (dropping the sender ends it).
    EndBody(Option<ClientSender>),
}

/// The attempt's side of a streamed client body.
struct ClientSender {
    tx: mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>,
    flow: Arc<ClientFlow>,
}

/// Writes the attempt off as outcome-unknown if its task ends without storing anything (a bug
/// that panics in idemgate's own code, or a runtime shutting down), so the key never stays in
/// flight for a holder that is gone.
struct AttemptGuard {
    shared: Arc<Shared>,
    id: RecordId,
    token: Token,
    ttl: Duration,
    armed: bool,
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::error!(record_id = %self.id, "attempt task ended without storing an outcome; recording outcome-unknown");
            self.shared.finisher.enqueue(
                self.shared.store.clone(),
                self.shared.observer.clone(),
                self.id,
                self.token,
                FinishOp::Complete {
                    outcome: Outcome::outcome_unknown(),
                    ttl: self.ttl,
                },
            );
        }
    }
}

pub(crate) async fn run<S, ReqB, ResB>(attempt: Attempt<S, ReqB>)
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let Attempt {
        shared,
        inner,
        request,
        id,
        token,
        policy,
        respond,
        reporter,
    } = attempt;
    let mut guard = AttemptGuard {
        shared: shared.clone(),
        id,
        token,
        ttl: policy.ttl,
        armed: true,
    };
    shared.observer.in_flight(1);
    let hold_until = Instant::now() + policy.max_lease_hold;
    // After the write-off, a hung attempt is driven for one more max_lease_hold, then dropped.
    let give_up_at = hold_until + policy.max_lease_hold;
    let renew_every = (policy.lease / 3).max(Duration::from_millis(1));
    let mut next_renewal = Instant::now() + renew_every;
    let mut written_off = false;
    let mut next_write_off = hold_until;
    // Set by `drive` once it stored the outcome early (a body too large to keep): renewals stop.
    let settled = AtomicBool::new(false);

    let driven = {
        let mut work = pin!(drive(
            &shared, id, token, inner, request, &policy, respond, &settled
        ));
        // An inner service that answers at once needs no lease timer.
        let at_once = futures_util::FutureExt::now_or_never(work.as_mut());
        if let Some(driven) = at_once {
            Some(driven)
        } else {
            loop {
                let wake = if Instant::now() < hold_until {
                    next_renewal.min(hold_until)
                } else if !written_off {
                    next_write_off
                } else {
                    give_up_at
                };
                tokio::select! {
                    biased;
                    driven = &mut work => break Some(driven),
                    _ = tokio::time::sleep_until(wake) => {
                        let now = Instant::now();
                        if now < hold_until {
                            next_renewal = now + renew_every;
                            if !settled.load(Ordering::Acquire) {
                                renew(&shared, id, token, policy.lease).await;
                            }
                        } else if !written_off {
                            if next_write_off == hold_until {
                                shared.observer.lease_abandoned();
                                tracing::warn!(record_id = %id, "attempt exceeded max_lease_hold; recording outcome-unknown");
                            }
                            // Written inline, never queued: a queued write-off could land after the
                            // real outcome and replace it.
                            let op = FinishOp::Complete {
                                outcome: Outcome::Problem { kind: StoredProblemKind::OutcomeUnknown, status: 504 },
                                ttl: policy.ttl,
                            };
                            match try_finish(&shared, id, token, &op).await {
                                Ok(_) => written_off = true,
                                Err(e) => {
                                    tracing::warn!(record_id = %id, error = %e, "recording outcome-unknown failed; trying again");
                                    next_write_off = now + PLACEHOLDER_RETRY;
                                }
                            }
                        } else {
                            tracing::error!(record_id = %id, "attempt still hung a max_lease_hold after its write-off; dropping it");
                            break None;
                        }
                    }
                }
            }
        }
    };
    shared.observer.in_flight(-1);
    let Some(driven) = driven else {
        guard.armed = false;
        return;
    };
    reporter.done(&shared, driven.outcome);
    finish(&shared, id, token, driven.op).await;
    guard.armed = false;
    match driven.after {
        AfterFinish::Respond(respond, response) => {
            let _ = respond.send(response);
        }
        AfterFinish::EndBody(sender) => drop(sender),
    }
}

async fn renew(shared: &Arc<Shared>, id: RecordId, token: Token, lease: Duration) {
    match with_tries(shared, StoreOp::Renew, || {
        shared.store.as_ref().renew(&id, token, lease)
    })
    .await
    {
        Ok(Renewal::Renewed { .. }) => {}
        Ok(Renewal::Refused) => {
            shared.observer.fencing_refused();
            tracing::warn!(record_id = %id, "lease renewal refused: the lease lapsed or the record was removed");
        }
        Err(e) => tracing::warn!(record_id = %id, error = %e, "lease renewal failed"),
    }
}

/// The finishing operation, tried inline: `Ok(true)` done, `Ok(false)` fenced (logged).
async fn try_finish(
    shared: &Arc<Shared>,
    id: RecordId,
    token: Token,
    op: &FinishOp,
) -> Result<bool, StoreError> {
    let store_op = match op {
        FinishOp::Complete { .. } => StoreOp::Complete,
        FinishOp::Release => StoreOp::Release,
        FinishOp::Nothing => return Ok(true),
    };
    let done = with_tries(shared, store_op, || {
        finisher::apply(shared.store.as_ref(), &id, token, op)
    })
    .await?;
    if !done {
        shared.observer.fencing_refused();
        tracing::warn!(record_id = %id, "outcome refused by the store: another attempt owns the record (lease lapsed?)");
    }
    Ok(done)
}

/// Tries the finishing operation inline, then hands it to the background queue.
async fn finish(shared: &Arc<Shared>, id: RecordId, token: Token, op: FinishOp) {
    if let Err(e) = try_finish(shared, id, token, &op).await {
        tracing::warn!(record_id = %id, error = %e, "storing the outcome failed; retrying in the background");
        shared
            .finisher
            .enqueue(shared.store.clone(), shared.observer.clone(), id, token, op);
    }
}

fn handler_failed(policy: &Policy, respond: oneshot::Sender<Response<ResponseBody>>) -> Driven {
    let response = Problem::new(ProblemKind::HandlerFailed).into_response();
    match policy.on_error {
        OnError::Store => Driven {
            op: FinishOp::Complete {
                outcome: Outcome::Problem {
                    kind: StoredProblemKind::HandlerFailed,
                    status: 500,
                },
                ttl: policy.ttl,
            },
            outcome: RequestOutcome::Executed,
            after: AfterFinish::Respond(respond, response),
        },
        OnError::Release => Driven {
            op: FinishOp::Release,
            outcome: RequestOutcome::Released,
            after: AfterFinish::Respond(respond, response),
        },
    }
}

/// Calls the inner service and drives its response body to the end.
#[allow(clippy::too_many_arguments)]
async fn drive<S, ReqB, ResB>(
    shared: &Arc<Shared>,
    id: RecordId,
    token: Token,
    mut inner: S,
    request: Request<RequestBody<ReqB>>,
    policy: &Policy,
    respond: oneshot::Sender<Response<ResponseBody>>,
    settled: &AtomicBool,
) -> Driven
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    S::Error: std::fmt::Display,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    // `call` itself may panic before it returns a future: both are inside the catch.
    let called = AssertUnwindSafe(async move { inner.call(request).await })
        .catch_unwind()
        .await;
    let response = match called {
        Err(_) => {
            tracing::error!("inner service panicked");
            return handler_failed(policy, respond);
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "inner service failed");
            return handler_failed(policy, respond);
        }
        Ok(Ok(response)) => response,
    };

    match response.extensions().get::<OutcomeHint>() {
        Some(OutcomeHint::NotSent) => {
            return Driven {
                op: FinishOp::Release,
                outcome: RequestOutcome::Released,
                after: AfterFinish::Respond(respond, response.map(ResponseBody::inner)),
            };
        }
        Some(OutcomeHint::Settled) => {
            return Driven {
                op: FinishOp::Nothing,
                outcome: RequestOutcome::Executed,
                after: AfterFinish::Respond(respond, response.map(ResponseBody::inner)),
            };
        }
        Some(OutcomeHint::NoResponse) => {
            let status = response.status().as_u16();
            let (op, outcome) = match policy.ambiguous {
                Ambiguous::Store => (
                    FinishOp::Complete {
                        outcome: Outcome::Problem {
                            kind: StoredProblemKind::OutcomeUnknown,
                            status,
                        },
                        ttl: policy.ttl,
                    },
                    RequestOutcome::Executed,
                ),
                Ambiguous::Release => (FinishOp::Release, RequestOutcome::Released),
            };
            return Driven {
                op,
                outcome,
                after: AfterFinish::Respond(respond, response.map(ResponseBody::inner)),
            };
        }
        None => {}
    }

    let status = response.status();
    if policy.release_statuses.contains(&status) {
        return Driven {
            op: FinishOp::Release,
            outcome: RequestOutcome::Released,
            after: AfterFinish::Respond(respond, response.map(ResponseBody::inner)),
        };
    }

    let (parts, body) = response.into_parts();
    let head = storable_head(status, &parts.headers, policy);
    let mut body = pin!(body);
    let small = body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= COLLECT_LIMIT && n <= policy.max_stored_response as u64);

    if small {
        let mut first: Option<Bytes> = None;
        let mut more: Option<BytesMut> = None;
        loop {
            match next_frame(body.as_mut()).await {
                None => break,
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match (&first, &mut more) {
                        (None, _) => first = Some(data),
                        (Some(f), None) => {
                            let mut buf = BytesMut::with_capacity(f.len() + data.len());
                            buf.extend_from_slice(f);
                            buf.extend_from_slice(&data);
                            more = Some(buf);
                        }
                        (Some(_), Some(buf)) => buf.extend_from_slice(&data),
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "response body failed before it was complete");
                    let response = Problem::new(ProblemKind::ResponseIncomplete)
                        .with_member("original_status", serde_json::json!(status.as_u16()))
                        .into_response();
                    return Driven {
                        op: FinishOp::Complete {
                            outcome: Outcome::BodyIncomplete { head },
                            ttl: policy.ttl,
                        },
                        outcome: RequestOutcome::Executed,
                        after: AfterFinish::Respond(respond, response),
                    };
                }
            }
        }
        let (sent, stored) = match (first, more) {
            (_, Some(buf)) => {
                let b = buf.freeze();
                (b.clone(), b)
            }
            // A single frame is a slice of the connection's read buffer (hyper's is 8 KiB and
            // more): stored as is, it would keep that whole buffer alive for the record's TTL
            // in an in-memory store. The client gets the slice; the record gets its own copy.
            (Some(f), None) => {
                let copy = Bytes::copy_from_slice(&f);
                (f, copy)
            }
            (None, None) => (Bytes::new(), Bytes::new()),
        };
        let response = Response::from_parts(parts, ResponseBody::full(sent));
        return Driven {
            op: FinishOp::Complete {
                outcome: Outcome::Response { head, body: stored },
                ttl: policy.ttl,
            },
            outcome: RequestOutcome::Executed,
            after: AfterFinish::Respond(respond, response),
        };
    }

    // Stream: the client reads frames as they come; the task keeps a copy up to the limit. The
    // channel is unbounded because the copy kept for the store bounds it anyway (frames are
    // shared, not copied); past the limit, the outcome is stored at once and only then may a
    // slow client slow the body down.
    let (tx, rx) = mpsc::unbounded_channel();
    let flow = Arc::new(ClientFlow::default());
    let _ = respond.send(Response::from_parts(
        parts,
        ResponseBody::channel(rx, flow.clone()),
    ));
    let mut client = Some(ClientSender { tx, flow });
    let mut kept: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    let mut too_large = false;
    loop {
        match next_frame(body.as_mut()).await {
            None => break,
            Some(Ok(frame)) => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                if let Some(data) = frame.data_ref() {
                    size = size.saturating_add(len);
                    if size > policy.max_stored_response && !too_large {
                        too_large = true;
                        kept = Vec::new();
                        // The first client still gets the whole body; retries get 410.
                        let op = FinishOp::Complete {
                            outcome: Outcome::BodyNotStored { head: head.clone() },
                            ttl: policy.ttl,
                        };
                        finish(shared, id, token, op).await;
                        settled.store(true, Ordering::Release);
                    } else if !too_large {
                        kept.push(data.clone());
                    }
                }
                if let Some(c) = &client {
                    c.flow.pending.fetch_add(len, Ordering::AcqRel);
                    if c.tx.send(Ok(frame)).is_err() {
                        // The client went away; the body is still driven to the end.
                        client = None;
                    } else if too_large {
                        c.wait_for_reader().await;
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "response body failed mid-way");
                if let Some(c) = client.take() {
                    let _ = c.tx.send(Err(e));
                }
                // Replaces an early BodyNotStored too: a retry must learn the body broke.
                return Driven {
                    op: FinishOp::Complete {
                        outcome: Outcome::BodyIncomplete { head },
                        ttl: policy.ttl,
                    },
                    outcome: RequestOutcome::Executed,
                    after: AfterFinish::EndBody(None),
                };
            }
        }
    }
    let op = if too_large {
        FinishOp::Nothing
    } else {
        let mut body = BytesMut::with_capacity(size);
        for chunk in kept {
            body.extend_from_slice(&chunk);
        }
        FinishOp::Complete {
            outcome: Outcome::Response {
                head,
                body: body.freeze(),
            },
            ttl: policy.ttl,
        }
    };
    Driven {
        op,
        outcome: RequestOutcome::Executed,
        after: AfterFinish::EndBody(client),
    }
}

impl ClientSender {
    /// Waits while more than [`CLIENT_BUFFER`] bytes wait for the client, unless it is gone.
    async fn wait_for_reader(&self) {
        while self.flow.pending.load(Ordering::Acquire) > CLIENT_BUFFER && !self.tx.is_closed() {
            let drained = self.flow.drained.notified();
            // Re-checked after registering, so a drain between the check and here is not lost;
            // the timeout re-checks a client that vanished without reading.
            if self.flow.pending.load(Ordering::Acquire) <= CLIENT_BUFFER {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), drained).await;
        }
    }
}

/// The next body frame; a panic inside the body's poll is an error, not a crash.
async fn next_frame<B>(mut body: std::pin::Pin<&mut B>) -> Option<Result<Frame<Bytes>, BoxError>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match AssertUnwindSafe(body.frame()).catch_unwind().await {
        Ok(Some(Ok(frame))) => Some(Ok(frame)),
        Ok(Some(Err(e))) => Some(Err(e.into())),
        Ok(None) => None,
        Err(_) => Some(Err("response body panicked".into())),
    }
}
