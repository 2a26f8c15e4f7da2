//! Nodes for the hostile tests: configs on 127.0.0.1, transports, bounded waits and what the
//! tests observe (liveness, key-values, resident memory).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use chitchat_uring::transport::UdpMode;
use chitchat_uring::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, UdpTransport, spawn_chitchat,
};

pub const CLUSTER: &str = "hostile-cluster";
pub const GOSSIP_MS: u64 = 100;

/// Every hostile test measures memory, reply bytes or liveness under load: one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A UDP port free right now on 127.0.0.1 (the kernel's pick, released at once).
pub fn free_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind port 0");
    socket.local_addr().unwrap().port()
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `node-{port}` generation 1 on 127.0.0.1:`port`, gossiping every 100 ms.
pub fn config(port: u16, cluster_id: &str, seeds: &[SocketAddr]) -> ChitchatConfig {
    let mut config = ChitchatConfig::for_test(port);
    config.chitchat_id = ChitchatId::new(format!("node-{port}"), 1, addr(port));
    config.cluster_id = cluster_id.to_string();
    config.gossip_interval = Duration::from_millis(GOSSIP_MS);
    config.seed_nodes = seeds.iter().map(ToString::to_string).collect();
    config.failure_detector_config = FailureDetectorConfig {
        initial_interval: Duration::from_millis(GOSSIP_MS * 2),
        dead_node_grace_period: Duration::from_secs(3_600),
        ..FailureDetectorConfig::default()
    };
    config.marked_for_deletion_grace_period = Duration::from_secs(3_600);
    config
}

pub fn epoll() -> UdpTransport {
    UdpTransport {
        mode: UdpMode::Epoll,
        workers: Some(1),
        ..UdpTransport::DEFAULT
    }
}

pub fn uring() -> UdpTransport {
    UdpTransport {
        mode: UdpMode::Uring,
        workers: Some(1),
        ..UdpTransport::DEFAULT
    }
}

/// Spawns a node; `None` (with the reason printed) if the transport is unavailable here, which
/// only happens for io_uring.
pub async fn try_spawn(
    config: ChitchatConfig,
    key_values: Vec<(String, String)>,
    transport: &UdpTransport,
) -> Option<ChitchatHandle> {
    match spawn_chitchat(config, key_values, transport).await {
        Ok(handle) => Some(handle),
        Err(error) if transport.mode == UdpMode::Uring => {
            eprintln!("skipping: io_uring unavailable here: {error:#}");
            None
        }
        Err(error) => panic!("spawn_chitchat failed: {error:#}"),
    }
}

pub async fn spawn(
    config: ChitchatConfig,
    key_values: Vec<(String, String)>,
    transport: &UdpTransport,
) -> ChitchatHandle {
    spawn_chitchat(config, key_values, transport)
        .await
        .expect("spawn_chitchat")
}

/// The shared bounded wait (test-support), one definition for every test crate.
pub use test_support::wait_until;

/// Whether `observer`'s failure detector holds `id` live.
pub fn is_live_at(observer: &ChitchatHandle, id: &ChitchatId) -> bool {
    observer
        .chitchat()
        .lock()
        .live_nodes()
        .any(|live| live == id)
}

/// Whether `observer` holds `id` dead.
pub fn is_dead_at(observer: &ChitchatHandle, id: &ChitchatId) -> bool {
    observer
        .chitchat()
        .lock()
        .dead_nodes()
        .any(|dead| dead == id)
}

/// The visible key-values `observer` holds for `id`.
pub fn view_of(observer: &ChitchatHandle, id: &ChitchatId) -> Option<BTreeMap<String, String>> {
    let chitchat = observer.chitchat();
    let guard = chitchat.lock();
    guard.node_state(id).map(|state| {
        state
            .key_values()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

/// A node's own visible key-values: the truth its peers must converge to.
pub fn own_view(node: &ChitchatHandle) -> BTreeMap<String, String> {
    view_of(node, node.chitchat_id()).expect("a node holds its own state")
}

/// The heartbeat `observer` holds for `id` (0 if unknown).
pub fn heartbeat_at(observer: &ChitchatHandle, id: &ChitchatId) -> u64 {
    observer
        .chitchat()
        .lock()
        .node_state(id)
        .map_or(0, |s| u64::from(s.heartbeat()))
}

/// `(heartbeat, last_gc_version, max_version)` of `id` at `observer`.
pub fn counters_at(observer: &ChitchatHandle, id: &ChitchatId) -> Option<(u64, u64, u64)> {
    observer.chitchat().lock().node_state(id).map(|s| {
        (
            u64::from(s.heartbeat()),
            s.last_gc_version(),
            s.max_version(),
        )
    })
}

/// Versions of a node's own key-values, tombstones included.
pub fn own_versions(node: &ChitchatHandle) -> BTreeMap<String, u64> {
    let chitchat = node.chitchat();
    let guard = chitchat.lock();
    guard
        .node_state(node.chitchat_id())
        .map(|state| {
            state
                .key_values_including_deleted()
                .map(|(k, v)| (k.to_string(), v.version))
                .collect()
        })
        .unwrap_or_default()
}

/// `count` keys of `value_len` bytes each, hard to compress (so a full-state reply really is
/// that large on the wire): `count × value_len` bytes of state.
pub fn bulky_state(tag: &str, count: usize, value_len: usize) -> Vec<(String, String)> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (tag.len() as u64);
    for b in tag.bytes() {
        x = x.wrapping_mul(0x100_0000_01B3) ^ u64::from(b);
    }
    (0..count)
        .map(|i| {
            let value: String = (0..value_len)
                .map(|_| {
                    // xorshift64*: deterministic, incompressible enough for zstd.
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
                    char::from(b'!' + (r >> 58) as u8 + (r >> 40 & 0x1f) as u8)
                })
                .collect();
            (format!("{tag}-{i:03}"), value)
        })
        .collect()
}

/// `VmRSS` of this process, in bytes (nodes run in-process).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| {
            let kib: u64 = line
                .strip_prefix("VmRSS:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// Whether the node's server is still running (its termination watcher is pending).
pub async fn still_running(node: &ChitchatHandle) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_millis(20), node.termination_watcher()).await {
        Err(_) => Ok(()),
        Ok(result) => Err(format!("the node stopped: {result:?}")),
    }
}
