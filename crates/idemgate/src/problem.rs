//! RFC 9457 problem responses that idemgate itself returns (SPEC §8).
//!
//! Every case has a stable `type` URI so a client can tell idemgate's answers from the
//! upstream's own errors. The kind also rides in the response extensions (as [`ProblemKind`])
//! so logging and outer layers can read it without parsing the body.
//!
//! ```
//! use idemgate::problem::{Problem, ProblemKind};
//! let response: http::Response<bytes::Bytes> = Problem::new(ProblemKind::KeyReused).into_response();
//! assert_eq!(response.status(), 422);
//! assert_eq!(response.headers()["content-type"], "application/problem+json");
//! assert_eq!(response.extensions().get::<ProblemKind>(), Some(&ProblemKind::KeyReused));
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Map, Value, json};

/// The prefix of every problem `type` URI.
pub const TYPE_PREFIX: &str = "https://idemgate.dev/problems/";

/// Which problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The route requires an `Idempotency-Key` and none was sent.
    KeyMissing,
    /// The key is not an sf-string (or bare token, unless strict).
    KeyMalformed,
    /// The key is shorter or longer than allowed.
    KeyLength,
    /// More than one `Idempotency-Key` field line.
    KeyRepeated,
    /// No caller identity under `on_missing_scope = reject`.
    ScopeMissing,
    /// The caller identity could not be verified (e.g. a bad JWT).
    ScopeInvalid,
    /// The request body stalled past the timeout.
    RequestBodyTimeout,
    /// The request body ended before it was complete (the client went away).
    RequestBodyIncomplete,
    /// A request with this key is in flight.
    RequestInFlight,
    /// The first response was too large to store.
    ResponseNotStored,
    /// The request body is over the limit.
    RequestTooLarge,
    /// The request's header fields are over the limit (their total size, or their number).
    RequestHeadTooLarge,
    /// The request target is over the limit.
    UriTooLong,
    /// The request is not valid HTTP (its request line, a header field, or its framing).
    MalformedRequest,
    /// The key was used for a different request.
    KeyReused,
    /// The stored record could not be decoded.
    RecordUnreadable,
    /// The inner service panicked or failed.
    HandlerFailed,
    /// The request could not be sent upstream.
    UpstreamUnreachable,
    /// The upstream's response body failed mid-way.
    ResponseIncomplete,
    /// The request may or may not have taken effect.
    OutcomeUnknown,
    /// The store is unreachable.
    StoreUnavailable,
    /// The store is at capacity.
    StoreFull,
    /// The client's deadline passed; idemgate is still waiting for the outcome.
    OutcomePending,
    /// Transactional mode: the lease was lost before the transaction committed.
    LeaseLost,
}

impl ProblemKind {
    /// The stable slug, last segment of the `type` URI.
    pub fn slug(self) -> &'static str {
        use ProblemKind::*;
        match self {
            KeyMissing => "key-missing",
            KeyMalformed => "key-malformed",
            KeyLength => "key-length",
            KeyRepeated => "key-repeated",
            ScopeMissing => "scope-missing",
            ScopeInvalid => "scope-invalid",
            RequestBodyTimeout => "request-body-timeout",
            RequestBodyIncomplete => "request-body-incomplete",
            RequestInFlight => "request-in-flight",
            ResponseNotStored => "response-not-stored",
            RequestTooLarge => "request-too-large",
            RequestHeadTooLarge => "request-head-too-large",
            UriTooLong => "uri-too-long",
            MalformedRequest => "malformed-request",
            KeyReused => "key-reused",
            RecordUnreadable => "record-unreadable",
            HandlerFailed => "handler-failed",
            UpstreamUnreachable => "upstream-unreachable",
            ResponseIncomplete => "response-incomplete",
            OutcomeUnknown => "outcome-unknown",
            StoreUnavailable => "store-unavailable",
            StoreFull => "store-full",
            OutcomePending => "outcome-pending",
            LeaseLost => "lease-lost",
        }
    }

    /// The default status.
    pub fn status(self) -> StatusCode {
        use ProblemKind::*;
        match self {
            KeyMissing
            | KeyMalformed
            | KeyLength
            | KeyRepeated
            | ScopeMissing
            | ScopeInvalid
            | RequestBodyIncomplete
            | MalformedRequest => StatusCode::BAD_REQUEST,
            RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            RequestInFlight | LeaseLost => StatusCode::CONFLICT,
            ResponseNotStored => StatusCode::GONE,
            RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestHeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            UriTooLong => StatusCode::URI_TOO_LONG,
            KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            RecordUnreadable | HandlerFailed => StatusCode::INTERNAL_SERVER_ERROR,
            UpstreamUnreachable | ResponseIncomplete | OutcomeUnknown => StatusCode::BAD_GATEWAY,
            StoreUnavailable | StoreFull => StatusCode::SERVICE_UNAVAILABLE,
            OutcomePending => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short human title.
    pub fn title(self) -> &'static str {
        use ProblemKind::*;
        match self {
            KeyMissing => "Idempotency-Key required",
            KeyMalformed => "Idempotency-Key malformed",
            KeyLength => "Idempotency-Key length out of range",
            KeyRepeated => "Idempotency-Key sent more than once",
            ScopeMissing => "Caller identity required",
            ScopeInvalid => "Caller identity invalid",
            RequestBodyTimeout => "Request body timed out",
            RequestBodyIncomplete => "Request body incomplete",
            RequestInFlight => "A request with this Idempotency-Key is in progress",
            ResponseNotStored => "Original response was too large to store",
            RequestTooLarge => "Request body too large",
            RequestHeadTooLarge => "Request header fields too large",
            UriTooLong => "Request target too long",
            MalformedRequest => "Malformed request",
            KeyReused => "Idempotency-Key reused for a different request",
            RecordUnreadable => "Stored idempotency record unreadable",
            HandlerFailed => "Request handler failed",
            UpstreamUnreachable => "Upstream unreachable",
            ResponseIncomplete => "Upstream response incomplete",
            OutcomeUnknown => "Outcome of the original request unknown",
            StoreUnavailable => "Idempotency store unavailable",
            StoreFull => "Idempotency store full",
            OutcomePending => "Outcome of the request still pending",
            LeaseLost => "Idempotency lease lost",
        }
    }

    /// The full `type` URI.
    pub fn type_uri(self) -> String {
        format!("{TYPE_PREFIX}{}", self.slug())
    }

    /// A default explanation for clients.
    pub fn default_detail(self) -> &'static str {
        use ProblemKind::*;
        match self {
            KeyMissing => "This endpoint requires an Idempotency-Key header.",
            KeyMalformed => {
                "The Idempotency-Key header must be a structured-field string (or a bare token of visible ASCII)."
            }
            KeyLength => "The Idempotency-Key is shorter or longer than this endpoint allows.",
            KeyRepeated => "Send exactly one Idempotency-Key header.",
            ScopeMissing => "Idempotent requests must carry caller credentials on this endpoint.",
            ScopeInvalid => "The caller credentials could not be verified.",
            RequestBodyTimeout => {
                "The request body was not received in time; nothing was executed."
            }
            RequestBodyIncomplete => {
                "The request body ended before it was complete; nothing was executed."
            }
            RequestInFlight => {
                "A request with this Idempotency-Key is still being processed. Retry after the indicated delay."
            }
            ResponseNotStored => {
                "The original request was executed, but its response was too large to keep for replay. It will not be executed again."
            }
            RequestTooLarge => "The request body exceeds the limit; nothing was executed.",
            RequestHeadTooLarge => {
                "The request's header fields exceed the limit; nothing was executed."
            }
            UriTooLong => "The request target exceeds the limit; nothing was executed.",
            MalformedRequest => {
                "The request is not valid HTTP (its request line, a header field, or its Content-Length or Transfer-Encoding); nothing was executed."
            }
            KeyReused => {
                "This Idempotency-Key was already used for a different request (method, path or body differ). Use a new key for a new request."
            }
            RecordUnreadable => {
                "The stored record for this Idempotency-Key cannot be read; the request was not executed."
            }
            HandlerFailed => {
                "The original request failed inside the server; it will not be executed again."
            }
            UpstreamUnreachable => {
                "The request could not be sent to the upstream; it was not executed. Retry with the same key."
            }
            ResponseIncomplete => {
                "The original request was executed, but its response failed part-way; the partial body is not replayed."
            }
            OutcomeUnknown => {
                "The original request may or may not have taken effect, and its response was lost. It will not be executed again; contact the operator to settle it."
            }
            StoreUnavailable => {
                "The idempotency store cannot be reached; nothing was executed. Retry with the same key."
            }
            StoreFull => {
                "The idempotency store is full; nothing was executed. Retry later with the same key."
            }
            OutcomePending => {
                "The request is still being processed. Retry with the same key to get its outcome."
            }
            LeaseLost => {
                "The request lost its idempotency lease before it committed; it was rolled back."
            }
        }
    }
}

/// A problem response under construction.
#[derive(Clone, Debug)]
pub struct Problem {
    kind: ProblemKind,
    status: StatusCode,
    detail: Option<String>,
    retry_after: Option<Duration>,
    extra: Map<String, Value>,
    headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl Problem {
    /// A problem of this kind with its default status and detail.
    pub fn new(kind: ProblemKind) -> Self {
        Problem {
            kind,
            status: kind.status(),
            detail: None,
            retry_after: None,
            extra: Map::new(),
            headers: Vec::new(),
        }
    }

    /// The kind.
    pub fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// Overrides the status (e.g. 504 for an outcome-unknown after a timeout).
    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Overrides the detail text.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds `Retry-After` (whole seconds, at least 1).
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Adds an extension member to the JSON body.
    #[must_use]
    pub fn with_member(mut self, name: &str, value: Value) -> Self {
        self.extra.insert(name.to_owned(), value);
        self
    }

    /// Adds a response header.
    #[must_use]
    pub fn with_header(mut self, name: http::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let mut obj = Map::new();
        obj.insert("type".into(), json!(self.kind.type_uri()));
        obj.insert("title".into(), json!(self.kind.title()));
        obj.insert("status".into(), json!(self.status.as_u16()));
        obj.insert(
            "detail".into(),
            json!(self.detail.as_deref().unwrap_or(self.kind.default_detail())),
        );
        for (k, v) in &self.extra {
            obj.insert(k.clone(), v.clone());
        }
        Bytes::from(Value::Object(obj).to_string())
    }

    /// The response, with any body type that can be made from bytes.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let body = self.body();
        let mut response = Response::new(B::from(body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        response.extensions_mut().insert(self.kind);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn every_problem_is_rfc9457_json() {
        use ProblemKind::*;
        for kind in [
            KeyMissing,
            KeyMalformed,
            KeyLength,
            KeyRepeated,
            ScopeMissing,
            ScopeInvalid,
            RequestBodyTimeout,
            RequestBodyIncomplete,
            RequestInFlight,
            ResponseNotStored,
            RequestTooLarge,
            RequestHeadTooLarge,
            UriTooLong,
            MalformedRequest,
            KeyReused,
            RecordUnreadable,
            HandlerFailed,
            UpstreamUnreachable,
            ResponseIncomplete,
            OutcomeUnknown,
            StoreUnavailable,
            StoreFull,
            OutcomePending,
            LeaseLost,
        ] {
            let p = Problem::new(kind).with_retry_after(Duration::from_millis(100));
            let body: Value = serde_json::from_slice(&p.body()).unwrap_or(Value::Null);
            assert_eq!(body["type"], json!(format!("{TYPE_PREFIX}{}", kind.slug())));
            assert_eq!(body["status"], json!(kind.status().as_u16()));
            assert!(body["title"].is_string() && body["detail"].is_string());
            let r: Response<Full<Bytes>> = p.into_response();
            assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        }
    }
}
