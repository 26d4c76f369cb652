//! One acquired attempt, driven by a task idemgate owns (SPEC §5: the client may vanish; the
//! work may not).
//!
//! The task calls the inner service, drives the whole response body, renews the lease every
//! third of it, and stores the outcome (or releases the key) whether or not the client still
//! reads. The client gets the response as soon as it is known; for a body that streams, it gets
//! the frames as they arrive and sees the end of the body only once the outcome is stored, so a
//! retry sent after a complete response always finds it.

use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
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
use super::body::{BoxError, RequestBody, ResponseBody};
use super::finisher::FinishOp;
use super::replay::storable_head;
use super::service::{Shared, with_tries};
use crate::observe::{RequestOutcome, StoreOp};
use crate::policy::{Ambiguous, OnError, Policy};
use crate::problem::{Problem, ProblemKind};
use crate::record::{Outcome, RecordId, StoredProblemKind, Token};
use crate::store::{Completion, Release, Renewal};

/// Bodies with an exact size up to this are collected before the client gets the response, so
/// the common small response costs no channel and is stored before it is sent.
const COLLECT_LIMIT: u64 = 64 * 1024;

/// Frames buffered between the attempt and a slow client.
const CLIENT_CHANNEL: usize = 16;

pub(crate) struct Attempt<S, B> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) inner: S,
    pub(crate) request: Request<RequestBody<B>>,
    pub(crate) id: RecordId,
    pub(crate) token: Token,
    pub(crate) policy: Arc<Policy>,
    pub(crate) respond: oneshot::Sender<Response<ResponseBody>>,
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
    EndBody(Option<mpsc::Sender<Result<Frame<Bytes>, BoxError>>>),
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
    } = attempt;
    shared.observer.in_flight(1);
    let hold_until = Instant::now() + policy.max_lease_hold;
    let renew_every = (policy.lease / 3).max(Duration::from_millis(1));
    let mut next_renewal = Instant::now() + renew_every;
    let mut abandoned = false;

    let mut work = pin!(drive(inner, request, &policy, respond));
    let driven = loop {
        let wake = next_renewal.min(hold_until);
        tokio::select! {
            biased;
            driven = &mut work => break driven,
            _ = tokio::time::sleep_until(wake), if !abandoned => {
                if Instant::now() >= hold_until {
                    // Hung past max_lease_hold: stop renewing and write the attempt off as
                    // outcome-unknown. If it finishes after all, its own token may still
                    // replace the placeholder with the real outcome.
                    abandoned = true;
                    shared.observer.lease_abandoned();
                    tracing::warn!(record_id = %id, "attempt exceeded max_lease_hold; recorded as outcome-unknown");
                    let op = FinishOp::Complete {
                        outcome: Outcome::Problem { kind: StoredProblemKind::OutcomeUnknown, status: 504 },
                        ttl: policy.ttl,
                    };
                    finish(&shared, id, token, op).await;
                } else {
                    next_renewal = Instant::now() + renew_every;
                    match with_tries(&shared, StoreOp::Renew, || shared.store.renew(&id, token, policy.lease)).await {
                        Ok(Renewal::Renewed { .. }) => {}
                        Ok(Renewal::Refused) => {
                            shared.observer.fencing_refused();
                            tracing::warn!(record_id = %id, "lease renewal refused: the lease lapsed or the record was removed");
                        }
                        Err(e) => tracing::warn!(record_id = %id, error = %e, "lease renewal failed"),
                    }
                }
            }
        }
    };
    shared.observer.in_flight(-1);
    shared.observer.request(driven.outcome);
    finish(&shared, id, token, driven.op).await;
    match driven.after {
        AfterFinish::Respond(respond, response) => {
            let _ = respond.send(response);
        }
        AfterFinish::EndBody(sender) => drop(sender),
    }
}

/// Tries the finishing operation inline, then hands it to the background queue.
async fn finish(shared: &Arc<Shared>, id: RecordId, token: Token, op: FinishOp) {
    let store_op = match op {
        FinishOp::Complete { .. } => StoreOp::Complete,
        FinishOp::Release => StoreOp::Release,
        FinishOp::Nothing => return,
    };
    let result = with_tries(shared, store_op, || async {
        match &op {
            FinishOp::Complete { outcome, ttl } => shared
                .store
                .complete(&id, token, outcome, *ttl)
                .await
                .map(|c| c == Completion::Stored),
            FinishOp::Release => shared
                .store
                .release(&id, token)
                .await
                .map(|r| r == Release::Released),
            FinishOp::Nothing => Ok(true),
        }
    })
    .await;
    match result {
        Ok(true) => {}
        Ok(false) => {
            shared.observer.fencing_refused();
            tracing::warn!(record_id = %id, "outcome refused by the store: another attempt owns the record (lease lapsed?)");
        }
        Err(e) => {
            tracing::warn!(record_id = %id, error = %e, "storing the outcome failed; retrying in the background");
            shared
                .finisher
                .enqueue(shared.store.clone(), shared.observer.clone(), id, token, op);
        }
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
async fn drive<S, ReqB, ResB>(
    mut inner: S,
    request: Request<RequestBody<ReqB>>,
    policy: &Policy,
    respond: oneshot::Sender<Response<ResponseBody>>,
) -> Driven
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    S::Error: std::fmt::Display,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let response = match AssertUnwindSafe(inner.call(request)).catch_unwind().await {
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
        let mut collected = BytesMut::new();
        loop {
            match next_frame(body.as_mut()).await {
                None => break,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        collected.extend_from_slice(data);
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
        let body = collected.freeze();
        let response = Response::from_parts(parts, ResponseBody::full(body.clone()));
        return Driven {
            op: FinishOp::Complete {
                outcome: Outcome::Response { head, body },
                ttl: policy.ttl,
            },
            outcome: RequestOutcome::Executed,
            after: AfterFinish::Respond(respond, response),
        };
    }

    // Stream: the client reads frames as they come; the task keeps a copy up to the limit.
    let (tx, rx) = mpsc::channel(CLIENT_CHANNEL);
    let _ = respond.send(Response::from_parts(parts, ResponseBody::channel(rx)));
    let mut client = Some(tx);
    let mut kept: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    let mut too_large = false;
    loop {
        match next_frame(body.as_mut()).await {
            None => break,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    size = size.saturating_add(data.len());
                    if size > policy.max_stored_response {
                        too_large = true;
                        kept = Vec::new();
                    } else if !too_large {
                        kept.push(data.clone());
                    }
                }
                if let Some(tx) = &client {
                    if tx.send(Ok(frame)).await.is_err() {
                        // The client went away; the body is still driven to the end.
                        client = None;
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "response body failed mid-way");
                if let Some(tx) = client.take() {
                    let _ = tx.send(Err(e)).await;
                }
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
    let outcome = if too_large {
        Outcome::BodyNotStored { head }
    } else {
        let mut body = BytesMut::with_capacity(size);
        for chunk in kept {
            body.extend_from_slice(&chunk);
        }
        Outcome::Response {
            head,
            body: body.freeze(),
        }
    };
    Driven {
        op: FinishOp::Complete {
            outcome,
            ttl: policy.ttl,
        },
        outcome: RequestOutcome::Executed,
        after: AfterFinish::EndBody(client),
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
