//! Connections: a [`ConnectionManager`] for standalone Redis, a cluster connection for Cluster.
//! Both multiplex: concurrent operations share one socket per node and its round trips.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{Client, IntoConnectionInfo, ProtocolVersion, PushInfo, RedisError, Value};

/// Where the store connects, parsed from a spec string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// `redis://…` or `rediss://…`, passed to the client as it is.
    Single(String),
    /// `redis+cluster://h:p,h:p` (or `rediss+cluster://`): one `redis://` URL per seed node.
    Cluster(Vec<String>),
}

impl Target {
    pub(crate) fn parse(spec: &str) -> Result<Self, String> {
        let cluster = |rest: &str, scheme: &str| -> Result<Self, String> {
            let (userinfo, hosts) = match rest.rsplit_once('@') {
                Some((u, h)) => (format!("{u}@"), h),
                None => (String::new(), rest),
            };
            let hosts = hosts.split(['/', '?']).next().unwrap_or_default();
            let nodes: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("{scheme}://{userinfo}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(format!("no cluster nodes in `{spec}`"));
            }
            Ok(Target::Cluster(nodes))
        };
        if let Some(rest) = spec.strip_prefix("redis+cluster://") {
            cluster(rest, "redis")
        } else if let Some(rest) = spec.strip_prefix("rediss+cluster://") {
            cluster(rest, "rediss")
        } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
            Ok(Target::Single(spec.to_owned()))
        } else {
            Err(format!(
                "unsupported Redis spec `{spec}`: use redis://, rediss:// or redis+cluster://h:p,h:p"
            ))
        }
    }
}

/// A multiplexed connection of either kind.
#[derive(Clone)]
pub(crate) enum Conn {
    /// Standalone: one multiplexed connection per slot, a thread sticking to its slot (see
    /// [`thread_slot`]); the subscriber has exactly one.
    Single(Arc<[ConnectionManager]>),
    Cluster(ClusterConnection),
}

/// Standalone connections at most, whatever the CPU count.
const MAX_SLOTS: usize = 16;

/// The slot of the calling thread among `n`: threads take slots in the order they first ask.
///
/// A multiplexed connection's driver task runs on the runtime of the thread that first used
/// it; a proxy worker thread that shares it with another pays two cross-thread wake-ups per
/// command. With a connection per thread (up to [`MAX_SLOTS`]) a worker's commands stay on its
/// own runtime.
fn thread_slot(n: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SLOT.with(|s| *s) % n
}

/// Timeouts and push delivery for [`Conn::open`].
pub(crate) struct ConnOptions<F> {
    /// Bounds connecting.
    pub(crate) timeout: Duration,
    /// Bounds one request (longer than `timeout` when writes carry a `WAIT`).
    pub(crate) response_timeout: Duration,
    /// Set for the wait-mode subscriber: RESP3 and a push sink.
    pub(crate) push: Option<F>,
    /// How long sent data may go unacknowledged before the kernel gives the connection up
    /// (see [`tcp_settings`]).
    pub(crate) dead_connection_timeout: Duration,
}

/// Keep-alive probes and a bound on unacknowledged data, so that a connection gone dark (a
/// NAT or load balancer that forgot it, a vanished host: no FIN, no RST) fails with an I/O
/// error that makes redis-rs reconnect. Without them, every command on it times out while the
/// kernel retransmits for ~15 minutes: redis-rs does not reconnect on a response timeout. The
/// probes also keep middleboxes from dropping an idle connection in the first place.
fn tcp_settings(dead_connection_timeout: Duration) -> TcpSettings {
    let idle = dead_connection_timeout.max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(Duration::from_secs(1)));
    let settings = TcpSettings::default().set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(dead_connection_timeout);
    settings
}

impl Conn {
    pub(crate) async fn open<F>(target: &Target, opts: ConnOptions<F>) -> Result<Self, RedisError>
    where
        F: Fn(PushInfo) + Send + Sync + 'static,
    {
        match target {
            Target::Single(url) => {
                let mut info = url
                    .as_str()
                    .into_connection_info()?
                    .set_tcp_settings(tcp_settings(opts.dead_connection_timeout));
                if opts.push.is_some() {
                    let settings = info
                        .redis_settings()
                        .clone()
                        .set_protocol(ProtocolVersion::RESP3);
                    info = info.set_redis_settings(settings);
                }
                let client = Client::open(info)?;
                // One quick reconnect attempt: a server that refuses connections must turn into
                // `Unavailable` within the operation's timeout, not after a long backoff. The
                // next operation tries again.
                let mut config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(opts.timeout))
                    .set_response_timeout(Some(opts.response_timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(200));
                let slots = if let Some(push) = opts.push {
                    config = config.set_push_sender(move |info: PushInfo| {
                        push(info);
                        Ok::<(), redis::aio::SendError>(())
                    });
                    1
                } else {
                    // One per CPU plus the thread that opened the store.
                    std::thread::available_parallelism()
                        .map_or(1, std::num::NonZeroUsize::get)
                        .saturating_add(1)
                        .min(MAX_SLOTS)
                };
                let conns = (0..slots)
                    .map(|_| {
                        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Conn::Single(conns.into()))
            }
            Target::Cluster(nodes) => {
                let mut builder = ClusterClientBuilder::new(nodes.clone())
                    .tcp_settings(tcp_settings(opts.dead_connection_timeout))
                    .connection_timeout(opts.timeout)
                    .response_timeout(opts.response_timeout)
                    .retries(2)
                    .min_retry_wait(20)
                    .max_retry_wait(200);
                if let Some(push) = opts.push {
                    builder = builder.use_protocol(ProtocolVersion::RESP3).push_sender(
                        move |info: PushInfo| {
                            push(info);
                            Ok::<(), redis::aio::SendError>(())
                        },
                    );
                }
                let client = builder.build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    pub(crate) async fn pipeline(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, RedisError> {
        match self {
            Conn::Single(c) => pipe.query_async(&mut pick(c)).await,
            Conn::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
    }

    pub(crate) async fn command(&self, cmd: &redis::Cmd) -> Result<Value, RedisError> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut pick(c)).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// Runs `cmd` on every master (Cluster) or the server (standalone).
    pub(crate) async fn on_all_masters(&self, cmd: redis::Cmd) -> Result<Value, RedisError> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut pick(c)).await,
            Conn::Cluster(c) => {
                use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
                c.clone()
                    .route_command(
                        cmd,
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                    )
                    .await
            }
        }
    }

    /// `SUBSCRIBE` (standalone) or `SSUBSCRIBE` (Cluster, routed to the channel's slot); returns
    /// once the server confirmed.
    pub(crate) async fn subscribe(&self, channels: &[String]) -> Result<(), RedisError> {
        if channels.is_empty() {
            return Ok(());
        }
        match self {
            Conn::Single(c) => pick(c).subscribe(channels).await,
            Conn::Cluster(c) => {
                // Sharded channels of different slots cannot share one SSUBSCRIBE.
                for ch in channels {
                    c.clone().ssubscribe(ch).await?;
                }
                Ok(())
            }
        }
    }

    pub(crate) async fn unsubscribe(&self, channels: &[String]) -> Result<(), RedisError> {
        if channels.is_empty() {
            return Ok(());
        }
        match self {
            Conn::Single(c) => pick(c).unsubscribe(channels).await,
            Conn::Cluster(c) => {
                for ch in channels {
                    c.clone().sunsubscribe(ch).await?;
                }
                Ok(())
            }
        }
    }
}

/// The calling thread's connection.
fn pick(conns: &[ConnectionManager]) -> ConnectionManager {
    conns[thread_slot(conns.len())].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:7000/2"),
            Ok(Target::Single("redis://127.0.0.1:7000/2".into()))
        );
        assert_eq!(
            Target::parse("redis+cluster://a:1,b:2"),
            Ok(Target::Cluster(vec![
                "redis://a:1".into(),
                "redis://b:2".into()
            ]))
        );
        assert_eq!(
            Target::parse("rediss+cluster://u:p@a:1,b:2/"),
            Ok(Target::Cluster(vec![
                "rediss://u:p@a:1".into(),
                "rediss://u:p@b:2".into()
            ]))
        );
        assert!(Target::parse("redis+cluster://").is_err());
        assert!(Target::parse("http://x").is_err());
    }
}
