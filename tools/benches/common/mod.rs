//! What both benchmarks share: the same remote node states built in either implementation
//! through its public API, running nodes of either implementation, and a local cluster of
//! chitchat 0.13 nodes measured like ours.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport as CcTransport};
use chitchat_uring::protocol::amplification::AmplificationLimits;
use chitchat_uring::server::{SpawnOptions, spawn_chitchat, spawn_chitchat_with};
use chitchat_uring::transport::UdpMode;
use chitchat_uring::{ChitchatConfig, ChitchatHandle, ChitchatId, UdpTransport};
use chitchat_uring_tools::bench_support::{
    ClusterSpec, LocalCluster, Traffic, cluster_failure_detector, free_udp_ports,
    initial_key_values, value_32,
};

pub const CLUSTER_ID: &str = "bench-cluster";
pub const KEYS: usize = 10;

/// Which node serves a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    OursUring,
    OursEpoll,
    Chitchat,
}

impl Impl {
    pub const ALL: [Impl; 3] = [Impl::OursUring, Impl::OursEpoll, Impl::Chitchat];

    pub fn name(self) -> &'static str {
        match self {
            Impl::OursUring => "chitchat-uring (io_uring)",
            Impl::OursEpoll => "chitchat-uring (epoll)",
            Impl::Chitchat => "chitchat 0.13",
        }
    }

    pub fn slug(self) -> &'static str {
        match self {
            Impl::OursUring => "ours-uring",
            Impl::OursEpoll => "ours-epoll",
            Impl::Chitchat => "chitchat",
        }
    }

    pub fn from_slug(slug: &str) -> Option<Impl> {
        Impl::ALL.into_iter().find(|i| i.slug() == slug)
    }

    pub fn transport(self) -> UdpTransport {
        UdpTransport {
            mode: if self == Impl::OursEpoll {
                UdpMode::Epoll
            } else {
                UdpMode::Uring
            },
            ..UdpTransport::DEFAULT
        }
    }
}

/// The id of remote node `i`: loopback addresses on port 1, where nothing listens, so a node
/// that gossips to them disturbs nobody.
pub fn remote_id(i: usize) -> (String, SocketAddr) {
    let addr = SocketAddr::from(([127, 77, (i / 250) as u8, (i % 250 + 1) as u8], 1));
    (format!("remote-{i:05}"), addr)
}

/// The key-values of remote node `i`, versions 1..=KEYS.
fn remote_kvs(i: usize) -> impl Iterator<Item = (String, String, u64)> {
    (0..KEYS).map(move |k| (format!("key-{k:04}"), value_32(i, k), k as u64 + 1))
}

/// Adds `n` remote node states of `KEYS` 32-byte values to one of our nodes (catch-up API).
pub fn fill_ours(chitchat: &mut chitchat_uring::Chitchat, n: usize) {
    for i in 0..n {
        let (name, addr) = remote_id(i);
        let id = ChitchatId::new(name, 1, addr);
        let kvs = remote_kvs(i).map(|(key, value, version)| {
            (
                key,
                chitchat_uring::VersionedValue {
                    value,
                    version,
                    status: chitchat_uring::DeletionStatus::Set,
                },
            )
        });
        chitchat.reset_node_state_if_update(&id, kvs, KEYS as u64, 0);
    }
}

/// The same states in a chitchat 0.13 node.
pub fn fill_chitchat(chitchat: &mut chitchat::Chitchat, n: usize) {
    for i in 0..n {
        let (name, addr) = remote_id(i);
        let id = chitchat::ChitchatId::new(name, 1, addr);
        let kvs = remote_kvs(i).map(|(key, value, version)| {
            (
                key,
                chitchat::VersionedValue {
                    value,
                    version,
                    status: chitchat::DeletionStatus::Set,
                },
            )
        });
        chitchat.reset_node_state_if_update(&id, kvs, KEYS as u64, 0);
    }
}

/// Our node config for a benchmark node: it gossips once an hour, so it only answers.
pub fn ours_config(addr: SocketAddr, gossip: Duration) -> ChitchatConfig {
    let mut config = ChitchatConfig::for_test(addr.port());
    config.chitchat_id = ChitchatId::new("bench-node", 1, addr);
    config.listen_addr = addr;
    config.cluster_id = CLUSTER_ID.to_string();
    config.gossip_interval = gossip;
    config.failure_detector_config = cluster_failure_detector(gossip);
    config.marked_for_deletion_grace_period = Duration::from_secs(3_600).max(gossip);
    config
}

pub fn chitchat_config(
    id: &str,
    addr: SocketAddr,
    gossip: Duration,
    seeds: Vec<String>,
) -> chitchat::ChitchatConfig {
    chitchat::ChitchatConfig {
        chitchat_id: chitchat::ChitchatId::new(id, 1, addr),
        cluster_id: CLUSTER_ID.to_string(),
        gossip_interval: gossip,
        listen_addr: addr,
        seed_nodes: seeds,
        failure_detector_config: chitchat::FailureDetectorConfig {
            initial_interval: gossip,
            dead_node_grace_period: Duration::from_secs(3_600),
            ..chitchat::FailureDetectorConfig::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(3_600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
    }
}

/// One running node of either implementation holding `n` remote states.
pub enum ServedNode {
    Ours(ChitchatHandle),
    Chitchat(chitchat::ChitchatHandle),
}

/// Starts a node of `which` on a free port with `n` remote states; it gossips once an hour.
pub fn serve(which: Impl, n: usize, rt: &tokio::runtime::Runtime) -> (ServedNode, SocketAddr) {
    let gossip = Duration::from_secs(3_600);
    for _ in 0..10 {
        let port = free_udp_ports(1).expect("no free port")[0];
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match which {
            Impl::OursUring | Impl::OursEpoll => {
                let transport = which.transport();
                // The load comes from sockets that are no cluster members: without this, the
                // anti-amplification limits (which chitchat lacks) would be measured instead
                // of the handling.
                let options =
                    SpawnOptions::default().with_amplification_limits(AmplificationLimits::off());
                let Ok(handle) = rt.block_on(spawn_chitchat_with(
                    ours_config(addr, gossip),
                    vec![],
                    &transport,
                    options,
                )) else {
                    continue;
                };
                fill_ours(&mut handle.chitchat().lock(), n);
                return (ServedNode::Ours(handle), addr);
            }
            Impl::Chitchat => {
                let config = chitchat_config("bench-node", addr, gossip, vec![]);
                let Ok(handle) = rt.block_on(chitchat::spawn_chitchat(
                    config,
                    vec![],
                    &chitchat::transport::UdpTransport,
                )) else {
                    continue;
                };
                rt.block_on(handle.with_chitchat(|c| fill_chitchat(c, n)));
                return (ServedNode::Chitchat(handle), addr);
            }
        }
    }
    panic!("could not start a {} node", which.name());
}

/// Starts the node under test of the one-host case: a node of `which` on a free port that
/// gossips every `interval` in `version`, with `KEYS` keys of its own and no seed (the
/// simulated peers contact it first).
pub fn serve_host(
    which: Impl,
    interval: Duration,
    version: chitchat_uring::ProtocolVersion,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(ServedNode, SocketAddr)> {
    let mut last_error = None;
    for _ in 0..10 {
        let port = free_udp_ports(1)?[0];
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let kvs = initial_key_values(0, KEYS);
        match which {
            Impl::OursUring | Impl::OursEpoll => {
                let mut config = ours_config(addr, interval);
                config.chitchat_id = ChitchatId::new("host-under-test", 1, addr);
                config.protocol_version = version;
                match rt.block_on(spawn_chitchat(config, kvs, &which.transport())) {
                    Ok(handle) => return Ok((ServedNode::Ours(handle), addr)),
                    Err(error) => last_error = Some(error),
                }
            }
            Impl::Chitchat => {
                let mut config = chitchat_config("host-under-test", addr, interval, vec![]);
                config.protocol_version = match version {
                    chitchat_uring::ProtocolVersion::V0 => chitchat::ProtocolVersion::V0,
                    chitchat_uring::ProtocolVersion::V1 => chitchat::ProtocolVersion::V1,
                };
                match rt.block_on(chitchat::spawn_chitchat(
                    config,
                    kvs,
                    &chitchat::transport::UdpTransport,
                )) {
                    Ok(handle) => return Ok((ServedNode::Chitchat(handle), addr)),
                    Err(error) => last_error = Some(error),
                }
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("no attempt"))
        .context(format!("starting a {} node", which.name())))
}

impl ServedNode {
    pub fn shutdown(self, rt: &tokio::runtime::Runtime) {
        let result = match self {
            ServedNode::Ours(handle) => rt.block_on(handle.shutdown()),
            ServedNode::Chitchat(handle) => rt.block_on(handle.shutdown()),
        };
        if let Err(error) = result {
            eprintln!("node shutdown: {error:#}");
        }
    }
}

/// Counts what chitchat's UDP sockets send (chitchat exposes no counters of its own).
#[derive(Default)]
pub struct Counters {
    messages: AtomicU64,
    bytes: AtomicU64,
    received: AtomicU64,
}

pub struct CountingTransport {
    pub counters: Arc<Counters>,
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    counters: Arc<Counters>,
}

#[async_trait]
impl CcTransport for CountingTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = chitchat::transport::UdpTransport.open(listen_addr).await?;
        Ok(Box::new(CountingSocket {
            inner,
            counters: self.counters.clone(),
        }))
    }
}

#[async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: chitchat::ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let outcome = self.inner.send(to, envelope).await?;
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(outcome.num_bytes_sent as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let outcome = self.inner.recv().await?;
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        Ok(outcome)
    }
}

/// A local cluster of chitchat 0.13 nodes on a 2-worker tokio runtime.
pub struct ChitchatCluster {
    handles: Vec<chitchat::ChitchatHandle>,
    keys: usize,
    counters: Arc<Counters>,
    runtime: tokio::runtime::Runtime,
}

impl ChitchatCluster {
    pub fn start(spec: &ClusterSpec) -> anyhow::Result<ChitchatCluster> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let counters = Arc::new(Counters::default());
        let transport = CountingTransport {
            counters: counters.clone(),
        };
        let mut ports = free_udp_ports(spec.nodes)?.into_iter();
        let mut handles: Vec<chitchat::ChitchatHandle> = Vec::with_capacity(spec.nodes);
        let mut seeds = Vec::new();
        for i in 0..spec.nodes {
            let mut attempt = 0;
            let handle = loop {
                let port = match ports.next() {
                    Some(port) => port,
                    None => free_udp_ports(1)?[0],
                };
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let mut config = chitchat_config(
                    &format!("node-{i}"),
                    addr,
                    spec.gossip_interval,
                    seeds.clone(),
                );
                config.cluster_id = spec.cluster_id.clone();
                match runtime.block_on(chitchat::spawn_chitchat(
                    config,
                    initial_key_values(i, spec.keys),
                    &transport,
                )) {
                    Ok(handle) => break handle,
                    Err(_) if attempt < 5 => attempt += 1,
                    Err(error) => return Err(error.context(format!("starting node {i}"))),
                }
            };
            if seeds.is_empty() {
                seeds.push(handle.chitchat_id().gossip_advertise_addr.to_string());
            }
            handles.push(handle);
        }
        Ok(ChitchatCluster {
            handles,
            keys: spec.keys,
            counters,
            runtime,
        })
    }
}

impl LocalCluster for ChitchatCluster {
    fn len(&self) -> usize {
        self.handles.len()
    }

    fn converged_nodes(&mut self) -> usize {
        let total = self.handles.len();
        let keys = self.keys as u64;
        self.handles
            .iter()
            .filter(|handle| {
                let chitchat = handle.chitchat();
                let chitchat = chitchat.blocking_lock();
                chitchat.live_nodes().count() == total
                    && chitchat.node_states().len() == total
                    && chitchat
                        .node_states()
                        .values()
                        .all(|state| state.max_version() >= keys)
            })
            .count()
    }

    fn set_key(&mut self, node: usize, key: &str, value: &str) {
        if let Some(handle) = self.handles.get(node) {
            handle
                .chitchat()
                .blocking_lock()
                .self_node_state()
                .set(key, value);
        }
    }

    fn nodes_with_key(&mut self, owner: usize, key: &str, value: &str) -> usize {
        let Some(owner_id) = self.handles.get(owner).map(|h| h.chitchat_id().clone()) else {
            return 0;
        };
        self.handles
            .iter()
            .filter(|handle| {
                let chitchat = handle.chitchat();
                let chitchat = chitchat.blocking_lock();
                chitchat
                    .node_state(&owner_id)
                    .and_then(|state| state.get(key))
                    == Some(value)
            })
            .count()
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            messages_sent: self.counters.messages.load(Ordering::Relaxed),
            bytes_sent: self.counters.bytes.load(Ordering::Relaxed),
            messages_received: self.counters.received.load(Ordering::Relaxed),
        }
    }

    fn shutdown(self: Box<Self>) -> anyhow::Result<()> {
        let ChitchatCluster {
            handles, runtime, ..
        } = *self;
        for handle in &handles {
            let _ = handle.initiate_shutdown();
        }
        let mut first_error = None;
        for handle in handles {
            if let Err(error) = runtime.block_on(handle.shutdown()) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
