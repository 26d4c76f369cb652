//! The real `idemgate` binary as a child process.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_idemgate");

/// How long a proxy may take to print its listening addresses.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Builds the command line of `idemgate serve`.
#[derive(Clone, Debug)]
pub struct ProxyBuilder {
    upstream: String,
    store: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    soft_open_files: Option<u32>,
}

impl ProxyBuilder {
    /// The store (`memory`, `file:PATH`); default `memory`.
    pub fn store(mut self, store: impl Into<String>) -> Self {
        self.store = store.into();
        self
    }

    /// Adds command-line arguments after the fixed ones.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts the child with this soft limit on open files (through `sh -c 'ulimit -S -n N'`).
    pub fn soft_open_files(mut self, limit: u32) -> Self {
        self.soft_open_files = Some(limit);
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The full argument list.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--admin-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--upstream".to_owned(),
            self.upstream.clone(),
            "--store".to_owned(),
            self.store.clone(),
        ];
        argv.extend(self.args.iter().cloned());
        argv
    }

    /// Starts the proxy and waits until it prints both listening addresses. Panics with the
    /// child's output when it exits or stays silent.
    pub async fn start(self) -> Proxy {
        let argv = self.argv();
        let mut cmd = match self.soft_open_files {
            None => Command::new(BIN),
            Some(limit) => {
                // `exec` keeps the pid: the child is idemgate itself, with the lowered limit.
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -S -n {limit} && exec \"$0\" \"$@\""))
                    .arg(BIN);
                sh
            }
        };
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Colour codes would only get in the way of parsing the log.
            .env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        if let Some(out) = child.stdout.take() {
            collect_lines(out, log.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect_lines(err, log.clone());
        }
        let mut proxy = Proxy {
            child: Some(child),
            addr: None,
            admin: None,
            log,
            argv,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let (addr, admin) = proxy.parse_addrs();
            if let (Some(addr), Some(admin)) = (addr, admin) {
                proxy.addr = Some(addr);
                proxy.admin = Some(admin);
                break;
            }
            if let Some(status) = proxy.try_wait() {
                panic!(
                    "idemgate {:?} exited early with {status}; output:\n{}",
                    proxy.argv,
                    proxy.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "idemgate {:?} printed no listening addresses within {START_TIMEOUT:?}; output:\n{}",
                    proxy.argv,
                    proxy.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        proxy
    }
}

fn collect_lines(stream: impl Read + Send + 'static, log: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = strip_ansi(&String::from_utf8_lossy(&line));
                    if let Ok(mut log) = log.lock() {
                        log.push(text.trim_end().to_owned());
                    }
                }
            }
        }
    });
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The first socket address among the words after `marker` in `line`.
fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace().find_map(|word| {
        let word = word
            .trim_start_matches("addr=")
            .trim_matches(|c: char| matches!(c, '"' | '\'' | ',' | ';' | '(' | ')' | '`'));
        let word = word.strip_prefix("http://").unwrap_or(word);
        word.trim_end_matches('/').parse().ok()
    })
}

/// A running `idemgate serve`; killed (SIGKILL) on drop.
pub struct Proxy {
    child: Option<Child>,
    addr: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
    argv: Vec<String>,
}

impl Proxy {
    /// A builder for `idemgate serve --upstream <upstream>` on loopback ports chosen by the OS.
    pub fn builder(upstream: impl Into<String>) -> ProxyBuilder {
        ProxyBuilder {
            upstream: upstream.into(),
            store: "memory".to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            soft_open_files: None,
        }
    }

    fn parse_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let lines = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        let mut addr = None;
        let mut admin = None;
        for line in &lines {
            if line.contains("admin listening on") {
                admin = admin.or_else(|| addr_after(line, "admin listening on"));
            } else if line.contains("listening on") {
                addr = addr.or_else(|| addr_after(line, "listening on"));
            }
        }
        (addr, admin)
    }

    /// The proxy's client-facing address.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("started proxies have an address")
    }

    /// The admin listener's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("started proxies have an admin address")
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Everything the child printed so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Sends SIGKILL and reaps the child.
    pub fn kill9(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (polling) up to `timeout` for the child to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Output of a one-shot `idemgate` command.
#[derive(Debug)]
pub struct Run {
    /// Exit code; `None` when killed by a signal or by the timeout.
    pub code: Option<i32>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error (ANSI codes removed).
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `idemgate <args>` with extra environment, killing it after `timeout`.
pub fn run_idemgate(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Run {
    let started = Instant::now();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    let deadline = started + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = strip_ansi(&err.join().unwrap_or_default());
    Run {
        code: status.and_then(|s| s.code()),
        timed_out,
        stdout: strip_ansi(&stdout),
        stderr,
        elapsed: started.elapsed(),
    }
}

fn read_all(stream: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut s) = stream {
            let _ = s.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        let a = addr_after(
            "2024 INFO idemgate: listening on 127.0.0.1:4321",
            "listening on",
        );
        assert_eq!(a, "127.0.0.1:4321".parse().ok());
        let a = addr_after("INFO admin listening on addr=127.0.0.1:99", "listening on");
        assert_eq!(a, "127.0.0.1:99".parse().ok());
        let a = addr_after("listening on http://127.0.0.1:7/ now", "listening on");
        assert_eq!(a, "127.0.0.1:7".parse().ok());
    }
}
