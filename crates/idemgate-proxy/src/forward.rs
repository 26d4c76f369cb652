//! The upstream-forwarding service that [`IdempotencyLayer`](idemgate::IdempotencyLayer) wraps.
//!
//! It rewrites the request for the upstream (URI, hop-by-hop headers, `X-Forwarded-*`), sends it
//! over pooled connections (a plain-HTTP upstream: HTTP/1.1 through [`Http1Pool`]; HTTPS:
//! hyper-util's client, HTTP/1.1 or HTTP/2 as TLS ALPN offers; `--upstream-protocol http2`:
//! HTTP/2 only, on plain TCP with prior knowledge), and classifies failures as SPEC §6 does,
//! telling the layer through [`OutcomeHint`]:
//!
//! | what failed | answer | hint |
//! |---|---|---|
//! | connect refused / timed out, DNS, TLS; HTTP/2 `REFUSED_STREAM`, `GOAWAY` below the stream (and, HTTP/2 only, a request canceled before its stream opened) | 502 `upstream-unreachable` | [`OutcomeHint::NotSent`] (key released) |
//! | sent, then reset / EOF before the response head (also on a reused connection) | 502 `outcome-unknown` | [`OutcomeHint::NoResponse`] |
//! | no response head by the hard timeout | 504 `outcome-unknown` | [`OutcomeHint::NoResponse`] |
//! | the client's own request body failed while it streamed through (malformed chunking, the client gone mid-body): unprotected requests only | 400 `request-body-incomplete` | [`OutcomeHint::NotSent`] |
//!
//! A body that fails after the head is the layer's business (it stores `response-incomplete`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use idemgate::OutcomeHint;
use idemgate::layer::BoxError;
use idemgate::problem::{Problem, ProblemKind};
use tower_service::Service;

use crate::config::UpstreamProtocol;
use crate::metrics::{Metrics, UpstreamResult};
use crate::pool::{Http1Pool, PoolError, UpstreamBody};

/// The body the forwarder answers with: the upstream's, streamed, or a problem of idemgate's.
pub type ForwardBody<B> = Either<UpstreamBody<B>, Full<Bytes>>;

/// Idle pooled connections are closed after this: below common server keep-alive timeouts
/// (nginx 75 s, Node 5 s, Go 90 s, gunicorn 2 s…), so idemgate rarely reuses a connection the
/// upstream is closing, which would make a sent request's outcome unknown.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connecting to the upstream (TCP + TLS) gives up after this; the request was not sent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's address, put in the request extensions by the server for `X-Forwarded-For`.
/// Made once per connection: the address text is formatted there, not on every request.
#[derive(Clone, Debug)]
pub struct ClientAddr {
    /// The peer address.
    pub addr: SocketAddr,
    /// Its IP as a header value.
    ip: HeaderValue,
    /// A proxy of the operator's (`--trusted-proxies`): the `X-Forwarded-Proto` and
    /// `X-Forwarded-Host` it sends describe the client's request and are passed on.
    trusted: bool,
}

impl ClientAddr {
    /// The client at `addr`, not a trusted proxy.
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_maybe_shared(Bytes::from(addr.ip().to_string()))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientAddr {
            addr,
            ip,
            trusted: false,
        }
    }

    /// The client at `addr`, trusted when `proxies` holds its address.
    pub fn connected(addr: SocketAddr, proxies: &TrustedProxies) -> Self {
        ClientAddr {
            trusted: proxies.contains(addr.ip()),
            ..ClientAddr::new(addr)
        }
    }
}

/// The addresses (`--trusted-proxies`) whose `X-Forwarded-Proto` and `X-Forwarded-Host` idemgate
/// passes on instead of replacing: the TLS edge in front of it, so the upstream sees the scheme
/// and host the client used.
///
/// ```
/// use idemgate_proxy::forward::TrustedProxies;
///
/// let proxies = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
/// assert!(proxies.contains("10.1.2.3".parse().unwrap()));
/// // An IPv4 client on a dual-stack listener shows as IPv4-mapped IPv6.
/// assert!(proxies.contains("::ffff:10.1.2.3".parse().unwrap()));
/// assert!(!proxies.contains("192.0.2.1".parse().unwrap()));
/// ```
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Arc<[ipnet::IpNet]>);

impl TrustedProxies {
    /// Trusts the addresses in `networks`.
    pub fn new(networks: Vec<ipnet::IpNet>) -> Self {
        TrustedProxies(networks.into())
    }

    /// Whether `ip` is one of them.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Marks a request the layer may protect: the forwarder then waits for the response head up to
/// the hard timeout (the layer answers the client at its deadline). Unmarked requests pass
/// through and get the client deadline as their head timeout.
#[derive(Clone, Copy, Debug)]
pub struct MayProtect;

/// Forwards requests to one upstream.
pub struct Forwarder<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for Forwarder<B> {
    fn clone(&self) -> Self {
        Forwarder {
            shared: self.shared.clone(),
        }
    }
}

/// How requests reach the upstream.
enum Connections<B> {
    /// `http://` over HTTP/1.1: keep-alive connections of our own.
    Plain(Http1Pool<B>),
    /// hyper-util's pooled client: `https://` (HTTP/2 or HTTP/1.1 as ALPN agrees), and HTTP/2
    /// on `http://` (h2c, prior knowledge).
    Client(Box<Client<HttpsConnector<HttpConnector>, B>>),
}

struct Shared<B> {
    connections: Connections<B>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The upstream URL's path without its trailing `/`, prefixed to every request path.
    base_path: String,
    /// The `Host` of a plain-HTTP upstream, set here so the client does not format it per
    /// request. `None` for HTTPS, where ALPN may pick HTTP/2 (which carries `:authority`).
    host: Option<HeaderValue>,
    hard_timeout: Duration,
    soft_timeout: Duration,
    /// `--upstream-protocol http2`: no connection speaks HTTP/1.
    http2_only: bool,
    metrics: Option<Arc<Metrics>>,
}

/// Settings of a [`Forwarder`].
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// The upstream base URL.
    pub upstream: Uri,
    /// The longest wait for a response head of a protected request.
    pub hard_timeout: Duration,
    /// The longest wait for a response head of an unprotected request.
    pub soft_timeout: Duration,
    /// The HTTP version to speak.
    pub protocol: UpstreamProtocol,
}

impl<B> Forwarder<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// A forwarder with pooled connections (HTTPS: webpki roots, rustls with the ring
    /// provider).
    pub fn new(config: ForwardConfig, metrics: Option<Arc<Metrics>>) -> Result<Self, String> {
        let parts = config.upstream.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err("the upstream URL needs a scheme and a host".into());
        };
        let base_path = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let plain = scheme == http::uri::Scheme::HTTP;
        let (connections, host) = if plain && config.protocol != UpstreamProtocol::Http2 {
            let pool = Http1Pool::new(
                authority.host(),
                authority.port_u16().unwrap_or(80),
                POOL_IDLE_TIMEOUT,
                CONNECT_TIMEOUT,
            );
            (Connections::Plain(pool), Some(host_header(&authority)?))
        } else {
            let client = pooled_client(config.protocol)?;
            (Connections::Client(Box::new(client)), None)
        };
        Ok(Forwarder {
            shared: Arc::new(Shared {
                connections,
                scheme,
                authority,
                base_path,
                host,
                hard_timeout: config.hard_timeout,
                soft_timeout: config.soft_timeout,
                http2_only: config.protocol == UpstreamProtocol::Http2,
                metrics,
            }),
        })
    }
}

/// hyper-util's pooled client speaking `protocol`: over TLS it offers the versions `protocol`
/// allows by ALPN; `Http2` on a plain connection is h2c with prior knowledge.
fn pooled_client<B>(
    protocol: UpstreamProtocol,
) -> Result<Client<HttpsConnector<HttpConnector>, B>, String>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .https_or_http();
    let connector = match protocol {
        UpstreamProtocol::Auto => tls.enable_http1().enable_http2().wrap_connector(http),
        UpstreamProtocol::Http1 => tls.enable_http1().wrap_connector(http),
        UpstreamProtocol::Http2 => tls.enable_http2().wrap_connector(http),
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(protocol == UpstreamProtocol::Http2)
        .build(connector))
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the ones the
/// `Connection` header names.
/// (Names, not strings: removing by `&str` parses the name again on every call.)
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const HOP_BY_HOP_COUNT: usize = 9;

/// Where `Connection` is in [`HOP_BY_HOP`].
const CONNECTION_INDEX: usize = 0;

/// Where `Transfer-Encoding` is in [`HOP_BY_HOP`].
const TRANSFER_ENCODING_INDEX: usize = 7;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The `Host` header for `authority`, as hyper's client writes it: the port only when it is not
/// the scheme's default.
fn host_header(authority: &http::uri::Authority) -> Result<HeaderValue, String> {
    let text = match authority.port_u16() {
        Some(80) | None => authority.host().to_owned(),
        Some(port) => format!("{}:{port}", authority.host()),
    };
    HeaderValue::from_str(&text).map_err(|e| format!("the upstream host is not a valid Host: {e}"))
}

/// Removes hop-by-hop headers and those named in `Connection`. `TE: trailers` is kept on
/// requests (gRPC and HTTP/2 allow it). A message that came with `Transfer-Encoding` also loses
/// its `Content-Length`: the transfer coding framed it, and a length passed on beside a body
/// hyper re-frames would cut the message short for the next hop (RFC 9112 §6.3 tells
/// intermediaries to remove it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // One pass over the few names present tells which of the nine are there (most requests
    // carry none, most upstream responses only `Connection: keep-alive`); only those are
    // removed, since a removal hashes the name.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // Names `Connection` lists, but not the hop-by-hop ones (`keep-alive`), removed below if
    // present, so that the usual `Connection: keep-alive` parses no name.
    let named: Vec<HeaderName> = if present[CONNECTION_INDEX] {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| {
                !HOP_BY_HOP
                    .iter()
                    .any(|hop| hop.as_str().eq_ignore_ascii_case(n))
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let te_trailers = keep_te_trailers
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in named {
        headers.remove(name);
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if present[TRANSFER_ENCODING_INDEX] {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Rewrites a request's head for the upstream: URI, hop-by-hop headers, `X-Forwarded-For`
/// (appended), `X-Forwarded-Proto` and `X-Forwarded-Host` (set, or kept from a trusted proxy),
/// `Host` (the upstream's).
pub fn prepare_head(
    parts: &mut http::request::Parts,
    scheme: &http::uri::Scheme,
    authority: &http::uri::Authority,
    base_path: &str,
    client: Option<&ClientAddr>,
) -> Result<(), String> {
    rewrite_head(parts, scheme, authority, base_path, None, client)
}

fn rewrite_head(
    parts: &mut http::request::Parts,
    scheme: &http::uri::Scheme,
    authority: &http::uri::Authority,
    base_path: &str,
    host: Option<&HeaderValue>,
    client: Option<&ClientAddr>,
) -> Result<(), String> {
    let original_host = parts.headers.remove(header::HOST).or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut parts.headers, true);
    if let Some(client) = client {
        let value = match parts
            .headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) if !prev.trim().is_empty() => {
                HeaderValue::from_str(&format!("{prev}, {}", client.addr.ip())).ok()
            }
            _ => Some(client.ip.clone()),
        };
        if let Some(v) = value {
            parts.headers.insert(X_FORWARDED_FOR, v);
        }
    }
    // A trusted proxy's values stand (it saw the client's request); anyone else's are replaced
    // with what idemgate saw, so a client cannot claim a scheme or host.
    let trusted = client.is_some_and(|c| c.trusted);
    if !(trusted && parts.headers.contains_key(&X_FORWARDED_PROTO)) {
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if let Some(host) = original_host
        && !(trusted && parts.headers.contains_key(&X_FORWARDED_HOST))
    {
        parts.headers.insert(X_FORWARDED_HOST, host);
    }
    // Otherwise the client sets Host (HTTP/1.1) or :authority (HTTP/2) from the URI.
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host.clone());
    }
    let path_and_query = if base_path.is_empty() {
        // The request's own path and query, shared rather than copied and parsed again.
        match parts.uri.path_and_query() {
            Some(pq) => pq.clone(),
            None => http::uri::PathAndQuery::from_static("/"),
        }
    } else {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        http::uri::PathAndQuery::try_from(format!("{base_path}{pq}"))
            .map_err(|e| format!("cannot build the upstream URI: {e}"))?
    };
    if host.is_some() {
        // A plain-HTTP upstream: the HTTP/1 pool writes the URI as is, so origin-form.
        parts.uri = Uri::from(path_and_query);
    } else {
        // hyper-util's client picks the connection by the absolute URI.
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(scheme.clone());
        uri.authority = Some(authority.clone());
        uri.path_and_query = Some(path_and_query);
        parts.uri =
            Uri::from_parts(uri).map_err(|e| format!("cannot build the upstream URI: {e}"))?;
    }
    // The pooled client picks HTTP/2 by ALPN; it refuses an HTTP/2 request on an HTTP/1
    // connection, so every request starts as HTTP/1.1.
    parts.version = Version::HTTP_11;
    Ok(())
}

/// How a failed upstream call is classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The request never reached the upstream.
    NotSent,
    /// The request was (maybe) sent; no response head came back.
    NoResponse,
    /// The client's request body failed while it was being sent (it was malformed, or the
    /// client stopped sending it): the upstream never received a whole request.
    ClientBody,
}

/// Whether `error` (or one of its causes) is hyper failing a request because the body it was
/// sending failed: an error of the client's request, not of the upstream.
fn client_body_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        // HTTP/1: hyper's only user error with a cause is the body's own error (`User::Body`).
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_user() && std::error::Error::source(h).is_some())
        {
            return true;
        }
        // HTTP/2: hyper resets the stream itself when the body fails, and the request then
        // fails with that reset, not the body's error. Its only other resets of a request
        // stream are when the caller drops the response future (which is then not polled to
        // see it) and CONNECT, which is not proxied.
        if e.downcast_ref::<h2::Error>()
            .is_some_and(|h| h.is_reset() && !h.is_remote() && !h.is_library())
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Classifies a client error (SPEC §6). `http2_only`: every connection speaks HTTP/2.
pub fn classify(error: &hyper_util::client::legacy::Error, http2_only: bool) -> Failure {
    if error.is_connect() {
        return Failure::NotSent;
    }
    if client_body_failed(error) {
        return Failure::ClientBody;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        // hyper cancels a request it never handed to the connection. Over HTTP/2 that means no
        // stream was opened for it, e.g. a GOAWAY arrived first: below our stream, so not
        // processed. Over HTTP/1 it would be an EOF before the request was written, which
        // SPEC §6 counts as "EOF before the head", maybe sent, so only HTTP/2 is told apart.
        if http2_only
            && e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
        {
            return Failure::NotSent;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // REFUSED_STREAM guarantees the stream was not processed (RFC 9113 §8.7); a
            // graceful GOAWAY (NO_ERROR) fails only streams above its last-stream-id, which the
            // server promises not to have processed.
            let refused = h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            let graceful_goaway =
                h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
            if refused || graceful_goaway {
                return Failure::NotSent;
            }
        }
        source = e.source();
    }
    Failure::NoResponse
}

/// `problem` as the forwarder's answer, telling the layer `hint`.
fn problem<B>(problem: Problem, hint: OutcomeHint) -> Response<ForwardBody<B>> {
    let mut r: Response<Full<Bytes>> = problem.into_response();
    r.extensions_mut().insert(hint);
    r.map(Either::Right)
}

impl<B> Service<Request<B>> for Forwarder<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ForwardBody<B>>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<ForwardBody<B>>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { Ok(forward(&shared, request).await) })
    }
}

async fn forward<B>(shared: &Shared<B>, request: Request<B>) -> Response<ForwardBody<B>>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    let client = parts.extensions.remove::<ClientAddr>();
    let may_protect = parts.extensions.get::<MayProtect>().is_some();
    let timeout = if may_protect {
        shared.hard_timeout
    } else {
        shared.soft_timeout
    };
    if let Err(e) = rewrite_head(
        &mut parts,
        &shared.scheme,
        &shared.authority,
        &shared.base_path,
        shared.host.as_ref(),
        client.as_ref(),
    ) {
        tracing::warn!(error = %e, "request not forwarded");
        return problem(
            Problem::new(ProblemKind::UpstreamUnreachable).with_status(StatusCode::BAD_GATEWAY),
            OutcomeHint::NotSent,
        );
    }
    let started = Instant::now();
    let request = Request::from_parts(parts, body);
    let sending = async {
        match &shared.connections {
            Connections::Plain(pool) => pool.send(request).await.map_err(|e| {
                let failure = match &e {
                    PoolError::Connect(_) => Failure::NotSent,
                    PoolError::Sent(e) if client_body_failed(e) => Failure::ClientBody,
                    PoolError::Sent(_) => Failure::NoResponse,
                };
                (failure, error_chain(&e))
            }),
            Connections::Client(client) => match client.request(request).await {
                Ok(response) => Ok(response.map(UpstreamBody::unpooled)),
                Err(e) => Err((classify(&e, shared.http2_only), error_chain(&e))),
            },
        }
    };
    let result = tokio::time::timeout(timeout, sending).await;
    let observe = |r: UpstreamResult| {
        if let Some(m) = &shared.metrics {
            m.upstream(r, started.elapsed());
        }
    };
    match result {
        Ok(Ok(response)) => {
            observe(UpstreamResult::Response);
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            Response::from_parts(parts, Either::Left(body))
        }
        Ok(Err((Failure::ClientBody, error))) if !may_protect => {
            // Only a request streamed through can meet it: a protected one's body is read
            // whole, and checked, before anything is forwarded.
            observe(UpstreamResult::ClientBodyFailed);
            tracing::debug!(%error, "the client's request body failed while it was forwarded");
            problem(
                Problem::new(ProblemKind::RequestBodyIncomplete).with_detail(
                    "The request body failed part-way (it was malformed, or stopped arriving) \
                     while it was forwarded; the upstream did not receive a complete request.",
                ),
                OutcomeHint::NotSent,
            )
        }
        Ok(Err((failure, error))) => match failure {
            Failure::NotSent => {
                observe(UpstreamResult::Unreachable);
                tracing::warn!(%error, "upstream unreachable; request not sent");
                problem(
                    Problem::new(ProblemKind::UpstreamUnreachable)
                        .with_status(StatusCode::BAD_GATEWAY),
                    OutcomeHint::NotSent,
                )
            }
            // Were a protected request's body to fail (it cannot), what the upstream made of
            // the part it got is unknown.
            Failure::NoResponse | Failure::ClientBody => {
                observe(UpstreamResult::NoResponse);
                tracing::warn!(%error, "upstream sent no response head; outcome unknown");
                problem(
                    Problem::new(ProblemKind::OutcomeUnknown).with_status(StatusCode::BAD_GATEWAY),
                    OutcomeHint::NoResponse,
                )
            }
        },
        Err(_) => {
            observe(UpstreamResult::Timeout);
            tracing::warn!(
                timeout = %crate::units::format_duration(timeout),
                "no upstream response head in time; outcome unknown"
            );
            problem(
                Problem::new(ProblemKind::OutcomeUnknown).with_status(StatusCode::GATEWAY_TIMEOUT),
                OutcomeHint::NoResponse,
            )
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn head(req: http::request::Builder) -> http::request::Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn rewrites_uri_and_forwarded_headers() {
        let mut parts = head(
            Request::post("/v1/pay?x=1")
                .header("host", "api.example.com")
                .header("connection", "keep-alive, x-secret-hop")
                .header("x-secret-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("upgrade", "h2c")
                .header("proxy-authorization", "Basic abc")
                .header("te", "trailers")
                .header("x-forwarded-for", "203.0.113.7")
                .header("authorization", "Bearer keep-me"),
        );
        let scheme = http::uri::Scheme::HTTP;
        let authority: http::uri::Authority = "127.0.0.1:3000".parse().unwrap();
        prepare_head(
            &mut parts,
            &scheme,
            &authority,
            "/base",
            Some(&ClientAddr::new("10.1.2.3:5555".parse().unwrap())),
        )
        .unwrap();
        assert_eq!(parts.uri, "http://127.0.0.1:3000/base/v1/pay?x=1");
        let h = &parts.headers;
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "upgrade",
            "proxy-authorization",
            "host",
        ] {
            assert!(h.get(gone).is_none(), "{gone} forwarded");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["authorization"], "Bearer keep-me");
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn only_a_trusted_proxy_reports_the_scheme_and_host() {
        let edge = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let forwarded = || {
            head(
                Request::post("/pay")
                    .header("host", "api.example.com")
                    .header("x-forwarded-proto", "https")
                    .header("x-forwarded-host", "shop.example")
                    .header("x-forwarded-for", "203.0.113.7"),
            )
        };
        let authority: http::uri::Authority = "127.0.0.1:3000".parse().unwrap();
        let rewrite = |parts: &mut http::request::Parts, peer: &str| {
            let client = ClientAddr::connected(peer.parse().unwrap(), &edge);
            prepare_head(
                parts,
                &http::uri::Scheme::HTTP,
                &authority,
                "",
                Some(&client),
            )
            .unwrap();
        };

        // The edge (10.0.0.5) terminated TLS for shop.example: the upstream learns that.
        let mut parts = forwarded();
        rewrite(&mut parts, "10.0.0.5:40000");
        assert_eq!(parts.headers["x-forwarded-proto"], "https");
        assert_eq!(parts.headers["x-forwarded-host"], "shop.example");
        assert_eq!(parts.headers["x-forwarded-for"], "203.0.113.7, 10.0.0.5");

        // The same claims from anyone else are replaced by what idemgate saw.
        let mut parts = forwarded();
        rewrite(&mut parts, "192.0.2.9:40000");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
        assert_eq!(parts.headers["x-forwarded-host"], "api.example.com");
        assert_eq!(parts.headers["x-forwarded-for"], "203.0.113.7, 192.0.2.9");

        // A trusted proxy that sends none gets them set.
        let mut parts = head(Request::post("/pay").header("host", "api.example.com"));
        rewrite(&mut parts, "10.0.0.5:40000");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
        assert_eq!(parts.headers["x-forwarded-host"], "api.example.com");
    }

    #[test]
    fn te_other_than_trailers_is_dropped_and_responses_lose_hop_headers() {
        let mut parts = head(Request::get("/").header("te", "gzip"));
        prepare_head(
            &mut parts,
            &http::uri::Scheme::HTTPS,
            &"up.example:443".parse().unwrap(),
            "",
            None,
        )
        .unwrap();
        assert!(parts.headers.get("te").is_none());
        assert!(parts.headers.get("x-forwarded-for").is_none());
        assert_eq!(parts.uri, "https://up.example:443/");

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));

        // The usual upstream answer, and the same with the `Keep-Alive` header it names, in
        // another case: only the message's own headers are left.
        for keep_alive_header in [false, true] {
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_static("Keep-Alive"));
            if keep_alive_header {
                h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            }
            h.insert("content-length", HeaderValue::from_static("2"));
            h.insert("x-request-id", HeaderValue::from_static("r1"));
            strip_hop_by_hop(&mut h, false);
            let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            left.sort_unstable();
            assert_eq!(left, ["content-length", "x-request-id"]);
        }

        // A length beside a transfer coding goes with the coding, on requests and responses.
        assert_eq!(HOP_BY_HOP[CONNECTION_INDEX], header::CONNECTION);
        assert_eq!(
            HOP_BY_HOP[TRANSFER_ENCODING_INDEX],
            header::TRANSFER_ENCODING
        );
        for keep_te_trailers in [false, true] {
            let mut h = HeaderMap::new();
            h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
            h.insert("content-length", HeaderValue::from_static("3"));
            h.insert("content-type", HeaderValue::from_static("text/plain"));
            strip_hop_by_hop(&mut h, keep_te_trailers);
            assert_eq!(h.len(), 1, "{h:?}");
            assert!(h.contains_key("content-type"));
        }
    }

    fn forwarder(upstream: &str, hard: Duration) -> Forwarder<Full<Bytes>> {
        Forwarder::new(
            ForwardConfig {
                upstream: upstream.parse().unwrap(),
                hard_timeout: hard,
                soft_timeout: hard,
                protocol: UpstreamProtocol::Auto,
            },
            None,
        )
        .unwrap()
    }

    async fn call(f: &mut Forwarder<Full<Bytes>>) -> Response<ForwardBody<Full<Bytes>>> {
        let mut req = Request::post("/charge")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        req.extensions_mut().insert(MayProtect);
        f.call(req).await.unwrap()
    }

    async fn problem_type(r: Response<ForwardBody<Full<Bytes>>>) -> String {
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["type"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn refused_connection_is_not_sent() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut f = forwarder(&format!("http://127.0.0.1:{port}"), Duration::from_secs(5));
        let r = call(&mut f).await;
        assert_eq!(r.status(), 502);
        assert_eq!(
            r.extensions().get::<OutcomeHint>(),
            Some(&OutcomeHint::NotSent)
        );
        assert!(problem_type(r).await.ends_with("/upstream-unreachable"));
    }

    #[tokio::test]
    async fn eof_before_the_head_is_no_response() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Read the request, then hang up without a response.
            for _ in 0..4 {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                drop(s);
            }
        });
        let mut f = forwarder(&format!("http://{addr}"), Duration::from_secs(5));
        let r = call(&mut f).await;
        assert_eq!(r.status(), 502);
        assert_eq!(
            r.extensions().get::<OutcomeHint>(),
            Some(&OutcomeHint::NoResponse)
        );
        assert!(problem_type(r).await.ends_with("/outcome-unknown"));
    }

    #[tokio::test]
    async fn no_head_by_the_hard_timeout_is_504_no_response() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        let mut f = forwarder(&format!("http://{addr}"), Duration::from_millis(300));
        let r = call(&mut f).await;
        assert_eq!(r.status(), 504);
        assert_eq!(
            r.extensions().get::<OutcomeHint>(),
            Some(&OutcomeHint::NoResponse)
        );
        assert!(problem_type(r).await.ends_with("/outcome-unknown"));
        server.abort();
    }

    #[tokio::test]
    async fn responses_stream_back_with_their_headers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let echo = req
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("host:"))
                .unwrap_or("")
                .to_owned();
            let body = echo.clone();
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 201 Created\r\ncontent-length: {}\r\nconnection: close\r\nx-up: 1\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        });
        let mut f = forwarder(&format!("http://{addr}"), Duration::from_secs(5));
        let r = call(&mut f).await;
        assert_eq!(r.status(), 201);
        assert!(r.extensions().get::<OutcomeHint>().is_none());
        assert_eq!(r.headers()["x-up"], "1");
        assert!(r.headers().get("connection").is_none());
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("host: {addr}").as_bytes());
    }
}
