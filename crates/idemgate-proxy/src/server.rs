//! `idemgate serve`: the proxy and admin listeners, and graceful shutdown (SPEC §5).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use idemgate::IdempotencyLayer;
use idemgate::key::{IDEMPOTENCY_KEY, KeyRules};
use idemgate::layer::{Idempotency, RequestBody};
use idemgate::observe::{Observer as _, RequestOutcome};
use idemgate::policy::Policy;
use idemgate::problem::Problem;
use idemgate::scope::MissingScope;
use idemgate::store::Store;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower_layer::Layer;
use tower_service::Service;

use crate::access_log::{AccessEntry, AccessLog};
use crate::admin::{self, AdminState};
use crate::client_body::ClientBody;
use crate::client_request_body::{ClientRequestBody, Gated, ResetGate};
use crate::client_timeouts::{self, Activity, WriteDeadline};
use crate::config::{Config, ConnectionLimit, RouteSettings, ScopeSpec};
use crate::forward::{ClientAddr, ForwardConfig, Forwarder, MayProtect, TrustedProxies};
use crate::metrics::{ClientClose, Metrics};
use crate::parser_refusals::{self, RefusalReport, RefusalsAsProblems};
use crate::request_head;
use crate::routes::{RouteEntry, RouteTable, RouteTarget, SharedRoutes};
use crate::store::Tracked;

/// `max_lease_hold` is the hard timeout plus this: renewal stops only after the forwarder has
/// itself given up on the response head and the body had a moment to finish.
pub const LEASE_HOLD_MARGIN: Duration = Duration::from_secs(5);

/// How long a stopping server waits for the access log's last lines to be written.
const ACCESS_LOG_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot work (exit 64).
    #[error("{0}")]
    Config(String),
    /// Something outside the configuration failed (store unreachable, address in use).
    #[error("{0}")]
    Runtime(String),
}

/// The layer's policy for a route's settings.
pub fn policy(settings: &RouteSettings, config: &Config) -> Policy {
    Policy {
        require_key: settings.require_key,
        key: KeyRules {
            strict: settings.strict_keys,
            ..KeyRules::default()
        },
        on_missing_scope: settings.on_missing_scope,
        ttl: settings.ttl,
        lease: settings.lease,
        max_lease_hold: config.upstream_hard_timeout + LEASE_HOLD_MARGIN,
        client_deadline: Some(config.upstream_timeout),
        fingerprint: settings.fingerprint.clone(),
        release_statuses: settings.release_statuses.clone(),
        on_lease_expiry: settings.on_lease_expiry,
        ambiguous: settings.ambiguous,
        concurrency: settings.concurrency,
        max_request_body: settings.max_request_body,
        max_stored_response: usize::try_from(settings.max_stored_response).unwrap_or(usize::MAX),
        fail_open: settings.fail_open,
        ..Policy::default()
    }
}

/// Builds the route table from the configuration.
pub fn route_table(config: &Config) -> Result<Arc<RouteTable>, StartError> {
    let global = crate::scope::resolver(&config.scope, config.scope_explicit, &config.jwt)
        .map_err(StartError::Config)?;
    let mut entries = Vec::with_capacity(config.routes.len());
    for r in &config.routes {
        let scope = match &r.settings.scope {
            Some(s) => {
                Some(crate::scope::resolver(s, true, &config.jwt).map_err(StartError::Config)?)
            }
            None => None,
        };
        entries.push(RouteEntry {
            path: r.path.clone(),
            methods: r.methods.clone(),
            target: RouteTarget {
                policy: r.protect.then(|| Arc::new(policy(&r.settings, config))),
                scope,
            },
        });
    }
    Ok(Arc::new(RouteTable::new(
        entries,
        Arc::new(policy(&config.defaults, config)),
        global,
    )))
}

type Proxy = Idempotency<Forwarder<RequestBody<ClientRequestBody>>>;

/// What a client connection's responses are: the layer's, keeping their request in progress
/// and telling the access log how they ended.
type ClientResponseBody = ClientBody<idemgate::layer::ResponseBody>;

/// A bound, ready server: its listeners are open and its store is open.
pub struct Server {
    config: Config,
    listener: TcpListener,
    addr: SocketAddr,
    admin: Option<(TcpListener, SocketAddr)>,
    /// One per worker thread: each has its own upstream connection pool, so a connection is
    /// only ever driven by the thread that serves the requests sent over it.
    proxies: Vec<Proxy>,
    layer: IdempotencyLayer,
    routes: Arc<RouteTable>,
    tracked: Arc<Tracked>,
    metrics: Arc<Metrics>,
    admin_token: Option<Arc<str>>,
    /// `--max-connections` as resolved at start.
    max_connections: usize,
}

impl Server {
    /// Opens the store, builds the proxy and binds both listeners.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        crate::store::available(&config.store).map_err(StartError::Config)?;
        let routes = route_table(&config)?;
        let admin_token = match &config.admin_token_file {
            Some(path) => {
                let t = std::fs::read_to_string(path).map_err(|e| {
                    StartError::Config(format!(
                        "cannot read admin token file {}: {e}",
                        path.display()
                    ))
                })?;
                let t = t.trim();
                if t.is_empty() {
                    return Err(StartError::Config(format!(
                        "admin token file {} is empty",
                        path.display()
                    )));
                }
                Some(Arc::from(t))
            }
            None => None,
        };
        let raw = crate::store::open(&config.store, config.store_pool_size)
            .await
            .map_err(StartError::Runtime)?;
        let tracked = Arc::new(Tracked::new(raw, Some(metrics.clone())));
        let layer = IdempotencyLayer::builder(tracked.clone() as Arc<dyn Store>)
            .policy(SharedRoutes(routes.clone()))
            .scope(SharedRoutes(routes.clone()))
            .observer(metrics.clone())
            .build();
        let forward = ForwardConfig {
            upstream: config.upstream.clone(),
            hard_timeout: config.upstream_hard_timeout,
            soft_timeout: config.upstream_timeout,
            protocol: config.upstream_protocol,
        };
        let proxies = (0..worker_count())
            .map(|_| {
                Forwarder::new(forward.clone(), Some(metrics.clone()))
                    .map(|forwarder| layer.layer(forwarder))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::Config)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| StartError::Runtime(format!("cannot listen on {}: {e}", config.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Runtime(e.to_string()))?;
        let admin = match config.admin_listen {
            None => None,
            Some(a) => {
                let l = TcpListener::bind(a).await.map_err(|e| {
                    StartError::Runtime(format!("cannot listen on {a} (admin): {e}"))
                })?;
                let bound = l
                    .local_addr()
                    .map_err(|e| StartError::Runtime(e.to_string()))?;
                Some((l, bound))
            }
        };
        let max_connections = connection_limit(config.max_connections, open_files_limit());
        metrics.set_client_connections_limit(max_connections);
        Ok(Server {
            config,
            listener,
            addr,
            admin,
            proxies,
            layer,
            routes,
            tracked,
            metrics,
            admin_token,
            max_connections,
        })
    }

    /// The proxy's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, a)| *a)
    }

    /// Logs the addresses and the guarantees in force.
    pub fn log_startup(&self, warnings: &[String]) {
        let c = &self.config;
        tracing::info!(
            workers = self.proxies.len(),
            max_connections = self.max_connections,
            "listening on {}",
            self.addr
        );
        if let (ConnectionLimit::Fixed(n), Some(open_files)) =
            (c.max_connections, open_files_limit())
        {
            let fits = connection_limit(ConnectionLimit::Auto, Some(open_files));
            if n.get() > fits {
                tracing::warn!(
                    max_connections = n.get(),
                    open_files,
                    "max-connections is above what the open files limit allows (about {fits}): \
                     past that, accepting clients and connecting upstream fail"
                );
            }
        }
        if let Some(a) = self.admin_addr() {
            tracing::info!(
                token_required = self.admin_token.is_some(),
                "admin listening on {a}"
            );
        }
        tracing::info!(
            upstream = %c.upstream,
            store = %c.store.display(),
            store_kind = self.tracked.kind(),
            scope = %c.scope.display(),
            routes = c.routes.len(),
            "guarantees: POST/PATCH with an Idempotency-Key execute at most once per scope; \
             retries within {} get the stored outcome",
            crate::units::format_duration(c.defaults.ttl)
        );
        if matches!(c.scope, ScopeSpec::Header(_)) {
            tracing::warn!(
                "scope by a client-visible header: the edge in front MUST strip it from client requests"
            );
        }
        if c.defaults.on_missing_scope == MissingScope::Anonymous {
            tracing::info!(
                "requests without credentials use the shared anonymous scope (on-missing-scope = anonymous)"
            );
        }
        if c.defaults.fail_open {
            tracing::warn!("fail-open: when the store fails, requests are forwarded UNPROTECTED");
        }
        for w in warnings {
            tracing::warn!("{w}");
        }
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully (SPEC §5): stop accepting,
    /// let in-flight requests finish within `shutdown-grace`, then record what is still
    /// unfinished as outcome-unknown.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), StartError> {
        let Server {
            config,
            listener,
            admin,
            proxies,
            layer,
            routes,
            tracked,
            metrics,
            admin_token,
            max_connections,
            ..
        } = self;

        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = admin.map(|(l, _)| {
            let app = admin::router(AdminState {
                store: tracked.clone() as Arc<dyn Store>,
                metrics: metrics.clone(),
                token: admin_token,
            });
            tokio::spawn(async move {
                let served = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = admin_stopped.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "admin listener failed");
                }
            })
        });

        let trusted_proxies = TrustedProxies::new(config.trusted_proxies.clone());
        let access_log = if config.access_log {
            let log = AccessLog::to_stdout(Some(metrics.clone())).map_err(|e| {
                StartError::Runtime(format!("cannot start the access log's writer: {e}"))
            })?;
            Some(log)
        } else {
            None
        };
        // Asks every worker to close its idle connections while the limit holds clients back.
        let (drain, drains) = watch::channel(());
        let workers = proxies
            .into_iter()
            .enumerate()
            .map(|(n, proxy)| {
                let clients = ClientSettings {
                    timeout: config.client_timeout,
                    trusted_proxies: trusted_proxies.clone(),
                    drains: drains.clone(),
                    metrics: metrics.clone(),
                    access_log: access_log.clone(),
                };
                Worker::start(n, proxy, routes.clone(), clients)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StartError::Runtime(format!("cannot start a worker thread: {e}")))?;
        let mut next = 0usize;
        let mut shutdown = std::pin::pin!(shutdown);
        let slots = Arc::new(Semaphore::new(max_connections));
        let mut warned_full: Option<Instant> = None;
        loop {
            // A place under --max-connections first: while there is none, new connections wait
            // in the listen backlog (the kernel's), not in idemgate.
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY) {
                        tracing::warn!(
                            max_connections,
                            "client connection limit reached: new connections wait in the \
                             listen backlog; idle connections are closed to make room \
                             (--max-connections)"
                        );
                        warned_full = Some(Instant::now());
                    }
                    match wait_for_slot(&slots, &drain, &mut shutdown).await {
                        Some(permit) => permit,
                        None => break,
                    }
                }
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let slot = ConnectionSlot::new(permit, metrics.clone());
            // Round robin: every worker gets an equal share of the connections.
            let mut connection = match stream.into_std() {
                Ok(stream) => Some(Accepted { stream, peer, slot }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hand a connection to a worker");
                    None
                }
            };
            // Round robin; a worker whose thread died (a bug) is passed over, not fed.
            for _ in 0..workers.len() {
                let Some(c) = connection.take() else { break };
                connection = workers[next % workers.len()].hand_over(c);
                next = next.wrapping_add(1);
            }
            if connection.is_some() {
                tracing::error!(
                    "no worker thread is left to serve connections; connection dropped"
                );
            }
        }
        drop(listener);
        let grace = config.shutdown_grace;
        tracing::info!(
            grace = %crate::units::format_duration(grace),
            in_flight = metrics.in_flight_now(),
            "shutting down: no new connections; waiting for in-flight requests"
        );
        let deadline = tokio::time::Instant::now() + grace;
        let mut workers = workers;
        for worker in &mut workers {
            worker.stop_accepting();
        }
        let mut drained = true;
        for worker in &mut workers {
            drained &= tokio::time::timeout_at(deadline, &mut worker.drained)
                .await
                .is_ok();
        }
        // Connections are done; attempts the layer owns may still run (a client that got 504
        // outcome-pending), and outcomes may still be on their way into the store.
        loop {
            let busy = tracked.unfinished() > 0 || layer.pending_finishes() > 0;
            if !busy || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !drained {
            tracing::warn!("shutdown grace over with connections still open; closing them");
        }
        let unfinished = tracked.unfinished();
        if unfinished > 0 {
            let written = tracked.write_off().await;
            tracing::warn!(
                unfinished,
                written,
                "shutdown: unfinished requests recorded as outcome-unknown"
            );
        }
        // Only now do the workers' runtimes go, with whatever they still run.
        for worker in workers {
            worker.stop().await;
        }
        let _ = admin_stop.send(());
        if let Some(task) = admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        if let Some(log) = access_log {
            log.close(ACCESS_LOG_CLOSE_WAIT).await;
        }
        drop(layer);
        drop(tracked);
        tracing::info!("stopped");
        Ok(())
    }
}

/// Raises the soft limit on open files to the hard one, and says what it is.
///
/// Every client connection holds a file descriptor and so does its upstream connection; the
/// usual default soft limit (1024, also under systemd) runs out near 500 concurrent clients,
/// while the hard limit is commonly far higher. Go's runtime raises it the same way at start.
/// Logs the change, and warns when even the hard limit is low.
pub fn raise_open_files_limit() {
    let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
        return;
    };
    let now = match rlimit::increase_nofile_limit(hard) {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open files limit");
            soft
        }
    };
    if now > soft {
        tracing::info!(from = soft, to = now, "raised the open files limit");
    }
    if now < LOW_OPEN_FILES {
        tracing::warn!(
            limit = now,
            "the open files limit allows about {} concurrent clients (each holds a client and an \
             upstream connection); raise it (ulimit -n, systemd LimitNOFILE=)",
            now / 2
        );
    }
}

/// Below this many open files, `serve` warns at start.
const LOW_OPEN_FILES: u64 = 4096;

/// Open files `--max-connections auto` leaves to everything but client connections and their
/// upstream connections: the store's files and connections, the admin listener and its
/// clients, the log.
const RESERVED_OPEN_FILES: u64 = 100;

/// At most one "limit reached" warning per this long: under a sustained overload every accept
/// waits.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// How often a wait for a place under the limit asks the workers again to close idle
/// connections (more become idle for long enough as time passes).
const DRAIN_EVERY: Duration = Duration::from_secs(1);

/// Waits for a place under `--max-connections`, asking the workers every [`DRAIN_EVERY`] to close
/// connections that have been idle for a while. `None` at shutdown.
async fn wait_for_slot<F: Future<Output = ()>>(
    slots: &Arc<Semaphore>,
    drain: &watch::Sender<()>,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Option<OwnedSemaphorePermit> {
    let acquire = slots.clone().acquire_owned();
    tokio::pin!(acquire);
    loop {
        drain.send_replace(());
        tokio::select! {
            // Err only if the semaphore were closed, which nothing does.
            permit = &mut acquire => return permit.ok(),
            () = tokio::time::sleep(DRAIN_EVERY) => {}
            () = shutdown.as_mut() => return None,
        }
    }
}

/// The soft limit on open files (`None` where it cannot be read).
fn open_files_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// How many client connections are served at once. `auto` gives each client connection two
/// descriptors (its own and the upstream connection a request on it holds) out of the open
/// files limit, after [`RESERVED_OPEN_FILES`]; without a readable limit it assumes the common
/// default of 1024.
fn connection_limit(configured: ConnectionLimit, open_files: Option<u64>) -> usize {
    let limit = match configured {
        ConnectionLimit::Fixed(n) => n.get(),
        ConnectionLimit::Auto => {
            let fits = open_files
                .unwrap_or(1024)
                .saturating_sub(RESERVED_OPEN_FILES)
                / 2;
            usize::try_from(fits).unwrap_or(usize::MAX)
        }
    };
    limit.clamp(1, Semaphore::MAX_PERMITS)
}

/// A client connection's place under `--max-connections`, counted in the open-connections
/// gauge. It lives in the connection's task, so it is given back when the connection ends
/// however it ends (closed, aborted for `--client-timeout`, dropped with its worker).
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.client_connections_changed(1);
        ConnectionSlot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.metrics.client_connections_changed(-1);
    }
}

/// An accepted client connection on its way to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
}

/// How many threads serve connections: one per CPU the process may use (cgroup quotas and
/// affinity count), so each runs a single-threaded runtime on its own core.
fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// How a worker treats its client connections.
struct ClientSettings {
    /// `--client-timeout`.
    timeout: Duration,
    /// `--trusted-proxies`.
    trusted_proxies: TrustedProxies,
    /// Signals to close idle connections (see [`wait_for_slot`]).
    drains: watch::Receiver<()>,
    /// Where connections closed for the timeout are counted.
    metrics: Arc<Metrics>,
    /// `--access-log`: where each request's line goes.
    access_log: Option<Arc<AccessLog>>,
}

/// A thread serving connections on its own single-threaded runtime.
///
/// The accept loop hands each connection to one worker, round robin, and everything the
/// connection causes (the request, its attempt task, the upstream connection it is forwarded
/// over) runs on that worker's thread. A work-stealing runtime moves these tasks between
/// threads and pays for it on every wake-up; measured on the proxy benchmark, one
/// single-threaded runtime per core used ~11 % less CPU per fresh-key request.
struct Worker {
    /// `None` once it takes no more connections (and drains the ones it has).
    connections: Option<tokio::sync::mpsc::UnboundedSender<Accepted>>,
    drained: tokio::sync::oneshot::Receiver<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    fn start(
        n: usize,
        proxy: Proxy,
        routes: Arc<RouteTable>,
        clients: ClientSettings,
    ) -> std::io::Result<Worker> {
        let ClientSettings {
            timeout: client_timeout,
            trusted_proxies,
            drains,
            metrics,
            access_log,
        } = clients;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (connections, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        let (drained_tx, drained) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("idemgate-worker-{n}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let graceful = GracefulShutdown::new();
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .max_buf_size(request_head::PARSER_MAX_BUFFER);
                    builder
                        .http2()
                        .max_header_list_size(request_head::PARSER_MAX_HEADER_LIST);
                    while let Some(Accepted { stream, peer, slot }) = incoming.recv().await {
                        let stream = match tokio::net::TcpStream::from_std(stream) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot serve a connection");
                                continue;
                            }
                        };
                        let activity = Activity::new();
                        let service = connection_service(
                            proxy.clone(),
                            routes.clone(),
                            ClientAddr::connected(peer, &trusted_proxies),
                            activity.clone(),
                            access_log.clone(),
                            metrics.clone(),
                        );
                        let stream = RefusalsAsProblems::new(
                            WriteDeadline::new(stream, client_timeout, Some(metrics.clone())),
                            RefusalReport {
                                client: peer,
                                metrics: metrics.clone(),
                                access_log: access_log.clone(),
                            },
                        );
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        let conn = graceful.watch(conn.into_owned());
                        let closes = metrics.clone();
                        let connection = tokio::spawn(async move {
                            let _slot = slot;
                            if let Err(e) = conn.await {
                                if e.downcast_ref::<hyper::Error>()
                                    .is_some_and(hyper::Error::is_parse)
                                {
                                    closes.client_connection_closed(ClientClose::Malformed);
                                }
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                        client_timeouts::close_when_idle(
                            connection,
                            activity,
                            client_timeout,
                            drains.clone(),
                            Some(metrics.clone()),
                        );
                    }
                    // The main thread decides when the grace is over: it may stop this runtime
                    // while connections still wait for their responses.
                    let mut stopped = stopped;
                    tokio::select! {
                        () = graceful.shutdown() => {
                            let _ = drained_tx.send(());
                            let _ = (&mut stopped).await;
                        }
                        _ = &mut stopped => {}
                    }
                });
            })?;
        Ok(Worker {
            connections: Some(connections),
            drained,
            stop,
            thread,
        })
    }

    /// Gives the worker a connection; hands it back if the worker's thread is gone.
    fn hand_over(&self, connection: Accepted) -> Option<Accepted> {
        let Some(connections) = &self.connections else {
            return Some(connection);
        };
        match connections.send(connection) {
            Ok(()) => None,
            Err(tokio::sync::mpsc::error::SendError(back)) => {
                tracing::error!("a worker thread is gone; trying the next one");
                Some(back)
            }
        }
    }

    /// Stops handing it connections; it closes idle ones and drains the rest.
    fn stop_accepting(&mut self) {
        self.connections = None;
    }

    /// Ends the worker's runtime (and whatever still runs on it) and waits for its thread.
    async fn stop(self) {
        let _ = self.stop.send(());
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// The hyper service for one client connection.
///
/// Each request is in progress on `activity` from its dispatch until its response body ends or
/// is dropped.
fn connection_service(
    proxy: Proxy,
    routes: Arc<RouteTable>,
    client: ClientAddr,
    activity: Arc<Activity>,
    access_log: Option<Arc<AccessLog>>,
    metrics: Arc<Metrics>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<ClientResponseBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<ClientResponseBody>, Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let in_progress = activity.begin();
        let (mut parts, body) = request.into_parts();
        let access = access_log.as_ref().map(|log| {
            let (entry, report) = AccessEntry::start(log, &parts, client.addr);
            parts.extensions.insert(report);
            entry
        });
        parts.extensions.insert(client.clone());
        if parts.headers.contains_key(IDEMPOTENCY_KEY) && routes.policy_for(&parts).is_some() {
            parts.extensions.insert(MayProtect);
        }
        let refused = request_head::refusal(&parts);
        if refused.is_some() {
            metrics.request(RequestOutcome::Rejected);
            if let Some(entry) = &access {
                entry.outcome(RequestOutcome::Rejected, None);
            }
        }
        // An HTTP/2 body that did not end with its head has its end held back until hyper has
        // checked the stream for a reset (see `client_request_body`).
        let gate = (parts.version == http::Version::HTTP_2
            && !http_body::Body::is_end_stream(&body))
        .then(ResetGate::new);
        let body = ClientRequestBody::new(body, gate.clone());
        let mut proxy = proxy.clone();
        let answer = async move {
            let mut response = match refused {
                Some(kind) => Problem::new(kind).into_response(),
                None => match proxy.call(Request::from_parts(parts, body)).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
            };
            if let Some(entry) = &access {
                entry.status(response.status());
            }
            parser_refusals::keep_distinguishable(&mut response);
            Ok(response.map(|body| ClientBody::new(body, in_progress, access)))
        };
        Gated::new(answer, gate)
    })
}

/// Resolves at SIGTERM or SIGINT.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::num::NonZeroUsize;

    use super::*;

    #[test]
    fn the_auto_connection_limit_leaves_two_open_files_per_connection_and_a_reserve() {
        let auto = |open_files| connection_limit(ConnectionLimit::Auto, open_files);
        assert_eq!(auto(Some(1024)), 462);
        assert_eq!(auto(Some(300)), 100);
        assert_eq!(auto(None), 462, "an unreadable limit is taken as 1024");
        assert_eq!(auto(Some(50)), 1, "never below one connection");
        assert_eq!(
            auto(Some(u64::MAX)),
            Semaphore::MAX_PERMITS,
            "an unlimited limit is capped where the semaphore is"
        );
        let fixed = ConnectionLimit::Fixed(NonZeroUsize::new(5).unwrap());
        assert_eq!(connection_limit(fixed, Some(1024)), 5);
        assert_eq!(
            connection_limit(fixed, Some(10)),
            5,
            "a fixed limit is kept"
        );
    }
}
