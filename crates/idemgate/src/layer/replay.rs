//! What is stored of a response, and what a retry gets back (SPEC §6).

use std::io::Read;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::layer::body::ResponseBody;
use crate::policy::Policy;
use crate::problem::{Problem, ProblemKind};
use crate::record::{Outcome, ResponseHead, StoredProblemKind};

/// The header every replay carries.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

// Never stored: they describe one connection or one moment, or they are credentials.
const NEVER_STORED: &[&str] = &[
    "date",
    "age",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "set-cookie",
    // Recomputed from the stored body on replay (which may also be decoded).
    "content-length",
];

/// Whether idemgate leaves a response header of this (lowercase) name out of what it stores
/// (unless a route's policy names it in `header_allow`): it describes one connection or one
/// moment (`connection`, `date`), is recomputed on replay (`content-length`), or is a
/// credential (`set-cookie`). An operator's answer to an outcome-unknown record (the admin
/// API's `resolve`, which knows no route) is held to the same rule.
///
/// ```
/// assert!(idemgate::layer::never_replayed("content-length"));
/// assert!(!idemgate::layer::never_replayed("content-type"));
/// ```
pub fn never_replayed(name: &str) -> bool {
    NEVER_STORED.contains(&name)
}

/// Whether the response header `name` may be stored under `policy`. `connection_named` lists the
/// names the response's `Connection` header marks as hop-by-hop.
pub(crate) fn is_storable(name: &str, policy: &Policy, connection_named: &[String]) -> bool {
    if policy
        .header_allow
        .iter()
        .any(|a| a.eq_ignore_ascii_case(name))
    {
        return true;
    }
    !(never_replayed(name)
        || name.contains("token")
        || name.contains("secret")
        || connection_named.iter().any(|c| c == name)
        || policy
            .header_deny
            .iter()
            .any(|d| d.eq_ignore_ascii_case(name)))
}

/// The storable part of a response head, in order (SPEC §6): never `Date`, `Age`, hop-by-hop
/// headers and those named in `Connection`, `Set-Cookie`, names containing `token` or `secret`,
/// nor the policy's deny list; the policy's allow list overrides. For inner services that store
/// an outcome themselves (the PostgreSQL transactional mode).
pub fn storable_head(status: StatusCode, headers: &HeaderMap, policy: &Policy) -> ResponseHead {
    let connection_named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if is_storable(name.as_str(), policy, &connection_named) {
            out.push((
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            ));
        }
    }
    ResponseHead {
        status: status.as_u16(),
        headers: out,
    }
}

fn restore_headers(head: &ResponseHead, into: &mut HeaderMap) {
    for (name, value) in &head.headers {
        // Stored heads came from valid headers; a record that decodes but holds an invalid one
        // is skipped rather than failing the whole replay.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            into.append(n, v);
        }
    }
}

fn header_value<'a>(head: &'a ResponseHead, name: &str) -> Option<&'a Bytes> {
    head.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// Builds what a retry gets for a stored outcome. `request_headers` are the retry's.
pub(crate) async fn replay(
    outcome: &Outcome,
    request_headers: &HeaderMap,
    policy: &Policy,
) -> Response<ResponseBody> {
    let mut response = match outcome {
        Outcome::Response { head, body } => {
            let mut response = Response::new(ResponseBody::empty());
            *response.status_mut() =
                StatusCode::from_u16(head.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            restore_headers(head, response.headers_mut());
            let body =
                decode_if_unacceptable(response.headers_mut(), body, request_headers, policy).await;
            *response.body_mut() = ResponseBody::full(body);
            response
        }
        Outcome::BodyNotStored { head } => {
            let mut problem = Problem::new(ProblemKind::ResponseNotStored)
                .with_member("original_status", json!(head.status));
            for name in ["location", "content-location", "etag"] {
                if let Some(v) = header_value(head, name) {
                    if let Ok(text) = std::str::from_utf8(v) {
                        problem =
                            problem.with_member(name.replace('-', "_").as_str(), Value::from(text));
                    }
                    if let Ok(hv) = HeaderValue::from_bytes(v) {
                        problem = problem.with_header(HeaderName::from_static(name), hv);
                    }
                }
            }
            problem.into_response()
        }
        Outcome::BodyIncomplete { head } => Problem::new(ProblemKind::ResponseIncomplete)
            .with_member("original_status", json!(head.status))
            .into_response(),
        Outcome::Problem { kind, status } => {
            let kind = match kind {
                StoredProblemKind::OutcomeUnknown => ProblemKind::OutcomeUnknown,
                StoredProblemKind::HandlerFailed => ProblemKind::HandlerFailed,
            };
            let status = StatusCode::from_u16(*status).unwrap_or(kind.status());
            Problem::new(kind).with_status(status).into_response()
        }
    };
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

/// Decodes a stored body whose `Content-Encoding` the retry does not accept. A request without
/// `Accept-Encoding` is served identity: clients that do not ask for a coding (curl without
/// `--compressed`, most SDKs) usually cannot decode one.
async fn decode_if_unacceptable(
    headers: &mut HeaderMap,
    body: &Bytes,
    request_headers: &HeaderMap,
    policy: &Policy,
) -> Bytes {
    let Some(coding) = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
    else {
        return body.clone();
    };
    if coding == "identity" || accepts(request_headers, &coding) {
        return body.clone();
    }
    let limit = policy.max_decoded_replay;
    let decoded = if body.len() <= INLINE_DECODE {
        decode(&coding, body, limit)
    } else {
        // Inflating a large body would hold an executor thread for milliseconds.
        let (coding, body) = (coding.clone(), body.clone());
        tokio::task::spawn_blocking(move || decode(&coding, &body, limit))
            .await
            .ok()
            .flatten()
    };
    match decoded {
        Some(decoded) => {
            headers.remove(header::CONTENT_ENCODING);
            // A strong validator names the encoded representation; a decoded one is different.
            if headers
                .get(header::ETAG)
                .is_some_and(|etag| !etag.as_bytes().starts_with(b"W/"))
            {
                headers.remove(header::ETAG);
            }
            decoded
        }
        None => {
            tracing::warn!(
                coding,
                "stored body could not be decoded for a client that does not accept its coding; replaying it encoded"
            );
            body.clone()
        }
    }
}

/// Whether the request's `Accept-Encoding` accepts `coding` (RFC 9110 §12.5.3).
fn accepts(request_headers: &HeaderMap, coding: &str) -> bool {
    let mut any = false;
    let mut star: Option<bool> = None;
    for value in request_headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        any = true;
        for item in value.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q_zero = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .or_else(|| p.strip_prefix("Q="))
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            let same = name == coding
                || (coding == "x-gzip" && name == "gzip")
                || (coding == "gzip" && name == "x-gzip");
            if same {
                return !q_zero;
            }
            if name == "*" {
                star = Some(!q_zero);
            }
        }
    }
    any && star.unwrap_or(false)
}

/// Encoded bodies up to this size are decoded on the request's own task.
const INLINE_DECODE: usize = 16 * 1024;

fn decode(coding: &str, body: &[u8], limit: usize) -> Option<Bytes> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let read = match coding {
        "gzip" | "x-gzip" => flate2::read::MultiGzDecoder::new(body)
            .take(cap)
            .read_to_end(&mut out),
        "deflate" => {
            // RFC 9110 "deflate" is zlib-wrapped; some servers send raw deflate.
            let zlib = flate2::read::ZlibDecoder::new(body)
                .take(cap)
                .read_to_end(&mut out);
            if zlib.is_err() {
                out.clear();
                flate2::read::DeflateDecoder::new(body)
                    .take(cap)
                    .read_to_end(&mut out)
            } else {
                zlib
            }
        }
        "br" => brotli_decompressor::Decompressor::new(body, 4096)
            .take(cap)
            .read_to_end(&mut out),
        _ => return None,
    };
    match read {
        Ok(n) if n <= limit => Some(Bytes::from(out)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ae: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = ae {
            h.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
            );
        }
        h
    }

    #[test]
    fn accept_encoding_rules() {
        assert!(accepts(&req(Some("gzip, br")), "gzip"));
        assert!(accepts(&req(Some("br;q=1, *")), "gzip"));
        assert!(!accepts(&req(Some("gzip;q=0")), "gzip"));
        assert!(!accepts(&req(Some("identity")), "gzip"));
        assert!(!accepts(&req(None), "gzip"));
        assert!(!accepts(&req(Some("*;q=0")), "gzip"));
    }

    #[test]
    fn header_rules() {
        let p = Policy::default();
        for name in [
            "set-cookie",
            "date",
            "x-api-token",
            "client-secret",
            "transfer-encoding",
        ] {
            assert!(!is_storable(name, &p, &[]), "{name}");
        }
        for name in ["location", "link", "vary", "etag", "content-encoding"] {
            assert!(is_storable(name, &p, &[]), "{name}");
        }
        assert!(!is_storable("x-hop", &p, &["x-hop".into()]));
        let p = Policy {
            header_allow: vec!["x-csrf-token".into()],
            header_deny: vec!["x-internal".into()],
            ..Policy::default()
        };
        assert!(is_storable("x-csrf-token", &p, &[]));
        assert!(!is_storable("x-internal", &p, &[]));
    }

    #[test]
    fn decode_is_bounded() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = enc.write_all(&vec![b'a'; 100_000]);
        let gz = enc.finish().unwrap_or_default();
        assert_eq!(decode("gzip", &gz, 100_000).map(|b| b.len()), Some(100_000));
        assert_eq!(decode("gzip", &gz, 99_999), None);
        assert_eq!(decode("gzip", b"not gzip", 10), None);
    }
}
