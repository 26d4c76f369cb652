//! The proxy's configuration: one TOML file, every key overridable by an `IDEMGATE_<NAME>`
//! environment variable and by a command-line flag (file < env < flag), validated into a
//! [`Config`] (SPEC §9).
//!
//! Keys are the flag names (`upstream-hard-timeout`); the file also accepts them with
//! underscores (`upstream_hard_timeout`). Per-route settings live in `[[route]]` tables:
//!
//! ```toml
//! upstream = "http://127.0.0.1:3000"
//! store = "file:/var/lib/idemgate/idemgate.db"
//! ttl = "24h"
//!
//! [[route]]
//! path = "/v1/payments"          # prefix, on segment boundaries; or pattern = "/v1/orders/{id}/capture"
//! methods = ["POST"]
//! require-key = true
//! ttl = "48h"
//! fingerprint = { headers = ["api-version"], json = true, ignore = ["/client_timestamp"] }
//! release-statuses = [408, 425, 429, 503]
//!
//! [[route]]
//! path = "/webhooks"
//! protect = false                # passes through untouched
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, Uri};
use idemgate::fingerprint::{FingerprintOptions, JsonFingerprint, check_json_pointer};
use idemgate::policy::{Ambiguous, Concurrency};
use idemgate::scope::MissingScope;
use idemgate::store::LeaseExpiry;

use crate::routes::PathMatch;
use crate::units::{format_duration, format_size, parse_bool, parse_duration, parse_size};

/// Every top-level setting, by its flag name. Each is also `IDEMGATE_<NAME>` in the environment
/// and `<name>` (or `<name_with_underscores>`) in the file.
pub const KEYS: &[&str] = &[
    "listen",
    "upstream",
    "store",
    "store-pool-size",
    "ttl",
    "lease",
    "require-key",
    "concurrent",
    "wait-max",
    "max-request-body",
    "max-stored-response",
    "upstream-timeout",
    "upstream-hard-timeout",
    "upstream-protocol",
    "scope",
    "trust-scope-header",
    "jwt-key-file",
    "jwt-issuer",
    "jwt-audience",
    "on-missing-scope",
    "on-lease-expiry",
    "ambiguous",
    "fail-open",
    "strict-keys",
    "shutdown-grace",
    "client-timeout",
    "max-connections",
    "trusted-proxies",
    "access-log",
    "admin-listen",
    "admin-token-file",
    "release-statuses",
    "instances",
];

/// `client-timeout` by default: nginx's keep-alive timeout, above the 60 s idle timeout of common
/// load balancers, so that the balancer, not idemgate, closes an idle connection first.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(75);

/// The largest `store-pool-size`: far above what one PostgreSQL server serves well (its
/// default `max_connections` is 100), low enough to catch a typo.
pub const MAX_STORE_POOL_SIZE: u32 = 1000;

/// The admin listener's default address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// A bad configuration: every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

/// Where the store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// In this process's memory: lost on restart.
    Memory,
    /// The embedded durable store in this file.
    File(PathBuf),
    /// Redis (`redis://`, `rediss://`, `redis+cluster://`, `rediss+cluster://`).
    Redis(String),
    /// PostgreSQL (`postgres://`, `postgresql://`).
    Postgres(String),
}

impl StoreSpec {
    /// Parses `memory`, `file:PATH`, `redis…://…` or `postgres://…`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "memory" {
            Ok(StoreSpec::Memory)
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(
                    "`file:` needs a path, e.g. `file:/var/lib/idemgate/idemgate.db`".into(),
                );
            }
            Ok(StoreSpec::File(PathBuf::from(path)))
        } else if [
            "redis://",
            "rediss://",
            "redis+cluster://",
            "rediss+cluster://",
        ]
        .iter()
        .any(|p| s.starts_with(p))
        {
            Ok(StoreSpec::Redis(s.to_owned()))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreSpec::Postgres(s.to_owned()))
        } else {
            Err(format!(
                "`{}` is not a store: use `memory`, `file:PATH`, `redis://…`, `rediss://…`, \
                 `redis+cluster://h:p,h:p` or `postgres://…`",
                redact(s)
            ))
        }
    }

    /// The spec as written, with any password hidden.
    pub fn display(&self) -> String {
        match self {
            StoreSpec::Memory => "memory".into(),
            StoreSpec::File(p) => format!("file:{}", p.display()),
            StoreSpec::Redis(s) | StoreSpec::Postgres(s) => redact(s),
        }
    }

    /// Whether the store serves one process only.
    pub fn single_process(&self) -> bool {
        matches!(self, StoreSpec::Memory | StoreSpec::File(_))
    }
}

/// Hides the password of a `scheme://user:pass@host` URL.
pub fn redact(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_owned();
    };
    let rest = &s[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return s.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}://{}:***@{}",
            &s[..scheme_end],
            &userinfo[..colon],
            &rest[at + 1..]
        ),
        None => s.to_owned(),
    }
}

/// How keys are scoped (SPEC §2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeSpec {
    /// The `Authorization` header value.
    Authorization,
    /// A header set by a trusted edge.
    Header(HeaderName),
    /// A claim of a verified JWT.
    JwtClaim(String),
}

impl ScopeSpec {
    /// Parses `authorization`, `header:NAME` or `jwt-claim:CLAIM`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("authorization") {
            Ok(ScopeSpec::Authorization)
        } else if let Some(name) = s.strip_prefix("header:") {
            HeaderName::from_bytes(name.trim().as_bytes())
                .map(ScopeSpec::Header)
                .map_err(|_| format!("`{name}` is not a header name"))
        } else if let Some(claim) = s.strip_prefix("jwt-claim:") {
            let claim = claim.trim();
            if claim.is_empty() {
                return Err("`jwt-claim:` needs a claim name, e.g. `jwt-claim:sub`".into());
            }
            Ok(ScopeSpec::JwtClaim(claim.to_owned()))
        } else {
            Err(format!(
                "`{s}` is not a scope: use `authorization`, `header:NAME` or `jwt-claim:CLAIM`"
            ))
        }
    }

    /// The spelling [`ScopeSpec::parse`] reads.
    pub fn display(&self) -> String {
        match self {
            ScopeSpec::Authorization => "authorization".into(),
            ScopeSpec::Header(h) => format!("header:{h}"),
            ScopeSpec::JwtClaim(c) => format!("jwt-claim:{c}"),
        }
    }
}

/// JWT verification settings for `jwt-claim` scopes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtSettings {
    /// PEM key, JWKS (JSON), or an HS256 secret.
    pub key_file: Option<PathBuf>,
    /// Accepted `iss` values (none: not checked).
    pub issuers: Vec<String>,
    /// Accepted `aud` values (none: not checked).
    pub audiences: Vec<String>,
}

/// Settings a route can override; the global values form the default route.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSettings {
    /// 400 for protected requests without a key.
    pub require_key: bool,
    /// Retention of stored outcomes.
    pub ttl: Duration,
    /// Lease length.
    pub lease: Duration,
    /// Concurrent duplicates: conflict or wait.
    pub concurrency: Concurrency,
    /// Largest protected request body.
    pub max_request_body: u64,
    /// Largest stored response body.
    pub max_stored_response: u64,
    /// Requests without identity.
    pub on_missing_scope: MissingScope,
    /// What a lapsed lease becomes.
    pub on_lease_expiry: LeaseExpiry,
    /// What an ambiguous upstream failure becomes.
    pub ambiguous: Ambiguous,
    /// Execute unprotected when the store fails.
    pub fail_open: bool,
    /// Keys must be sf-strings.
    pub strict_keys: bool,
    /// Statuses that release the key.
    pub release_statuses: Vec<StatusCode>,
    /// What the fingerprint covers.
    pub fingerprint: FingerprintOptions,
    /// This route's own scope (`None`: the global one).
    pub scope: Option<ScopeSpec>,
}

/// One `[[route]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// The path matcher.
    pub path: PathMatch,
    /// How it was written (`path` or `pattern`), for printing.
    pub path_text: (&'static str, String),
    /// Methods it covers.
    pub methods: Vec<Method>,
    /// `false`: requests pass through untouched.
    pub protect: bool,
    /// Its settings (the globals, overridden by the route's keys).
    pub settings: RouteSettings,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The proxy's listen address.
    pub listen: SocketAddr,
    /// The upstream base URL.
    pub upstream: Uri,
    /// The store.
    pub store: StoreSpec,
    /// Connections the PostgreSQL store pools (its LISTEN connection for wait mode not
    /// counted); `None`: the store's default. Other stores take none.
    pub store_pool_size: Option<u32>,
    /// The global (default-route) settings.
    pub defaults: RouteSettings,
    /// The client's deadline.
    pub upstream_timeout: Duration,
    /// How long idemgate waits for an upstream response head at most.
    pub upstream_hard_timeout: Duration,
    /// Which HTTP version idemgate speaks to the upstream.
    pub upstream_protocol: UpstreamProtocol,
    /// The global scope.
    pub scope: ScopeSpec,
    /// Whether `scope` was set explicitly (else the JWT-shape hint may be logged).
    pub scope_explicit: bool,
    /// `header:` scopes are allowed.
    pub trust_scope_header: bool,
    /// JWT verification.
    pub jwt: JwtSettings,
    /// How long in-flight requests get at shutdown.
    pub shutdown_grace: Duration,
    /// Longest wait on a client: for a complete request head while none is in progress, and
    /// for progress writing a response.
    pub client_timeout: Duration,
    /// How many client connections are served at once.
    pub max_connections: ConnectionLimit,
    /// Peers whose `X-Forwarded-Proto` and `X-Forwarded-Host` are passed on.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// One line per request on standard output (see `access_log`).
    pub access_log: bool,
    /// The admin listener (`None`: off).
    pub admin_listen: Option<SocketAddr>,
    /// The admin bearer token's file.
    pub admin_token_file: Option<PathBuf>,
    /// How many instances the operator runs (for the single-process store check).
    pub instances: u32,
    /// The routes, first match wins.
    pub routes: Vec<Route>,
}

/// The configuration and what an operator should know about it.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Warnings (relative store path, anonymous scope, single-process store…).
    pub warnings: Vec<String>,
}

/// Where a value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    File,
    Env(String),
    Flag,
}

impl Source {
    fn describe(&self, key: &str) -> String {
        match self {
            Source::File => format!("`{key}` in the config file"),
            Source::Env(var) => format!("environment variable {var}"),
            Source::Flag => format!("--{key}"),
        }
    }
}

/// The inputs of [`load`].
#[derive(Debug, Default)]
pub struct Inputs {
    /// The config file's text and path, if one was given.
    pub file: Option<(PathBuf, String)>,
    /// The environment.
    pub env: HashMap<String, String>,
    /// Flags given on the command line, by key.
    pub flags: Vec<(&'static str, String)>,
}

impl Inputs {
    /// Reads `path` (if any) and this process's environment.
    pub fn from_process(
        path: Option<&Path>,
        flags: Vec<(&'static str, String)>,
    ) -> Result<Self, ConfigError> {
        let file = match path {
            Some(p) => Some((
                p.to_owned(),
                std::fs::read_to_string(p).map_err(|e| {
                    ConfigError(vec![format!(
                        "cannot read config file {}: {e}",
                        p.display()
                    )])
                })?,
            )),
            None => None,
        };
        Ok(Inputs {
            file,
            env: std::env::vars().collect(),
            flags,
        })
    }
}

/// The environment variable of a key: `IDEMGATE_` + upper case, `-` → `_`.
pub fn env_var(key: &str) -> String {
    format!("IDEMGATE_{}", key.to_ascii_uppercase().replace('-', "_"))
}

fn value_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(value_text)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        _ => None,
    }
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Collects errors while parsing values.
struct Parser {
    errors: Vec<String>,
}

impl Parser {
    fn take<T>(
        &mut self,
        key: &str,
        raw: Option<&(String, Source)>,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> T {
        match raw {
            None => default,
            Some((text, source)) => match parse(text) {
                Ok(v) => v,
                Err(e) => {
                    self.errors
                        .push(format!("invalid {}: {e}", source.describe(key)));
                    default
                }
            },
        }
    }
}

fn parse_concurrency(s: &str) -> Result<bool, String> {
    match s.trim() {
        "conflict" => Ok(false),
        "wait" => Ok(true),
        other => Err(format!("`{other}`: use `conflict` or `wait`")),
    }
}

fn parse_missing_scope(s: &str) -> Result<MissingScope, String> {
    match s.trim() {
        "anonymous" => Ok(MissingScope::Anonymous),
        "reject" => Ok(MissingScope::Reject),
        "passthrough" => Ok(MissingScope::Passthrough),
        other => Err(format!(
            "`{other}`: use `anonymous`, `reject` or `passthrough`"
        )),
    }
}

fn parse_lease_expiry(s: &str) -> Result<LeaseExpiry, String> {
    match s.trim() {
        "outcome-unknown" => Ok(LeaseExpiry::OutcomeUnknown),
        "re-execute" => Ok(LeaseExpiry::ReExecute),
        other => Err(format!("`{other}`: use `outcome-unknown` or `re-execute`")),
    }
}

/// The HTTP version idemgate speaks to the upstream (`upstream-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// `http://`: HTTP/1.1. `https://`: HTTP/2 or HTTP/1.1, as TLS ALPN agrees.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only: over TLS by ALPN, and over plain TCP with prior knowledge (h2c).
    Http2,
}

impl UpstreamProtocol {
    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamProtocol::Auto => "auto",
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::Http2 => "http2",
        }
    }
}

/// How many client connections `serve` holds open at once (`max-connections`).
///
/// Past the limit, new connections wait in the listen backlog (and idle ones are closed to make
/// room) instead of taking the file descriptors that upstream connections and the store need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectionLimit {
    /// From the open files limit at start: each client connection may hold two descriptors
    /// (its own and an upstream connection's), after a reserve for everything else.
    #[default]
    Auto,
    /// At most this many.
    Fixed(std::num::NonZeroUsize),
}

fn parse_connection_limit(s: &str) -> Result<ConnectionLimit, String> {
    match s.trim() {
        "auto" => Ok(ConnectionLimit::Auto),
        n => n
            .parse::<std::num::NonZeroUsize>()
            .map(ConnectionLimit::Fixed)
            .map_err(|_| format!("`{n}`: use `auto` or a positive number of connections")),
    }
}

/// A list of networks (`10.0.0.0/8`) or addresses (`192.0.2.7`, one host).
fn parse_networks(s: &str) -> Result<Vec<ipnet::IpNet>, String> {
    list(s)
        .iter()
        .map(|item| {
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("`{item}` is not an IP address or network (CIDR)"))
        })
        .collect()
}

fn parse_upstream_protocol(s: &str) -> Result<UpstreamProtocol, String> {
    match s.trim() {
        "auto" => Ok(UpstreamProtocol::Auto),
        "http1" => Ok(UpstreamProtocol::Http1),
        "http2" => Ok(UpstreamProtocol::Http2),
        other => Err(format!("`{other}`: use `auto`, `http1` or `http2`")),
    }
}

fn parse_ambiguous(s: &str) -> Result<Ambiguous, String> {
    match s.trim() {
        "store" => Ok(Ambiguous::Store),
        "release" => Ok(Ambiguous::Release),
        other => Err(format!("`{other}`: use `store` or `release`")),
    }
}

fn parse_statuses(s: &str) -> Result<Vec<StatusCode>, String> {
    list(s)
        .iter()
        .map(|t| {
            t.parse::<u16>()
                .ok()
                .and_then(|n| StatusCode::from_u16(n).ok())
                .ok_or_else(|| format!("`{t}` is not an HTTP status"))
        })
        .collect()
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:8080 or [::1]:8080"))
}

fn parse_upstream(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "`{s}`: the upstream URL must start with http:// or https://"
            ));
        }
    }
    if uri.authority().is_none() {
        return Err(format!("`{s}`: the upstream URL needs a host"));
    }
    if uri.query().is_some() {
        return Err(format!("`{s}`: the upstream URL cannot have a query"));
    }
    Ok(uri)
}

fn method_list(s: &str) -> Result<Vec<Method>, String> {
    let methods: Vec<Method> = list(s)
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("`{m}` is not a method"))
        })
        .collect::<Result<_, _>>()?;
    if methods.is_empty() {
        return Err("empty method list".into());
    }
    Ok(methods)
}

/// Builds the configuration from a file, the environment and flags (file < env < flag).
pub fn load(inputs: &Inputs) -> Result<Loaded, ConfigError> {
    let mut errors = Vec::new();
    let mut raw: BTreeMap<&'static str, (String, Source)> = BTreeMap::new();
    let mut route_tables: Vec<toml::Table> = Vec::new();

    if let Some((path, text)) = &inputs.file {
        match text.parse::<toml::Table>() {
            Err(e) => errors.push(format!("config file {}: {e}", path.display())),
            Ok(table) => {
                for (name, value) in table {
                    let norm = name.replace('_', "-");
                    if norm == "route" {
                        match value {
                            toml::Value::Array(items) => {
                                for item in items {
                                    match item {
                                        toml::Value::Table(t) => route_tables.push(t),
                                        _ => errors.push(
                                            "`route` entries must be tables ([[route]])".into(),
                                        ),
                                    }
                                }
                            }
                            _ => {
                                errors.push("`route` must be an array of tables ([[route]])".into())
                            }
                        }
                        continue;
                    }
                    let Some(key) = KEYS.iter().find(|k| **k == norm) else {
                        errors.push(format!(
                            "config file {}: unknown key `{name}`",
                            path.display()
                        ));
                        continue;
                    };
                    match value_text(&value) {
                        Some(t) => {
                            raw.insert(key, (t, Source::File));
                        }
                        None => errors.push(format!("config file: `{name}` must be a plain value")),
                    }
                }
            }
        }
    }
    for key in KEYS {
        let var = env_var(key);
        if let Some(v) = inputs.env.get(&var) {
            raw.insert(key, (v.clone(), Source::Env(var)));
        }
    }
    for (key, value) in &inputs.flags {
        raw.insert(key, (value.clone(), Source::Flag));
    }

    let mut p = Parser { errors };
    let get = |k: &str| raw.get(k);

    let listen = p.take(
        "listen",
        get("listen"),
        SocketAddr::from(([127, 0, 0, 1], 8080)),
        parse_listen,
    );
    let upstream = match get("upstream") {
        Some(_) => Some(p.take(
            "upstream",
            get("upstream"),
            Uri::from_static("http://invalid"),
            parse_upstream,
        )),
        None => {
            p.errors.push(
                "no upstream: set --upstream URL (or `upstream` in the config file, or IDEMGATE_UPSTREAM)"
                    .into(),
            );
            None
        }
    };
    let default_store = match inputs.env.get("STATE_DIRECTORY") {
        // systemd may list several directories separated by ':'; the first is ours.
        Some(dir) if !dir.is_empty() => {
            let first = dir.split(':').next().unwrap_or(dir);
            StoreSpec::File(Path::new(first).join("idemgate.db"))
        }
        _ => StoreSpec::File(PathBuf::from("idemgate.db")),
    };
    let store = p.take("store", get("store"), default_store, StoreSpec::parse);

    let base = idemgate::policy::Policy::default();
    let ttl = p.take("ttl", get("ttl"), base.ttl, parse_duration);
    let lease = p.take("lease", get("lease"), base.lease, parse_duration);
    let require_key = p.take("require-key", get("require-key"), false, parse_bool);
    let wait = p.take("concurrent", get("concurrent"), false, parse_concurrency);
    let wait_max = p.take(
        "wait-max",
        get("wait-max"),
        Duration::from_secs(10),
        parse_duration,
    );
    let max_request_body = p.take(
        "max-request-body",
        get("max-request-body"),
        base.max_request_body,
        parse_size,
    );
    let max_stored_response = p.take(
        "max-stored-response",
        get("max-stored-response"),
        base.max_stored_response as u64,
        parse_size,
    );
    let upstream_timeout = p.take(
        "upstream-timeout",
        get("upstream-timeout"),
        Duration::from_secs(60),
        parse_duration,
    );
    let upstream_hard_timeout = p.take(
        "upstream-hard-timeout",
        get("upstream-hard-timeout"),
        Duration::from_secs(600),
        parse_duration,
    );
    let upstream_protocol = p.take(
        "upstream-protocol",
        get("upstream-protocol"),
        UpstreamProtocol::Auto,
        parse_upstream_protocol,
    );
    let scope_explicit = get("scope").is_some();
    let scope = p.take(
        "scope",
        get("scope"),
        ScopeSpec::Authorization,
        ScopeSpec::parse,
    );
    let trust_scope_header = p.take(
        "trust-scope-header",
        get("trust-scope-header"),
        false,
        parse_bool,
    );
    let jwt = JwtSettings {
        key_file: get("jwt-key-file").map(|(s, _)| PathBuf::from(s.trim())),
        issuers: get("jwt-issuer").map(|(s, _)| list(s)).unwrap_or_default(),
        audiences: get("jwt-audience")
            .map(|(s, _)| list(s))
            .unwrap_or_default(),
    };
    let on_missing_scope = p.take(
        "on-missing-scope",
        get("on-missing-scope"),
        MissingScope::Anonymous,
        parse_missing_scope,
    );
    let on_lease_expiry = p.take(
        "on-lease-expiry",
        get("on-lease-expiry"),
        LeaseExpiry::OutcomeUnknown,
        parse_lease_expiry,
    );
    let ambiguous = p.take(
        "ambiguous",
        get("ambiguous"),
        Ambiguous::Store,
        parse_ambiguous,
    );
    let fail_open = p.take("fail-open", get("fail-open"), false, parse_bool);
    let strict_keys = p.take("strict-keys", get("strict-keys"), false, parse_bool);
    let shutdown_grace = p.take(
        "shutdown-grace",
        get("shutdown-grace"),
        Duration::from_secs(25),
        parse_duration,
    );
    let trusted_proxies = p.take(
        "trusted-proxies",
        get("trusted-proxies"),
        Vec::new(),
        parse_networks,
    );
    let client_timeout = p.take(
        "client-timeout",
        get("client-timeout"),
        DEFAULT_CLIENT_TIMEOUT,
        parse_duration,
    );
    let max_connections = p.take(
        "max-connections",
        get("max-connections"),
        ConnectionLimit::Auto,
        parse_connection_limit,
    );
    let access_log = p.take("access-log", get("access-log"), false, parse_bool);
    let admin_listen = p.take(
        "admin-listen",
        get("admin-listen"),
        DEFAULT_ADMIN_LISTEN.parse().ok(),
        |s| match s.trim() {
            "off" | "none" | "" => Ok(None),
            other => parse_listen(other).map(Some),
        },
    );
    let admin_token_file = get("admin-token-file").map(|(s, _)| PathBuf::from(s.trim()));
    let release_statuses = p.take(
        "release-statuses",
        get("release-statuses"),
        base.release_statuses.clone(),
        parse_statuses,
    );
    let store_pool_size = p.take("store-pool-size", get("store-pool-size"), None, |s| {
        s.trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_STORE_POOL_SIZE).contains(n))
            .map(Some)
            .ok_or_else(|| {
                format!("`{s}` is not a pool size: use a count from 1 to {MAX_STORE_POOL_SIZE}")
            })
    });
    let instances = p.take("instances", get("instances"), 1u32, |s| {
        s.trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("`{s}` is not a positive count"))
    });

    // Cross-checks.
    if lease < Duration::from_millis(30) {
        p.errors.push(format!(
            "lease {} is too short (at least 30ms)",
            format_duration(lease)
        ));
    }
    if client_timeout < Duration::from_millis(100) {
        p.errors.push(format!(
            "client-timeout {} is too short (at least 100ms)",
            format_duration(client_timeout)
        ));
    }
    if upstream_hard_timeout < upstream_timeout {
        p.errors.push(format!(
            "upstream-hard-timeout ({}) must be at least upstream-timeout ({})",
            format_duration(upstream_hard_timeout),
            format_duration(upstream_timeout)
        ));
    }
    if let Some(addr) = admin_listen
        && !addr.ip().is_loopback()
        && admin_token_file.is_none()
    {
        p.errors.push(format!(
            "admin-listen {addr} is not a loopback address: set --admin-token-file (the admin API \
                 requires a bearer token when reachable from other hosts)"
        ));
    }
    if let Some(path) = &admin_token_file {
        match std::fs::read_to_string(path) {
            Ok(t) if t.trim().is_empty() => p
                .errors
                .push(format!("admin token file {} is empty", path.display())),
            Ok(_) => {}
            Err(e) => p.errors.push(format!(
                "cannot read admin token file {}: {e}",
                path.display()
            )),
        }
    }
    let concurrency = if wait {
        Concurrency::Wait { max: wait_max }
    } else {
        Concurrency::Conflict
    };
    let defaults = RouteSettings {
        require_key,
        ttl,
        lease,
        concurrency,
        max_request_body,
        max_stored_response,
        on_missing_scope,
        on_lease_expiry,
        ambiguous,
        fail_open,
        strict_keys,
        release_statuses,
        fingerprint: FingerprintOptions::default(),
        scope: None,
    };
    let mut routes = Vec::new();
    for (i, table) in route_tables.into_iter().enumerate() {
        if let Some(r) = parse_route(i, table, &defaults, &mut p.errors) {
            routes.push(r);
        }
    }
    let mut scopes: Vec<&ScopeSpec> = vec![&scope];
    scopes.extend(routes.iter().filter_map(|r| r.settings.scope.as_ref()));
    for s in scopes {
        match s {
            ScopeSpec::Header(name) if !trust_scope_header => p.errors.push(format!(
                "scope `header:{name}` needs --trust-scope-header: only use it when a trusted edge \
                 strips `{name}` from client requests and sets it itself"
            )),
            ScopeSpec::JwtClaim(_) if jwt.key_file.is_none() => p.errors.push(
                "a `jwt-claim:` scope needs --jwt-key-file (a PEM key, a JWKS file, or an HS256 secret)".into(),
            ),
            _ => {}
        }
    }
    if let Some(path) = &jwt.key_file
        && let Err(e) = std::fs::metadata(path)
    {
        p.errors
            .push(format!("cannot read jwt key file {}: {e}", path.display()));
    }

    if !p.errors.is_empty() {
        return Err(ConfigError(p.errors));
    }
    let Some(upstream) = upstream else {
        return Err(ConfigError(vec!["no upstream".into()]));
    };
    let config = Config {
        listen,
        upstream,
        store,
        store_pool_size,
        defaults,
        upstream_timeout,
        upstream_hard_timeout,
        upstream_protocol,
        scope,
        scope_explicit,
        trust_scope_header,
        jwt,
        shutdown_grace,
        client_timeout,
        max_connections,
        trusted_proxies,
        access_log,
        admin_listen,
        admin_token_file,
        instances,
        routes,
    };
    let warnings = warnings(&config);
    Ok(Loaded { config, warnings })
}

fn parse_route(
    index: usize,
    table: toml::Table,
    defaults: &RouteSettings,
    errors: &mut Vec<String>,
) -> Option<Route> {
    let at = format!("route #{}", index + 1);
    let mut raw: BTreeMap<String, toml::Value> = BTreeMap::new();
    for (k, v) in table {
        raw.insert(k.replace('_', "-"), v);
    }
    let mut p = Parser { errors: Vec::new() };
    let mut text = |key: &str| -> Option<(String, Source)> {
        raw.remove(key).and_then(|v| match value_text(&v) {
            Some(t) => Some((t, Source::File)),
            None => {
                p.errors
                    .push(format!("{at}: `{key}` must be a plain value"));
                None
            }
        })
    };
    let path_v = text("path");
    let pattern_v = text("pattern");
    let methods_v = text("methods");
    let protect_v = text("protect");
    let fields: Vec<(&str, Option<(String, Source)>)> = [
        "require-key",
        "ttl",
        "lease",
        "concurrent",
        "wait-max",
        "max-request-body",
        "max-stored-response",
        "on-missing-scope",
        "on-lease-expiry",
        "ambiguous",
        "fail-open",
        "strict-keys",
        "release-statuses",
        "scope",
    ]
    .into_iter()
    .map(|k| (k, text(k)))
    .collect();
    let fingerprint_v = raw.remove("fingerprint");
    let unknown: Vec<String> = raw.keys().cloned().collect();
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| *n == k)
            .and_then(|(_, v)| v.as_ref())
    };

    let path = match (path_v, pattern_v) {
        (Some((p_, _)), None) => PathMatch::prefix(&p_).map(|m| (m, ("path", p_))),
        (None, Some((p_, _))) => PathMatch::pattern(&p_).map(|m| (m, ("pattern", p_))),
        (Some(_), Some(_)) => Err("set `path` (a prefix) or `pattern`, not both".into()),
        (None, None) => Err("needs `path` (a prefix) or `pattern`".into()),
    };
    let methods = match &methods_v {
        Some((m, _)) => method_list(m),
        None => Ok(vec![Method::POST, Method::PATCH]),
    };
    let protect = p.take("protect", protect_v.as_ref(), true, parse_bool);
    let d = defaults;
    let wait_default = matches!(d.concurrency, Concurrency::Wait { .. });
    let wait = p.take(
        "concurrent",
        get("concurrent"),
        wait_default,
        parse_concurrency,
    );
    let default_max = match d.concurrency {
        Concurrency::Wait { max } => max,
        Concurrency::Conflict => Duration::from_secs(10),
    };
    let wait_max = p.take("wait-max", get("wait-max"), default_max, parse_duration);
    let mut settings = RouteSettings {
        require_key: p.take("require-key", get("require-key"), d.require_key, parse_bool),
        ttl: p.take("ttl", get("ttl"), d.ttl, parse_duration),
        lease: p.take("lease", get("lease"), d.lease, parse_duration),
        concurrency: if wait {
            Concurrency::Wait { max: wait_max }
        } else {
            Concurrency::Conflict
        },
        max_request_body: p.take(
            "max-request-body",
            get("max-request-body"),
            d.max_request_body,
            parse_size,
        ),
        max_stored_response: p.take(
            "max-stored-response",
            get("max-stored-response"),
            d.max_stored_response,
            parse_size,
        ),
        on_missing_scope: p.take(
            "on-missing-scope",
            get("on-missing-scope"),
            d.on_missing_scope,
            parse_missing_scope,
        ),
        on_lease_expiry: p.take(
            "on-lease-expiry",
            get("on-lease-expiry"),
            d.on_lease_expiry,
            parse_lease_expiry,
        ),
        ambiguous: p.take("ambiguous", get("ambiguous"), d.ambiguous, parse_ambiguous),
        fail_open: p.take("fail-open", get("fail-open"), d.fail_open, parse_bool),
        strict_keys: p.take("strict-keys", get("strict-keys"), d.strict_keys, parse_bool),
        release_statuses: p.take(
            "release-statuses",
            get("release-statuses"),
            d.release_statuses.clone(),
            parse_statuses,
        ),
        fingerprint: FingerprintOptions::default(),
        scope: get("scope").and_then(|(s, _)| match ScopeSpec::parse(s) {
            Ok(s) => Some(s),
            Err(e) => {
                p.errors.push(format!("invalid `scope`: {e}"));
                None
            }
        }),
    };
    if let Some(fp) = fingerprint_v {
        match parse_fingerprint(fp) {
            Ok(f) => settings.fingerprint = f,
            Err(e) => p.errors.push(format!("invalid `fingerprint`: {e}")),
        }
    }
    for k in unknown {
        p.errors.push(format!("unknown key `{k}`"));
    }
    if let Err(e) = &path {
        p.errors.push(e.clone());
    }
    if let Err(e) = &methods {
        p.errors.push(format!("invalid `methods`: {e}"));
    }
    let failed = !p.errors.is_empty();
    errors.extend(p.errors.into_iter().map(|e| {
        let e = e.replace("`route` in the config file", "");
        format!("{at}: {}", e.replace("in the config file", "").trim())
    }));
    if failed {
        return None;
    }
    let (path, path_text) = path.ok()?;
    Some(Route {
        path,
        path_text,
        methods: methods.ok()?,
        protect,
        settings,
    })
}

fn parse_fingerprint(v: toml::Value) -> Result<FingerprintOptions, String> {
    let toml::Value::Table(t) = v else {
        return Err("must be a table, e.g. { headers = [\"api-version\"], json = true, ignore = [\"/ts\"] }".into());
    };
    let mut out = FingerprintOptions::default();
    let mut json = false;
    let mut ignore = Vec::new();
    for (k, v) in t {
        match k.as_str() {
            "headers" => {
                let names = value_text(&v).ok_or("`headers` must be a list of names")?;
                for n in list(&names) {
                    out.headers.push(
                        HeaderName::from_bytes(n.as_bytes())
                            .map_err(|_| format!("`{n}` is not a header name"))?,
                    );
                }
            }
            "json" => {
                json = v.as_bool().ok_or("`json` must be true or false")?;
            }
            "ignore" => {
                let toml::Value::Array(items) = v else {
                    return Err("`ignore` must be a list of JSON pointers".into());
                };
                for item in items {
                    let s = item.as_str().ok_or("`ignore` entries must be strings")?;
                    check_json_pointer(s).map_err(|e| format!("`{s}`: {e}"))?;
                    ignore.push(s.to_owned());
                }
            }
            other => return Err(format!("unknown key `{other}` (use headers, json, ignore)")),
        }
    }
    if !ignore.is_empty() && !json {
        return Err("`ignore` needs `json = true`".into());
    }
    if json {
        out.json = Some(JsonFingerprint { ignore });
    }
    Ok(out)
}

fn warnings(c: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if let StoreSpec::File(path) = &c.store
        && path.is_relative()
    {
        w.push(format!(
            "store path `{}` is relative: it is resolved against the working directory at start \
                 (set an absolute path, or STATE_DIRECTORY under systemd)",
            path.display()
        ));
    }
    if c.store.single_process() {
        if c.instances > 1 {
            w.push(format!(
                "the {} store serves ONE process but `instances` is {}: every replica would have its \
                 own records and duplicates would execute; use redis:// or postgres://",
                c.store.display(),
                c.instances
            ));
        } else {
            w.push(format!(
                "the {} store serves a single instance: to run more than one (replicas, a load \
                 balancer), use redis:// or postgres://",
                c.store.display()
            ));
        }
    }
    if let Some(size) = c.store_pool_size
        && !matches!(c.store, StoreSpec::Postgres(_))
    {
        w.push(format!(
            "store-pool-size {size} is ignored: only the PostgreSQL store pools connections, \
             and the store is {}",
            c.store.display()
        ));
    }
    let anonymous = std::iter::once(&c.defaults)
        .chain(c.routes.iter().filter(|r| r.protect).map(|r| &r.settings))
        .any(|s| s.on_missing_scope == MissingScope::Anonymous);
    if anonymous {
        w.push(
            "on-missing-scope = anonymous: protected requests without credentials share one \
             anonymous scope, so such clients can see each other's keys (use `reject` to require \
             credentials)"
                .into(),
        );
    }
    w
}

impl Config {
    /// The effective configuration as TOML (what `check-config` prints). Secrets are not
    /// included: store passwords are hidden, token files are named, not read.
    pub fn to_toml(&self) -> String {
        use toml::Value as V;
        let mut t = toml::Table::new();
        let s = |x: &str| V::String(x.to_owned());
        let d = |x: Duration| V::String(format_duration(x));
        t.insert("listen".into(), s(&self.listen.to_string()));
        t.insert("upstream".into(), s(&self.upstream.to_string()));
        t.insert("store".into(), s(&self.store.display()));
        if let Some(size) = self.store_pool_size {
            t.insert("store-pool-size".into(), V::Integer(i64::from(size)));
        }
        t.insert("scope".into(), s(&self.scope.display()));
        t.insert(
            "trust-scope-header".into(),
            V::Boolean(self.trust_scope_header),
        );
        if let Some(f) = &self.jwt.key_file {
            t.insert("jwt-key-file".into(), s(&f.display().to_string()));
        }
        if !self.jwt.issuers.is_empty() {
            t.insert(
                "jwt-issuer".into(),
                V::Array(self.jwt.issuers.iter().map(|x| s(x)).collect()),
            );
        }
        if !self.jwt.audiences.is_empty() {
            t.insert(
                "jwt-audience".into(),
                V::Array(self.jwt.audiences.iter().map(|x| s(x)).collect()),
            );
        }
        settings_into(&mut t, &self.defaults, true);
        t.insert("upstream-timeout".into(), d(self.upstream_timeout));
        t.insert(
            "upstream-hard-timeout".into(),
            d(self.upstream_hard_timeout),
        );
        t.insert("upstream-protocol".into(), s(self.upstream_protocol.name()));
        t.insert("shutdown-grace".into(), d(self.shutdown_grace));
        t.insert("client-timeout".into(), d(self.client_timeout));
        t.insert(
            "max-connections".into(),
            match self.max_connections {
                ConnectionLimit::Auto => s("auto"),
                ConnectionLimit::Fixed(n) => V::Integer(i64::try_from(n.get()).unwrap_or(i64::MAX)),
            },
        );
        t.insert(
            "trusted-proxies".into(),
            V::Array(
                self.trusted_proxies
                    .iter()
                    .map(|n| s(&n.to_string()))
                    .collect(),
            ),
        );
        t.insert("access-log".into(), V::Boolean(self.access_log));
        t.insert(
            "admin-listen".into(),
            s(&self
                .admin_listen
                .map_or("off".to_owned(), |a| a.to_string())),
        );
        if let Some(f) = &self.admin_token_file {
            t.insert("admin-token-file".into(), s(&f.display().to_string()));
        }
        t.insert("instances".into(), V::Integer(i64::from(self.instances)));
        let routes: Vec<V> = self
            .routes
            .iter()
            .map(|r| {
                let mut rt = toml::Table::new();
                rt.insert(r.path_text.0.into(), s(&r.path_text.1));
                rt.insert(
                    "methods".into(),
                    V::Array(r.methods.iter().map(|m| s(m.as_str())).collect()),
                );
                rt.insert("protect".into(), V::Boolean(r.protect));
                if r.protect {
                    settings_into(&mut rt, &r.settings, false);
                }
                V::Table(rt)
            })
            .collect();
        if !routes.is_empty() {
            t.insert("route".into(), V::Array(routes));
        }
        toml::to_string(&t).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

fn settings_into(t: &mut toml::Table, r: &RouteSettings, global: bool) {
    use toml::Value as V;
    let s = |x: &str| V::String(x.to_owned());
    let d = |x: Duration| V::String(format_duration(x));
    t.insert("require-key".into(), V::Boolean(r.require_key));
    t.insert("ttl".into(), d(r.ttl));
    t.insert("lease".into(), d(r.lease));
    match r.concurrency {
        Concurrency::Conflict => {
            t.insert("concurrent".into(), s("conflict"));
        }
        Concurrency::Wait { max } => {
            t.insert("concurrent".into(), s("wait"));
            t.insert("wait-max".into(), d(max));
        }
    }
    t.insert(
        "max-request-body".into(),
        s(&format_size(r.max_request_body)),
    );
    t.insert(
        "max-stored-response".into(),
        s(&format_size(r.max_stored_response)),
    );
    t.insert(
        "on-missing-scope".into(),
        s(match r.on_missing_scope {
            MissingScope::Anonymous => "anonymous",
            MissingScope::Reject => "reject",
            MissingScope::Passthrough => "passthrough",
        }),
    );
    t.insert(
        "on-lease-expiry".into(),
        s(match r.on_lease_expiry {
            LeaseExpiry::OutcomeUnknown => "outcome-unknown",
            LeaseExpiry::ReExecute => "re-execute",
        }),
    );
    t.insert(
        "ambiguous".into(),
        s(match r.ambiguous {
            Ambiguous::Store => "store",
            Ambiguous::Release => "release",
        }),
    );
    t.insert("fail-open".into(), V::Boolean(r.fail_open));
    t.insert("strict-keys".into(), V::Boolean(r.strict_keys));
    t.insert(
        "release-statuses".into(),
        V::Array(
            r.release_statuses
                .iter()
                .map(|c| V::Integer(i64::from(c.as_u16())))
                .collect(),
        ),
    );
    if !global {
        if let Some(scope) = &r.scope {
            t.insert("scope".into(), s(&scope.display()));
        }
        if r.fingerprint != FingerprintOptions::default() {
            let mut f = toml::Table::new();
            f.insert(
                "headers".into(),
                V::Array(
                    r.fingerprint
                        .headers
                        .iter()
                        .map(|h| s(h.as_str()))
                        .collect(),
                ),
            );
            if let Some(j) = &r.fingerprint.json {
                f.insert("json".into(), V::Boolean(true));
                f.insert(
                    "ignore".into(),
                    V::Array(j.ignore.iter().map(|x| s(x)).collect()),
                );
            }
            t.insert("fingerprint".into(), V::Table(f));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn inputs(file: Option<&str>, env: &[(&str, &str)], flags: &[(&'static str, &str)]) -> Inputs {
        Inputs {
            file: file.map(|t| (PathBuf::from("idemgate.toml"), t.to_owned())),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            flags: flags.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        }
    }

    fn errors(i: &Inputs) -> String {
        load(i).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = load(&inputs(None, &[], &[("upstream", "http://127.0.0.1:3000")]))
            .unwrap()
            .config;
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.store, StoreSpec::File(PathBuf::from("idemgate.db")));
        assert_eq!(c.defaults.ttl, Duration::from_secs(86_400));
        assert_eq!(c.defaults.lease, Duration::from_secs(30));
        assert_eq!(c.defaults.max_request_body, 10 << 20);
        assert_eq!(c.defaults.max_stored_response, 1 << 20);
        assert_eq!(c.upstream_timeout, Duration::from_secs(60));
        assert_eq!(c.upstream_hard_timeout, Duration::from_secs(600));
        assert_eq!(c.upstream_protocol, UpstreamProtocol::Auto);
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.client_timeout, Duration::from_secs(75));
        assert_eq!(c.max_connections, ConnectionLimit::Auto);
        assert_eq!(c.scope, ScopeSpec::Authorization);
        assert!(!c.scope_explicit);
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.defaults.concurrency, Concurrency::Conflict);
        assert!(!c.defaults.require_key);
        assert!(!c.access_log);

        let c = load(&inputs(
            None,
            &[("STATE_DIRECTORY", "/var/lib/idemgate")],
            &[("upstream", "http://u")],
        ))
        .unwrap()
        .config;
        assert_eq!(
            c.store,
            StoreSpec::File(PathBuf::from("/var/lib/idemgate/idemgate.db"))
        );
    }

    #[test]
    fn file_then_env_then_flag() {
        let file = r#"
            upstream = "http://file:1"
            ttl = "1h"
            lease = "10s"
            max_request_body = 65536
            require-key = true
            concurrent = "wait"
            wait-max = "3s"
        "#;
        let i = inputs(
            Some(file),
            &[
                ("IDEMGATE_TTL", "2h"),
                ("IDEMGATE_LEASE", "5s"),
                ("IDEMGATE_REQUIRE_KEY", "false"),
            ],
            &[("lease", "2s"), ("listen", "127.0.0.1:0")],
        );
        let c = load(&i).unwrap().config;
        assert_eq!(c.upstream, "http://file:1/");
        assert_eq!(c.defaults.ttl, Duration::from_secs(7200), "env over file");
        assert_eq!(c.defaults.lease, Duration::from_secs(2), "flag over env");
        assert_eq!(
            c.defaults.max_request_body, 65_536,
            "file, snake_case, integer"
        );
        assert!(!c.defaults.require_key, "env false over file true");
        assert_eq!(
            c.defaults.concurrency,
            Concurrency::Wait {
                max: Duration::from_secs(3)
            }
        );
        assert_eq!(c.listen.port(), 0);

        let access = |file: Option<&str>, env: &[(&str, &str)], flags: &[(&'static str, &str)]| {
            let mut flags = flags.to_vec();
            flags.push(("upstream", "http://u"));
            load(&inputs(file, env, &flags)).unwrap().config.access_log
        };
        assert!(
            access(Some("access_log = true"), &[], &[]),
            "file, snake_case"
        );
        assert!(!access(
            Some("access-log = true"),
            &[("IDEMGATE_ACCESS_LOG", "false")],
            &[]
        ));
        assert!(access(
            None,
            &[("IDEMGATE_ACCESS_LOG", "false")],
            &[("access-log", "true")]
        ));
    }

    #[test]
    fn bad_values_name_their_source() {
        let e = errors(&inputs(
            Some("upstream = \"http://u\"\nttl = \"soon\""),
            &[],
            &[],
        ));
        assert!(e.contains("`ttl` in the config file"), "{e}");
        let e = errors(&inputs(
            None,
            &[("IDEMGATE_LEASE", "30")],
            &[("upstream", "http://u")],
        ));
        assert!(e.contains("IDEMGATE_LEASE") && e.contains("no unit"), "{e}");
        let e = errors(&inputs(
            None,
            &[],
            &[("upstream", "http://u"), ("max-stored-response", "lots")],
        ));
        assert!(e.contains("--max-stored-response"), "{e}");
        let e = errors(&inputs(
            None,
            &[("IDEMGATE_UPSTREAM_PROTOCOL", "h3")],
            &[("upstream", "http://u")],
        ));
        assert!(
            e.contains("IDEMGATE_UPSTREAM_PROTOCOL") && e.contains("`auto`, `http1` or `http2`"),
            "{e}"
        );
        let e = errors(&inputs(
            None,
            &[],
            &[("upstream", "http://u"), ("client-timeout", "0s")],
        ));
        assert!(e.contains("client-timeout 0s is too short"), "{e}");
        for bad in ["0", "-3", "many"] {
            let e = errors(&inputs(
                None,
                &[],
                &[("upstream", "http://u"), ("max-connections", bad)],
            ));
            assert!(
                e.contains("max-connections") && e.contains("`auto` or a positive number"),
                "{bad}: {e}"
            );
        }
        let e = errors(&inputs(None, &[], &[]));
        assert!(e.contains("no upstream"), "{e}");
        let e = errors(&inputs(None, &[], &[("upstream", "ftp://u")]));
        assert!(e.contains("http://"), "{e}");
        let e = errors(&inputs(
            Some("upstream = \"http://u\"\nbogus = 1"),
            &[],
            &[],
        ));
        assert!(e.contains("unknown key `bogus`"), "{e}");
        let e = errors(&inputs(
            None,
            &[],
            &[("upstream", "http://u"), ("store", "mysql://x")],
        ));
        assert!(e.contains("not a store"), "{e}");
        let e = errors(&inputs(
            None,
            &[],
            &[
                ("upstream", "http://u"),
                ("upstream-timeout", "2m"),
                ("upstream-hard-timeout", "1m"),
            ],
        ));
        assert!(e.contains("at least upstream-timeout"), "{e}");
    }

    #[test]
    fn scope_rules() {
        let e = errors(&inputs(
            None,
            &[],
            &[("upstream", "http://u"), ("scope", "header:X-Tenant")],
        ));
        assert!(e.contains("--trust-scope-header"), "{e}");
        let c = load(&inputs(
            None,
            &[],
            &[
                ("upstream", "http://u"),
                ("scope", "header:X-Tenant"),
                ("trust-scope-header", "true"),
            ],
        ))
        .unwrap()
        .config;
        assert_eq!(
            c.scope,
            ScopeSpec::Header(HeaderName::from_static("x-tenant"))
        );
        assert!(c.scope_explicit);
        let e = errors(&inputs(
            None,
            &[],
            &[("upstream", "http://u"), ("scope", "jwt-claim:sub")],
        ));
        assert!(e.contains("--jwt-key-file"), "{e}");
        let e = errors(&inputs(
            None,
            &[],
            &[("upstream", "http://u"), ("scope", "cookie")],
        ));
        assert!(e.contains("not a scope"), "{e}");
    }

    #[test]
    fn admin_off_loopback_needs_a_token() {
        let e = errors(&inputs(
            None,
            &[],
            &[("upstream", "http://u"), ("admin-listen", "0.0.0.0:9090")],
        ));
        assert!(e.contains("--admin-token-file"), "{e}");
        let c = load(&inputs(
            None,
            &[],
            &[("upstream", "http://u"), ("admin-listen", "off")],
        ))
        .unwrap()
        .config;
        assert_eq!(c.admin_listen, None);
    }

    #[test]
    fn routes() {
        let file = r#"
            upstream = "http://u"
            ttl = "1h"
            max-connections = 500
            [[route]]
            path = "/v1/payments"
            methods = ["post"]
            require_key = true
            ttl = "48h"
            fingerprint = { headers = ["api-version"], json = true, ignore = ["/client_ts"] }
            release-statuses = [429]
            ambiguous = "release"
            [[route]]
            pattern = "/v1/orders/{id}/capture"
            concurrent = "wait"
            [[route]]
            path = "/webhooks"
            protect = false
        "#;
        let c = load(&inputs(Some(file), &[], &[])).unwrap().config;
        assert_eq!(
            c.max_connections,
            ConnectionLimit::Fixed(std::num::NonZeroUsize::new(500).unwrap())
        );
        assert_eq!(c.routes.len(), 3);
        let r = &c.routes[0];
        assert_eq!(r.methods, vec![Method::POST]);
        assert!(r.settings.require_key);
        assert_eq!(r.settings.ttl, Duration::from_secs(48 * 3600));
        assert_eq!(
            r.settings.release_statuses,
            vec![StatusCode::TOO_MANY_REQUESTS]
        );
        assert_eq!(r.settings.ambiguous, Ambiguous::Release);
        assert_eq!(
            r.settings.fingerprint.headers,
            vec![HeaderName::from_static("api-version")]
        );
        assert_eq!(
            r.settings.fingerprint.json.as_ref().unwrap().ignore,
            vec!["/client_ts".to_owned()]
        );
        let r = &c.routes[1];
        assert_eq!(
            r.settings.ttl,
            Duration::from_secs(3600),
            "inherits the global ttl"
        );
        assert_eq!(r.methods, vec![Method::POST, Method::PATCH]);
        assert!(matches!(r.settings.concurrency, Concurrency::Wait { .. }));
        assert!(r.path.matches("/v1/orders/9/capture"));
        assert!(!c.routes[2].protect);
        // The printed config loads back to the same thing.
        let printed = c.to_toml();
        let mut again = load(&inputs(Some(&printed), &[], &[])).unwrap().config;
        assert!(again.scope_explicit, "the printed scope is explicit");
        again.scope_explicit = false;
        assert_eq!(again, c, "{printed}");

        let e = errors(&inputs(
            Some("upstream = \"http://u\"\n[[route]]\nmethods = [\"POST\"]\nttl = \"x\"\nfoo = 1"),
            &[],
            &[],
        ));
        assert!(
            e.contains("route #1")
                && e.contains("`path`")
                && e.contains("unknown key `foo`")
                && e.contains("ttl"),
            "{e}"
        );
        let e = errors(&inputs(
            Some(
                "upstream = \"http://u\"\n[[route]]\npath = \"/a\"\nfingerprint = { ignore = [\"x\"], json = true }",
            ),
            &[],
            &[],
        ));
        assert!(e.contains("JSON pointer"), "{e}");
    }

    #[test]
    fn store_pool_size_is_a_bounded_count_for_the_postgres_store() {
        let pg = ("store", "postgres://h/db");
        let c = load(&inputs(None, &[], &[("upstream", "http://u"), pg]))
            .unwrap()
            .config;
        assert_eq!(c.store_pool_size, None);
        assert!(!c.to_toml().contains("store-pool-size"));
        // file < env < flag, as for every setting.
        let file = "store-pool-size = 4";
        let env = [("IDEMGATE_STORE_POOL_SIZE", "6")];
        for (file, env, flags, want) in [
            (Some(file), &[][..], &[("upstream", "http://u"), pg][..], 4),
            (Some(file), &env[..], &[("upstream", "http://u"), pg][..], 6),
            (
                Some(file),
                &env[..],
                &[("upstream", "http://u"), pg, ("store-pool-size", "8")][..],
                8,
            ),
        ] {
            let loaded = load(&inputs(file, env, flags)).unwrap();
            assert_eq!(loaded.config.store_pool_size, Some(want));
            assert!(
                loaded
                    .config
                    .to_toml()
                    .contains(&format!("store-pool-size = {want}"))
            );
            assert!(
                !loaded.warnings.join("\n").contains("store-pool-size"),
                "{:?}",
                loaded.warnings
            );
        }
        for bad in ["0", "-1", "1001", "ten", ""] {
            let e = errors(&inputs(
                None,
                &[],
                &[("upstream", "http://u"), pg, ("store-pool-size", bad)],
            ));
            assert!(
                e.contains("--store-pool-size") && e.contains("a count from 1 to 1000"),
                "{bad:?}: {e}"
            );
        }
        // Only PostgreSQL pools: elsewhere the setting is said to do nothing.
        for store in ["memory", "file:/abs/x.db", "redis://h:6379"] {
            let w = load(&inputs(
                None,
                &[],
                &[
                    ("upstream", "http://u"),
                    ("store", store),
                    ("store-pool-size", "3"),
                ],
            ))
            .unwrap()
            .warnings
            .join("\n");
            assert!(w.contains("store-pool-size 3 is ignored"), "{store}: {w}");
        }
    }

    #[test]
    fn warnings_and_redaction() {
        let w = load(&inputs(None, &[], &[("upstream", "http://u")]))
            .unwrap()
            .warnings
            .join("\n");
        assert!(w.contains("relative"), "{w}");
        assert!(w.contains("single instance"), "{w}");
        assert!(w.contains("anonymous"), "{w}");
        let w = load(&inputs(
            None,
            &[],
            &[
                ("upstream", "http://u"),
                ("instances", "3"),
                ("on-missing-scope", "reject"),
                ("store", "file:/abs/x.db"),
            ],
        ))
        .unwrap()
        .warnings
        .join("\n");
        assert!(
            w.contains("ONE process") && !w.contains("relative") && !w.contains("anonymous"),
            "{w}"
        );
        assert_eq!(redact("redis://user:pw@h:1/0"), "redis://user:***@h:1/0");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(
            env_var("upstream-hard-timeout"),
            "IDEMGATE_UPSTREAM_HARD_TIMEOUT"
        );
    }
}
