//! Per-route policies (SPEC §9): `[[route]]` tables in the config file, matched in order, first
//! match wins; requests no route matches fall back to the default route (POST and PATCH with the
//! global settings).

use std::sync::Arc;

use http::{Method, request::Parts};
use idemgate::policy::{Policy, PolicyResolver};
use idemgate::scope::{Scope, ScopeError, ScopeResolver};

/// How a route's path is matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// Matches the prefix on a segment boundary: `/v1/payments` matches `/v1/payments` and
    /// `/v1/payments/pay_1`, not `/v1/paymentsx`. `/` matches everything.
    Prefix(String),
    /// Segment by segment: `{name}` or `*` match exactly one non-empty segment; a final `**`
    /// matches whatever is left (also nothing); other segments match literally.
    Pattern(Vec<Segment>),
}

/// One segment of a [`PathMatch::Pattern`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Matches this text exactly.
    Literal(String),
    /// Matches any one non-empty segment.
    Any,
    /// Matches the rest of the path.
    Rest,
}

impl PathMatch {
    /// A prefix matcher; the prefix must start with `/`.
    pub fn prefix(p: &str) -> Result<Self, String> {
        if !p.starts_with('/') {
            return Err(format!("route path `{p}` must start with `/`"));
        }
        let trimmed = p.trim_end_matches('/');
        Ok(PathMatch::Prefix(trimmed.to_owned()))
    }

    /// A pattern matcher, e.g. `/v1/orders/{id}/capture` or `/v1/*/refunds/**`.
    pub fn pattern(p: &str) -> Result<Self, String> {
        if !p.starts_with('/') {
            return Err(format!("route pattern `{p}` must start with `/`"));
        }
        let parts: Vec<&str> = p[1..].split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, s) in parts.iter().enumerate() {
            let seg = if *s == "**" {
                if i + 1 != parts.len() {
                    return Err(format!(
                        "route pattern `{p}`: `**` may only be the last segment"
                    ));
                }
                Segment::Rest
            } else if *s == "*" || (s.starts_with('{') && s.ends_with('}') && s.len() > 2) {
                Segment::Any
            } else if s.contains(['{', '}', '*']) {
                return Err(format!(
                    "route pattern `{p}`: segment `{s}` mixes text and a wildcard"
                ));
            } else {
                Segment::Literal((*s).to_owned())
            };
            segments.push(seg);
        }
        Ok(PathMatch::Pattern(segments))
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(prefix) => {
                prefix.is_empty()
                    || (path.starts_with(prefix.as_str())
                        && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
            }
            PathMatch::Pattern(segments) => {
                let rest = path.strip_prefix('/').unwrap_or(path);
                let mut parts = rest.split('/');
                for seg in segments {
                    match seg {
                        Segment::Rest => return true,
                        Segment::Any => match parts.next() {
                            Some(p) if !p.is_empty() => {}
                            _ => return false,
                        },
                        Segment::Literal(l) => match parts.next() {
                            Some(p) if p == l => {}
                            _ => return false,
                        },
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

/// A matched route's behaviour.
pub struct RouteTarget {
    /// `None`: the route is unprotected (`protect = false`), requests pass through untouched.
    pub policy: Option<Arc<Policy>>,
    /// The route's own scope resolver, or `None` for the global one.
    pub scope: Option<Arc<dyn ScopeResolver>>,
}

/// One `[[route]]` entry, ready to match.
pub struct RouteEntry {
    /// The path matcher.
    pub path: PathMatch,
    /// Methods it covers (default POST and PATCH).
    pub methods: Vec<Method>,
    /// What happens to requests it matches.
    pub target: RouteTarget,
}

impl RouteEntry {
    fn matches(&self, parts: &Parts) -> bool {
        self.methods.contains(&parts.method) && self.path.matches(parts.uri.path())
    }
}

/// The route table: a [`PolicyResolver`] and a [`ScopeResolver`] (a route may scope its keys
/// differently from the global setting).
pub struct RouteTable {
    routes: Vec<RouteEntry>,
    default_methods: Vec<Method>,
    default_policy: Arc<Policy>,
    default_scope: Arc<dyn ScopeResolver>,
}

impl RouteTable {
    /// A table; requests no route matches get `default_policy` when their method is POST or
    /// PATCH, and pass through otherwise.
    pub fn new(
        routes: Vec<RouteEntry>,
        default_policy: Arc<Policy>,
        default_scope: Arc<dyn ScopeResolver>,
    ) -> Self {
        RouteTable {
            routes,
            default_methods: vec![Method::POST, Method::PATCH],
            default_policy,
            default_scope,
        }
    }

    /// The route entry for a request, if a configured one matches.
    fn find(&self, parts: &Parts) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| r.matches(parts))
    }

    /// The policy for a request (also used by the proxy to know which requests are protected).
    pub fn policy_for(&self, parts: &Parts) -> Option<Arc<Policy>> {
        match self.find(parts) {
            Some(route) => route.target.policy.clone(),
            None => self
                .default_methods
                .contains(&parts.method)
                .then(|| self.default_policy.clone()),
        }
    }
}

/// Shares one table between the layer's two resolver slots.
#[derive(Clone)]
pub struct SharedRoutes(pub Arc<RouteTable>);

impl PolicyResolver for SharedRoutes {
    fn resolve(&self, parts: &Parts) -> Option<Arc<Policy>> {
        self.0.policy_for(parts)
    }
}

impl ScopeResolver for SharedRoutes {
    fn resolve(&self, parts: &Parts) -> Result<Option<Scope>, ScopeError> {
        match self.0.find(parts).and_then(|r| r.target.scope.as_ref()) {
            Some(scope) => scope.resolve(parts),
            None => self.0.default_scope.resolve(parts),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use idemgate::scope::AuthorizationScope;
    use std::time::Duration;

    fn parts(method: &str, uri: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let m = PathMatch::prefix("/v1/payments").unwrap();
        assert!(m.matches("/v1/payments"));
        assert!(m.matches("/v1/payments/"));
        assert!(m.matches("/v1/payments/pay_1/capture"));
        assert!(!m.matches("/v1/paymentsx"));
        assert!(!m.matches("/v1"));
        let trailing = PathMatch::prefix("/v1/payments/").unwrap();
        assert!(trailing.matches("/v1/payments"));
        let root = PathMatch::prefix("/").unwrap();
        assert!(root.matches("/anything/at/all"));
        assert!(PathMatch::prefix("v1").is_err());
    }

    #[test]
    fn patterns_match_segment_by_segment() {
        let m = PathMatch::pattern("/v1/orders/{id}/capture").unwrap();
        assert!(m.matches("/v1/orders/42/capture"));
        assert!(!m.matches("/v1/orders//capture"));
        assert!(!m.matches("/v1/orders/42/capture/extra"));
        assert!(!m.matches("/v1/orders/42"));
        let star = PathMatch::pattern("/v1/*/refunds").unwrap();
        assert!(star.matches("/v1/acct_1/refunds"));
        assert!(!star.matches("/v1/acct_1/charges"));
        let rest = PathMatch::pattern("/files/**").unwrap();
        assert!(rest.matches("/files"));
        assert!(rest.matches("/files/a/b/c"));
        assert!(!rest.matches("/filesx"));
        assert!(PathMatch::pattern("/a/**/b").is_err());
        assert!(PathMatch::pattern("/a/x{id}").is_err());
        assert!(PathMatch::pattern("a").is_err());
    }

    #[test]
    fn first_match_wins_and_default_is_post_patch() {
        let strict = Arc::new(Policy {
            require_key: true,
            ..Policy::default()
        });
        let short = Arc::new(Policy {
            ttl: Duration::from_secs(60),
            ..Policy::default()
        });
        let table = RouteTable::new(
            vec![
                RouteEntry {
                    path: PathMatch::prefix("/webhooks").unwrap(),
                    methods: vec![Method::POST],
                    target: RouteTarget {
                        policy: None,
                        scope: None,
                    },
                },
                RouteEntry {
                    path: PathMatch::pattern("/v1/payments/{id}").unwrap(),
                    methods: vec![Method::POST, Method::PUT],
                    target: RouteTarget {
                        policy: Some(short.clone()),
                        scope: None,
                    },
                },
                RouteEntry {
                    path: PathMatch::prefix("/v1/payments").unwrap(),
                    methods: vec![Method::POST],
                    target: RouteTarget {
                        policy: Some(strict.clone()),
                        scope: None,
                    },
                },
            ],
            Arc::new(Policy::default()),
            Arc::new(AuthorizationScope),
        );
        let r = SharedRoutes(Arc::new(table));
        let p = |m: &str, u: &str| PolicyResolver::resolve(&r, &parts(m, u));
        assert!(p("POST", "/webhooks/stripe").is_none(), "protect = false");
        assert!(Arc::ptr_eq(&p("POST", "/v1/payments/p1").unwrap(), &short));
        assert!(Arc::ptr_eq(&p("PUT", "/v1/payments/p1").unwrap(), &short));
        assert!(Arc::ptr_eq(&p("POST", "/v1/payments").unwrap(), &strict));
        assert!(Arc::ptr_eq(
            &p("POST", "/v1/payments/p1/refund").unwrap(),
            &strict
        ));
        // Unmatched: default route, POST and PATCH only.
        let d = p("PATCH", "/v1/customers/c1").unwrap();
        assert!(!d.require_key);
        assert!(p("GET", "/v1/payments").is_none());
        assert!(p("DELETE", "/anything").is_none());
        // A GET on the webhook path matches no route (method), and GET is not protected.
        assert!(p("GET", "/webhooks/x").is_none());
    }
}
