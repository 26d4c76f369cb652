//! Scope resolvers the proxy adds to the core's: `jwt-claim:CLAIM` (a claim of a verified JWT)
//! and the one-time hint that recommends it when `Authorization` carries JWTs.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::request::Parts;
use idemgate::scope::{
    AuthorizationScope, HeaderScope, Scope, ScopeError, ScopeResolver, looks_like_jwt,
};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::{JwtSettings, ScopeSpec};

/// Builds the resolver for a scope setting.
pub fn resolver(
    spec: &ScopeSpec,
    explicit: bool,
    jwt: &JwtSettings,
) -> Result<Arc<dyn ScopeResolver>, String> {
    Ok(match spec {
        ScopeSpec::Authorization if explicit => Arc::new(AuthorizationScope),
        ScopeSpec::Authorization => Arc::new(HintingAuthorization::default()),
        ScopeSpec::Header(name) => Arc::new(HeaderScope::new(name.clone())),
        ScopeSpec::JwtClaim(claim) => {
            let Some(path) = &jwt.key_file else {
                return Err("a jwt-claim scope needs --jwt-key-file".into());
            };
            Arc::new(JwtClaimScope::from_file(
                path,
                claim,
                &jwt.issuers,
                &jwt.audiences,
            )?)
        }
    })
}

/// The `Authorization` scope, which logs once that `jwt-claim` suits JWT bearer tokens better
/// (a refreshed token would start a new scope in the middle of a retry window).
#[derive(Default)]
pub struct HintingAuthorization {
    warned: AtomicBool,
}

impl ScopeResolver for HintingAuthorization {
    fn resolve(&self, parts: &Parts) -> Result<Option<Scope>, ScopeError> {
        if !self.warned.load(Ordering::Relaxed)
            && let Some(v) = parts.headers.get(AUTHORIZATION)
            && looks_like_jwt(v.as_bytes())
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "Authorization carries a JWT bearer token but keys are scoped by the whole \
                         Authorization value: a refreshed token starts a new scope, so a retry sent \
                         with it is executed again. Consider --scope jwt-claim:sub with --jwt-key-file"
            );
        }
        AuthorizationScope.resolve(parts)
    }
}

/// Keys scoped by a claim of a verified JWT from `Authorization: Bearer …` (kind
/// `jwt-claim:<claim>`). HS256, RS256 and ES256; `exp` is required and checked, `iss` and
/// `aud` when configured. No `Authorization` header is no identity; anything else that does
/// not verify is [`ScopeError::Invalid`].
pub struct JwtClaimScope {
    kind: Cow<'static, str>,
    claim: String,
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
    issuers: Vec<String>,
    audiences: Vec<String>,
}

impl JwtClaimScope {
    /// Reads the key file: a JWKS (JSON with `keys`), a PEM public key (RSA → RS256, EC P-256 →
    /// ES256), or else the raw bytes of an HS256 secret (one trailing newline trimmed).
    pub fn from_file(
        path: &Path,
        claim: &str,
        issuers: &[String],
        audiences: &[String],
    ) -> Result<Self, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read jwt key file {}: {e}", path.display()))?;
        let keys =
            parse_keys(&bytes).map_err(|e| format!("jwt key file {}: {e}", path.display()))?;
        Ok(JwtClaimScope {
            kind: Cow::Owned(format!("jwt-claim:{claim}")),
            claim: claim.to_owned(),
            keys,
            issuers: issuers.to_vec(),
            audiences: audiences.to_vec(),
        })
    }

    fn verify(&self, token: &str) -> Result<serde_json::Value, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("bad JWT header: {e}"))?;
        let candidates = self.keys.iter().filter(|(kid, alg, _)| {
            *alg == header.alg
                && match (&header.kid, kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        });
        let mut last = "no key for this token's algorithm/kid".to_owned();
        for (_, alg, key) in candidates {
            let mut v = Validation::new(*alg);
            if self.issuers.is_empty() {
                v.iss = None;
            } else {
                v.set_issuer(&self.issuers);
            }
            if self.audiences.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&self.audiences);
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

fn parse_keys(bytes: &[u8]) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, String> {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        let set: JwkSet = serde_json::from_str(trimmed).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad JWK: {e}"))?;
            keys.push((jwk.common.key_id.clone(), alg, key));
        }
        if keys.is_empty() {
            return Err("the JWKS has no RSA, EC or oct key".into());
        }
        return Ok(keys);
    }
    if trimmed.starts_with("-----BEGIN") {
        if let Ok(k) = DecodingKey::from_rsa_pem(bytes) {
            return Ok(vec![(None, Algorithm::RS256, k)]);
        }
        if let Ok(k) = DecodingKey::from_ec_pem(bytes) {
            return Ok(vec![(None, Algorithm::ES256, k)]);
        }
        return Err("PEM is neither an RSA nor an EC (P-256) public key".into());
    }
    let secret = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
    if secret.is_empty() {
        return Err("empty HS256 secret".into());
    }
    let key = DecodingKey::from_secret(secret).map_err(|e| format!("bad HS256 secret: {e}"))?;
    Ok(vec![(None, Algorithm::HS256, key)])
}

impl ScopeResolver for JwtClaimScope {
    fn resolve(&self, parts: &Parts) -> Result<Option<Scope>, ScopeError> {
        let mut values = parts.headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(ScopeError::Invalid(
                "more than one Authorization field line".into(),
            ));
        }
        let v = value
            .to_str()
            .map_err(|_| ScopeError::Invalid("Authorization is not ASCII".into()))?
            .trim();
        if v.is_empty() {
            return Ok(None);
        }
        let token = match v.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => {
                return Err(ScopeError::Invalid(
                    "Authorization is not a Bearer token".into(),
                ));
            }
        };
        let claims = self.verify(token).map_err(ScopeError::Invalid)?;
        let value = match claims.get(&self.claim) {
            Some(serde_json::Value::String(s)) => Bytes::from(s.clone().into_bytes()),
            Some(serde_json::Value::Null) | None => {
                return Err(ScopeError::Invalid(format!(
                    "the JWT has no `{}` claim",
                    self.claim
                )));
            }
            Some(other) => Bytes::from(other.to_string().into_bytes()),
        };
        Ok(Some(Scope {
            kind: self.kind.clone(),
            value,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn parts(auth: Option<&str>) -> Parts {
        let mut b = http::Request::post("/x");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hs256_claim_scope() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"s3cret\n").unwrap();
        let scope =
            JwtClaimScope::from_file(&path, "sub", &["https://issuer".into()], &[]).unwrap();
        let exp = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600) as i64;
        let good = token(
            b"s3cret",
            serde_json::json!({"sub": "alice", "exp": exp, "iss": "https://issuer"}),
        );
        let s = scope
            .resolve(&parts(Some(&format!("Bearer {good}"))))
            .unwrap()
            .unwrap();
        assert_eq!(s.kind, "jwt-claim:sub");
        assert_eq!(&s.value[..], b"alice");
        // A refreshed token for the same subject is the same scope.
        let refreshed = token(
            b"s3cret",
            serde_json::json!({"sub": "alice", "exp": exp + 60, "iss": "https://issuer"}),
        );
        let s2 = scope
            .resolve(&parts(Some(&format!("Bearer {refreshed}"))))
            .unwrap()
            .unwrap();
        assert_eq!(s, s2);

        assert_eq!(scope.resolve(&parts(None)).unwrap(), None);
        let forged = token(
            b"other",
            serde_json::json!({"sub": "alice", "exp": exp, "iss": "https://issuer"}),
        );
        assert!(
            scope
                .resolve(&parts(Some(&format!("Bearer {forged}"))))
                .is_err()
        );
        let wrong_iss = token(
            b"s3cret",
            serde_json::json!({"sub": "alice", "exp": exp, "iss": "evil"}),
        );
        assert!(
            scope
                .resolve(&parts(Some(&format!("Bearer {wrong_iss}"))))
                .is_err()
        );
        let expired = token(
            b"s3cret",
            serde_json::json!({"sub": "alice", "exp": 1000, "iss": "https://issuer"}),
        );
        assert!(
            scope
                .resolve(&parts(Some(&format!("Bearer {expired}"))))
                .is_err()
        );
        let no_sub = token(
            b"s3cret",
            serde_json::json!({"exp": exp, "iss": "https://issuer"}),
        );
        assert!(
            scope
                .resolve(&parts(Some(&format!("Bearer {no_sub}"))))
                .is_err()
        );
        assert!(scope.resolve(&parts(Some("Basic abc"))).is_err());
    }
}
