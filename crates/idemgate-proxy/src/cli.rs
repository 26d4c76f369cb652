//! The command line (clap): `serve`, `check-config`, `keys`, `demo`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// idemgate: at-most-once execution of POST/PATCH requests per Idempotency-Key, in front of any
/// HTTP API.
#[derive(Debug, Parser)]
#[command(name = "idemgate", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve(Settings),
    /// Validate the configuration, print the effective config and its warnings.
    CheckConfig(Settings),
    /// Inspect and settle stored keys through a running proxy's admin API.
    Keys(KeysArgs),
    /// Show what idemgate does, with nothing installed: a flaky client against a payments API,
    /// without and with idemgate.
    Demo(DemoArgs),
}

macro_rules! settings {
    (
        values { $( $(#[$doc:meta])* $field:ident : $name:literal ;)* }
        flags { $( $(#[$fdoc:meta])* $ffield:ident : $fname:literal ;)* }
    ) => {
        /// Settings shared by `serve` and `check-config`. Each is also `IDEMGATE_<NAME>` in the
        /// environment and `<name>` in the `--config` file (file < env < flag).
        #[derive(Debug, Default, Args)]
        pub struct Settings {
            /// TOML config file (also IDEMGATE_CONFIG).
            #[arg(long, value_name = "PATH", env = "IDEMGATE_CONFIG")]
            pub config: Option<PathBuf>,
            $(
                $(#[$doc])*
                #[arg(long = $name)]
                pub $field: Option<String>,
            )*
            $(
                $(#[$fdoc])*
                #[arg(long = $fname, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
                pub $ffield: Option<String>,
            )*
        }

        impl Settings {
            /// The flags given, by config key.
            pub fn flags(&self) -> Vec<(&'static str, String)> {
                let mut out = Vec::new();
                $( if let Some(v) = &self.$field { out.push(($name, v.clone())); } )*
                $( if let Some(v) = &self.$ffield { out.push(($fname, v.clone())); } )*
                out
            }
        }
    };
}

settings! {
values {
    /// Address to listen on [default: 127.0.0.1:8080]; port 0 picks a free one.
    listen: "listen";
    /// Upstream base URL (http:// or https://), required.
    upstream: "upstream";
    /// memory | file:PATH | redis://… | rediss://… | redis+cluster://h:p,h:p | postgres://…
    /// [default: file:idemgate.db, or $STATE_DIRECTORY/idemgate.db]
    store: "store";
    /// Connections the PostgreSQL store keeps in its pool, besides one for wait mode's
    /// notifications; mind the server's max_connections across instances [default: 10].
    store_pool_size: "store-pool-size";
    /// Retention of stored outcomes [default: 24h].
    ttl: "ttl";
    /// Lease length, renewed every third [default: 30s].
    lease: "lease";
    /// Concurrent duplicates: conflict (409) | wait [default: conflict].
    concurrent: "concurrent";
    /// Longest wait in `wait` mode [default: 10s].
    wait_max: "wait-max";
    /// Largest protected request body [default: 10MiB].
    max_request_body: "max-request-body";
    /// Largest response body stored for replay [default: 1MiB].
    max_stored_response: "max-stored-response";
    /// Client deadline: past it 504 outcome-pending while idemgate keeps waiting [default: 60s].
    upstream_timeout: "upstream-timeout";
    /// No response head by then: outcome-unknown [default: 10m].
    upstream_hard_timeout: "upstream-hard-timeout";
    /// HTTP version to the upstream: auto (http:// HTTP/1.1; https:// by ALPN) | http1 |
    /// http2 (h2c with prior knowledge on http://) [default: auto].
    upstream_protocol: "upstream-protocol";
    /// authorization | header:NAME | jwt-claim:CLAIM [default: authorization].
    scope: "scope";
    /// JWT verification key for jwt-claim scopes: PEM key, JWKS file, or HS256 secret.
    jwt_key_file: "jwt-key-file";
    /// Accepted JWT issuers (comma-separated; none: not checked).
    jwt_issuer: "jwt-issuer";
    /// Accepted JWT audiences (comma-separated; none: not checked).
    jwt_audience: "jwt-audience";
    /// Requests without credentials: anonymous | reject | passthrough [default: anonymous].
    on_missing_scope: "on-missing-scope";
    /// A lapsed lease becomes: outcome-unknown | re-execute [default: outcome-unknown].
    on_lease_expiry: "on-lease-expiry";
    /// Sent but no response head: store (outcome-unknown) | release [default: store].
    ambiguous: "ambiguous";
    /// Time in-flight requests get to finish at shutdown [default: 25s].
    shutdown_grace: "shutdown-grace";
    /// Longest wait on a client connection: for a whole request head when none is in
    /// progress (keep-alive idle time included), and for progress writing a response [default: 75s].
    client_timeout: "client-timeout";
    /// Most client connections served at once; past it new ones wait in the listen backlog
    /// and connections idle for a second are closed to make room. `auto`: (open files limit -
    /// 100) / 2, as each may hold an upstream connection too [default: auto].
    max_connections: "max-connections";
    /// Proxies in front (comma-separated addresses or CIDR networks) whose X-Forwarded-Proto
    /// and X-Forwarded-Host are passed on; from others they are replaced [default: none].
    trusted_proxies: "trusted-proxies";
    /// Admin API address, or `off` [default: 127.0.0.1:9090].
    admin_listen: "admin-listen";
    /// File holding the admin bearer token (required when admin-listen is not loopback).
    admin_token_file: "admin-token-file";
    /// Statuses that release the key instead of storing it [default: 408,425,429,503].
    release_statuses: "release-statuses";
    /// How many instances you run (warns when a single-process store is shared) [default: 1].
    instances: "instances";
}
flags {
    /// Protected requests without Idempotency-Key get 400.
    require_key: "require-key";
    /// Allow `header:NAME` scopes (the edge must strip that header from clients).
    trust_scope_header: "trust-scope-header";
    /// Forward requests unprotected when the store fails (instead of 503).
    fail_open: "fail-open";
    /// Accept only sf-string keys ("abc"), not bare tokens.
    strict_keys: "strict-keys";
    /// One line per request on standard output: arrival time, client, method, path, status,
    /// what idemgate did (outcome), record id, body bytes, duration.
    access_log: "access-log";
}
}

/// `keys` subcommand arguments.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// What to do with the record.
    #[command(subcommand)]
    pub action: KeysAction,
    /// The proxy's admin API.
    #[arg(
        long,
        global = true,
        env = "IDEMGATE_ADMIN",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin: String,
    /// File holding the admin bearer token.
    #[arg(long, global = true, env = "IDEMGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// How a record is addressed.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The record id (64 hex digits), as logged.
    #[arg(long, conflicts_with = "key", required_unless_present = "key")]
    pub id: Option<String>,
    /// The client's Idempotency-Key (either spelling: "abc" or abc).
    #[arg(long)]
    pub key: Option<String>,
    /// Scope kind: authorization, header:NAME, jwt-claim:CLAIM, anonymous [default:
    /// authorization with --scope-value, else anonymous].
    #[arg(long, requires = "key")]
    pub scope_kind: Option<String>,
    /// Scope value (e.g. the whole Authorization header value).
    #[arg(long, requires = "key")]
    pub scope_value: Option<String>,
}

/// `keys` actions.
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Print a record.
    Show(RecordArgs),
    /// Delete a record (in-flight ones need --force).
    Delete {
        /// The record.
        #[command(flatten)]
        record: RecordArgs,
        /// Delete even an in-flight record.
        #[arg(long)]
        force: bool,
    },
    /// Settle an outcome-unknown record: release it, or give it a response.
    Resolve {
        /// The record.
        #[command(flatten)]
        record: RecordArgs,
        /// Delete it so the next retry executes.
        #[arg(long, conflicts_with_all = ["status", "body", "header"], required_unless_present = "status")]
        release: bool,
        /// Status of the response retries will get.
        #[arg(long)]
        status: Option<u16>,
        /// Its body.
        #[arg(long, requires = "status")]
        body: Option<String>,
        /// A header, `Name: value` (repeatable).
        #[arg(long, requires = "status")]
        header: Vec<String>,
        /// Retention from now [default: 24h].
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Delete completed records past retention.
    PurgeExpired,
}

/// `demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many times the flaky client sends the one payment.
    #[arg(long, default_value_t = 42)]
    pub attempts: u32,
    /// Over how long, at most 10s (both runs go side by side, so the demo takes about this).
    #[arg(long, default_value = "10s")]
    pub over: String,
}
