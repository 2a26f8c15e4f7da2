//! The reference's performance scenarios (SPEC §6.13) as behaviour tests, over our in-memory
//! `ChannelTransport` with the UDP payload limit (mtu 65 507): nodes `node_i` on
//! 127.0.0.1:10000+i, all seeded with the first, gossip every 300 ms, failure-detector prior
//! 300 ms.
//!
//! - death of a node detected within 10 s at 10, 40 and 100 nodes, within 15 s at 100 nodes
//!   with 50 % message loss;
//! - 10 nodes at 50 % loss lose no node for 30 s after convergence;
//! - after convergence, fewer than 50 messages/s per node and bytes/s per node under the
//!   reference's ceilings (15 000 B at 10 nodes, 25 000 at 20, 50 000 at 40, 120 000 at 100).
//!
//! The measured figures are printed (`--nocapture`) for the README. The tests are timing-based,
//! so they run one at a time (a shared lock) to be robust on a loaded 2-core machine.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chitchat_uring::transport::{Faults, Statistics};
use chitchat_uring::{
    ChannelTransport, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    MAX_UDP_DATAGRAM_PAYLOAD_SIZE, spawn_chitchat,
};

/// One scenario at a time: they measure time and traffic.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const GOSSIP: Duration = Duration::from_millis(300);
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(60);

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))
}

fn config(i: usize) -> ChitchatConfig {
    let mut config = ChitchatConfig::for_test(10_000 + i as u16);
    config.chitchat_id = ChitchatId::new(format!("node_{i}"), 0, addr(i));
    config.listen_addr = addr(i);
    config.cluster_id = "perf".to_string();
    config.gossip_interval = GOSSIP;
    config.seed_nodes = vec![addr(0).to_string()];
    config.failure_detector_config = FailureDetectorConfig {
        initial_interval: GOSSIP,
        ..FailureDetectorConfig::default()
    };
    config.marked_for_deletion_grace_period = Duration::from_secs(10_000);
    config
}

struct Cluster {
    network: ChannelTransport,
    nodes: Vec<ChitchatHandle>,
}

impl Cluster {
    async fn start(n: usize, loss: f64) -> Cluster {
        let network = ChannelTransport::with_mtu(MAX_UDP_DATAGRAM_PAYLOAD_SIZE);
        let transport = network.clone().with_faults(Faults {
            loss,
            ..Faults::NONE
        });
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            nodes.push(
                spawn_chitchat(config(i), Vec::new(), &transport)
                    .await
                    .unwrap(),
            );
        }
        Cluster { network, nodes }
    }

    fn live_count(node: &ChitchatHandle) -> usize {
        node.chitchat().lock().live_nodes().count()
    }

    fn min_live(&self) -> usize {
        self.nodes
            .iter()
            .map(Cluster::live_count)
            .min()
            .unwrap_or(0)
    }

    /// Waits until every node sees all `n` nodes live; returns how long that took.
    async fn converge(&self, started: Instant) -> Duration {
        let n = self.nodes.len();
        let converged = common::wait_until(CONVERGENCE_TIMEOUT, || self.min_live() == n).await;
        assert!(
            converged,
            "{n} nodes did not converge: live counts {:?}",
            self.nodes
                .iter()
                .map(Cluster::live_count)
                .collect::<Vec<_>>()
        );
        started.elapsed()
    }

    async fn shutdown(self) {
        for node in self.nodes {
            node.shutdown().await.unwrap();
        }
    }
}

/// Converges, stops the last node, and returns (convergence time, detection delay): the time
/// until node 1 sees it dead.
async fn detection_delay(n: usize, loss: f64) -> (Duration, Duration) {
    let started = Instant::now();
    let mut cluster = Cluster::start(n, loss).await;
    let converged = cluster.converge(started).await;
    let last = cluster.nodes.pop().unwrap();
    let last_id = last.chitchat_id().clone();
    last.shutdown().await.unwrap();
    let stopped = Instant::now();
    let observer = &cluster.nodes[0];
    let detected = common::wait_until(Duration::from_secs(60), || {
        let chitchat = observer.chitchat();
        let chitchat = chitchat.lock();
        chitchat.live_nodes().count() == n - 1 && !chitchat.live_nodes().any(|id| *id == last_id)
    })
    .await;
    let delay = stopped.elapsed();
    assert!(
        detected,
        "{n} nodes, loss {loss}: the stopped node was never seen dead"
    );
    cluster.shutdown().await;
    (converged, delay)
}

async fn death_detected_within(n: usize, loss: f64, limit: Duration) {
    let _heavy = HEAVY.lock().await;
    let (converged, delay) = detection_delay(n, loss).await;
    eprintln!(
        "[scenario] dead detection, {n} nodes, loss {:.0} %: converged in {:.1} s, death detected after {:.2} s (limit {} s)",
        loss * 100.0,
        converged.as_secs_f64(),
        delay.as_secs_f64(),
        limit.as_secs()
    );
    assert!(
        delay < limit,
        "{n} nodes: detection took {delay:?}, limit {limit:?}"
    );
}

/// Reference `test_delay_before_dead_detection_10` (which actually ran 40 nodes; here 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_detected_within_10s_at_10_nodes() {
    death_detected_within(10, 0.0, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_detected_within_10s_at_40_nodes() {
    death_detected_within(40, 0.0, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_detected_within_10s_at_100_nodes() {
    death_detected_within(100, 0.0, Duration::from_secs(10)).await;
}

/// Reference `test_delay_before_dead_detection_100_faulty`: half of all datagrams are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_detected_within_15s_at_100_nodes_with_half_the_messages_lost() {
    death_detected_within(100, 0.5, Duration::from_secs(15)).await;
}

/// Reference `test_faulty_network_stability_10`: after convergence at 50 % loss, every node
/// keeps seeing all 10 nodes live for 30 s (sampled every 50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_lost_for_30s_at_10_nodes_with_half_the_messages_lost() {
    let _heavy = HEAVY.lock().await;
    let n = 10;
    let started = Instant::now();
    let cluster = Cluster::start(n, 0.5).await;
    let converged = cluster.converge(started).await;
    let window = Instant::now();
    let mut samples = 0u64;
    while window.elapsed() < Duration::from_secs(30) {
        let live: Vec<usize> = cluster.nodes.iter().map(Cluster::live_count).collect();
        assert!(
            live.iter().all(|&l| l == n),
            "a node was lost {:?} after convergence: live counts {live:?}",
            window.elapsed()
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "[scenario] stability, {n} nodes, loss 50 %: converged in {:.1} s, no node lost for 30 s ({samples} samples)",
        converged.as_secs_f64()
    );
    cluster.shutdown().await;
}

/// Reference `test_bandwidth_aux(n)`: 3 s of traffic after convergence.
async fn bandwidth_under(n: usize, max_bytes_per_node_per_s: f64) {
    let _heavy = HEAVY.lock().await;
    let started = Instant::now();
    let cluster = Cluster::start(n, 0.0).await;
    let converged = cluster.converge(started).await;
    let before: Statistics = cluster.network.statistics();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = cluster.network.statistics();
    let seconds = window.elapsed().as_secs_f64();
    let messages =
        (after.num_messages_total - before.num_messages_total) as f64 / seconds / n as f64;
    let bytes = (after.num_bytes_total - before.num_bytes_total) as f64 / seconds / n as f64;
    eprintln!(
        "[scenario] bandwidth, {n} nodes: converged in {:.1} s, {messages:.1} messages/s/node, {bytes:.0} B/s/node (limits 50 and {max_bytes_per_node_per_s:.0})",
        converged.as_secs_f64()
    );
    assert!(cluster.min_live() == n, "the cluster stayed converged");
    assert!(messages < 50.0, "{n} nodes: {messages} messages/s/node");
    assert!(
        bytes < max_bytes_per_node_per_s,
        "{n} nodes: {bytes} B/s/node, limit {max_bytes_per_node_per_s}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_under_the_reference_ceiling_at_10_nodes() {
    bandwidth_under(10, 15_000.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_under_the_reference_ceiling_at_20_nodes() {
    bandwidth_under(20, 25_000.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_under_the_reference_ceiling_at_40_nodes() {
    bandwidth_under(40, 50_000.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_under_the_reference_ceiling_at_100_nodes() {
    bandwidth_under(100, 120_000.0).await;
}
