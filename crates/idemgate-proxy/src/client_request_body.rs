//! The body of every request a client sends, as the layer and the forwarder read it.
//!
//! Over HTTP/1 it is hyper's body as it is. Over HTTP/2, the end of the body is held back for a
//! moment: hyper ends a request body that the client cut short with `RST_STREAM(NO_ERROR)` just
//! as if `END_STREAM` had arrived (a *server* may reset with `NO_ERROR` after an early response,
//! RFC 9113 §8.1, and hyper's body reads both sides' resets alike), so a truncated body would
//! read as complete and be executed. hyper does notice the reset on its own: whenever the
//! request's service future is pending, it checks the stream, and drops the future if the
//! stream was reset. So the end is only released once the service future has been pending once
//! after it ([`ResetGate`]); if the stream was reset meanwhile, the future is dropped and the
//! body fails instead of ending.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use idemgate::layer::BoxError;

/// A client's request body.
pub struct ClientRequestBody {
    inner: Incoming,
    /// HTTP/2 bodies that did not end with their head.
    gate: Option<Arc<ResetGate>>,
    /// `inner` has ended; the end waits for the gate.
    inner_ended: bool,
}

impl ClientRequestBody {
    /// `inner`, with `gate` holding back its end (HTTP/2), or as it is (`None`).
    pub fn new(inner: Incoming, gate: Option<Arc<ResetGate>>) -> Self {
        ClientRequestBody {
            inner,
            gate,
            inner_ended: false,
        }
    }
}

impl Body for ClientRequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(gate) = &this.gate else {
            return Pin::new(&mut this.inner)
                .poll_frame(cx)
                .map_err(BoxError::from);
        };
        if !this.inner_ended {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(None) => {
                    this.inner_ended = true;
                    gate.end_seen();
                }
                other => return other.map_err(BoxError::from),
            }
        }
        gate.poll_end(cx)
    }

    fn is_end_stream(&self) -> bool {
        match &self.gate {
            None => self.inner.is_end_stream(),
            Some(gate) => self.inner_ended && gate.released(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where the end of one HTTP/2 request body stands, shared by the body and its request's
/// service future ([`Gated`]).
#[derive(Default)]
pub struct ResetGate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    phase: Phase,
    /// The task reading the body (the service future's own, or the upstream connection's when
    /// the body streams through), woken when the end is released or the request aborted.
    body: Option<Waker>,
    /// The service future's task, woken when the body's end is seen elsewhere.
    service: Option<Waker>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    /// The body has not ended.
    #[default]
    Open,
    /// The body's end arrived; the service future has not been pending since.
    EndSeen,
    /// The service future was pending after the end: hyper checks the stream next.
    Checked,
    /// hyper polled the service future again, so the stream was not reset: the end is real.
    Released,
    /// The service future is gone (the stream was reset, or the connection closed).
    Aborted,
}

impl ResetGate {
    /// A gate for a new request.
    pub fn new() -> Arc<ResetGate> {
        Arc::new(ResetGate::default())
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // A panic while this small lock was held leaves a state still worth reading.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end_seen(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Open {
            state.phase = Phase::EndSeen;
            if let Some(service) = &state.service {
                service.wake_by_ref();
            }
        }
    }

    fn poll_end(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut state = self.lock();
        match state.phase {
            Phase::Released => Poll::Ready(None),
            Phase::Aborted => Poll::Ready(Some(Err(
                "the client reset the HTTP/2 stream before its request body was complete".into(),
            ))),
            Phase::Open | Phase::EndSeen | Phase::Checked => {
                match &mut state.body {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    fn released(&self) -> bool {
        self.lock().phase == Phase::Released
    }

    /// Before each poll of the service future.
    fn before_poll(&self, cx: &Context<'_>) {
        let mut state = self.lock();
        match &mut state.service {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        if state.phase == Phase::Checked {
            state.phase = Phase::Released;
            if let Some(body) = state.body.take() {
                body.wake();
            }
        }
    }

    /// After a poll that left the service future pending.
    fn after_pending(&self, cx: &Context<'_>) {
        let mut state = self.lock();
        if state.phase == Phase::EndSeen {
            state.phase = Phase::Checked;
            // hyper looks at the stream now; polled again, the end is released.
            cx.waker().wake_by_ref();
        }
    }

    /// The service future finished (`answered`) or was dropped unfinished.
    fn finish(&self, answered: bool) {
        let mut state = self.lock();
        if state.phase == Phase::Released {
            return;
        }
        // An answer given, the rest of a streamed body may end: nothing waits on the stream.
        state.phase = if answered {
            Phase::Released
        } else {
            Phase::Aborted
        };
        if let Some(body) = state.body.take() {
            body.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's service future, telling its [`ResetGate`] when hyper has had the chance to
    /// see a reset.
    pub struct Gated<F> {
        #[pin]
        inner: F,
        gate: Option<Arc<ResetGate>>,
    }

    impl<F> PinnedDrop for Gated<F> {
        fn drop(this: Pin<&mut Self>) {
            // After an answer the gate is released already, and this changes nothing.
            if let Some(gate) = this.project().gate {
                gate.finish(false);
            }
        }
    }
}

impl<F> Gated<F> {
    /// `inner`, reporting to `gate` (none for HTTP/1 requests).
    pub fn new(inner: F, gate: Option<Arc<ResetGate>>) -> Self {
        Gated { inner, gate }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(gate) = this.gate.as_deref() else {
            return this.inner.poll(cx);
        };
        gate.before_poll(cx);
        match this.inner.poll(cx) {
            Poll::Ready(output) => {
                gate.finish(true);
                Poll::Ready(output)
            }
            Poll::Pending => {
                gate.after_pending(cx);
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_end(gate: &ResetGate) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        gate.poll_end(&mut Context::from_waker(Waker::noop()))
    }

    /// A service future that reads the gate's end the way the layer reads a body: it sees the
    /// end arrive while it is polled, then waits for it.
    struct Reader<'a> {
        gate: &'a ResetGate,
        end_arrives: bool,
    }

    impl Future for Reader<'_> {
        type Output = bool;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
            if std::mem::take(&mut self.end_arrives) {
                self.gate.end_seen();
            }
            match self.gate.poll_end(cx) {
                Poll::Ready(None) => Poll::Ready(true),
                Poll::Ready(Some(_)) => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    /// A request's future whose body ends during its first poll.
    fn reading(gate: &Arc<ResetGate>) -> Gated<Reader<'_>> {
        Gated::new(
            Reader {
                gate,
                end_arrives: true,
            },
            Some(gate.clone()),
        )
    }

    #[test]
    fn the_end_is_released_only_on_the_poll_after_the_service_future_was_pending() {
        let gate = ResetGate::new();
        let mut service = std::pin::pin!(reading(&gate));
        let mut cx = Context::from_waker(Waker::noop());
        // The end arrives while the service future is polled: held back, however often the
        // body is asked within that poll.
        assert!(service.as_mut().poll(&mut cx).is_pending());
        assert!(poll_end(&gate).is_pending());
        // hyper found no reset and polls again: the end is real.
        assert_eq!(service.as_mut().poll(&mut cx), Poll::Ready(true));
        assert!(matches!(poll_end(&gate), Poll::Ready(None)));
    }

    #[test]
    fn a_service_future_dropped_before_the_release_fails_the_body() {
        let gate = ResetGate::new();
        {
            let mut service = std::pin::pin!(reading(&gate));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(service.as_mut().poll(&mut cx).is_pending());
            // hyper saw the reset and drops the future.
        }
        assert!(matches!(poll_end(&gate), Poll::Ready(Some(Err(_)))));
    }

    #[test]
    fn a_streamed_body_ends_after_the_service_future_next_went_pending() {
        // The end is seen by another task (the upstream connection's), while the service
        // future waits for the upstream's answer.
        let gate = ResetGate::new();
        let mut service =
            std::pin::pin!(Gated::new(std::future::pending::<()>(), Some(gate.clone())));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(service.as_mut().poll(&mut cx).is_pending());
        gate.end_seen();
        assert!(poll_end(&gate).is_pending());
        // Woken, polled, still waiting: hyper checks the stream after this poll...
        assert!(service.as_mut().poll(&mut cx).is_pending());
        assert!(poll_end(&gate).is_pending());
        // ...and polls again only when it was not reset.
        assert!(service.as_mut().poll(&mut cx).is_pending());
        assert!(matches!(poll_end(&gate), Poll::Ready(None)));

        // An answer already given releases a streamed body's end too.
        let gate = ResetGate::new();
        let mut answered = std::pin::pin!(Gated::new(std::future::ready(()), Some(gate.clone())));
        assert!(answered.as_mut().poll(&mut cx).is_ready());
        gate.end_seen();
        assert!(matches!(poll_end(&gate), Poll::Ready(None)));
    }
}
