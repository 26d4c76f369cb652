//! Limits on a request's head (its target and header fields), answered with problem responses.
//!
//! hyper enforces limits of its own while parsing and answers past them itself, before any
//! request exists. idemgate's size limits sit below hyper's, so a head that is merely too large
//! is parsed and then refused here with an RFC 9457 problem, counted and logged like every
//! other refused request. Past hyper's own, larger limits (and for bytes that are not HTTP at
//! all) hyper answers, [`crate::parser_refusals`] turns its empty answer into a problem, and
//! it is counted and logged as a rejected request with what is known of it.
//! The number of header lines is left to hyper (at most 100 over HTTP/1.1): raising its limit
//! past that makes it allocate the parser's header table on the heap for every request.

use http::request::Parts;
use idemgate::problem::ProblemKind;

/// Longest request target (path and query, plus the authority of an absolute-form target).
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Largest total size of the header fields, each counted as `name: value` plus its line end.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// hyper's HTTP/1.1 read buffer, which bounds the whole head it will parse: above our limits,
/// so that ours are the ones clients meet, and below hyper's default (~408 KiB), which bounds
/// the memory a client can make a connection hold with a head that never ends.
pub(crate) const PARSER_MAX_BUFFER: usize = 4 * MAX_HEADER_BYTES;
/// The header list size HTTP/2 clients are told to stay under (hyper's default, 16 KiB, is
/// below ours). HTTP/2 counts 32 bytes per field over its name and value: 256 KiB leaves room
/// for every head within our limits.
pub(crate) const PARSER_MAX_HEADER_LIST: u32 = 4 * MAX_HEADER_BYTES as u32;

/// The problem a request's head is refused with, if it is over a limit.
pub fn refusal(parts: &Parts) -> Option<ProblemKind> {
    let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len());
    if target > MAX_TARGET_BYTES {
        return Some(ProblemKind::UriTooLong);
    }
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (header_bytes > MAX_HEADER_BYTES).then_some(ProblemKind::RequestHeadTooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, String)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (n, v) in headers {
            b = b.header(*n, v.as_str());
        }
        b.body(())
            .map(|r| r.into_parts().0)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn limits_are_inclusive_and_each_is_checked() {
        let path = |n: usize| format!("/{}", "a".repeat(n - 1));
        assert_eq!(refusal(&parts(&path(MAX_TARGET_BYTES), &[])), None);
        assert_eq!(
            refusal(&parts(&path(MAX_TARGET_BYTES + 1), &[])),
            Some(ProblemKind::UriTooLong)
        );
        let query = format!("/?q={}", "b".repeat(MAX_TARGET_BYTES));
        assert_eq!(refusal(&parts(&query, &[])), Some(ProblemKind::UriTooLong));

        // "cookie: " + value + CRLF: exactly at the limit, then one byte over; many small
        // fields count alike.
        let fits = MAX_HEADER_BYTES - "cookie".len() - 4;
        assert_eq!(refusal(&parts("/", &[("cookie", "c".repeat(fits))])), None);
        assert_eq!(
            refusal(&parts("/", &[("cookie", "c".repeat(fits + 1))])),
            Some(ProblemKind::RequestHeadTooLarge)
        );
        let field = ("x-a", "v".repeat(1000));
        let many: Vec<(&str, String)> = (0..70).map(|_| field.clone()).collect();
        assert_eq!(
            refusal(&parts("/", &many)),
            Some(ProblemKind::RequestHeadTooLarge)
        );
    }
}
