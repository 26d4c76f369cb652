//! Throwaway PostgreSQL servers for tests.
//!
//! [`PostgresServer::start`] runs `initdb` and `pg_ctl` (found on `PATH` or under
//! `/usr/lib/postgresql/*/bin`) in a fresh temp dir, on a free `127.0.0.1` port (never 5432),
//! with `trust` authentication, `fsync` on and its unix socket inside the temp dir.
//!
//! PostgreSQL refuses to run as root, and sessions and CI run as root: then the temp dir is
//! handed to the `postgres` user and `initdb`/`pg_ctl` run under `runuser -u postgres`.
//!
//! Cleanup: [`Drop`] stops the server and removes the dir. A server kept in a `static` (see
//! [`PostgresServer::shared`]) is never dropped, so every server also has a watchdog shell that
//! holds the read end of a pipe whose write end lives in this process: when the test process
//! exits (even by `SIGKILL`) the pipe closes, and the watchdog stops the server and removes the
//! dir.
//!
//! A missing binary panics with a message naming the package to install (`postgresql`).

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A PostgreSQL server of its own, in a temp dir, for one test or one test binary.
pub struct PostgresServer {
    // Declared first so it is dropped last among the paths it names (drop order is declaration
    // order; `Drop::drop` below stops the server before any field goes).
    dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    /// Whether `initdb`/`pg_ctl` must run as the `postgres` user (we are root).
    as_postgres: bool,
    running: bool,
    /// The watchdog that cleans up if this process dies without dropping us; it exits when
    /// `watchdog_pipe` closes.
    watchdog: Option<Child>,
    watchdog_pipe: Option<ChildStdin>,
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .field("running", &self.running)
            .finish()
    }
}

impl PostgresServer {
    /// Starts a fresh server (`initdb` + `pg_ctl start`). Panics with a clear message when the
    /// binaries are missing or the server does not come up.
    pub fn start() -> Self {
        let bin = find_bin_dir();
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("idemgate-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for PostgreSQL: {e}"));
        if as_postgres {
            chown_to_postgres(dir.path());
        }
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", socket_dir.display()));
        if as_postgres {
            chown_to_postgres(&socket_dir);
        }

        let mut server = PostgresServer {
            dir,
            data,
            bin,
            port: 0,
            as_postgres,
            running: false,
            watchdog: None,
            watchdog_pipe: None,
        };
        server.initdb();
        server.spawn_watchdog();

        // A port picked by binding to :0 could be taken by someone else before the postmaster
        // binds it; try a few.
        let mut last_err = String::new();
        for _ in 0..5 {
            server.port = free_port();
            server.write_port_config(&socket_dir);
            match server.pg_ctl_start() {
                Ok(()) => {
                    server.running = true;
                    return server;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("PostgreSQL did not start: {last_err}");
    }

    /// One server per test binary, started on first use. It is stopped and removed by its
    /// watchdog when the test process exits.
    pub fn shared() -> &'static PostgresServer {
        static SHARED: OnceLock<PostgresServer> = OnceLock::new();
        SHARED.get_or_init(PostgresServer::start)
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir holding the data dir, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `db` on this server.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (letters, digits and `_` only) and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name.len() < 64
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?} must be 1-63 characters of [A-Za-z0-9_]"
        );
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url_for(name)
    }

    /// Creates a database with a name no other call in this process gets, and returns its URL.
    pub fn create_unique_database(&self, prefix: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix: String = prefix
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(32)
            .collect();
        self.create_database(&format!("{prefix}_{}_{n}", std::process::id()))
    }

    /// Runs SQL with `psql` against database `db` and returns its (unaligned, tuples-only)
    /// output. Panics when `psql` fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the server is (as far as this handle knows) running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Stops the server (`pg_ctl stop -m fast`): sessions are disconnected, data is kept.
    pub fn stop(&mut self) {
        if self.running {
            if let Err(e) = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "30"]) {
                panic!("pg_ctl stop failed: {e}");
            }
            self.running = false;
        }
    }

    /// Kills the postmaster and its backends with `SIGKILL`, as a crash would. Data that was
    /// committed (fsync is on) survives [`start_again`](Self::start_again).
    pub fn kill(&mut self) {
        if !self.running {
            return;
        }
        if let Some(pid) = self.postmaster_pid() {
            // Backends notice a dead postmaster and exit by themselves, but until they do the
            // old shared memory is in use and a restart would refuse to start: kill them too.
            let mut pids = children_of(pid);
            pids.push(pid);
            let mut cmd = Command::new("kill");
            cmd.arg("-9");
            for p in &pids {
                cmd.arg(p.to_string());
            }
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.running = false;
    }

    /// Starts the server again on the same data dir and port, after [`stop`](Self::stop) or
    /// [`kill`](Self::kill).
    pub fn start_again(&mut self) {
        if self.running {
            return;
        }
        // The port was released when the server stopped; someone else may have taken it in
        // between, in which case there is nothing to do but report it.
        if let Err(e) = self.pg_ctl_start() {
            panic!("PostgreSQL did not start again on port {}: {e}", self.port);
        }
        self.running = true;
    }

    fn initdb(&self) {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale"])
            // Syncing the files initdb writes only matters across an OS crash; the server
            // itself runs with fsync on.
            .arg("--no-sync");
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn write_port_config(&self, socket_dir: &Path) {
        // `include_if_exists` keeps the generated postgresql.conf untouched; our settings live in
        // their own file, rewritten when a new port is tried.
        let conf = self.data.join("postgresql.conf");
        let extra = self.data.join("idemgate-test.conf");
        let settings = format!(
            "port = {port}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{sock}'\n\
             fsync = on\n\
             max_connections = 200\n\
             shared_buffers = 16MB\n\
             log_min_messages = warning\n",
            port = self.port,
            sock = socket_dir.display()
        );
        std::fs::write(&extra, settings)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", extra.display()));
        let current = std::fs::read_to_string(&conf).unwrap_or_default();
        if !current.contains("idemgate-test.conf") {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&conf)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", conf.display()));
            let _ = writeln!(f, "\ninclude_if_exists = 'idemgate-test.conf'");
        }
        if self.as_postgres {
            chown_to_postgres(&extra);
        }
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let log = self.dir.path().join("postgres.log");
        let log = log.to_string_lossy().into_owned();
        self.pg_ctl(&["start", "-w", "-t", "30", "-l", &log])
            .map_err(|e| {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: String = tail
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                format!("{e}\nserver log:\n{tail}")
            })
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A command for one of the server binaries, under `runuser -u postgres` when root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    fn spawn_watchdog(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let prefix = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        // Waits for EOF on stdin (this process exited or dropped the server), then stops the
        // server and removes its dir. Ignores the signals a Ctrl-C of the test run sends to the
        // whole process group, so the cleanup still happens.
        let script = format!(
            "trap '' INT TERM HUP; cat >/dev/null; \
             {prefix}'{pg_ctl}' -D '{data}' stop -m immediate -w -t 10 >/dev/null 2>&1; \
             rm -rf '{dir}'",
            pg_ctl = pg_ctl.display(),
            data = self.data.display(),
            dir = self.dir.path().display(),
        );
        match Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(mut child) => {
                self.watchdog_pipe = child.stdin.take();
                self.watchdog = Some(child);
            }
            Err(e) => panic!("cannot start the PostgreSQL cleanup watchdog (sh): {e}"),
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "10"]);
            self.running = false;
        }
        // Closing the pipe lets the watchdog finish (its stop is then a no-op) and reaping it
        // avoids a zombie; the temp dir is removed when `dir` drops.
        drop(self.watchdog_pipe.take());
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.wait();
        }
    }
}

fn find_bin_dir() -> PathBuf {
    let has_all = |d: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").is_file() {
                // Distribution packages link only some binaries onto PATH: prefer the real
                // directory they point into, where all of them live.
                let real = std::fs::canonicalize(d.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf));
                if let Some(r) = real.filter(|r| has_all(r)) {
                    return r;
                }
                if has_all(&d) {
                    return d;
                }
            }
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|d| has_all(d))
                .collect()
        })
        .unwrap_or_default();
    // The highest version first (numeric, so 16 sorts after 9).
    candidates.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl, psql) not found on PATH or under \
             /usr/lib/postgresql/*/bin: install the `postgresql` package \
             (e.g. `apt-get install postgresql`)"
        )
    })
}

fn running_as_root() -> bool {
    // The owner of /proc/self is this process's effective uid; no libc (and no unsafe) needed.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or_else(|_| {
            Command::new("id")
                .arg("-u")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
                .unwrap_or(false)
        })
}

fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .unwrap_or_else(|e| panic!("cannot run `id`: {e}"));
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|_| {
                    panic!(
                        "running as root, PostgreSQL needs the `postgres` user, which does not \
                         exist: install the `postgresql` package (it creates the user)"
                    )
                })
        };
        (id("-u"), id("-g"))
    })
}

fn chown_to_postgres(path: &Path) {
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("cannot chown {} to postgres: {e}", path.display()));
}

fn free_port() -> u16 {
    // The kernel picks among ephemeral ports, which never include 5432.
    super::unused_port(|_| true).unwrap_or_else(|| panic!("cannot find a free port on 127.0.0.1"))
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so parse after
            // the last ')'.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_kills_and_restarts_keeping_data() {
        let t0 = Instant::now();
        let mut pg = PostgresServer::start();
        assert_ne!(pg.port(), 5432);
        eprintln!("started in {:?}", t0.elapsed());
        let url = pg.create_database("keepme");
        assert!(url.ends_with("/keepme"));
        pg.psql(
            "keepme",
            "CREATE TABLE t (x int); INSERT INTO t VALUES (42)",
        );

        pg.stop();
        assert!(!pg.is_running());
        pg.start_again();
        assert_eq!(pg.psql("keepme", "SELECT x FROM t").trim(), "42");

        pg.psql("keepme", "INSERT INTO t VALUES (43)");
        pg.kill();
        pg.start_again();
        assert_eq!(
            pg.psql("keepme", "SELECT count(*) FROM t").trim(),
            "2",
            "committed rows survive SIGKILL"
        );

        let dir = pg.dir().to_path_buf();
        drop(pg);
        assert!(!dir.exists(), "drop removes the temp dir");
    }
}
