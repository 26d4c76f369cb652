//! The command line: config precedence (file < env < flag), exit code 64 on bad config,
//! `check-config`, and `idemgate demo` (SPEC §9).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{Client, Proxy, Req, Upstream, run_idemgate};

/// The largest body accepted, found by probing: `ok` must pass and `too_big` must be 413.
async fn assert_body_limit(proxy: &Proxy, ok: usize, too_big: usize, what: &str) {
    let client = Client::new(proxy.addr());
    let r = client
        .send(
            Req::post("/orders")
                .key(&format!("{what}-ok"))
                .body(vec![b'x'; ok]),
        )
        .await;
    assert_eq!(r.status, 201, "{what}: {ok} bytes refused: {}", r.summary());
    let r = client
        .send(
            Req::post("/orders")
                .key(&format!("{what}-big"))
                .body(vec![b'x'; too_big]),
        )
        .await;
    assert_eq!(
        r.status,
        413,
        "{what}: {too_big} bytes accepted: {}",
        r.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_then_env_then_flag_decide_the_effective_value() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("idemgate.toml");
    std::fs::write(&config, "max_request_body = \"1000B\"\n").expect("write config");
    let config = config.display().to_string();

    // The file alone: 1000 bytes.
    let proxy = Proxy::builder(up.url())
        .args(["--config", &config])
        .start()
        .await;
    assert_body_limit(&proxy, 900, 1500, "file").await;
    drop(proxy);

    // The environment overrides the file: 2000 bytes.
    let proxy = Proxy::builder(up.url())
        .args(["--config", &config])
        .env("IDEMGATE_MAX_REQUEST_BODY", "2000B")
        .start()
        .await;
    assert_body_limit(&proxy, 1500, 2500, "env").await;
    drop(proxy);

    // A flag overrides both: 3000 bytes.
    let proxy = Proxy::builder(up.url())
        .args(["--config", &config, "--max-request-body", "3000B"])
        .env("IDEMGATE_MAX_REQUEST_BODY", "2000B")
        .start()
        .await;
    assert_body_limit(&proxy, 2500, 3500, "flag").await;
}

#[test]
fn check_config_prints_the_effective_value_by_precedence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("idemgate.toml");
    std::fs::write(
        &config,
        "upstream = \"http://127.0.0.1:9\"\nstore = \"memory\"\nttl = \"7h\"\n",
    )
    .expect("write config");
    let config = config.display().to_string();
    // check-config prints the effective configuration as TOML on stdout: read its `ttl` line.
    let ttl = |env: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["check-config", "--config", &config];
        args.extend_from_slice(extra);
        let r = run_idemgate(&args, env, Duration::from_secs(10));
        assert_eq!(r.code, Some(0), "check-config failed: {r:?}");
        r.stdout
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("ttl = ")
                    .map(|v| v.trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| panic!("no ttl line in check-config output:\n{}", r.stdout))
    };
    assert_eq!(ttl(&[], &[]), "7h", "the file's value");
    assert_eq!(
        ttl(&[("IDEMGATE_TTL", "5h")], &[]),
        "5h",
        "env overrides the file"
    );
    assert_eq!(
        ttl(&[("IDEMGATE_TTL", "5h")], &["--ttl", "3h"]),
        "3h",
        "a flag overrides env and file"
    );
}

#[test]
fn bad_config_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "this is = = not toml\n").expect("write");
    let broken = broken.display().to_string();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "no_such_setting = 1\n").expect("write");
    let unknown = unknown.display().to_string();
    let base = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9",
    ];
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case<'_>> = vec![
        (
            "bad duration",
            vec!["--store", "memory", "--ttl", "soon"],
            vec![],
        ),
        (
            "bad size",
            vec!["--store", "memory", "--max-request-body", "lots"],
            vec![],
        ),
        ("bad store", vec!["--store", "carrier-pigeon"], vec![]),
        (
            "bad concurrent",
            vec!["--store", "memory", "--concurrent", "maybe"],
            vec![],
        ),
        (
            "missing config file",
            vec!["--config", "/nonexistent/idemgate.toml"],
            vec![],
        ),
        ("broken config file", vec!["--config", &broken], vec![]),
        (
            "unknown config key",
            vec!["--config", &unknown, "--store", "memory"],
            vec![],
        ),
        (
            "bad env value",
            vec!["--store", "memory"],
            vec![("IDEMGATE_TTL", "never")],
        ),
        (
            "header scope without trust",
            vec!["--store", "memory", "--scope", "header:x-tenant"],
            vec![],
        ),
    ];
    for (what, extra, env) in cases {
        let mut args = base.to_vec();
        args.extend(extra);
        let r = run_idemgate(&args, &env, Duration::from_secs(10));
        assert_eq!(r.code, Some(64), "{what}: expected exit 64, got {r:?}");
        assert!(!r.stderr.trim().is_empty(), "{what}: no message on stderr");
    }
    let r = run_idemgate(
        &["check-config", "--config", &broken],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(64), "check-config on a broken file: {r:?}");
}

#[test]
fn demo_runs_and_prints_its_table_within_15_s() {
    let r = run_idemgate(&["demo"], &[], Duration::from_secs(15));
    assert!(!r.timed_out, "demo ran past 15 s: {r:?}");
    assert_eq!(r.code, Some(0), "demo failed: {r:?}");
    // The table: a header naming the columns, then one row per setup, charges first.
    assert!(
        r.stdout.contains("charges"),
        "no table header:\n{}",
        r.stdout
    );
    let charges = |row: &str| -> u64 {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no `{row}` row:\n{}", r.stdout));
        line[row.len()..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no charge count in {line:?}"))
    };
    // Straight to the API every attempt that arrived charged again: the story's double charges.
    assert!(
        charges("straight to the API") >= 2,
        "demo output:\n{}",
        r.stdout
    );
    assert_eq!(charges("through idemgate"), 1, "demo output:\n{}", r.stdout);
    println!("demo took {:?}:\n{}", r.elapsed, r.stdout);
}
