//! Mixed clusters: nodes of ours and real `chitchat` 0.13 nodes behind one interface, so a
//! scenario can be written once and run with the seed (or any role) on either side.
//!
//! Node identities are compared as `"node_id:generation_id"` strings: the two crates have their
//! own `ChitchatId` types.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chitchat_uring::transport::{Faults, Partition, UdpMode};
use chitchat_uring::{ChitchatHandle, ProtocolVersion, UdpTransport, spawn_chitchat};

/// The cluster id every mixed test uses.
pub const CLUSTER_ID: &str = "interop";

/// Which implementation runs a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ours,
    Theirs,
}

/// Everything that differs between the nodes of a test, for both implementations.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub side: Side,
    pub node_id: String,
    pub port: u16,
    pub generation: u64,
    pub gossip: Duration,
    pub seeds: Vec<SocketAddr>,
    pub v1: bool,
    pub initial_interval: Duration,
    pub phi_threshold: f64,
    pub dead_node_grace_period: Duration,
    pub marked_for_deletion_grace_period: Duration,
    /// Ours only: destinations whose datagrams this node drops (a partition on real UDP).
    pub partition: Option<Partition>,
    /// Counts the calls of the catch-up callback (both sides).
    pub catchups: Option<Arc<AtomicUsize>>,
}

impl NodeSpec {
    /// A node on 127.0.0.1:`port`, gossiping every 100 ms, long grace periods, V0.
    pub fn new(side: Side, port: u16) -> NodeSpec {
        let prefix = match side {
            Side::Ours => "ours",
            Side::Theirs => "theirs",
        };
        NodeSpec {
            side,
            node_id: format!("{prefix}-{port}"),
            port,
            generation: 1,
            gossip: Duration::from_millis(100),
            seeds: Vec::new(),
            v1: false,
            initial_interval: Duration::from_millis(500),
            phi_threshold: 8.0,
            dead_node_grace_period: Duration::from_secs(3_600),
            marked_for_deletion_grace_period: Duration::from_secs(3_600),
            partition: None,
            catchups: None,
        }
    }

    /// A catch-up callback that counts its calls, for either implementation.
    fn catchup_callback(&self) -> Option<Box<dyn Fn() + Send>> {
        let counter = self.catchups.clone()?;
        Some(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The `"node_id:generation"` identity of this node.
    pub fn id(&self) -> String {
        format!("{}:{}", self.node_id, self.generation)
    }

    fn ours_config(&self) -> chitchat_uring::ChitchatConfig {
        let mut config = chitchat_uring::ChitchatConfig::for_test(self.port);
        config.chitchat_id =
            chitchat_uring::ChitchatId::new(self.node_id.clone(), self.generation, self.addr());
        config.listen_addr = self.addr();
        config.cluster_id = CLUSTER_ID.to_string();
        config.gossip_interval = self.gossip;
        config.seed_nodes = self.seeds.iter().map(ToString::to_string).collect();
        config.failure_detector_config = chitchat_uring::FailureDetectorConfig {
            phi_threshold: self.phi_threshold,
            initial_interval: self.initial_interval,
            dead_node_grace_period: self.dead_node_grace_period,
            ..chitchat_uring::FailureDetectorConfig::default()
        };
        config.marked_for_deletion_grace_period = self.marked_for_deletion_grace_period;
        config.catchup_callback = self.catchup_callback();
        // Left at our default (V0) unless V1 is asked for: tests rely on the default.
        if self.v1 {
            config.protocol_version = ProtocolVersion::V1;
        }
        config
    }

    fn theirs_config(&self) -> chitchat::ChitchatConfig {
        chitchat::ChitchatConfig {
            chitchat_id: chitchat::ChitchatId::new(
                self.node_id.clone(),
                self.generation,
                self.addr(),
            ),
            cluster_id: CLUSTER_ID.to_string(),
            gossip_interval: self.gossip,
            listen_addr: self.addr(),
            seed_nodes: self.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config: chitchat::FailureDetectorConfig {
                phi_threshold: self.phi_threshold,
                initial_interval: self.initial_interval,
                dead_node_grace_period: self.dead_node_grace_period,
                ..chitchat::FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: self.marked_for_deletion_grace_period,
            catchup_callback: self.catchup_callback(),
            extra_liveness_predicate: None,
            protocol_version: if self.v1 {
                chitchat::ProtocolVersion::V1
            } else {
                chitchat::ProtocolVersion::V0
            },
        }
    }

    /// Starts the node (ours on io_uring, falling back to epoll only if io_uring is missing).
    pub async fn spawn(&self, kvs: &[(&str, &str)]) -> Node {
        let kvs: Vec<(String, String)> = kvs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_with(kvs).await
    }

    pub async fn spawn_with(&self, kvs: Vec<(String, String)>) -> Node {
        match self.side {
            Side::Ours => {
                let transport = UdpTransport {
                    mode: UdpMode::Auto,
                    faults: Faults {
                        partition: self.partition.clone(),
                        ..Faults::NONE
                    },
                    ..UdpTransport::DEFAULT
                };
                Node::Ours(
                    spawn_chitchat(self.ours_config(), kvs, &transport)
                        .await
                        .unwrap(),
                )
            }
            Side::Theirs => Node::Theirs(
                chitchat::spawn_chitchat(
                    self.theirs_config(),
                    kvs,
                    &chitchat::transport::UdpTransport,
                )
                .await
                .unwrap(),
            ),
        }
    }
}

fn ours_id(id: &chitchat_uring::ChitchatId) -> String {
    format!("{}:{}", id.node_id, id.generation_id)
}

fn theirs_id(id: &chitchat::ChitchatId) -> String {
    format!("{}:{}", id.node_id, id.generation_id)
}

/// Visible key-values of every node state a node holds: owner id → key → value.
pub type View = BTreeMap<String, BTreeMap<String, String>>;

/// A running node of either implementation.
pub enum Node {
    Ours(ChitchatHandle),
    Theirs(chitchat::ChitchatHandle),
}

impl Node {
    pub fn side(&self) -> Side {
        match self {
            Node::Ours(_) => Side::Ours,
            Node::Theirs(_) => Side::Theirs,
        }
    }

    /// `"node_id:generation"`.
    pub fn id(&self) -> String {
        match self {
            Node::Ours(h) => ours_id(h.chitchat_id()),
            Node::Theirs(h) => theirs_id(h.chitchat_id()),
        }
    }

    pub fn ours(&self) -> &ChitchatHandle {
        match self {
            Node::Ours(h) => h,
            Node::Theirs(_) => panic!("{} is a chitchat node", self.id()),
        }
    }

    /// Live nodes (self included).
    pub async fn live(&self) -> BTreeSet<String> {
        match self {
            Node::Ours(h) => h.chitchat().lock().live_nodes().map(ours_id).collect(),
            Node::Theirs(h) => {
                h.with_chitchat(|c| c.live_nodes().map(theirs_id).collect())
                    .await
            }
        }
    }

    pub async fn dead(&self) -> BTreeSet<String> {
        match self {
            Node::Ours(h) => h.chitchat().lock().dead_nodes().map(ours_id).collect(),
            Node::Theirs(h) => {
                h.with_chitchat(|c| c.dead_nodes().map(theirs_id).collect())
                    .await
            }
        }
    }

    /// Every node state held (live, dead or unknown yet).
    pub async fn known(&self) -> BTreeSet<String> {
        match self {
            Node::Ours(h) => h
                .chitchat()
                .lock()
                .node_states()
                .keys()
                .map(ours_id)
                .collect(),
            Node::Theirs(h) => {
                h.with_chitchat(|c| c.node_states().keys().map(theirs_id).collect())
                    .await
            }
        }
    }

    /// Visible key-values of every node state (tombstones excluded, TTL'd values included).
    pub async fn view(&self) -> View {
        match self {
            Node::Ours(h) => h
                .chitchat()
                .lock()
                .node_states()
                .iter()
                .map(|(id, s)| {
                    let kvs = s
                        .key_values()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    (ours_id(id), kvs)
                })
                .collect(),
            Node::Theirs(h) => {
                h.with_chitchat(|c| {
                    c.node_states()
                        .iter()
                        .map(|(id, s)| {
                            let kvs = s
                                .key_values()
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect();
                            (theirs_id(id), kvs)
                        })
                        .collect()
                })
                .await
            }
        }
    }

    /// `last_gc_version` of node `owner`'s state, as this node sees it.
    pub async fn last_gc_version_of(&self, owner: &str) -> Option<u64> {
        match self {
            Node::Ours(h) => h
                .chitchat()
                .lock()
                .node_states()
                .iter()
                .find(|(id, _)| ours_id(id) == owner)
                .map(|(_, s)| s.last_gc_version()),
            Node::Theirs(h) => {
                h.with_chitchat(|c| {
                    c.node_states()
                        .iter()
                        .find(|(id, _)| theirs_id(id) == owner)
                        .map(|(_, s)| s.last_gc_version())
                })
                .await
            }
        }
    }

    /// The value of `key` in the state of node `owner`, as this node sees it.
    pub async fn get(&self, owner: &str, key: &str) -> Option<String> {
        self.view().await.get(owner)?.get(key).cloned()
    }

    pub async fn set(&self, key: &str, value: &str) {
        match self {
            Node::Ours(h) => h.chitchat().lock().self_node_state().set(key, value),
            Node::Theirs(h) => {
                h.with_chitchat(|c| c.self_node_state().set(key, value))
                    .await
            }
        }
    }

    pub async fn set_with_ttl(&self, key: &str, value: &str) {
        match self {
            Node::Ours(h) => h
                .chitchat()
                .lock()
                .self_node_state()
                .set_with_ttl(key, value),
            Node::Theirs(h) => {
                h.with_chitchat(|c| c.self_node_state().set_with_ttl(key, value))
                    .await
            }
        }
    }

    pub async fn delete(&self, key: &str) {
        match self {
            Node::Ours(h) => h.chitchat().lock().self_node_state().delete(key),
            Node::Theirs(h) => h.with_chitchat(|c| c.self_node_state().delete(key)).await,
        }
    }

    /// Whether the server is still running (a real chitchat node that panicked or failed has a
    /// resolved termination watcher).
    pub async fn is_running(&self) -> bool {
        let watcher: std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> = match self
        {
            Node::Ours(h) => Box::pin(h.termination_watcher()),
            Node::Theirs(h) => Box::pin(h.termination_watcher()),
        };
        tokio::time::timeout(Duration::from_millis(1), watcher)
            .await
            .is_err()
    }

    pub async fn shutdown(self) {
        match self {
            Node::Ours(h) => h.shutdown().await.unwrap(),
            Node::Theirs(h) => h.shutdown().await.unwrap(),
        }
    }
}

/// Polls an async condition every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True when every node sees exactly `expected` as live.
pub async fn all_see_live(nodes: &[Node], expected: &BTreeSet<String>) -> bool {
    for node in nodes {
        if &node.live().await != expected {
            return false;
        }
    }
    true
}

/// Waits until every node sees exactly `expected` live; panics with every node's view if not.
pub async fn wait_all_live(nodes: &[Node], expected: &BTreeSet<String>, timeout: Duration) {
    if eventually(timeout, || all_see_live(nodes, expected)).await {
        return;
    }
    let mut report = String::new();
    for node in nodes {
        report.push_str(&format!(
            "\n  {} sees live {:?} dead {:?}",
            node.id(),
            node.live().await,
            node.dead().await
        ));
    }
    panic!("not every node sees {expected:?} live:{report}");
}

/// True when every node sees `owner`'s `key` with value `expected` (None: absent or deleted).
pub async fn all_see(nodes: &[Node], owner: &str, key: &str, expected: Option<&str>) -> bool {
    for node in nodes {
        if node.get(owner, key).await.as_deref() != expected {
            return false;
        }
    }
    true
}

/// Waits until every node sees `owner`'s `key` as `expected`; panics with the views if not.
pub async fn wait_all_see(
    nodes: &[Node],
    owner: &str,
    key: &str,
    expected: Option<&str>,
    timeout: Duration,
) {
    if eventually(timeout, || all_see(nodes, owner, key, expected)).await {
        return;
    }
    let mut report = String::new();
    for node in nodes {
        report.push_str(&format!(
            "\n  {} has {:?}",
            node.id(),
            node.get(owner, key).await
        ));
    }
    panic!("{owner}/{key} did not become {expected:?} everywhere:{report}");
}

/// A listener counter: how many events a subscription saw.
#[derive(Clone, Default)]
pub struct EventLog {
    pub events: Arc<parking_lot::Mutex<Vec<(String, String, String)>>>,
    pub count: Arc<AtomicUsize>,
}

impl EventLog {
    /// Subscribes to `prefix` on one of our nodes; events are (node id, key, value).
    pub fn subscribe(&self, node: &ChitchatHandle, prefix: &str) {
        let log = self.clone();
        node.chitchat()
            .lock()
            .subscribe_event(prefix, move |event| {
                log.events.lock().push((
                    ours_id(event.node),
                    event.key.to_string(),
                    event.value.to_string(),
                ));
                log.count.fetch_add(1, Ordering::SeqCst);
            })
            .forever();
    }

    pub fn contains(&self, node: &str, key: &str, value: &str) -> bool {
        self.events
            .lock()
            .iter()
            .any(|(n, k, v)| n == node && k == key && v == value)
    }
}
