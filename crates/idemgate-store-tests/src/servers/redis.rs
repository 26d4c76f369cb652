//! Throwaway Redis servers for tests: a standalone [`RedisServer`] and a [`RedisCluster`].
//!
//! Each server is a `redis-server` from `PATH`, on a free `127.0.0.1` port (never 6379), with
//! its config, AOF and log in a fresh temp dir. [`RedisServer::kill`] sends `SIGKILL` and
//! [`RedisServer::restart`] starts it again on the same port and dir, so data written with
//! `appendonly yes` survives (the point of crash tests).
//!
//! Cleanup: [`Drop`] kills the server(s) and removes the dir. A server kept in a `static` is
//! never dropped, so each temp dir also gets a watchdog shell that holds the read end of a pipe
//! whose write end lives in this process and learns every pid started: when the test process
//! exits (even by `SIGKILL`) the pipe closes, and the watchdog kills those pids and removes the
//! dir.
//!
//! A missing `redis-server` panics with a message naming the package to install.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const MISSING: &str =
    "redis-server not found on PATH: install the redis-server package (scripts/test does this)";

/// How long a server may take to answer `PING` after start (AOF replay included).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for [`RedisServer`]; extra lines go verbatim into `redis.conf`.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct RedisServerBuilder {
    extra: Vec<String>,
}

impl RedisServerBuilder {
    /// Adds one `redis.conf` line, e.g. `appendonly yes` or `maxmemory-policy noeviction`.
    pub fn config(mut self, line: impl Into<String>) -> Self {
        self.extra.push(line.into());
        self
    }

    /// `appendonly yes` with `appendfsync always`: every acknowledged write survives `SIGKILL`.
    pub fn durable(self) -> Self {
        self.config("appendonly yes").config("appendfsync always")
    }

    /// Starts the server; panics with a clear message if it cannot.
    pub fn start(self) -> RedisServer {
        let bin = find_redis_server();
        let dir = tempfile::Builder::new()
            .prefix("idemgate-redis-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for redis-server: {e}"));
        let watchdog = Watchdog::spawn(dir.path());
        let mut last_err = String::new();
        // A port picked by binding to :0 could be taken before redis-server binds it: retry.
        for _ in 0..5 {
            let port = free_port(false);
            let conf = write_conf(dir.path(), port, &self.extra, false);
            match spawn_and_wait(&bin, &conf, dir.path(), port) {
                Ok(child) => {
                    let mut server = RedisServer {
                        bin,
                        conf,
                        port,
                        child: None,
                        watchdog,
                        dir,
                    };
                    server.adopt(child);
                    return server;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server did not start: {last_err}");
    }
}

/// A `redis-server` of its own, in a temp dir, for one test or one test binary.
pub struct RedisServer {
    bin: PathBuf,
    conf: PathBuf,
    port: u16,
    child: Option<Child>,
    // Dropped after `child` is killed (see `Drop`), so it never kills a pid we still use.
    watchdog: Watchdog,
    // Last: the dir outlives everything that names paths inside it.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl RedisServer {
    /// Starts a server with the default config (no persistence, no memory limit).
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// A builder for extra config lines.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temp dir (config, AOF, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the server process is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server with `SIGKILL` (no shutdown, no final fsync) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and dir (so AOF data survives); kills it first
    /// if it is running. Waits until it answers `PING`.
    pub fn restart(&mut self) {
        self.kill();
        // The port was just released by the killed process; nobody else should grab it, but a
        // few tries cover a slow kernel.
        let mut last_err = String::new();
        for _ in 0..20 {
            match spawn_and_wait(&self.bin, &self.conf, self.dir.path(), self.port) {
                Ok(child) => {
                    self.adopt(child);
                    return;
                }
                Err(e) => {
                    last_err = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!(
            "redis-server did not restart on port {}: {last_err}",
            self.port
        );
    }

    /// Runs `redis-cli -p <port> <args>` and returns its stdout (for INFO, CONFIG and the like).
    /// Panics if `redis-cli` cannot run.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    fn adopt(&mut self, child: Child) {
        self.watchdog.track(child.id());
        self.child = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of masters without replicas, each node a `redis-server --cluster-enabled yes`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("ports", &self.ports())
            .finish()
    }
}

/// Options for [`RedisCluster`].
#[derive(Clone, Debug)]
#[must_use]
pub struct RedisClusterBuilder {
    masters: usize,
    extra: Vec<String>,
    slots_on_first: bool,
}

impl RedisClusterBuilder {
    /// Adds one `redis.conf` line to every node, e.g. `maxmemory 4mb`.
    pub fn config(mut self, line: impl Into<String>) -> Self {
        self.extra.push(line.into());
        self
    }

    /// Puts all 16384 slots on the first node; the others join the cluster holding none.
    /// Every key then lives on one node, so capacity tests fill one node deterministically
    /// while the client still speaks the Cluster protocol.
    pub fn all_slots_on_first_node(mut self) -> Self {
        self.slots_on_first = true;
        self
    }

    /// Starts the nodes, assigns the slots and waits until every node reports
    /// `cluster_state:ok`. Panics with a clear message if it cannot.
    pub fn start(self) -> RedisCluster {
        assert!(
            self.masters >= 3,
            "a Redis Cluster needs at least 3 masters"
        );
        let bin = find_redis_server();
        let mut last_err = String::new();
        for _ in 0..3 {
            match self.try_start(&bin) {
                Ok(cluster) => return cluster,
                Err(e) => last_err = e,
            }
        }
        panic!("Redis Cluster did not start: {last_err}");
    }

    fn try_start(&self, bin: &Path) -> Result<RedisCluster, String> {
        let mut nodes = Vec::with_capacity(self.masters);
        for _ in 0..self.masters {
            let dir = tempfile::Builder::new()
                .prefix("idemgate-redis-cluster-")
                .tempdir()
                .map_err(|e| format!("temp dir: {e}"))?;
            let watchdog = Watchdog::spawn(dir.path());
            // The cluster bus listens on port + 10000: pick ports where both are free.
            let port = free_port(true);
            let conf = write_conf(dir.path(), port, &self.extra, true);
            let child = spawn_and_wait(bin, &conf, dir.path(), port)?;
            let mut node = RedisServer {
                bin: bin.to_path_buf(),
                conf,
                port,
                child: None,
                watchdog,
                dir,
            };
            node.adopt(child);
            nodes.push(node);
        }
        if self.slots_on_first {
            let first = nodes[0].port;
            let out = try_cli(first, &["cluster", "addslotsrange", "0", "16383"])?;
            if !out.contains("OK") {
                return Err(format!("CLUSTER ADDSLOTSRANGE: {out}"));
            }
            for node in &nodes[1..] {
                let out = try_cli(
                    node.port,
                    &["cluster", "meet", "127.0.0.1", &first.to_string()],
                )?;
                if !out.contains("OK") {
                    return Err(format!("CLUSTER MEET: {out}"));
                }
            }
        } else {
            let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
            args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
            args.push("--cluster-yes".into());
            let out = Command::new("redis-cli")
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("redis-cli --cluster create: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "redis-cli --cluster create failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let cluster = RedisCluster { nodes };
        let known = format!("cluster_known_nodes:{}", self.masters);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ok = cluster.nodes.iter().all(|n| {
                let info = try_cli(n.port, &["cluster", "info"]).unwrap_or_default();
                info.contains("cluster_state:ok") && info.contains(&known)
            });
            if ok {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                return Err("cluster_state did not become ok".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3, as `redis-cli --cluster create` requires), spreads
    /// the slots over them and waits until every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> Self {
        Self::builder(masters).start()
    }

    /// A builder for `masters` nodes with extra config or another slot layout.
    pub fn builder(masters: usize) -> RedisClusterBuilder {
        RedisClusterBuilder {
            masters,
            extra: Vec::new(),
            slots_on_first: false,
        }
    }

    /// The nodes' `host:port` addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// The nodes' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis+cluster://h:p,h:p,h:p`, the spec idemgate's Redis store accepts.
    pub fn url(&self) -> String {
        format!("redis+cluster://{}", self.addrs().join(","))
    }

    /// The nodes, e.g. to run `redis-cli` against one or to kill one.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Mutable access to the nodes (kill / restart).
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }
}

/// Kills the tracked pids and removes the dir when this process goes away without dropping.
struct Watchdog {
    child: Option<Child>,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    fn spawn(dir: &Path) -> Self {
        // Every line on stdin is a pid to kill at EOF; EOF comes when this process exits or
        // the Watchdog is dropped.
        let script = r#"pids=""; while read -r p; do pids="$pids $p"; done; [ -n "$pids" ] && kill -9 $pids 2>/dev/null; rm -rf "$1""#;
        let spawned = Command::new("sh")
            .args(["-c", script, "idemgate-redis-watchdog"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(mut child) => {
                let pipe = child.stdin.take();
                Watchdog {
                    child: Some(child),
                    pipe,
                }
            }
            // Without sh the servers are still cleaned up by Drop; only a crash leaks them.
            Err(_) => Watchdog {
                child: None,
                pipe: None,
            },
        }
    }

    fn track(&mut self, pid: u32) {
        if let Some(pipe) = self.pipe.as_mut() {
            let _ = writeln!(pipe, "{pid}");
            let _ = pipe.flush();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.pipe.take());
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

fn find_redis_server() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{MISSING}"))
}

fn free_port(with_bus: bool) -> u16 {
    super::unused_port(|port| {
        if port == 6379 || port == 16379 {
            return false;
        }
        !with_bus
            || port
                .checked_add(10000)
                .is_some_and(|bus| TcpListener::bind((Ipv4Addr::LOCALHOST, bus)).is_ok())
    })
    .unwrap_or_else(|| panic!("no free loopback port for redis-server"))
}

fn write_conf(dir: &Path, port: u16, extra: &[String], cluster: bool) -> PathBuf {
    let mut conf = format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode yes\ndaemonize no\ndir {dir}\n\
         logfile {log}\nsave \"\"\nappendfilename appendonly.aof\n",
        dir = dir.display(),
        log = dir.join("redis.log").display(),
    );
    if cluster {
        conf.push_str(
            "cluster-enabled yes\ncluster-config-file nodes.conf\ncluster-node-timeout 2000\n",
        );
    }
    for line in extra {
        conf.push_str(line);
        conf.push('\n');
    }
    let path = dir.join("redis.conf");
    std::fs::write(&path, conf).unwrap_or_else(|e| panic!("cannot write redis.conf: {e}"));
    path
}

fn spawn_and_wait(bin: &Path, conf: &Path, dir: &Path, port: u16) -> Result<Child, String> {
    let mut child = Command::new(bin)
        .arg(conf)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                panic!("{MISSING}");
            }
            format!("spawn {}: {e}", bin.display())
        })?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(format!("redis-server exited with {status}: {tail:?}"));
        }
        if ping(port) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("redis-server on port {port} did not answer PING"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `PING` over a raw socket; `+PONG` only (a server still loading its AOF says `-LOADING`).
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("+PONG")
}

fn try_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("redis-cli: {e} (install the redis-tools package)"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cli(port: u16, args: &[&str]) -> String {
    try_cli(port, args).unwrap_or_else(|e| panic!("{e}"))
}
