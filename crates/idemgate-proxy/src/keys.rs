//! `idemgate keys …`: a client of the admin API (the embedded store's file is locked by the
//! running server, so operators go through it).

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idemgate::key::{KeyRules, parse_key};
use idemgate::record::RecordId;
use idemgate::scope::Scope;
use serde_json::json;

use crate::cli::{KeysAction, KeysArgs, RecordArgs};

/// The record id `keys` addresses: `--id`, or derived from `--key` and the scope exactly as the
/// layer derives it.
pub fn record_id(args: &RecordArgs) -> Result<RecordId, String> {
    if let Some(id) = &args.id {
        return RecordId::from_hex(id.trim())
            .ok_or_else(|| "--id must be 64 hex digits".to_owned());
    }
    let Some(key) = &args.key else {
        return Err("give --id HEX or --key KEY".into());
    };
    let key = parse_key(key.as_bytes(), &KeyRules::default()).map_err(|e| e.to_string())?;
    let scope = match (&args.scope_kind, &args.scope_value) {
        (None, None) => Scope::anonymous(),
        (None, Some(v)) => Scope::new("authorization", Bytes::from(v.clone().into_bytes())),
        (Some(k), v) => {
            let kind = if let Some(name) = k.strip_prefix("header:") {
                format!("header:{}", name.to_ascii_lowercase())
            } else {
                k.clone()
            };
            if kind == "anonymous" {
                Scope::anonymous()
            } else {
                Scope::new(
                    kind,
                    Bytes::from(v.clone().unwrap_or_default().into_bytes()),
                )
            }
        }
    };
    Ok(scope.record_id(&key))
}

/// Runs a `keys` command; returns the process exit code.
pub async fn run(args: KeysArgs) -> Result<i32, String> {
    let token = match &args.admin_token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let base = args.admin.trim_end_matches('/').to_owned();
    let (method, path, body) = match &args.action {
        KeysAction::Show(r) => (
            Method::GET,
            format!("/keys/{}", record_id(r)?.to_hex()),
            None,
        ),
        KeysAction::Delete { record, force } => (
            Method::DELETE,
            format!(
                "/keys/{}{}",
                record_id(record)?.to_hex(),
                if *force { "?force=true" } else { "" }
            ),
            None,
        ),
        KeysAction::Resolve {
            record,
            release,
            status,
            body,
            header,
            ttl,
        } => {
            let payload = if *release {
                json!({"action": "release"})
            } else {
                let status = status.ok_or("give --release or --status")?;
                let headers: Vec<(String, String)> = header
                    .iter()
                    .map(|h| {
                        h.split_once(':')
                            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                            .ok_or_else(|| format!("--header `{h}` must be `Name: value`"))
                    })
                    .collect::<Result<_, _>>()?;
                let mut p = json!({"action": "respond", "status": status, "headers": headers, "body": body.clone().unwrap_or_default()});
                if let Some(t) = ttl {
                    p["ttl"] = json!(t);
                }
                p
            };
            (
                Method::POST,
                format!("/keys/{}/resolve", record_id(record)?.to_hex()),
                Some(payload.to_string()),
            )
        }
        KeysAction::PurgeExpired => (Method::POST, "/purge-expired".to_owned(), None),
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"));
    if let Some(t) = &token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| format!("bad admin URL {base}: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("cannot reach the admin API at {base}: {e}"))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the admin API's answer: {e}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| text.to_string())
        ),
        Err(_) => println!("{text}"),
    }
    Ok(match status {
        s if s.is_success() => 0,
        StatusCode::NOT_FOUND => 3,
        _ => 1,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn args(key: &str, kind: Option<&str>, value: Option<&str>) -> RecordArgs {
        RecordArgs {
            id: None,
            key: Some(key.into()),
            scope_kind: kind.map(Into::into),
            scope_value: value.map(Into::into),
        }
    }

    #[test]
    fn derives_the_layers_record_ids() {
        let k = parse_key(b"order-42", &KeyRules::default()).unwrap();
        assert_eq!(
            record_id(&args("order-42", None, Some("Bearer sk_1"))).unwrap(),
            Scope::new("authorization", Bytes::from_static(b"Bearer sk_1")).record_id(&k)
        );
        assert_eq!(
            record_id(&args("\"order-42\"", None, None)).unwrap(),
            Scope::anonymous().record_id(&k),
            "both spellings, anonymous scope"
        );
        assert_eq!(
            record_id(&args("order-42", Some("header:X-Tenant"), Some("acme"))).unwrap(),
            Scope::new("header:x-tenant", Bytes::from_static(b"acme")).record_id(&k)
        );
        let id = Scope::anonymous().record_id(&k);
        let by_id = RecordArgs {
            id: Some(id.to_hex()),
            key: None,
            scope_kind: None,
            scope_value: None,
        };
        assert_eq!(record_id(&by_id).unwrap(), id);
        assert!(
            record_id(&RecordArgs {
                id: Some("zz".into()),
                key: None,
                scope_kind: None,
                scope_value: None
            })
            .is_err()
        );
    }
}
