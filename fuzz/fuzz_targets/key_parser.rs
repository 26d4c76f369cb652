//! Feeds arbitrary bytes to `parse_key` under strict and lax rules and checks what every
//! accepted key must satisfy.

#![no_main]

use idemgate::key::{KeyError, KeyRules, parse_key, to_sf_string};
use libfuzzer_sys::fuzz_target;

const RULES: [KeyRules; 4] = [
    KeyRules {
        min_len: 1,
        max_len: 255,
        strict: false,
    },
    KeyRules {
        min_len: 1,
        max_len: 255,
        strict: true,
    },
    KeyRules {
        min_len: 0,
        max_len: 8,
        strict: false,
    },
    KeyRules {
        min_len: 3,
        max_len: 5,
        strict: true,
    },
];

fuzz_target!(|data: &[u8]| {
    let trimmed = trim_ows(data);
    for rules in &RULES {
        match parse_key(data, rules) {
            Ok(key) => {
                let k = key.as_str();
                assert!(
                    (rules.min_len..=rules.max_len).contains(&k.len()),
                    "accepted a key of length {} outside {}..={}",
                    k.len(),
                    rules.min_len,
                    rules.max_len
                );
                // Keys are sf-string characters: printable ASCII, space included.
                assert!(
                    k.bytes().all(|b| (0x20..=0x7e).contains(&b)),
                    "non-printable key {k:?}"
                );
                if trimmed.first() != Some(&b'"') {
                    // An accepted bare token: only under lax rules, and it is its own bytes.
                    assert!(!rules.strict, "strict rules accepted a bare token");
                    assert_eq!(k.as_bytes(), trimmed, "a bare token is taken as sent");
                }
                // Every accepted key, re-quoted as an sf-string, is the same key under strict
                // rules of the same lengths: both spellings name one record.
                let strict = KeyRules {
                    strict: true,
                    ..rules.clone()
                };
                let quoted = to_sf_string(&key);
                assert_eq!(
                    parse_key(quoted.as_bytes(), &strict).as_ref(),
                    Ok(&key),
                    "{quoted}"
                );
                // Strict acceptance implies lax acceptance of the same key.
                if rules.strict {
                    let lax = KeyRules {
                        strict: false,
                        ..rules.clone()
                    };
                    assert_eq!(parse_key(data, &lax).as_ref(), Ok(&key));
                }
            }
            Err(KeyError::Length { len, min, max }) => {
                assert!(
                    len < min || len > max,
                    "length {len} refused though within {min}..={max}"
                );
                assert_eq!((min, max), (rules.min_len, rules.max_len));
            }
            Err(KeyError::Malformed(_)) => {}
            Err(KeyError::Repeated) => panic!("parse_key sees one field line, never repeats"),
        }
    }
});

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}
