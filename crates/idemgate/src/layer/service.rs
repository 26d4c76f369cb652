//! `IdempotencyLayer` and the `Idempotency` service: the request flow up to execution.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, header, request::Parts};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tower_layer::Layer;
use tower_service::Service;

use super::attempt::{self, Attempt};
use super::body::{BoxError, RequestBody, ResponseBody};
use super::finisher::Finisher;
use super::replay;
use crate::fingerprint::fingerprint;
use crate::key::{KeyError, key_from_headers};
use crate::observe::{NoopObserver, Observer, ReportOutcome, RequestOutcome, StoreOp};
use crate::policy::{Concurrency, MethodPolicy, Policy, PolicyResolver};
use crate::problem::{Problem, ProblemKind};
use crate::record::{RecordId, Timestamp, Token};
use crate::scope::{AuthorizationScope, MissingScope, Scope, ScopeError, ScopeResolver};
use crate::store::{Acquire, AcquireRequest, Store, StoreError};

/// Everything the layer's services share.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    policy: Arc<dyn PolicyResolver>,
    scope: Arc<dyn ScopeResolver>,
    pub(crate) observer: Arc<dyn Observer>,
    pub(crate) finisher: Arc<Finisher>,
    // Tries of an operation with the same token before the layer gives up on it inline.
    store_tries: u32,
}

/// Adds Idempotency-Key enforcement to a service. See the [module docs](crate::layer).
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

impl IdempotencyLayer {
    /// A layer over `store` that protects POST and PATCH with the default [`Policy`], scoped by
    /// the `Authorization` header (anonymous when absent).
    pub fn new<S: Store>(store: Arc<S>) -> Self {
        Self::builder(store).build()
    }

    /// A builder over `store` (any `Arc<impl Store>` or `Arc<dyn Store>`).
    pub fn builder(store: Arc<dyn Store>) -> IdempotencyLayerBuilder {
        IdempotencyLayerBuilder {
            store,
            policy: Arc::new(MethodPolicy::default()),
            scope: Arc::new(AuthorizationScope),
            observer: Arc::new(NoopObserver),
            finish_queue: 10_000,
            finish_give_up_after: Duration::from_secs(600),
            store_tries: 3,
        }
    }

    /// How many finishing operations (`complete`/`release` that failed inline) are being
    /// retried in the background.
    pub fn pending_finishes(&self) -> usize {
        self.shared.finisher.pending()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Configures an [`IdempotencyLayer`].
#[must_use]
pub struct IdempotencyLayerBuilder {
    store: Arc<dyn Store>,
    policy: Arc<dyn PolicyResolver>,
    scope: Arc<dyn ScopeResolver>,
    observer: Arc<dyn Observer>,
    finish_queue: usize,
    finish_give_up_after: Duration,
    store_tries: u32,
}

impl IdempotencyLayerBuilder {
    /// Decides per request whether and how it is protected (default: POST and PATCH with
    /// [`Policy::default`]).
    pub fn policy(mut self, resolver: impl PolicyResolver) -> Self {
        self.policy = Arc::new(resolver);
        self
    }

    /// Finds the caller identity (default: the `Authorization` header).
    pub fn scope(mut self, resolver: impl ScopeResolver) -> Self {
        self.scope = Arc::new(resolver);
        self
    }

    /// Receives metrics events.
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Bounds the background retries of failed `complete`/`release` (default 10 000 pending,
    /// each given up after 10 minutes).
    pub fn finish_queue(mut self, capacity: usize, give_up_after: Duration) -> Self {
        self.finish_queue = capacity;
        self.finish_give_up_after = give_up_after;
        self
    }

    /// How many times an operation is tried inline, with the same token, before the layer
    /// answers 503 (default 3).
    pub fn store_tries(mut self, tries: u32) -> Self {
        self.store_tries = tries.max(1);
        self
    }

    /// The layer.
    pub fn build(self) -> IdempotencyLayer {
        IdempotencyLayer {
            shared: Arc::new(Shared {
                store: self.store,
                policy: self.policy,
                scope: self.scope,
                observer: self.observer,
                finisher: Arc::new(Finisher::new(self.finish_queue, self.finish_give_up_after)),
                store_tries: self.store_tries,
            }),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Idempotency<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming the wrapper.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The future of [`Idempotency`].
pub struct ResponseFuture<E> {
    inner: Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, E>> + Send>>,
}

impl<E> Future for ResponseFuture<E> {
    type Output = Result<Response<ResponseBody>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The ready service goes into the future; the clone stays for the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture {
            inner: Box::pin(handle(shared, inner, request)),
        }
    }
}

/// Where the layer says what it did with a request: the observer, and the request's own
/// [`ReportOutcome`] when it came with one. Reporting consumes it, so a request is reported once.
pub(crate) struct Reporter {
    to: Option<ReportOutcome>,
    id: Option<RecordId>,
}

impl Reporter {
    pub(crate) fn done(self, shared: &Shared, outcome: RequestOutcome) {
        shared.observer.request(outcome);
        if let Some(to) = self.to {
            to.report(outcome, self.id);
        }
    }
}

fn problem(
    shared: &Shared,
    reporter: Reporter,
    outcome: RequestOutcome,
    p: Problem,
) -> Response<ResponseBody> {
    reporter.done(shared, outcome);
    p.into_response()
}

async fn passthrough<S, ReqB, ResB>(
    shared: &Shared,
    reporter: Reporter,
    mut inner: S,
    parts: Parts,
    body: RequestBody<ReqB>,
    outcome: RequestOutcome,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    reporter.done(shared, outcome);
    let response = inner.call(Request::from_parts(parts, body)).await?;
    Ok(response.map(ResponseBody::inner))
}

async fn handle<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<ReqB>,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    let mut reporter = Reporter {
        to: parts.extensions.remove::<ReportOutcome>(),
        id: None,
    };
    let Some(policy) = shared.policy.resolve(&parts) else {
        return passthrough(
            &shared,
            reporter,
            inner,
            parts,
            RequestBody::streaming(body),
            RequestOutcome::Passthrough,
        )
        .await;
    };

    // 1. The key, before anything touches the store (draft §5).
    let key = match key_from_headers(&parts.headers, &policy.key) {
        Ok(Some(key)) => key,
        Ok(None) if policy.require_key => {
            return Ok(problem(
                &shared,
                reporter,
                RequestOutcome::Rejected,
                Problem::new(ProblemKind::KeyMissing),
            ));
        }
        Ok(None) => {
            return passthrough(
                &shared,
                reporter,
                inner,
                parts,
                RequestBody::streaming(body),
                RequestOutcome::Passthrough,
            )
            .await;
        }
        Err(e) => {
            let kind = match e {
                KeyError::Repeated => ProblemKind::KeyRepeated,
                KeyError::Malformed(_) => ProblemKind::KeyMalformed,
                KeyError::Length { .. } => ProblemKind::KeyLength,
            };
            return Ok(problem(
                &shared,
                reporter,
                RequestOutcome::Rejected,
                Problem::new(kind).with_detail(e.to_string()),
            ));
        }
    };

    // 2. Whose key it is.
    let scope = match shared.scope.resolve(&parts) {
        Ok(Some(scope)) => scope,
        Ok(None) => match policy.on_missing_scope {
            MissingScope::Anonymous => Scope::anonymous(),
            MissingScope::Reject => {
                return Ok(problem(
                    &shared,
                    reporter,
                    RequestOutcome::Rejected,
                    Problem::new(ProblemKind::ScopeMissing),
                ));
            }
            MissingScope::Passthrough => {
                return passthrough(
                    &shared,
                    reporter,
                    inner,
                    parts,
                    RequestBody::streaming(body),
                    RequestOutcome::Passthrough,
                )
                .await;
            }
        },
        Err(ScopeError::Invalid(reason)) => {
            tracing::debug!(%reason, "caller identity invalid");
            return Ok(problem(
                &shared,
                reporter,
                RequestOutcome::Rejected,
                Problem::new(ProblemKind::ScopeInvalid),
            ));
        }
    };

    // 3. The whole body, to fingerprint it.
    let bytes = match read_body(body, &parts, &policy).await {
        Ok(bytes) => bytes,
        Err(rejection) => {
            return Ok(problem(
                &shared,
                reporter,
                RequestOutcome::Rejected,
                rejection,
            ));
        }
    };
    let id = scope.record_id(&key);
    reporter.id = Some(id);
    let acquire = AcquireRequest {
        id,
        fingerprint: fingerprint(&parts, &bytes, &policy.fingerprint),
        token: Token::next(),
        lease: policy.lease,
        on_lease_expiry: policy.on_lease_expiry,
        retention: policy.ttl,
    };

    // 4. Acquire, and act on the answer. From the first try on, the guard releases the key if
    //    this future is dropped (client gone, outer timeout) before an attempt task owns it.
    let mut guard = AcquireGuard::new(&shared, &acquire);
    let answer = match acquire_answer(&shared, &acquire, &mut guard).await {
        Ok(answer) => answer,
        Err(e) => {
            return on_store_error(&shared, reporter, inner, parts, bytes, &policy, e).await;
        }
    };
    let (answer, waited) = match (answer, policy.concurrency) {
        (Acquire::InFlight { lease_expires_at }, Concurrency::Wait { max }) => {
            match wait_for_outcome(
                &shared,
                &acquire,
                &policy,
                lease_expires_at,
                max,
                &mut guard,
            )
            .await
            {
                Ok(answer) => (answer, true),
                // Not fail-open: the duplicate is known to be in flight elsewhere.
                Err(e) => return Ok(store_error_response(&shared, reporter, &e)),
            }
        }
        (answer, _) => (answer, false),
    };
    if !matches!(answer, Acquire::Acquired { .. }) {
        guard.disarm();
    }
    Ok(match answer {
        Acquire::Acquired { .. } => {
            execute(
                shared, reporter, inner, parts, bytes, acquire, policy, guard,
            )
            .await
        }
        Acquire::Completed(record) => {
            reporter.done(
                &shared,
                if waited {
                    RequestOutcome::WaitedReplay
                } else {
                    RequestOutcome::Replayed
                },
            );
            replay::replay(&record.outcome, &parts.headers, &policy).await
        }
        Acquire::Mismatch => problem(
            &shared,
            reporter,
            RequestOutcome::Mismatch,
            Problem::new(ProblemKind::KeyReused),
        ),
        Acquire::InFlight { lease_expires_at } => problem(
            &shared,
            reporter,
            RequestOutcome::Conflict,
            Problem::new(ProblemKind::RequestInFlight)
                .with_retry_after(retry_after(lease_expires_at, policy.lease)),
        ),
    })
}

/// Releases, in the background, a key this request may have acquired but never handed to an
/// attempt task: when the request future is dropped mid-acquire, or when the acquire failed
/// after it may have been applied. Without it the record would sit in flight until its lease
/// lapsed, which single-process stores never judge while the process lives.
pub(crate) struct AcquireGuard {
    shared: Arc<Shared>,
    id: crate::record::RecordId,
    token: Token,
    armed: bool,
}

impl AcquireGuard {
    fn new(shared: &Arc<Shared>, req: &AcquireRequest) -> Self {
        AcquireGuard {
            shared: shared.clone(),
            id: req.id,
            token: req.token,
            armed: true,
        }
    }

    /// The store holds nothing of this attempt, or a task owns it now.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AcquireGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.finisher.enqueue_speculative(
                self.shared.store.clone(),
                self.shared.observer.clone(),
                self.id,
                self.token,
            );
        }
    }
}

/// Seconds until the holder's next renewal (it renews every third of the lease), at least 1.
fn retry_after(lease_expires_at: Timestamp, lease: Duration) -> Duration {
    let remaining = lease_expires_at.saturating_since(Timestamp::now());
    remaining
        .saturating_sub(lease * 2 / 3)
        .max(Duration::from_secs(1))
}

/// Reads the whole request body under the policy's size and stall limits (SPEC §3).
async fn read_body<B>(body: B, parts: &Parts, policy: &Policy) -> Result<Bytes, Problem>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limit = policy.max_request_body;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // Checked before the body is polled, so hyper never sends `100 Continue` for it.
    if declared.is_some_and(|n| n > limit) {
        return Err(Problem::new(ProblemKind::RequestTooLarge)
            .with_header(header::CONNECTION, HeaderValue::from_static("close")));
    }
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut total: u64 = 0;
    loop {
        // A frame already buffered needs no timer; only a body that has to wait is timed.
        // Errors become `BoxError` (which is `Send`) before anything is held across the await.
        let ready = futures_util::FutureExt::now_or_never(body.as_mut().frame())
            .map(|f| f.map(|r| r.map_err(Into::<BoxError>::into)));
        let next = match ready {
            Some(ready) => Ok(ready),
            None => tokio::time::timeout(policy.request_body_timeout, body.as_mut().frame())
                .await
                .map(|f| f.map(|r| r.map_err(Into::<BoxError>::into))),
        };
        let frame = match next {
            Err(_) => {
                return Err(Problem::new(ProblemKind::RequestBodyTimeout)
                    .with_header(header::CONNECTION, HeaderValue::from_static("close")));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body ended early; nothing executed");
                return Err(Problem::new(ProblemKind::RequestBodyIncomplete)
                    .with_header(header::CONNECTION, HeaderValue::from_static("close")));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total = total.saturating_add(data.len() as u64);
        if total > limit {
            // The rest of the body is not read: the connection must close.
            return Err(Problem::new(ProblemKind::RequestTooLarge)
                .with_header(header::CONNECTION, HeaderValue::from_static("close")));
        }
        match (&mut first, &mut rest) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut buf =
                    // The declared length is the client's word: reserve at most 256 KiB up front.
                    BytesMut::with_capacity(
                        declared.map_or(f.len() + data.len(), |n| n as usize).min(256 * 1024),
                    );
                buf.extend_from_slice(f);
                buf.extend_from_slice(&data);
                rest = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&data),
        }
    }
    Ok(match (first, rest) {
        (_, Some(buf)) => buf.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// A store operation, timed for the observer and tried with the same token up to
/// `store_tries` times while it fails retryably.
pub(crate) async fn with_tries<T, F, Fut>(
    shared: &Shared,
    op: StoreOp,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let timed = shared.observer.wants_timings();
    let mut tries = 0;
    loop {
        tries += 1;
        let started = timed.then(Instant::now);
        let result = call().await;
        let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
        shared.observer.store_op(op, elapsed, result.is_ok());
        match result {
            Err(e) if e.is_retryable() && tries < shared.store_tries => {
                tokio::time::sleep(Duration::from_millis(5 << tries)).await;
            }
            Err(StoreError::Corrupt(reason)) => {
                shared.observer.unreadable_record();
                return Err(StoreError::Corrupt(reason));
            }
            other => return other,
        }
    }
}

/// `acquire`, tried with the same token while it fails retryably. The guard stays armed when
/// an error leaves open whether any try was applied, so the key is released in the background.
async fn acquire_answer(
    shared: &Arc<Shared>,
    req: &AcquireRequest,
    guard: &mut AcquireGuard,
) -> Result<Acquire, StoreError> {
    let maybe_applied = std::sync::atomic::AtomicBool::new(false);
    let result = with_tries(shared, StoreOp::Acquire, || async {
        // Through the `dyn Store` itself: `Arc<dyn Store>` also implements `Store` (forwarding),
        // and calling that would box one more future per operation.
        let r = shared.store.as_ref().acquire(*req).await;
        if matches!(
            r,
            Err(StoreError::Timeout {
                maybe_applied: true
            })
        ) {
            maybe_applied.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    })
    .await;
    if result.is_err() && !maybe_applied.load(std::sync::atomic::Ordering::Relaxed) {
        guard.disarm();
    }
    result
}

/// Wait mode (SPEC §7): subscribe, then re-read; woken by completion and release, re-checks
/// when the lease would lapse; past `max`, the InFlight answer stands (409).
async fn wait_for_outcome(
    shared: &Arc<Shared>,
    req: &AcquireRequest,
    policy: &Policy,
    mut lease_expires_at: Timestamp,
    max: Duration,
    guard: &mut AcquireGuard,
) -> Result<Acquire, StoreError> {
    let deadline = tokio::time::Instant::now() + max;
    // A store error while waiting says nothing new about the key, which was seen in flight:
    // the duplicate gets the 409 it would have got without waiting (an unreadable record
    // still gets its 500).
    let in_flight_on_error = |e: StoreError, lease_expires_at| match e {
        StoreError::Corrupt(_) => Err(e),
        _ => Ok(Acquire::InFlight { lease_expires_at }),
    };
    loop {
        let mut watch = match shared
            .store
            .as_ref()
            .watch(&req.id, policy.max_waiters_per_key)
            .await
        {
            Ok(Some(watch)) => watch,
            Ok(None) => return Ok(Acquire::InFlight { lease_expires_at }),
            Err(e) => return in_flight_on_error(e, lease_expires_at),
        };
        match acquire_answer(shared, req, guard).await {
            Ok(Acquire::InFlight {
                lease_expires_at: l,
            }) => lease_expires_at = l,
            Ok(other) => return Ok(other),
            Err(e) => return in_flight_on_error(e, lease_expires_at),
        }
        let recheck = tokio::time::Instant::now()
            + lease_expires_at.saturating_since(Timestamp::now())
            + Duration::from_millis(20);
        let wake = recheck.min(deadline);
        tokio::select! {
            _ = watch.changed() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            // One last look, so an outcome that landed at the deadline is not a 409.
            return match acquire_answer(shared, req, guard).await {
                Ok(answer) => Ok(answer),
                Err(e) => in_flight_on_error(e, lease_expires_at),
            };
        }
    }
}

fn store_error_response(
    shared: &Shared,
    reporter: Reporter,
    error: &StoreError,
) -> Response<ResponseBody> {
    let p = match error {
        StoreError::Corrupt(reason) => {
            tracing::error!(%reason, "stored record unreadable; request not executed");
            Problem::new(ProblemKind::RecordUnreadable)
        }
        StoreError::Full(_) => {
            Problem::new(ProblemKind::StoreFull).with_retry_after(Duration::from_secs(5))
        }
        _ => {
            tracing::warn!(%error, "store failed; request not executed");
            Problem::new(ProblemKind::StoreUnavailable).with_retry_after(Duration::from_secs(1))
        }
    };
    problem(shared, reporter, RequestOutcome::StoreError, p)
}

async fn on_store_error<S, ReqB, ResB>(
    shared: &Arc<Shared>,
    reporter: Reporter,
    inner: S,
    parts: Parts,
    bytes: Bytes,
    policy: &Policy,
    error: StoreError,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    // An unreadable record is never a reason to execute: it may hold a completed outcome.
    if policy.fail_open && !matches!(error, StoreError::Corrupt(_)) {
        tracing::warn!(%error, "store failed; fail_open executes the request unprotected");
        return passthrough(
            shared,
            reporter,
            inner,
            parts,
            RequestBody::buffered(bytes),
            RequestOutcome::FailedOpen,
        )
        .await;
    }
    Ok(store_error_response(shared, reporter, &error))
}

#[allow(clippy::too_many_arguments)]
async fn execute<S, ReqB, ResB>(
    shared: Arc<Shared>,
    reporter: Reporter,
    inner: S,
    parts: Parts,
    bytes: Bytes,
    acquire: AcquireRequest,
    policy: Arc<Policy>,
    mut guard: AcquireGuard,
) -> Response<ResponseBody>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let (respond, mut response) = oneshot::channel();
    let client_deadline = policy.client_deadline;
    let max_lease_hold = policy.max_lease_hold;
    let mut parts = parts;
    parts.extensions.insert(super::AttemptInfo {
        record_id: acquire.id,
        token: acquire.token,
        ttl: policy.ttl,
    });
    // The work belongs to idemgate from here: it goes on if the client vanishes. It is driven
    // here, in the client's task, until the client's answer is known; whatever is left then
    // (a streamed body, a late outcome after the client deadline) or when this future is
    // dropped first runs on a task of its own. Most attempts finish here and never cost a task
    // spawn or a wake-up across tasks.
    let mut attempt = Detachable(Some(Box::pin(attempt::run(Attempt {
        shared,
        inner,
        request: Request::from_parts(parts, RequestBody::buffered(bytes)),
        id: acquire.id,
        token: acquire.token,
        policy,
        respond,
        reporter,
    }))));
    guard.disarm();
    let response = std::future::poll_fn(|cx| {
        if let Some(work) = attempt.0.as_mut()
            && work.as_mut().poll(cx).is_ready()
        {
            attempt.0 = None;
        }
        match Pin::new(&mut response).poll(cx) {
            Poll::Ready(answer) => Poll::Ready(answer.unwrap_or_else(|_| {
                // The attempt ended without answering: only a runtime shutdown does that.
                Problem::new(ProblemKind::OutcomePending).into_response()
            })),
            Poll::Pending => Poll::Pending,
        }
    });
    match client_deadline {
        Some(deadline) => match tokio::time::timeout(deadline, response).await {
            Ok(r) => r,
            Err(_) => Problem::new(ProblemKind::OutcomePending).into_response(),
        },
        // Without a client deadline the client waits as long as the attempt may hold the key;
        // past that the attempt is written off, and the client gets what retries will get.
        None => match tokio::time::timeout(max_lease_hold + HOLD_MARGIN, response).await {
            Ok(r) => r,
            Err(_) => Problem::new(ProblemKind::OutcomeUnknown)
                .with_status(StatusCode::GATEWAY_TIMEOUT)
                .into_response(),
        },
    }
}

/// An attempt driven by the request's own future; what is left of it when that future is done
/// or dropped goes on in a task of its own.
struct Detachable(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl Drop for Detachable {
    fn drop(&mut self) {
        let Some(work) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            // Not a future that panicked while polled here: it cannot be resumed.
            Ok(runtime) if !std::thread::panicking() => {
                runtime.spawn(work);
            }
            // No runtime to run it (shutting down), or it panicked: dropping it lets its guard
            // record outcome-unknown where it can.
            _ => drop(work),
        }
    }
}

/// How long past `max_lease_hold` a client waits, so that an attempt finishing right at the
/// bound still reaches it.
const HOLD_MARGIN: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_until_next_renewal_and_at_least_one_second() {
        let lease = Duration::from_secs(30);
        let now = Timestamp::now();
        // Just renewed: the next renewal is in 10 s.
        let d = retry_after(now.after(lease), lease);
        assert!((9..=10).contains(&d.as_secs()), "{d:?}");
        assert_eq!(retry_after(now, lease), Duration::from_secs(1));
    }
}
