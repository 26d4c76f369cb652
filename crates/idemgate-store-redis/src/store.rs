//! [`RedisStore`]: the [`Store`] contract over Lua scripts.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idemgate::record::{
    Completed, FORMAT_VERSION, Fingerprint, Holder, InFlight, Outcome, Record, RecordId, Timestamp,
    Token,
};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, LeaseExpiry, Release, Renewal, Resolution,
    Resolved, Store, StoreError, Watch,
};
use redis::{RedisError, Value};

use crate::conn::{Conn, ConnOptions, Target};
use crate::scripts::{Lua, Scripts};
use crate::subscriber::Subscriber;

/// The default bound on one store operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The default of [`RedisStoreBuilder::dead_connection_timeout`].
pub const DEFAULT_DEAD_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Durations are clamped to this (about 10 years) so that server-side sums of milliseconds stay
/// exact in Lua's doubles.
const MAX_DURATION_MS: u64 = 10 * 366 * 24 * 3600 * 1000;

/// Settings for [`RedisStore`]; build with [`RedisStore::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct RedisStoreBuilder {
    spec: String,
    timeout: Duration,
    key_prefix: String,
    allow_eviction: bool,
    wait_replicas: Option<(u32, Duration)>,
    dead_connection_timeout: Duration,
}

impl RedisStoreBuilder {
    /// The bound on each operation (default 1 s). An operation that has not answered by then
    /// returns [`StoreError::Timeout`] (`maybe_applied` for writes).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The text before `{<hex id>}` in every key and channel name (default `idemgate:`).
    /// Several deployments (or tests) can share one Redis with different prefixes. The `{…}`
    /// hash tag is always the record id, so a record's key and channel share a Cluster slot; a prefix with braces is refused by `connect`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Let [`readiness`](Store::readiness) pass whatever `maxmemory-policy` is set. Eviction can
    /// delete live records, which breaks at-most-once: only for caches you accept to lose.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// After every write, `WAIT replicas timeout` in the same round trip; fewer acknowledgements
    /// make the operation return [`StoreError::Timeout`] with `maybe_applied: true` (the write
    /// happened on the primary but may be lost on failover). Writes are then bounded by the
    /// operation timeout plus `timeout`. Operations that write nothing (a replay) do not wait.
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = Some((replicas, timeout));
        self
    }

    /// How long a connection may leave data unacknowledged, or its keep-alive probes
    /// unanswered, before it is given up and replaced (default 10 s; probes start after as
    /// long without traffic). A connection that went dark (a NAT or load balancer forgot it,
    /// the host vanished: no FIN, no RST) then fails over in about this time, where commands
    /// on it would otherwise time out for ~15 minutes (redis-rs reconnects on I/O errors, not
    /// on response timeouts); and the probes keep middleboxes from dropping an idle
    /// connection at all. Set on every connection, the wait-mode subscriber's included
    /// (`SO_KEEPALIVE`, and `TCP_USER_TIMEOUT` on Linux). Keep it well above the network's
    /// worst round trip.
    pub fn dead_connection_timeout(mut self, d: Duration) -> Self {
        self.dead_connection_timeout = d;
        self
    }

    /// Parses the spec and connects. Fails with [`StoreError::Unavailable`] on a bad spec or an
    /// unreachable server (within the timeout).
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let target = Target::parse(&self.spec).map_err(StoreError::Unavailable)?;
        if self.key_prefix.contains(['{', '}']) {
            // Redis Cluster hashes the first `{…}` of a key: a brace in the prefix would move
            // every record into the prefix's slot.
            return Err(StoreError::Unavailable(format!(
                "redis key prefix `{}` must not contain braces",
                self.key_prefix
            )));
        }
        let open = Conn::open(
            &target,
            ConnOptions::<fn(redis::PushInfo)> {
                timeout: self.timeout,
                response_timeout: self.timeout + self.wait_replicas.map_or(Duration::ZERO, |w| w.1),
                push: None,
                dead_connection_timeout: self.dead_connection_timeout,
            },
        );
        let conn = match tokio::time::timeout(self.timeout, open).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unavailable(&e)),
            Err(_) => {
                return Err(StoreError::Unavailable(
                    "redis: connecting timed out".into(),
                ));
            }
        };
        let cluster = conn.is_cluster();
        let prefix = self.key_prefix.clone();
        let subscriber = Subscriber::new(
            target,
            self.timeout,
            self.dead_connection_timeout,
            Box::new(move |id: &RecordId| key_name(&prefix, id)),
        );
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn,
                scripts: Scripts::new(),
                timeout: self.timeout,
                key_prefix: self.key_prefix,
                allow_eviction: self.allow_eviction,
                wait_replicas: self.wait_replicas,
                publish: if cluster { "SPUBLISH" } else { "PUBLISH" },
                holder: Holder(u64::from_be_bytes(
                    Token::random().0[..8].try_into().unwrap_or([0; 8]),
                )),
                subscriber,
            }),
        };
        // Fail fast on a server that is not there, so a misconfigured spec shows at startup.
        let ping_cmd = redis::cmd("PING");
        let ping = store.inner.conn.command(&ping_cmd);
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(e)) => Err(unavailable(&e)),
            Err(_) => Err(StoreError::Unavailable("redis: PING timed out".into())),
        }
    }
}

/// The Redis backend (standalone or Cluster). Cheap to clone; clones share connections.
///
/// See the [crate docs](crate) for the data layout and for deploying it safely.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    scripts: Scripts,
    timeout: Duration,
    key_prefix: String,
    allow_eviction: bool,
    wait_replicas: Option<(u32, Duration)>,
    /// `PUBLISH` on standalone, `SPUBLISH` on Cluster (sharded pub/sub keeps a message on the
    /// record's own shard instead of broadcasting it to every node).
    publish: &'static str,
    /// This instance's epoch, kept in InFlight records (for operators; leases are judged by the
    /// server clock).
    holder: Holder,
    subscriber: Arc<Subscriber>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.inner.conn.is_cluster())
            .field("key_prefix", &self.inner.key_prefix)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

fn key_name(prefix: &str, id: &RecordId) -> String {
    format!("{prefix}{{{}}}", id.to_hex())
}

fn ms(d: Duration) -> Vec<u8> {
    let v = u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_DURATION_MS);
    v.to_string().into_bytes()
}

fn flag(b: bool) -> Vec<u8> {
    if b { b"1".to_vec() } else { b"0".to_vec() }
}

/// Whether an operation changes the record (so a timeout may have applied it and `WAIT` applies).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl RedisStore {
    /// A builder for `spec`: `redis://host:port/db`, `rediss://…` (TLS, rustls) or
    /// `redis+cluster://h:p,h:p` (`rediss+cluster://` for TLS).
    pub fn builder(spec: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            spec: spec.into(),
            timeout: DEFAULT_TIMEOUT,
            key_prefix: "idemgate:".into(),
            allow_eviction: false,
            wait_replicas: None,
            dead_connection_timeout: DEFAULT_DEAD_CONNECTION_TIMEOUT,
        }
    }

    /// Connects with the defaults.
    pub async fn connect(spec: impl Into<String>) -> Result<Self, StoreError> {
        Self::builder(spec).connect().await
    }

    /// The Redis key (and pub/sub channel) of a record: `<prefix>{<hex id>}`.
    pub fn key(&self, id: &RecordId) -> String {
        key_name(&self.inner.key_prefix, id)
    }

    /// Runs one script in one round trip (plus `WAIT` in the same pipeline when configured and
    /// `kind` is a write), bounded by the timeout. Returns the script's answer as byte strings.
    async fn run(
        &self,
        lua: &Lua,
        id: &RecordId,
        args: Vec<Vec<u8>>,
        kind: Kind,
    ) -> Result<(Vec<Vec<u8>>, Option<i64>), StoreError> {
        let key = self.key(id);
        let fut = self.run_untimed(lua, &key, &args, kind);
        // A write that waits for replicas may take the WAIT timeout on top of the round trip.
        let bound = match (kind, self.inner.wait_replicas) {
            (Kind::Write, Some((_, wait))) => self.inner.timeout + wait,
            _ => self.inner.timeout,
        };
        match tokio::time::timeout(bound, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout {
                maybe_applied: kind == Kind::Write,
            }),
        }
    }

    async fn run_untimed(
        &self,
        lua: &Lua,
        key: &str,
        args: &[Vec<u8>],
        kind: Kind,
    ) -> Result<(Vec<Vec<u8>>, Option<i64>), StoreError> {
        let inner = &self.inner;
        let mut common: Vec<Vec<u8>> = vec![
            FORMAT_VERSION.to_string().into_bytes(),
            // The previous version is readable too (record.rs rule); with version 1 there is
            // none, so the current one stands in.
            FORMAT_VERSION
                .saturating_sub(1)
                .max(1)
                .to_string()
                .into_bytes(),
            inner.publish.as_bytes().to_vec(),
            key.as_bytes().to_vec(),
        ];
        common.extend_from_slice(args);
        let wait = if kind == Kind::Write {
            inner.wait_replicas
        } else {
            None
        };
        let build = |by_source: bool| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let c = pipe.cmd(if by_source { "EVAL" } else { "EVALSHA" });
            c.arg(if by_source { &lua.source } else { &lua.hash })
                .arg(1)
                .arg(key)
                .arg(&common);
            if let Some((n, t)) = wait {
                pipe.cmd("WAIT")
                    .arg(n)
                    .arg(u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1));
            }
            pipe
        };
        let mut values = inner
            .conn
            .pipeline(&build(false))
            .await
            .map_err(|e| request_error(&e, kind))?;
        if matches!(values.first(), Some(Value::ServerError(e)) if e.code() == "NOSCRIPT") {
            // Not executed: the script cache was flushed (restart, failover). EVAL with the
            // source runs it and caches it for the next EVALSHA.
            values = inner
                .conn
                .pipeline(&build(true))
                .await
                .map_err(|e| request_error(&e, kind))?;
        }
        let mut values = values.into_iter();
        let answer = values.next().unwrap_or(Value::Nil);
        let acks = match values.next() {
            Some(Value::Int(n)) => Some(n),
            Some(Value::ServerError(e)) => {
                return Err(StoreError::Unavailable(format!("redis WAIT failed: {e:?}")));
            }
            _ => None,
        };
        Ok((parts(answer)?, acks))
    }

    /// After a write: too few replica acknowledgements turn success into `Timeout`.
    fn check_acks(&self, acks: Option<i64>) -> Result<(), StoreError> {
        match (self.inner.wait_replicas, acks) {
            (Some((want, _)), Some(got)) if got < i64::from(want) => Err(StoreError::Timeout {
                maybe_applied: true,
            }),
            _ => Ok(()),
        }
    }
}

/// A script answer as byte strings; a server error becomes the matching `StoreError`.
fn parts(v: Value) -> Result<Vec<Vec<u8>>, StoreError> {
    match v {
        Value::Array(items) | Value::Set(items) => items
            .into_iter()
            .map(|item| match item {
                Value::BulkString(b) => Ok(b),
                Value::SimpleString(s) => Ok(s.into_bytes()),
                Value::Int(n) => Ok(n.to_string().into_bytes()),
                other => Err(StoreError::Unavailable(format!(
                    "redis: unexpected script answer item {other:?}"
                ))),
            })
            .collect(),
        Value::ServerError(e) => Err(server_error(e.code(), e.details().unwrap_or(""))),
        other => Err(StoreError::Unavailable(format!(
            "redis: unexpected script answer {other:?}"
        ))),
    }
}

fn server_error(code: &str, detail: &str) -> StoreError {
    let text = format!("{code} {detail}");
    if code == "OOM" || text.contains("OOM command not allowed") {
        StoreError::Full(format!("redis: {}", text.trim()))
    } else {
        // LOADING, CLUSTERDOWN, MASTERDOWN, TRYAGAIN, READONLY, script errors: the script did
        // not run to a write (Redis scripts are atomic), so nothing was applied.
        StoreError::Unavailable(format!("redis: {}", text.trim()))
    }
}

fn unavailable(e: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// A failed request: refused before sending → `Unavailable`; lost after sending → a write may
/// have been applied.
fn request_error(e: &RedisError, kind: Kind) -> StoreError {
    if let Some(code) = e.code() {
        if e.is_io_error() || e.is_timeout() {
            // fall through to the transport rules below
        } else {
            return server_error(code, e.detail().unwrap_or(""));
        }
    }
    if e.is_timeout() {
        return StoreError::Timeout {
            maybe_applied: kind == Kind::Write,
        };
    }
    if e.is_connection_refusal() || kind == Kind::Read {
        return unavailable(e);
    }
    if e.is_connection_dropped() || e.is_io_error() {
        // The request may have reached the server before the connection went.
        return StoreError::Timeout {
            maybe_applied: true,
        };
    }
    unavailable(e)
}

fn take<const N: usize>(b: &[u8], what: &str) -> Result<[u8; N], StoreError> {
    b.try_into()
        .map_err(|_| StoreError::Corrupt(format!("redis record: bad {what}")))
}

fn num(b: &[u8], what: &str) -> Result<u64, StoreError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("redis record: bad {what}")))
}

fn completed(p: &[Vec<u8>]) -> Result<Completed, StoreError> {
    let [_, fp, tok, x, o] = p else {
        return Err(StoreError::Unavailable(
            "redis: malformed completed answer".into(),
        ));
    };
    Ok(Completed {
        fingerprint: Fingerprint(take(fp, "fingerprint")?),
        origin_token: Token(take(tok, "token")?),
        expires_at: Timestamp(num(x, "expiry")?),
        outcome: Outcome::decode(o)?,
    })
}

fn tag(p: &[Vec<u8>]) -> &[u8] {
    p.first().map_or(&[][..], Vec::as_slice)
}

fn corrupt_or_unexpected(p: &[Vec<u8>], op: &str) -> StoreError {
    if tag(p) == b"E" {
        let reason = p
            .get(1)
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .unwrap_or_default();
        StoreError::Corrupt(reason)
    } else {
        StoreError::Unavailable(format!(
            "redis: unexpected {op} answer {:?}",
            String::from_utf8_lossy(tag(p))
        ))
    }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Acquire, StoreError> {
        let args = vec![
            req.fingerprint.0.to_vec(),
            req.token.0.to_vec(),
            ms(req.lease.max(Duration::from_millis(1))),
            ms(req.retention),
            self.inner.holder.0.to_string().into_bytes(),
            flag(req.on_lease_expiry == LeaseExpiry::ReExecute),
            Outcome::outcome_unknown().encode(),
        ];
        let (p, acks) = self
            .run(&self.inner.scripts.acquire, &req.id, args, Kind::Write)
            .await?;
        match tag(&p) {
            b"A" => {
                let lease_expires_at = Timestamp(num(p.get(1).map_or(&[][..], |v| v), "lease")?);
                if p.get(2).is_some_and(|w| w == b"1") {
                    self.check_acks(acks)?;
                }
                Ok(Acquire::Acquired { lease_expires_at })
            }
            b"I" => Ok(Acquire::InFlight {
                lease_expires_at: Timestamp(num(p.get(1).map_or(&[][..], |v| v), "lease")?),
            }),
            b"C" => Ok(Acquire::Completed(Box::new(completed(&p)?))),
            b"M" => Ok(Acquire::Mismatch),
            _ => Err(corrupt_or_unexpected(&p, "acquire")),
        }
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: Token,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        let args = vec![token.0.to_vec(), ms(lease.max(Duration::from_millis(1)))];
        let (p, acks) = self
            .run(&self.inner.scripts.renew, id, args, Kind::Write)
            .await?;
        match tag(&p) {
            b"R" => {
                self.check_acks(acks)?;
                Ok(Renewal::Renewed {
                    lease_expires_at: Timestamp(num(p.get(1).map_or(&[][..], |v| v), "lease")?),
                })
            }
            b"F" => Ok(Renewal::Refused),
            _ => Err(corrupt_or_unexpected(&p, "renew")),
        }
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let args = vec![
            token.0.to_vec(),
            outcome.encode(),
            ms(ttl),
            flag(outcome.is_outcome_unknown()),
        ];
        let (p, acks) = self
            .run(&self.inner.scripts.complete, id, args, Kind::Write)
            .await?;
        match tag(&p) {
            b"S" => {
                if p.get(1).is_some_and(|w| w == b"1") {
                    self.check_acks(acks)?;
                }
                Ok(Completion::Stored)
            }
            b"F" => Ok(Completion::Refused),
            _ => Err(corrupt_or_unexpected(&p, "complete")),
        }
    }

    async fn release(&self, id: &RecordId, token: Token) -> Result<Release, StoreError> {
        let (p, acks) = self
            .run(
                &self.inner.scripts.release,
                id,
                vec![token.0.to_vec()],
                Kind::Write,
            )
            .await?;
        match tag(&p) {
            b"D" => {
                if p.get(1).is_some_and(|w| w == b"1") {
                    self.check_acks(acks)?;
                }
                Ok(Release::Released)
            }
            b"F" => Ok(Release::Refused),
            _ => Err(corrupt_or_unexpected(&p, "release")),
        }
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let (p, _) = self
            .run(&self.inner.scripts.get, id, Vec::new(), Kind::Read)
            .await?;
        match tag(&p) {
            b"N" => Ok(None),
            b"I" => {
                let [_, fp, tok, lx, h] = p.as_slice() else {
                    return Err(StoreError::Unavailable(
                        "redis: malformed get answer".into(),
                    ));
                };
                Ok(Some(Record::InFlight(InFlight {
                    fingerprint: Fingerprint(take(fp, "fingerprint")?),
                    token: Token(take(tok, "token")?),
                    lease_expires_at: Timestamp(num(lx, "lease")?),
                    holder: Holder(num(h, "holder")?),
                })))
            }
            b"C" => Ok(Some(Record::Completed(completed(&p)?))),
            _ => Err(corrupt_or_unexpected(&p, "get")),
        }
    }

    async fn delete(&self, id: &RecordId, force: bool) -> Result<Deletion, StoreError> {
        let (p, acks) = self
            .run(
                &self.inner.scripts.delete,
                id,
                vec![flag(force)],
                Kind::Write,
            )
            .await?;
        match tag(&p) {
            b"N" => Ok(Deletion::NotFound),
            b"P" => Ok(Deletion::InFlightNeedsForce),
            b"D" => {
                self.check_acks(acks)?;
                Ok(Deletion::Deleted)
            }
            _ => Err(corrupt_or_unexpected(&p, "delete")),
        }
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution) -> Result<Resolved, StoreError> {
        let args = match &resolution {
            Resolution::Release => vec![
                b"release".to_vec(),
                Vec::new(),
                ms(Duration::ZERO),
                flag(false),
                Vec::new(),
            ],
            Resolution::Respond { outcome, ttl } => vec![
                b"respond".to_vec(),
                outcome.encode(),
                ms(*ttl),
                flag(outcome.is_outcome_unknown()),
                Token::random().0.to_vec(),
            ],
        };
        let (p, acks) = self
            .run(&self.inner.scripts.resolve, id, args, Kind::Write)
            .await?;
        match tag(&p) {
            b"N" => Ok(Resolved::NotFound),
            b"U" => Ok(Resolved::NotOutcomeUnknown),
            b"OK" => {
                self.check_acks(acks)?;
                Ok(Resolved::Resolved)
            }
            _ => Err(corrupt_or_unexpected(&p, "resolve")),
        }
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        // Redis expires keys by their TTL (the retention); nothing is left to purge.
        Ok(0)
    }

    async fn watch(&self, id: &RecordId, max_waiters: usize) -> Result<Option<Watch>, StoreError> {
        self.inner.subscriber.watch(id, max_waiters).await
    }

    async fn readiness(&self) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let answer =
            tokio::time::timeout(self.inner.timeout, self.inner.conn.on_all_masters(cmd)).await;
        let value = match answer {
            Err(_) => {
                return Err(StoreError::Timeout {
                    maybe_applied: false,
                });
            }
            Ok(Err(e)) if e.code() == Some("NOPERM") || e.to_string().contains("NOPERM") => {
                return Err(StoreError::Unavailable(format!(
                    "redis: cannot check maxmemory-policy (CONFIG GET is not permitted for this user: {e}); \
                     grant +config|get or set allow_eviction after checking the policy yourself"
                )));
            }
            Ok(Err(e)) => return Err(request_error(&e, Kind::Read)),
            Ok(Ok(v)) => v,
        };
        if self.inner.allow_eviction {
            return Ok(());
        }
        let mut strings = Vec::new();
        collect_strings(&value, &mut strings);
        let policies: Vec<String> = strings
            .into_iter()
            .filter(|s| s != "maxmemory-policy" && !s.contains(':'))
            .collect();
        if policies.is_empty() {
            return Err(StoreError::Unavailable(
                "redis: CONFIG GET maxmemory-policy gave no answer".into(),
            ));
        }
        if let Some(bad) = policies.iter().find(|p| p.as_str() != "noeviction") {
            return Err(StoreError::Unavailable(format!(
                "redis maxmemory-policy is `{bad}`: Redis may evict live idempotency records; \
                 set `maxmemory-policy noeviction` (or allow_eviction to accept the risk)"
            )));
        }
        Ok(())
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => out.push(s.clone()),
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|i| collect_strings(i, out));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            collect_strings(k, out);
            collect_strings(v, out);
        }),
        _ => {}
    }
}
