//! Seed resolution: `ip:port` seeds are kept as they are, `host:port` seeds are resolved with
//! hickory-resolver at start and again every `DNS_POLLING_DURATION` (so a Kubernetes headless
//! service or a re-deployed seed keeps working).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How often hostname seeds are resolved again.
pub(crate) const DNS_POLLING_DURATION: Duration = Duration::from_secs(60);

/// The seeds of a config, split into fixed addresses and hostnames to resolve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Seeds {
    pub(crate) static_addrs: HashSet<SocketAddr>,
    /// `(host, port)` pairs.
    pub(crate) hostnames: Vec<(String, u16)>,
}

impl Seeds {
    /// Splits seed strings; the config validation has already rejected malformed ones, so
    /// anything unparsable here is skipped with a warning.
    pub(crate) fn parse(seeds: &[String]) -> Seeds {
        let mut parsed = Seeds::default();
        for seed in seeds {
            if let Ok(addr) = seed.parse::<SocketAddr>() {
                parsed.static_addrs.insert(addr);
                continue;
            }
            match seed.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
                Some((host, Ok(port))) if !host.is_empty() => {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    parsed.hostnames.push((host.to_string(), port));
                }
                _ => warn!(seed, "ignoring a seed that is not `host:port`"),
            }
        }
        parsed
    }
}

/// Builds a resolver from the system configuration, or the default one (hosts file still
/// honoured) if the system configuration cannot be read.
pub(crate) fn system_resolver() -> TokioResolver {
    let mut builder = match TokioResolver::builder_tokio() {
        Ok(builder) => builder,
        Err(error) => {
            warn!(%error, "cannot read the system DNS configuration: using defaults");
            TokioResolver::builder_with_config(
                ResolverConfig::default(),
                TokioConnectionProvider::default(),
            )
        }
    };
    let options: &mut ResolverOpts = builder.options_mut();
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    builder.build()
}

/// Keeps only addresses a socket bound to `listen_addr` can send to.
fn reachable_from(listen_addr: SocketAddr, ip: IpAddr) -> bool {
    match listen_addr {
        SocketAddr::V4(_) => ip.is_ipv4(),
        SocketAddr::V6(_) => true,
    }
}

/// Resolves one `host:port` seed; a failure is logged and resolves to nothing.
pub(crate) async fn resolve_seed_host(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
    listen_addr: SocketAddr,
) -> HashSet<SocketAddr> {
    match resolver.lookup_ip(host).await {
        Ok(lookup) => lookup
            .iter()
            .filter(|ip| reachable_from(listen_addr, *ip))
            .map(|ip| SocketAddr::new(ip, port))
            .collect(),
        Err(error) => {
            warn!(host, %error, "failed to resolve seed host");
            HashSet::new()
        }
    }
}

/// Static seeds plus the current resolution of every hostname seed.
pub(crate) async fn resolve_seeds(
    resolver: &TokioResolver,
    seeds: &Seeds,
    listen_addr: SocketAddr,
) -> HashSet<SocketAddr> {
    let mut addrs = seeds.static_addrs.clone();
    for (host, port) in &seeds.hostnames {
        let resolved = resolve_seed_host(resolver, host, *port, listen_addr).await;
        debug!(host, ?resolved, "resolved seed host");
        addrs.extend(resolved);
    }
    addrs
}

/// Re-resolves the hostname seeds every `period` (first resolution already done by the
/// caller) and publishes `static ∪ resolved`, dropping addresses that vanished. Ends when
/// nobody watches the seeds any more or when `node_stopped` completes (a stopped node needs
/// no fresh seeds, even while the application still holds its state).
pub(crate) async fn dns_refresh_loop(
    resolver: TokioResolver,
    seeds: Seeds,
    listen_addr: SocketAddr,
    seed_tx: watch::Sender<HashSet<SocketAddr>>,
    period: Duration,
    node_stopped: impl Future<Output = ()>,
) {
    if seeds.hostnames.is_empty() {
        return;
    }
    let mut node_stopped = std::pin::pin!(node_stopped);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await; // the first tick is immediate: start resolved already
    loop {
        let addrs = tokio::select! {
            _ = interval.tick() => {
                tokio::select! {
                    addrs = resolve_seeds(&resolver, &seeds, listen_addr) => addrs,
                    _ = seed_tx.closed() => return,
                    _ = &mut node_stopped => return,
                }
            }
            _ = seed_tx.closed() => return,
            _ = &mut node_stopped => return,
        };
        seed_tx.send_if_modified(|current| {
            if *current == addrs {
                return false;
            }
            info!(seeds = ?addrs, "seed addresses changed");
            *current = addrs;
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_split_into_addresses_and_hostnames() {
        let seeds = Seeds::parse(&[
            "127.0.0.1:7000".to_string(),
            "[::1]:7001".to_string(),
            "localhost:7002".to_string(),
            "seed.example:7003".to_string(),
            "garbage".to_string(),
        ]);
        assert_eq!(seeds.static_addrs.len(), 2);
        assert_eq!(
            seeds.hostnames,
            vec![
                ("localhost".to_string(), 7002),
                ("seed.example".to_string(), 7003)
            ]
        );
    }

    #[tokio::test]
    async fn localhost_resolves_from_the_hosts_file() {
        let resolver = system_resolver();
        let seeds = Seeds::parse(&["localhost:7002".to_string(), "10.0.0.1:9".to_string()]);
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let addrs = resolve_seeds(&resolver, &seeds, listen).await;
        assert!(
            addrs.contains(&"127.0.0.1:7002".parse().unwrap()),
            "{addrs:?}"
        );
        assert!(addrs.contains(&"10.0.0.1:9".parse().unwrap()));
        assert!(addrs.iter().all(|a| a.is_ipv4()), "IPv4 socket: {addrs:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_loop_ends_when_nobody_watches() {
        let resolver = system_resolver();
        let seeds = Seeds::parse(&["localhost:7002".to_string()]);
        let (tx, rx) = watch::channel(HashSet::new());
        let task = tokio::spawn(dns_refresh_loop(
            resolver,
            seeds,
            "127.0.0.1:0".parse().unwrap(),
            tx,
            Duration::from_secs(60),
            std::future::pending(),
        ));
        drop(rx);
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the loop ends")
            .unwrap();
    }

    /// The node stopped but its state is still watched (the application holds a reference):
    /// the loop ends anyway.
    #[tokio::test(start_paused = true)]
    async fn refresh_loop_ends_when_the_node_stops() {
        let resolver = system_resolver();
        let seeds = Seeds::parse(&["localhost:7002".to_string()]);
        let (tx, mut rx) = watch::channel(HashSet::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dns_refresh_loop(
            resolver,
            seeds,
            "127.0.0.1:0".parse().unwrap(),
            tx,
            Duration::from_secs(60),
            async move {
                let _ = stop_rx.await;
            },
        ));
        // While the node runs, the loop publishes (its first refresh is one period in).
        tokio::time::timeout(Duration::from_secs(120), rx.changed())
            .await
            .expect("a refresh within two periods")
            .unwrap();
        assert!(!task.is_finished());
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the loop ends when the node stops")
            .unwrap();
        assert!(rx.has_changed().is_err(), "the loop dropped its sender");
    }

    #[tokio::test]
    async fn refresh_loop_publishes_resolved_hostnames() {
        let resolver = system_resolver();
        let seeds = Seeds::parse(&["localhost:7002".to_string()]);
        let (tx, mut rx) = watch::channel(HashSet::new());
        let task = tokio::spawn(dns_refresh_loop(
            resolver,
            seeds,
            "127.0.0.1:0".parse().unwrap(),
            tx,
            Duration::from_millis(20),
            std::future::pending(),
        ));
        let published = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|addrs| !addrs.is_empty()),
        )
        .await
        .expect("resolved within 10 s")
        .unwrap()
        .clone();
        assert!(published.contains(&"127.0.0.1:7002".parse().unwrap()));
        drop(rx);
        task.await.unwrap();
    }
}
