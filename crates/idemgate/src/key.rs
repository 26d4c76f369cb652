//! The `Idempotency-Key` header (SPEC §1).
//!
//! The IETF draft defines the field as an RFC 9651 *Item* whose bare item is an sf-string
//! (`Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`). Stripe-style clients send the
//! characters unquoted, so unless [`KeyRules::strict`] is set a bare token of visible ASCII
//! is accepted too. Both spellings of the same characters are the same key, so a client that
//! switches libraries between retries still hits its record.
//!
//! ```
//! use idemgate::key::{parse_key, KeyError, KeyRules};
//!
//! let rules = KeyRules::default();
//! let quoted = parse_key(br#""order-42""#, &rules).unwrap();
//! let bare = parse_key(b"order-42", &rules).unwrap();
//! assert_eq!(quoted, bare);
//! assert_eq!(quoted.as_str(), "order-42");
//!
//! let strict = KeyRules { strict: true, ..KeyRules::default() };
//! assert!(matches!(parse_key(b"order-42", &strict), Err(KeyError::Malformed(_))));
//! ```

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};
use sfv::visitor::{Ignored, ParameterVisitor, parameter_visitor_with};
use sfv::{BareItemFromInput, StringRef};

/// The header's name (matched case-insensitively, as every HTTP field name).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Syntax and length rules for keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRules {
    /// Fewest characters after unescaping (default 1).
    pub min_len: usize,
    /// Most characters after unescaping (default 255).
    pub max_len: usize,
    /// Accept sf-strings only, not bare tokens.
    pub strict: bool,
}

impl Default for KeyRules {
    fn default() -> Self {
        KeyRules {
            min_len: 1,
            max_len: 255,
            strict: false,
        }
    }
}

/// A validated key: its characters after unescaping.
///
/// `Debug` prints the key: it is the client's own identifier, not a credential, but it is still
/// never stored or logged by idemgate (only the record id is).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key's characters.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a key was refused.
///
/// The messages never contain the key itself, so they can go into a problem `detail` as they
/// are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// More than one `Idempotency-Key` field line.
    #[error("more than one Idempotency-Key field line")]
    Repeated,
    /// Not an sf-string (nor, unless strict, a bare token).
    #[error("malformed Idempotency-Key: {0}")]
    Malformed(&'static str),
    /// Too short or too long after unescaping.
    #[error("Idempotency-Key length {len} outside {min}..={max}")]
    Length {
        /// The key's length.
        len: usize,
        /// The minimum.
        min: usize,
        /// The maximum.
        max: usize,
    },
}

/// Reads the key from a request's headers: `Ok(None)` when absent.
///
/// Two field lines are [`KeyError::Repeated`]. A single line holding a list
/// (`"a", "b"`, as an intermediary that folds repeated lines would produce) is
/// [`KeyError::Malformed`]: the field is an Item, never a List.
pub fn key_from_headers(
    headers: &HeaderMap,
    rules: &KeyRules,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut lines = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    if lines.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse_key(first.as_bytes(), rules).map(Some)
}

/// Parses one field value.
///
/// Leading and trailing optional whitespace (SP, HTAB) is ignored: RFC 9110 excludes it from
/// the field value, but not every HTTP parser strips it. An empty value is
/// [`KeyError::Malformed`]; an empty sf-string (`""`) is a syntactically valid key of length 0
/// and so [`KeyError::Length`] under the default rules.
pub fn parse_key(value: &[u8], rules: &KeyRules) -> Result<IdempotencyKey, KeyError> {
    let value = trim_ows_end(trim_ows_start(value));
    let key: Cow<'_, str> = match value.first() {
        None => return Err(KeyError::Malformed("empty value")),
        Some(b'"') => parse_sf_string(value)?,
        Some(_) if rules.strict => {
            return Err(KeyError::Malformed("not an sf-string (strict keys)"));
        }
        Some(_) => Cow::Borrowed(parse_bare_token(value)?),
    };
    // Every accepted character is ASCII, so bytes are characters.
    let len = key.len();
    if len < rules.min_len || len > rules.max_len {
        return Err(KeyError::Length {
            len,
            min: rules.min_len,
            max: rules.max_len,
        });
    }
    Ok(IdempotencyKey(key.into_owned()))
}

fn trim_ows_start(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    v
}

fn trim_ows_end(mut v: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// An RFC 9651 Item whose bare item is a String; parameters are parsed (so they must be
/// well-formed) and ignored, as RFC 9651 §3.1.2 says unknown parameters are.
fn parse_sf_string(value: &[u8]) -> Result<Cow<'_, str>, KeyError> {
    /// The visitor's error; its content is never shown, the parser's result says enough.
    #[derive(Debug)]
    struct NotAString;
    impl std::fmt::Display for NotAString {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("not a string")
        }
    }
    impl std::error::Error for NotAString {}

    fn as_string<'de>(
        item: BareItemFromInput<'de>,
    ) -> Result<impl ParameterVisitor<'de, Out = Cow<'de, StringRef>>, NotAString> {
        match item {
            BareItemFromInput::String(s) => Ok(parameter_visitor_with(Ignored, move |_| Ok(s))),
            _ => Err(NotAString),
        }
    }

    match sfv::Parser::new(value).parse_item_with_visitor(as_string) {
        Ok(Cow::Borrowed(s)) => Ok(Cow::Borrowed(s.as_str())),
        Ok(Cow::Owned(s)) => Ok(Cow::Owned(s.into())),
        Err(_) => Err(KeyError::Malformed("not a valid sf-string")),
    }
}

/// A Stripe-style unquoted key: visible ASCII without `"` (which would make it ambiguous with
/// an sf-string) and `,` (which would make it a list).
fn parse_bare_token(value: &[u8]) -> Result<&str, KeyError> {
    for &b in value {
        match b {
            b'"' => return Err(KeyError::Malformed("'\"' inside an unquoted key")),
            b',' => return Err(KeyError::Malformed("',' inside an unquoted key")),
            0x21..=0x7e => {}
            b' ' | b'\t' => return Err(KeyError::Malformed("whitespace inside an unquoted key")),
            0x80..=0xff => return Err(KeyError::Malformed("non-ASCII byte")),
            _ => return Err(KeyError::Malformed("control character")),
        }
    }
    // All bytes were checked to be ASCII above.
    std::str::from_utf8(value).map_err(|_| KeyError::Malformed("non-ASCII byte"))
}

/// Quotes a key as an sf-string, the spelling the draft recommends.
///
/// Every key [`parse_key`] accepts can be written this way, and parsing the result gives the
/// same key back.
pub fn to_sf_string(key: &IdempotencyKey) -> String {
    let mut out = String::with_capacity(key.0.len() + 2);
    out.push('"');
    for c in key.0.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const LAX: KeyRules = KeyRules {
        min_len: 1,
        max_len: 255,
        strict: false,
    };
    const STRICT: KeyRules = KeyRules {
        min_len: 1,
        max_len: 255,
        strict: true,
    };

    enum Want<'a> {
        Key(&'a str),
        Malformed,
        Length(usize),
    }
    use Want::*;

    fn check(rules: &KeyRules, cases: &[(&[u8], Want<'_>)]) {
        for (input, want) in cases {
            let got = parse_key(input, rules);
            let shown = String::from_utf8_lossy(input);
            match (want, &got) {
                (Key(k), Ok(key)) => assert_eq!(key.as_str(), *k, "input {shown:?}"),
                (Malformed, Err(KeyError::Malformed(_))) => {}
                (Length(n), Err(KeyError::Length { len, .. })) => {
                    assert_eq!(len, n, "input {shown:?}")
                }
                _ => panic!("input {shown:?} (strict={}): got {got:?}", rules.strict),
            }
        }
    }

    #[test]
    fn lax_rules() {
        let k255 = "k".repeat(255);
        let k256 = "k".repeat(256);
        let q255 = format!("\"{k255}\"");
        let q256 = format!("\"{k256}\"");
        // 255 characters after unescaping, 510 + 2 bytes on the wire.
        let esc255 = format!("\"{}\"", "\\\\".repeat(255));
        let esc256 = format!("\"{}\"", "\\\"".repeat(256));
        let backslashes255 = "\\".repeat(255);
        let cases: Vec<(&[u8], Want<'_>)> = vec![
            // sf-strings
            (br#""abc""#, Key("abc")),
            (br#""a b c""#, Key("a b c")),
            (br#""a\"b""#, Key("a\"b")),
            (br#""a\\b""#, Key("a\\b")),
            (br#""a,b""#, Key("a,b")),
            (br#""abc";p=1"#, Key("abc")),
            (br#""abc";p=1;q="x";r"#, Key("abc")),
            (br#""abc"; p=1"#, Key("abc")), // RFC 9651 §4.2.3.2 allows SP after ';'
            (br#""abc" ;p=1"#, Malformed),
            (br#""abc";"#, Malformed),
            (br#""abc";P=1"#, Malformed), // parameter keys are lowercase
            (br#""a\b""#, Malformed),     // only \" and \\ are escapes
            (br#""abc"#, Malformed),
            (br#""abc"x"#, Malformed),
            (br#""a", "b""#, Malformed), // a list, e.g. folded field lines
            (br#""a","b""#, Malformed),
            (b"\"\xc3\xa9\"", Malformed),
            (b"\"a\x01b\"", Malformed),
            (b"\"a\tb\"", Malformed),
            (b"\"a\x7fb\"", Malformed),
            (br#""""#, Length(0)),
            (q255.as_bytes(), Key(&k255)),
            (q256.as_bytes(), Length(256)),
            (esc255.as_bytes(), Key(&backslashes255)),
            (esc256.as_bytes(), Length(256)),
            // bare tokens
            (b"abc", Key("abc")),
            (
                b"8e03978e-40d5-43e8-bc93-6894a57f9324",
                Key("8e03978e-40d5-43e8-bc93-6894a57f9324"),
            ),
            (
                b"!#$%&'()*+-./:;<=>?@[\\]^_`{|}~",
                Key("!#$%&'()*+-./:;<=>?@[\\]^_`{|}~"),
            ),
            (b"a;p=1", Key("a;p=1")), // a bare token has no parameters
            (b"ab\"c", Malformed),
            (b"abc\"", Malformed),
            (b"a,b", Malformed),
            (b"a, b", Malformed),
            (b"a b", Malformed),
            (b"a\tb", Malformed),
            (b"caf\xc3\xa9", Malformed),
            (b"a\x00b", Malformed),
            (b"a\x7f", Malformed),
            (k255.as_bytes(), Key(&k255)),
            (k256.as_bytes(), Length(256)),
            // whitespace a parser may leave around the value
            (b"  abc  ", Key("abc")),
            (b"\tabc\t", Key("abc")),
            (b" \"abc\" ", Key("abc")),
            (b"\t\"abc\"\t", Key("abc")),
            (b"\" abc \"", Key(" abc ")),
            // nothing
            (b"", Malformed),
            (b"   ", Malformed),
            (b"\t", Malformed),
        ];
        check(&LAX, &cases);
    }

    #[test]
    fn strict_rules() {
        let cases: Vec<(&[u8], Want<'_>)> = vec![
            (br#""abc""#, Key("abc")),
            (br#" "abc";p=?1 "#, Key("abc")),
            (br#""a\"b""#, Key("a\"b")),
            (b"abc", Malformed),
            (b"8e03978e-40d5-43e8-bc93-6894a57f9324", Malformed),
            (b"123", Malformed),    // an sf-integer, not a string
            (b"?1", Malformed),     // an sf-boolean
            (b":YWJj:", Malformed), // a byte sequence
            (b"", Malformed),
            (br#""""#, Length(0)),
        ];
        check(&STRICT, &cases);
    }

    #[test]
    fn configurable_lengths() {
        let rules = KeyRules {
            min_len: 8,
            max_len: 10,
            strict: false,
        };
        check(
            &rules,
            &[
                (b"1234567", Length(7)),
                (b"12345678", Key("12345678")),
                (br#""1234567\\""#, Key("1234567\\")),
                (b"1234567890", Key("1234567890")),
                (b"12345678901", Length(11)),
                (br#""123456789\"\"""#, Length(11)),
            ],
        );
        let zero = KeyRules {
            min_len: 0,
            max_len: 4,
            strict: false,
        };
        check(&zero, &[(br#""""#, Key("")), (b"", Malformed)]);
        assert_eq!(
            parse_key(b"12345", &zero),
            Err(KeyError::Length {
                len: 5,
                min: 0,
                max: 4
            })
        );
    }

    #[test]
    fn both_spellings_are_one_key() {
        for (quoted, bare) in [
            (&br#""abc""#[..], &b"abc"[..]),
            (br#""a\\b""#, br"a\b"),
            (br#""~!@#$%^&*()""#, b"~!@#$%^&*()"),
        ] {
            assert_eq!(
                parse_key(quoted, &LAX).unwrap(),
                parse_key(bare, &LAX).unwrap()
            );
        }
    }

    #[test]
    fn sf_string_round_trip() {
        for input in [&b"abc"[..], br#""a\"b\\c""#, br"a\b", br#""x y""#] {
            let key = parse_key(input, &LAX).unwrap();
            let quoted = to_sf_string(&key);
            assert_eq!(parse_key(quoted.as_bytes(), &STRICT).unwrap(), key);
        }
    }

    #[test]
    fn from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(key_from_headers(&h, &LAX), Ok(None));

        h.insert("Idempotency-Key", HeaderValue::from_static("\"abc\""));
        assert_eq!(key_from_headers(&h, &LAX).unwrap().unwrap().as_str(), "abc");

        h.append("idempotency-key", HeaderValue::from_static("\"abc\""));
        assert_eq!(key_from_headers(&h, &LAX), Err(KeyError::Repeated));

        let mut h = HeaderMap::new();
        h.insert("IDEMPOTENCY-KEY", HeaderValue::from_static("\"a\", \"b\""));
        assert!(matches!(
            key_from_headers(&h, &LAX),
            Err(KeyError::Malformed(_))
        ));

        h.insert("idempotency-key", HeaderValue::from_static("a, b"));
        assert!(matches!(
            key_from_headers(&h, &LAX),
            Err(KeyError::Malformed(_))
        ));

        h.insert("idempotency-key", HeaderValue::from_static(""));
        assert!(matches!(
            key_from_headers(&h, &LAX),
            Err(KeyError::Malformed(_))
        ));

        h.insert(
            "idempotency-key",
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert!(matches!(
            key_from_headers(&h, &LAX),
            Err(KeyError::Malformed(_))
        ));

        h.insert("idempotency-key", HeaderValue::from_static("plain"));
        assert!(matches!(
            key_from_headers(&h, &STRICT),
            Err(KeyError::Malformed(_))
        ));
    }

    #[test]
    fn errors_never_echo_the_key() {
        let secret = b"super-secret-looking-key\"";
        let err = parse_key(secret, &LAX).unwrap_err();
        assert!(!err.to_string().contains("super-secret"));
    }
}
