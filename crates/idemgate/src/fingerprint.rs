//! Request fingerprints (SPEC §3).
//!
//! A retry must be the same request as the first attempt; the fingerprint is how idemgate
//! tells. It is SHA-256 over, each length-prefixed so no two different requests can line up
//! into the same byte stream:
//!
//! 1. the method,
//! 2. the path,
//! 3. the query string, raw as sent (an absent query differs from an empty one, `/a?`),
//! 4. every `Content-Type` value (none when absent: an absent header differs from an empty
//!    one),
//! 5. for each header named in [`FingerprintOptions::headers`], in that order: its name and
//!    all its values in order,
//! 6. the body: its bytes, or with [`FingerprintOptions::json`] its RFC 8785 canonical form
//!    after removing the members at the configured JSON pointers. A body that is not JSON
//!    (or not I-JSON: duplicate member names, numbers out of the IEEE 754 range, lone
//!    surrogates) falls back to its bytes under a different tag, so it never equals a JSON
//!    body's canonical form.
//!
//! Byte mode allocates nothing: every field goes straight into the hasher.
//!
//! ```
//! use idemgate::fingerprint::{fingerprint, FingerprintOptions, JsonFingerprint};
//!
//! let (parts, _) = http::Request::post("/orders").body(()).unwrap().into_parts();
//! let bytes = FingerprintOptions::default();
//! let json = FingerprintOptions {
//!     json: Some(JsonFingerprint { ignore: vec!["/sent_at".into()] }),
//!     ..FingerprintOptions::default()
//! };
//! let a = br#"{"amount": 100, "currency": "eur", "sent_at": 1}"#;
//! let b = br#"{"currency":"eur","amount":1e2,"sent_at":2}"#;
//! assert_ne!(fingerprint(&parts, a, &bytes), fingerprint(&parts, b, &bytes));
//! assert_eq!(fingerprint(&parts, a, &json), fingerprint(&parts, b, &json));
//! ```

use std::fmt;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, request::Parts};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use crate::record::Fingerprint;

/// Versions the byte layout below: a change to it must change this tag, so fingerprints of
/// different layouts never compare equal by accident.
const DOMAIN: &[u8] = b"idemgate/fingerprint/v1\0";
/// Precedes a body hashed as its raw bytes.
const BODY_BYTES: u8 = b'B';
/// Precedes a body hashed as canonical JSON.
const BODY_JSON: u8 = b'J';

/// What a fingerprint covers besides method, path, query, `Content-Type` and body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FingerprintOptions {
    /// Extra request headers (e.g. `Host`, `API-Version`).
    pub headers: Vec<HeaderName>,
    /// Compare JSON bodies canonically (RFC 8785) instead of byte for byte.
    pub json: Option<JsonFingerprint>,
}

/// JSON-canonical body comparison.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonFingerprint {
    /// JSON pointers (RFC 6901) of members left out, e.g. `/client_timestamp`.
    ///
    /// A pointer whose target does not exist removes nothing. A pointer to an array element
    /// removes that element; pointers are applied in the order listed, so a later pointer into
    /// the same array sees the shifted indices. Check configured pointers with
    /// [`check_json_pointer`].
    pub ignore: Vec<String>,
}

/// Whether `pointer` is a JSON pointer that [`JsonFingerprint::ignore`] can use: it starts
/// with `/` and every `~` is followed by `0` or `1` (RFC 6901). The empty pointer (the whole
/// document) is refused: ignoring the whole body would make every body match.
pub fn check_json_pointer(pointer: &str) -> Result<(), &'static str> {
    if pointer.is_empty() {
        return Err("the empty JSON pointer would ignore the whole body");
    }
    if !pointer.starts_with('/') {
        return Err("a JSON pointer starts with '/'");
    }
    let mut bytes = pointer.bytes();
    while let Some(b) = bytes.next() {
        if b == b'~' && !matches!(bytes.next(), Some(b'0' | b'1')) {
            return Err("'~' in a JSON pointer must be followed by '0' or '1'");
        }
    }
    Ok(())
}

/// The fingerprint of a request.
pub fn fingerprint(parts: &Parts, body: &[u8], options: &FingerprintOptions) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    field(&mut h, parts.method.as_str().as_bytes());
    field(&mut h, parts.uri.path().as_bytes());
    match parts.uri.query() {
        None => h.update([0]),
        Some(q) => {
            h.update([1]);
            field(&mut h, q.as_bytes());
        }
    }
    header_values(&mut h, &parts.headers, &CONTENT_TYPE);
    // The count keeps `headers: [a]` with two values apart from `headers: [a, b]`.
    h.update((options.headers.len() as u64).to_be_bytes());
    for name in &options.headers {
        field(&mut h, name.as_str().as_bytes());
        header_values(&mut h, &parts.headers, name);
    }
    let canonical = options
        .json
        .as_ref()
        .and_then(|j| parse_json(body, &j.ignore));
    match canonical {
        Some(value) => {
            h.update([BODY_JSON]);
            // The body is the last field, so its canonical form needs no length prefix.
            write_value(&mut h, &value);
        }
        None => {
            h.update([BODY_BYTES]);
            field(&mut h, body);
        }
    }
    Fingerprint(h.finalize().into())
}

/// The RFC 8785 canonical form of a JSON body with the members at `ignore` removed, or `None`
/// when the body is not I-JSON. This is what JSON-mode fingerprints hash; it is public so the
/// effect of a configuration can be seen.
pub fn canonical_json(body: &[u8], ignore: &[String]) -> Option<Vec<u8>> {
    let value = parse_json(body, ignore)?;
    let mut out = Vec::with_capacity(body.len());
    write_value(&mut out, &value);
    Some(out)
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// All values of `name` in order, preceded by their count, so an absent header (0) differs
/// from an empty one (1, then a zero length).
fn header_values(h: &mut Sha256, headers: &HeaderMap, name: &HeaderName) {
    let values = headers.get_all(name);
    h.update((values.iter().count() as u64).to_be_bytes());
    for v in values {
        field(h, v.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// RFC 8785 (JCS)
//
// Implemented here rather than taken from a crate: the JCS crates serialize a
// `serde_json::Value`, which has already dropped duplicate member names (so `{"a":1,"a":2}`
// would match `{"a":2}` even though an upstream may read the first) and keeps integers beyond
// 2^53 exact where RFC 8785 requires their IEEE 754 value. Number formatting, the only subtle
// part, is the ECMAScript algorithm from `ryu-js`.

/// A parsed I-JSON value in canonical order.
enum Json {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    /// Members sorted by their names' UTF-16 code units, names unique.
    Object(Vec<(String, Json)>),
}

fn parse_json(body: &[u8], ignore: &[String]) -> Option<Json> {
    // serde_json stops nesting at 128 levels, which bounds the recursion below as well.
    let mut value: Json = serde_json::from_slice(body).ok()?;
    for pointer in ignore {
        remove_pointer(&mut value, pointer);
    }
    Some(value)
}

fn utf16_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }

    // RFC 8785 §3.2.2.3: numbers are IEEE 754 doubles; larger integers round like JS would.
    #[allow(clippy::cast_precision_loss)]
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Number(v as f64))
    }

    #[allow(clippy::cast_precision_loss)]
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Number(v as f64))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        if v.is_finite() {
            Ok(Json::Number(v))
        } else {
            Err(E::custom("number out of range"))
        }
    }

    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut members: Vec<(String, Json)> = Vec::new();
        while let Some((k, v)) = map.next_entry()? {
            members.push((k, v));
        }
        members.sort_by(|a, b| utf16_cmp(&a.0, &b.0));
        // I-JSON (RFC 7493) forbids duplicate names; parsers disagree on which one wins, so a
        // body with duplicates is compared byte for byte instead.
        if members.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(de::Error::custom("duplicate member name"));
        }
        Ok(Json::Object(members))
    }
}

/// Removes the value at an RFC 6901 pointer; anything that does not resolve removes nothing.
fn remove_pointer(root: &mut Json, pointer: &str) {
    let Some(rest) = pointer.strip_prefix('/') else {
        return;
    };
    let mut tokens = rest.split('/').peekable();
    let mut node = root;
    while let Some(raw) = tokens.next() {
        let token = unescape_token(raw);
        let last = tokens.peek().is_none();
        match node {
            Json::Object(members) => {
                let Ok(i) = members.binary_search_by(|(k, _)| utf16_cmp(k, &token)) else {
                    return;
                };
                if last {
                    members.remove(i);
                    return;
                }
                node = &mut members[i].1;
            }
            Json::Array(items) => {
                let Some(i) = array_index(&token).filter(|&i| i < items.len()) else {
                    return;
                };
                if last {
                    items.remove(i);
                    return;
                }
                node = &mut items[i];
            }
            _ => return,
        }
    }
}

/// `~1` is `/` and `~0` is `~`, decoded in that order (RFC 6901 §4).
fn unescape_token(raw: &str) -> std::borrow::Cow<'_, str> {
    if raw.contains('~') {
        raw.replace("~1", "/").replace("~0", "~").into()
    } else {
        raw.into()
    }
}

/// RFC 6901 array indices: `0` or a digit string without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    let digits = token.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits.len() > 1 && digits[0] == b'0' {
        return None;
    }
    token.parse().ok()
}

/// Where canonical bytes go: the hasher on the hot path, a buffer for [`canonical_json`].
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

fn write_value(out: &mut impl Sink, value: &Json) {
    match value {
        Json::Null => out.put(b"null"),
        Json::Bool(true) => out.put(b"true"),
        Json::Bool(false) => out.put(b"false"),
        Json::Number(n) => write_number(out, *n),
        Json::String(s) => write_string(out, s),
        Json::Array(items) => {
            out.put(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                write_value(out, item);
            }
            out.put(b"]");
        }
        Json::Object(members) => {
            out.put(b"{");
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                write_string(out, k);
                out.put(b":");
                write_value(out, v);
            }
            out.put(b"}");
        }
    }
}

/// ECMAScript `Number.prototype.toString` (RFC 8785 §3.2.2.3); `-0` is `0`.
fn write_number(out: &mut impl Sink, n: f64) {
    if n == 0.0 {
        out.put(b"0");
        return;
    }
    let mut buf = ryu_js::Buffer::new();
    out.put(buf.format_finite(n).as_bytes());
}

/// RFC 8785 §3.2.2.2: only `"`, `\` and the C0 controls are escaped, with the short forms
/// where JSON has them and lower-case `\u00xx` otherwise; everything else is raw UTF-8.
fn write_string(out: &mut impl Sink, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.put(b"\"");
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => &[],
            _ => continue,
        };
        out.put(&bytes[start..i]);
        if short.is_empty() {
            out.put(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.put(short);
        }
        start = i + 1;
    }
    out.put(&bytes[start..]);
    out.put(b"\"");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn canon(body: &str) -> String {
        String::from_utf8(canonical_json(body.as_bytes(), &[]).expect("valid JSON")).unwrap()
    }

    fn canon_ignoring(body: &str, ignore: &[&str]) -> String {
        let ignore: Vec<String> = ignore.iter().map(|s| s.to_string()).collect();
        String::from_utf8(canonical_json(body.as_bytes(), &ignore).unwrap()).unwrap()
    }

    fn json_opts(ignore: &[&str]) -> FingerprintOptions {
        FingerprintOptions {
            headers: vec![],
            json: Some(JsonFingerprint {
                ignore: ignore.iter().map(|s| s.to_string()).collect(),
            }),
        }
    }

    #[test]
    fn rfc8785_main_example() {
        // RFC 8785 §3.2.2 / §3.2.3.
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        let want = concat!(
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"#,
            r#""string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
        assert_eq!(canon(input), want);
    }

    #[test]
    fn rfc8785_sorting_by_utf16() {
        // RFC 8785 §3.2.3: "\ud83d\ude00" (U+1F600) sorts before U+FB33 by UTF-16 code units,
        // though after it by code points.
        let input = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let want = concat!(
            r#"{"\r":"Carriage Return","1":"One","#,
            "\"\u{80}\":\"Control\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",",
            "\"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",",
            "\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
        assert_eq!(canon(input), want);
    }

    #[test]
    fn rfc8785_numbers() {
        // RFC 8785 Appendix B: IEEE 754 bit patterns and their ECMAScript form.
        let cases: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for &(bits, want) in cases {
            let mut out = Vec::new();
            write_number(&mut out, f64::from_bits(bits));
            assert_eq!(String::from_utf8(out).unwrap(), want, "bits {bits:#018x}");
            // And parsing the canonical text gives the same number back.
            assert_eq!(canon(want), want, "round trip of {want}");
        }
    }

    #[test]
    fn number_spellings() {
        for (input, want) in [
            ("1e21", "1e+21"),
            ("1E21", "1e+21"),
            ("1000000000000000000000", "1e+21"),
            ("1E-7", "1e-7"),
            ("0.0000001", "1e-7"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("0e10", "0"),
            ("333333333.33333329", "333333333.3333333"),
            ("4.50", "4.5"),
            ("100", "100"),
            ("1e2", "100"),
            ("-1", "-1"),
            ("9007199254740993", "9007199254740992"),
            ("18446744073709551615", "18446744073709552000"),
            ("123456789012345678901234567890", "1.2345678901234568e+29"),
            ("-9223372036854775808", "-9223372036854776000"),
        ] {
            assert_eq!(canon(input), want, "input {input}");
        }
    }

    #[test]
    fn strings_escape_minimally() {
        assert_eq!(
            canon(r#""\u0000\u001f\u007f\/é\ud83d\ude00""#),
            "\"\\u0000\\u001f\u{7f}/é😀\""
        );
        assert_eq!(canon(r#""\b\f\n\r\t""#), r#""\b\f\n\r\t""#);
        assert_eq!(canon(r#""\u00e9""#), "\"é\"");
    }

    #[test]
    fn not_i_json_falls_back() {
        for body in [
            &b""[..],
            b"   ",
            b"{",
            b"{\"a\":1}x",
            b"\xef\xbb\xbf{}",
            b"{\"a\":1,\"a\":2}",
            b"1e400",
            b"\"\\ud800\"",
            b"[1,]",
            b"NaN",
            b"\"\xff\"",
        ] {
            assert!(
                canonical_json(body, &[]).is_none(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let nested = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(canonical_json(nested.as_bytes(), &[]).is_none());
        assert!(canonical_json(b" {\"a\" : [ 1 , 2 ] } \n", &[]).is_some());
    }

    #[test]
    fn fallback_differs_from_every_json_form() {
        let p = parts("POST", "/a", &[]);
        let opts = json_opts(&[]);
        // The raw bytes of a non-JSON body equal the canonical text of a JSON body: the tag
        // still tells them apart.
        let not_json = br#"{"a":1,"a":1}"#;
        let json = br#"{"a":1}"#;
        assert_ne!(
            fingerprint(&p, not_json, &opts),
            fingerprint(&p, json, &opts)
        );
        let raw_canonical = canonical_json(json, &[]).unwrap();
        assert_eq!(raw_canonical, json);
        // The same bytes hashed in byte mode and in JSON mode differ too.
        assert_ne!(
            fingerprint(&p, json, &FingerprintOptions::default()),
            fingerprint(&p, json, &opts)
        );
        // A fallback body is its bytes: JSON mode and byte mode agree on them.
        assert_eq!(
            fingerprint(&p, not_json, &FingerprintOptions::default()),
            fingerprint(&p, not_json, &opts)
        );
    }

    #[test]
    fn json_mode_ignores_layout_byte_mode_does_not() {
        let p = parts("POST", "/orders", &[("content-type", "application/json")]);
        let a = br#"{"amount":100,"items":[{"sku":"x","qty":1}],"currency":"eur"}"#;
        let b = b"{ \"currency\" : \"eur\",\n  \"items\": [ {\"qty\": 1.0, \"sku\": \"x\"} ],\n  \"amount\": 1e2 }\n";
        let c = br#"{"amount":100,"items":[{"sku":"x","qty":2}],"currency":"eur"}"#;
        let d = br#"{"amount":100,"items":[{"qty":1},{"sku":"x"}],"currency":"eur"}"#;
        let json = json_opts(&[]);
        let bytes = FingerprintOptions::default();
        assert_eq!(fingerprint(&p, a, &json), fingerprint(&p, b, &json));
        assert_ne!(fingerprint(&p, a, &bytes), fingerprint(&p, b, &bytes));
        assert_ne!(fingerprint(&p, a, &json), fingerprint(&p, c, &json));
        assert_ne!(
            fingerprint(&p, a, &json),
            fingerprint(&p, d, &json),
            "array order counts"
        );
    }

    #[test]
    fn ignored_pointers() {
        let p = parts("POST", "/orders", &[]);
        let opts = json_opts(&[
            "/sent_at",
            "/meta/a~1b",
            "/meta/t~0",
            "/lines/0/nonce",
            "/nope/x",
        ]);
        let a = br#"{"amount":1,"sent_at":1,"meta":{"a/b":1,"t~":1,"keep":1},"lines":[{"nonce":1,"q":1}]}"#;
        let b = br#"{"amount":1,"sent_at":2,"meta":{"a/b":2,"t~":2,"keep":1},"lines":[{"nonce":2,"q":1}]}"#;
        let c = br#"{"amount":1,"meta":{"keep":1},"lines":[{"q":1}]}"#;
        let d = br#"{"amount":2,"sent_at":1,"meta":{"a/b":1,"t~":1,"keep":1},"lines":[{"nonce":1,"q":1}]}"#;
        let e = br#"{"amount":1,"sent_at":1,"meta":{"a/b":1,"t~":1,"keep":2},"lines":[{"nonce":1,"q":1}]}"#;
        assert_eq!(fingerprint(&p, a, &opts), fingerprint(&p, b, &opts));
        assert_eq!(fingerprint(&p, a, &opts), fingerprint(&p, c, &opts));
        assert_ne!(fingerprint(&p, a, &opts), fingerprint(&p, d, &opts));
        assert_ne!(fingerprint(&p, a, &opts), fingerprint(&p, e, &opts));
        // Without the pointers they differ.
        let plain = json_opts(&[]);
        assert_ne!(fingerprint(&p, a, &plain), fingerprint(&p, b, &plain));
    }

    #[test]
    fn pointer_edge_cases() {
        let doc = r#"{"a":[1,2,3],"":{"x":1},"b":{"c":1}}"#;
        assert_eq!(
            canon_ignoring(doc, &["/a/1"]),
            r#"{"":{"x":1},"a":[1,3],"b":{"c":1}}"#
        );
        assert_eq!(
            canon_ignoring(doc, &["/a/0", "/a/0"]),
            r#"{"":{"x":1},"a":[3],"b":{"c":1}}"#
        );
        assert_eq!(
            canon_ignoring(doc, &["//x"]),
            r#"{"":{},"a":[1,2,3],"b":{"c":1}}"#
        );
        for no_op in [
            "/a/3", "/a/01", "/a/-", "/a/x", "/b/c/d", "/zz", "", "a", "/b/",
        ] {
            assert_eq!(
                canon_ignoring(doc, &[no_op]),
                canon(doc),
                "pointer {no_op:?}"
            );
        }
        assert_eq!(canon_ignoring("[1,2]", &["/0"]), "[2]");
        assert_eq!(canon_ignoring("7", &["/0"]), "7");
    }

    #[test]
    fn pointer_check() {
        for ok in ["/a", "/a/0", "/", "//", "/a~0b", "/a~1b"] {
            assert_eq!(check_json_pointer(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a", "/a~", "/a~2", "~1"] {
            assert!(check_json_pointer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_covered_field_counts() {
        let base = parts(
            "POST",
            "/a/b?x=1&y=2",
            &[("content-type", "application/json")],
        );
        let fp = |p: &Parts, body: &[u8]| fingerprint(p, body, &FingerprintOptions::default());
        let f0 = fp(&base, b"{}");
        assert_eq!(f0, fp(&base.clone(), b"{}"), "deterministic");
        let variants = [
            fp(
                &parts(
                    "PATCH",
                    "/a/b?x=1&y=2",
                    &[("content-type", "application/json")],
                ),
                b"{}",
            ),
            fp(
                &parts(
                    "POST",
                    "/a/c?x=1&y=2",
                    &[("content-type", "application/json")],
                ),
                b"{}",
            ),
            fp(
                &parts(
                    "POST",
                    "/a/b?y=2&x=1",
                    &[("content-type", "application/json")],
                ),
                b"{}",
            ),
            fp(
                &parts(
                    "POST",
                    "/a/b?x=1&y=%32",
                    &[("content-type", "application/json")],
                ),
                b"{}",
            ),
            fp(
                &parts("POST", "/a/b", &[("content-type", "application/json")]),
                b"{}",
            ),
            fp(
                &parts("POST", "/a/b?x=1&y=2", &[("content-type", "text/plain")]),
                b"{}",
            ),
            fp(&parts("POST", "/a/b?x=1&y=2", &[]), b"{}"),
            fp(
                &parts("POST", "/a/b?x=1&y=2", &[("content-type", "")]),
                b"{}",
            ),
            fp(&base, b"{ }"),
            fp(&base, b""),
        ];
        for (i, f) in variants.iter().enumerate() {
            assert_ne!(*f, f0, "variant {i}");
        }
        // Absent, empty and non-empty query all differ.
        let q = |uri: &str| fp(&parts("POST", uri, &[]), b"");
        assert_ne!(q("/a"), q("/a?"));
        assert_ne!(q("/a?"), q("/a?x"));
        // Path and query do not run together.
        assert_ne!(q("/a?b"), q("/a%3Fb"));
    }

    #[test]
    fn named_headers_count_others_do_not() {
        let opts = FingerprintOptions {
            headers: vec![
                HeaderName::from_static("api-version"),
                HeaderName::from_static("host"),
            ],
            json: None,
        };
        let fp = |h: &[(&str, &str)]| fingerprint(&parts("POST", "/a", h), b"x", &opts);
        let f0 = fp(&[("api-version", "1"), ("host", "a.example")]);
        // Headers not named do not count.
        assert_eq!(
            f0,
            fp(&[
                ("api-version", "1"),
                ("host", "a.example"),
                ("x-request-id", "r1")
            ])
        );
        assert_eq!(
            f0,
            fp(&[
                ("host", "a.example"),
                ("user-agent", "z"),
                ("api-version", "1")
            ])
        );
        // Named ones do, with all their values in order.
        let variants = [
            fp(&[("api-version", "2"), ("host", "a.example")]),
            fp(&[("host", "a.example")]),
            fp(&[("api-version", ""), ("host", "a.example")]),
            fp(&[
                ("api-version", "1"),
                ("api-version", "1"),
                ("host", "a.example"),
            ]),
            fp(&[("api-version", "1"), ("host", "b.example")]),
        ];
        for (i, f) in variants.iter().enumerate() {
            assert_ne!(*f, f0, "variant {i}");
        }
        assert_ne!(
            fp(&[("api-version", "1"), ("api-version", "2")]),
            fp(&[("api-version", "2"), ("api-version", "1")])
        );
        // Absent differs from empty, also for headers named but missing.
        assert_ne!(fp(&[]), fp(&[("api-version", "")]));
        assert_ne!(fp(&[("host", "")]), fp(&[("api-version", "")]));
        // Values do not run into the next header.
        assert_ne!(
            fp(&[("api-version", "1a"), ("host", "b")]),
            fp(&[("api-version", "1"), ("host", "ab")])
        );
        // Not naming a header ignores it.
        let none = FingerprintOptions::default();
        let p1 = parts("POST", "/a", &[("api-version", "1")]);
        let p2 = parts("POST", "/a", &[("api-version", "2")]);
        assert_eq!(fingerprint(&p1, b"x", &none), fingerprint(&p2, b"x", &none));
    }

    #[test]
    fn body_boundaries() {
        // Bytes cannot move between body and an earlier field.
        let fp = |ct: &str, body: &[u8]| {
            fingerprint(
                &parts("POST", "/a", &[("content-type", ct)]),
                body,
                &FingerprintOptions::default(),
            )
        };
        assert_ne!(fp("a", b"b"), fp("ab", b""));
        let big = vec![7u8; 1 << 20];
        let mut big2 = big.clone();
        big2[(1 << 19) + 3] = 8;
        assert_ne!(fp("a", &big), fp("a", &big2));
    }
}
