//! Requests hyper's HTTP/1 parser refuses, answered with problem documents.
//!
//! A request head hyper cannot parse (bytes that are not HTTP, a malformed request line or
//! header field, a bad `Content-Length`, more header lines than it takes) never reaches
//! idemgate's service: hyper answers it itself with an empty 400, 414 or 431 and closes the
//! connection, and offers no hook to answer otherwise (hyperium/hyper#3911 proposes one).
//! SPEC §8 wants every answer of idemgate's own to be an RFC 9457 problem, so the client
//! stream ([`RefusalsAsProblems`]) rewrites that answer on its way out, keeping its status
//! line and date.
//!
//! hyper writes it as one buffer of a fixed shape: the status line, then exactly
//! `connection: close` (not over HTTP/1.0), `content-length: 0` and `date`. A response of the
//! service could only have that shape without a `Date` of its own and with an empty body,
//! which [`keep_distinguishable`] rules out, so the rewrite never touches an upstream's
//! answer. Anything else passes through untouched; were a hyper upgrade to change the shape,
//! clients would get hyper's empty answer again, and the black-box tests say so.
//!
//! Once written, a rewritten answer is counted as a rejected request and, with `--access-log`,
//! logged ([`RefusalReport`]), as the service does for the requests it refuses.
//!
//! HTTP/2 is not concerned: there, a stream hyper refuses is reset, not answered.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};
use idemgate::observe::{Observer, RequestOutcome};
use idemgate::problem::{Problem, ProblemKind};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::access_log::AccessLog;
use crate::metrics::Metrics;

/// The statuses hyper answers parse errors with (after `HTTP/1.x `), and the problem each
/// stands for.
const REFUSALS: [(&[u8], ProblemKind); 3] = [
    (b"400 Bad Request\r\n", ProblemKind::MalformedRequest),
    (b"414 URI Too Long\r\n", ProblemKind::UriTooLong),
    (
        b"431 Request Header Fields Too Large\r\n",
        ProblemKind::RequestHeadTooLarge,
    ),
];
const VERSION_LEN: usize = b"HTTP/1.1 ".len();
/// Over HTTP/1.1 hyper asks to close; over HTTP/1.0 (after a keep-alive request of that
/// version on the connection) closing goes without saying.
const CLOSE: &[u8] = b"connection: close\r\n";
/// What follows, up to the date's value.
const LENGTH_AND_DATE: &[u8] = b"content-length: 0\r\ndate: ";
/// An IMF-fixdate, as hyper writes it: `Tue, 08 Dec 2026 02:46:17 GMT`.
const DATE_LEN: usize = 29;
const END: &[u8] = b"\r\n\r\n";
/// No answer of hyper's to a parse error is longer (431's status line is the longest); a
/// longer write is never looked into.
const LONGEST: usize =
    VERSION_LEN + REFUSALS[2].0.len() + CLOSE.len() + LENGTH_AND_DATE.len() + DATE_LEN + END.len();

/// A problem response written in place of hyper's answer.
struct Replacement {
    answer: Vec<u8>,
    sent: usize,
    status: u16,
    body_bytes: u64,
}

/// The problem response that replaces `written`, if `written` is hyper's whole answer to a
/// request it could not parse.
fn replacement(written: &[u8]) -> Option<Replacement> {
    if written.len() > LONGEST || written.len() < VERSION_LEN {
        return None;
    }
    let (version, rest) = written.split_at(VERSION_LEN);
    if version != b"HTTP/1.1 " && version != b"HTTP/1.0 " {
        return None;
    }
    let (status_line, kind) = REFUSALS.iter().find(|(line, _)| rest.starts_with(line))?;
    let fields = &rest[status_line.len()..];
    let fields = if version == b"HTTP/1.1 " {
        fields.strip_prefix(CLOSE)?
    } else {
        fields
    };
    let date = fields.strip_prefix(LENGTH_AND_DATE)?.strip_suffix(END)?;
    if date.len() != DATE_LEN || !date.ends_with(b" GMT") || !date.is_ascii() {
        return None;
    }
    let problem: Response<bytes::Bytes> = Problem::new(*kind).into_response();
    let body = problem.body();
    let mut answer = Vec::with_capacity(LONGEST + 128 + body.len());
    answer.extend_from_slice(version);
    answer.extend_from_slice(status_line);
    for (name, value) in problem.headers() {
        answer.extend_from_slice(name.as_str().as_bytes());
        answer.extend_from_slice(b": ");
        answer.extend_from_slice(value.as_bytes());
        answer.extend_from_slice(b"\r\n");
    }
    answer.extend_from_slice(CLOSE);
    answer.extend_from_slice(b"content-length: ");
    answer.extend_from_slice(body.len().to_string().as_bytes());
    answer.extend_from_slice(b"\r\ndate: ");
    answer.extend_from_slice(date);
    answer.extend_from_slice(END);
    answer.extend_from_slice(body);
    Some(Replacement {
        answer,
        sent: 0,
        status: kind.status().as_u16(),
        body_bytes: body.len() as u64,
    })
}

/// Makes sure `response` cannot be mistaken for hyper's answer to a parse error (see the
/// module's documentation). hyper writes a response's own fields first, then `connection`,
/// `content-length` (skipping the map's when the body is empty) and, last, `date` when the
/// response has none; so a response of the service with a status hyper answers parse errors
/// with gets its `Date` now, as a field of its own, which hyper then writes ahead of the rest.
/// The client receives the same fields as without it.
pub fn keep_distinguishable<B>(response: &mut Response<B>) {
    if matches!(
        response.status(),
        StatusCode::BAD_REQUEST
            | StatusCode::URI_TOO_LONG
            | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    ) && !response.headers().contains_key(header::DATE)
    {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        if let Ok(date) = HeaderValue::from_str(&now) {
            response.headers_mut().insert(header::DATE, date);
        }
    }
}

/// Where a refused head is counted (`requests_total{outcome="rejected"}`) and logged, like
/// every other refused request.
pub struct RefusalReport {
    /// The client's address.
    pub client: SocketAddr,
    /// The proxy's metrics.
    pub metrics: Arc<Metrics>,
    /// The access log, with `--access-log`.
    pub access_log: Option<Arc<AccessLog>>,
}

impl RefusalReport {
    fn refused(&self, status: u16, body_bytes: u64) {
        self.metrics.request(RequestOutcome::Rejected);
        if let Some(log) = &self.access_log {
            log.refused_head(self.client, status, body_bytes);
        }
    }
}

/// A client connection's stream whose writes carry problem documents where hyper would
/// answer a request it could not parse with an empty response.
pub struct RefusalsAsProblems<S> {
    stream: S,
    /// The problem response being written in place of hyper's answer.
    replacing: Option<Replacement>,
    report: RefusalReport,
}

impl<S> RefusalsAsProblems<S> {
    /// `stream`, with hyper's answers to parse errors rewritten, each reported to `report`
    /// once written.
    pub fn new(stream: S, report: RefusalReport) -> Self {
        RefusalsAsProblems {
            stream,
            replacing: None,
            report,
        }
    }
}

impl<S: AsyncWrite + Unpin> RefusalsAsProblems<S> {
    /// Writes the rest of the replacement; ready once all of it is written. hyper writes the
    /// same buffer again after `Pending`, and is told all of it went out only at the end.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(r) = &mut self.replacing {
            if r.sent == r.answer.len() {
                self.report.refused(r.status, r.body_bytes);
                self.replacing = None;
                break;
            }
            match ready!(Pin::new(&mut self.stream).poll_write(cx, &r.answer[r.sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => r.sent += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RefusalsAsProblems<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RefusalsAsProblems<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replacing.is_none() {
            match replacement(buf) {
                Some(answer) => self.replacing = Some(answer),
                None => return Pin::new(&mut self.stream).poll_write(cx, buf),
            }
        }
        ready!(self.poll_replacement(cx))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.replacing.is_none() {
            let mut written = bufs.iter().filter(|b| !b.is_empty());
            let answer = match (written.next(), written.next()) {
                (Some(only), None) => replacement(only),
                _ => None,
            };
            match answer {
                Some(answer) => self.replacing = Some(answer),
                None => return Pin::new(&mut self.stream).poll_write_vectored(cx, bufs),
            }
        }
        ready!(self.poll_replacement(cx))?;
        Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const DATE: &str = "Tue, 08 Dec 2026 02:46:17 GMT";

    /// hyper's answer to a parse error: over HTTP/1.1 it asks to close, over HTTP/1.0 not.
    fn hypers_answer(status_line: &str) -> Vec<u8> {
        let close = if status_line.starts_with("HTTP/1.1") {
            "connection: close\r\n"
        } else {
            ""
        };
        format!("{status_line}\r\n{close}content-length: 0\r\ndate: {DATE}\r\n\r\n").into_bytes()
    }

    fn parsed(answer: &[u8]) -> (String, serde_json::Value) {
        let text = String::from_utf8_lossy(answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no head end: {text}"));
        let body: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        (head.to_owned(), body)
    }

    #[test]
    fn each_of_hypers_answers_becomes_its_problem() {
        for (status_line, status, slug) in [
            ("HTTP/1.1 400 Bad Request", 400, "malformed-request"),
            ("HTTP/1.1 414 URI Too Long", 414, "uri-too-long"),
            (
                "HTTP/1.1 431 Request Header Fields Too Large",
                431,
                "request-head-too-large",
            ),
            // After an HTTP/1.0 keep-alive request on the same connection.
            ("HTTP/1.0 400 Bad Request", 400, "malformed-request"),
        ] {
            let answer = replacement(&hypers_answer(status_line))
                .unwrap_or_else(|| panic!("{status_line} not recognised"))
                .answer;
            let (head, body) = parsed(&answer);
            let declared = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap_or_else(|| panic!("{head}"));
            let body_len = answer.len() - head.len() - 4;
            assert_eq!(declared, body_len.to_string(), "{head}");
            assert!(head.starts_with(status_line), "{head}");
            for field in [
                "content-type: application/problem+json",
                "connection: close",
                &format!("date: {DATE}"),
            ] {
                assert!(head.lines().any(|l| l == field), "{field} missing: {head}");
            }
            assert_eq!(body["status"], status);
            assert_eq!(
                body["type"],
                format!("{}{slug}", idemgate::problem::TYPE_PREFIX)
            );
        }
    }

    #[test]
    fn anything_else_is_left_alone() {
        let others: Vec<Vec<u8>> = vec![
            // Another status, another field, a body, field orders hyper gives a response of
            // the service (its own fields first, `Date` among them), HTTP/1.0 with a close,
            // a cut-off date.
            hypers_answer("HTTP/1.1 404 Not Found"),
            hypers_answer("HTTP/1.1 400 Bad Request")
                .iter()
                .copied()
                .chain(*b"{}")
                .collect(),
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: {DATE}\r\n\r\n").into_bytes(),
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\nserver: x\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n").into_bytes(),
            format!("HTTP/1.0 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n").into_bytes(),
            format!("HTTP/1.0 400 Bad Request\r\ndate: {DATE}\r\ncontent-length: 0\r\n\r\n").into_bytes(),
            format!("HTTP/1.1 400 Bad Request\r\ndate: {DATE}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").into_bytes(),
            format!("HTTP/2.0 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n").into_bytes(),
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue\r\n\r\n".to_vec(),
            b"HTTP/1.1 400".to_vec(),
            Vec::new(),
        ];
        for written in others {
            assert!(
                replacement(&written).is_none(),
                "{}",
                String::from_utf8_lossy(&written)
            );
        }
    }

    #[test]
    fn a_refusal_status_without_a_date_gets_one() {
        let response = |status: u16| {
            http::Response::builder()
                .status(status)
                .body(())
                .unwrap_or_else(|e| panic!("{e}"))
        };
        for status in [400, 414, 431] {
            let mut r = response(status);
            keep_distinguishable(&mut r);
            let date = r.headers()[header::DATE].to_str().unwrap_or_default();
            assert!(
                httpdate::parse_http_date(date).is_ok(),
                "{status}: {date:?}"
            );
        }
        for status in [200, 204, 404, 413] {
            let mut r = response(status);
            keep_distinguishable(&mut r);
            assert!(r.headers().is_empty(), "{status}");
        }
        let mut dated = response(400);
        dated
            .headers_mut()
            .insert(header::DATE, HeaderValue::from_static(DATE));
        keep_distinguishable(&mut dated);
        assert_eq!(dated.headers()[header::DATE], DATE);
        assert_eq!(dated.headers().len(), 1);
    }

    /// A stream that takes at most `per_write` bytes per write, and is `Pending` every other
    /// time, as a slow client's socket is.
    struct Trickle {
        taken: Vec<u8>,
        per_write: usize,
        pending_next: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.pending_next = !self.pending_next;
            if !self.pending_next {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.per_write);
            self.taken.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn report() -> RefusalReport {
        RefusalReport {
            client: SocketAddr::from(([127, 0, 0, 1], 4000)),
            metrics: Arc::new(Metrics::new()),
            access_log: None,
        }
    }

    #[tokio::test]
    async fn the_replacement_goes_out_whole_through_short_writes() {
        let mut stream = RefusalsAsProblems::new(
            Trickle {
                taken: Vec::new(),
                per_write: 7,
                pending_next: false,
            },
            report(),
        );
        let answer = hypers_answer("HTTP/1.1 431 Request Header Fields Too Large");
        // hyper is told its whole buffer went out, in one write.
        let n = stream
            .write(&answer)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, answer.len());
        stream.flush().await.unwrap_or_else(|e| panic!("{e}"));
        let (head, body) = parsed(&stream.stream.taken);
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert_eq!(body["status"], 431);

        // Later writes pass through as they are.
        let mut plain = RefusalsAsProblems::new(
            Trickle {
                taken: Vec::new(),
                per_write: 7,
                pending_next: false,
            },
            report(),
        );
        plain
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.stream.taken, b"HTTP/1.1 200 OK\r\n\r\n");
    }
}
