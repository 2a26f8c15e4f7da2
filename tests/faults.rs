//! Behaviour under network faults: partitions that heal (over the in-memory transport's links
//! and over real UDP through `Faults::partition`), and duplicated, reordered, truncated, lost
//! and corrupted datagrams (`Faults`).
//!
//! After healing, every live node holds the same key-values, tombstones win over stale
//! replicas, a node that missed deletions that were since garbage-collected is reset
//! (SPEC §4.7) and its catch-up callback fires — and nobody else is reset.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chitchat_uring::message::Digest;
use chitchat_uring::transport::{Faults, Partition, UdpMode};
use chitchat_uring::{
    ChannelTransport, ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatMessage,
    ProtocolVersion, Transport, UdpTransport, spawn_chitchat,
};
use common::{FakePeer, free_port, node_config, uring_or_skip, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const GOSSIP_MS: u64 = 100;

/// Visible key-values with their versions, per node state: what must agree on every replica.
type View = BTreeMap<String, BTreeMap<String, (String, u64)>>;

fn view(node: &ChitchatHandle) -> View {
    node.chitchat()
        .lock()
        .node_states()
        .iter()
        .map(|(id, state)| {
            let kvs = state
                .key_values_including_deleted()
                .filter(|(_, v)| !v.is_deleted())
                .map(|(k, v)| (k.to_string(), (v.value.clone(), v.version)))
                .collect();
            (id.node_id.to_string(), kvs)
        })
        .collect()
}

fn views_agree(nodes: &[&ChitchatHandle]) -> bool {
    let first = view(nodes[0]);
    nodes[1..].iter().all(|n| view(n) == first)
}

async fn wait_views_agree(nodes: &[&ChitchatHandle], what: &str) {
    if !wait_until(WAIT, || views_agree(nodes)).await {
        let views: Vec<View> = nodes.iter().map(|n| view(n)).collect();
        panic!("{what}: views differ: {views:#?}");
    }
}

fn live_count(node: &ChitchatHandle) -> usize {
    node.chitchat().lock().live_nodes().count()
}

async fn wait_all_live(nodes: &[&ChitchatHandle], what: &str) {
    let n = nodes.len();
    let ok = wait_until(WAIT, || nodes.iter().all(|node| live_count(node) == n)).await;
    let counts: Vec<usize> = nodes.iter().map(|node| live_count(node)).collect();
    assert!(ok, "{what}: live counts {counts:?}, expected {n}");
}

fn get(observer: &ChitchatHandle, owner: &ChitchatHandle, key: &str) -> Option<String> {
    observer
        .chitchat()
        .lock()
        .node_state(owner.chitchat_id())
        .and_then(|s| s.get(key).map(String::from))
}

fn resets(node: &ChitchatHandle) -> u64 {
    node.chitchat().lock().stats().node_deltas_reset
}

/// A node config with a catch-up callback counting its calls.
fn counted_config(
    port: u16,
    seeds: &[SocketAddr],
    grace: Duration,
) -> (ChitchatConfig, Arc<AtomicUsize>) {
    let mut config = node_config(port, GOSSIP_MS, seeds);
    config.marked_for_deletion_grace_period = grace;
    let catchups = Arc::new(AtomicUsize::new(0));
    let counter = catchups.clone();
    config.catchup_callback = Some(Box::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    (config, catchups)
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How a test cuts and heals the links between two nodes.
trait Links {
    fn cut(&self, a: usize, b: usize);
    fn heal_all(&self);
}

struct ChannelLinks {
    network: ChannelTransport,
    addrs: Vec<SocketAddr>,
}

impl Links for ChannelLinks {
    fn cut(&self, a: usize, b: usize) {
        self.network.remove_link_now(self.addrs[a], self.addrs[b]);
    }
    fn heal_all(&self) {
        for a in &self.addrs {
            for b in &self.addrs {
                self.network.add_link_now(*a, *b);
            }
        }
    }
}

struct UdpLinks {
    partitions: Vec<Partition>,
    addrs: Vec<SocketAddr>,
}

impl Links for UdpLinks {
    fn cut(&self, a: usize, b: usize) {
        self.partitions[a].block(self.addrs[b]);
        self.partitions[b].block(self.addrs[a]);
    }
    fn heal_all(&self) {
        for partition in &self.partitions {
            partition.heal();
        }
    }
}

/// The SPEC §4.7 scenario: node 3 is cut off while node 0 deletes keys and garbage-collects the
/// tombstones (grace 2 s). After healing, node 3 gets a reset of node 0's state (catch-up
/// callback fires there, and only there), ends with exactly the others' key-values (the deleted
/// keys are gone, nothing it held comes back), and its own write made during the partition
/// reaches everyone.
async fn partitioned_node_is_reset(
    nodes: &[ChitchatHandle],
    catchups: &[Arc<AtomicUsize>],
    links: &dyn Links,
    label: &str,
) {
    let all: Vec<&ChitchatHandle> = nodes.iter().collect();
    wait_all_live(&all, label).await;
    let (writer, isolated) = (&nodes[0], &nodes[3]);
    writer
        .with_chitchat(|c| {
            let own = c.self_node_state();
            own.set("a", "1");
            own.set("b", "2");
            own.set("c", "3");
        })
        .await;
    let spread = wait_until(WAIT, || {
        nodes
            .iter()
            .all(|n| get(n, writer, "c").as_deref() == Some("3"))
    })
    .await;
    assert!(spread, "{label}: initial keys did not spread");

    for other in 0..3 {
        links.cut(3, other);
    }
    let split = wait_until(WAIT, || {
        live_count(isolated) == 1 && nodes[..3].iter().all(|n| live_count(n) == 3)
    })
    .await;
    assert!(split, "{label}: the partition did not isolate node 3");

    writer
        .with_chitchat(|c| {
            let own = c.self_node_state();
            own.delete("a");
            own.set("e", "5");
            own.delete("e");
        })
        .await;
    isolated
        .with_chitchat(|c| c.self_node_state().set("isolated", "yes"))
        .await;
    // Node 0 and its replicas on nodes 1 and 2 collect the tombstones (versions 4 and 6).
    let collected = wait_until(WAIT, || {
        nodes[..3].iter().all(|n| {
            n.chitchat()
                .lock()
                .node_state(writer.chitchat_id())
                .is_some_and(|s| s.last_gc_version() >= 6)
        })
    })
    .await;
    assert!(collected, "{label}: tombstones were not garbage-collected");
    assert_eq!(
        get(isolated, writer, "a").as_deref(),
        Some("1"),
        "{label}: stale"
    );

    links.heal_all();
    wait_all_live(&all, label).await;
    wait_views_agree(&all, label).await;
    let healed = view(isolated);
    let writer_kvs = &healed[&*writer.chitchat_id().node_id];
    assert_eq!(
        writer_kvs.keys().collect::<Vec<_>>(),
        ["b", "c"],
        "{label}: deleted keys are gone"
    );
    assert_eq!(get(writer, isolated, "isolated").as_deref(), Some("yes"));
    assert!(
        catchups[3].load(Ordering::SeqCst) >= 1 && resets(isolated) >= 1,
        "{label}: node 3 was not reset"
    );
    for i in 0..3 {
        assert_eq!(catchups[i].load(Ordering::SeqCst), 0, "{label}: node {i}");
        assert_eq!(resets(&nodes[i]), 0, "{label}: node {i} reset");
    }
    eprintln!(
        "[{label}] node 3 reset {} time(s), catch-up callback called {} time(s)",
        resets(isolated),
        catchups[3].load(Ordering::SeqCst)
    );
}

/// SPEC §4.7 over the in-memory transport (links removed and restored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_partition_node_missing_collected_deletions_is_reset_on_heal() {
    let network = ChannelTransport::new();
    let addrs: Vec<SocketAddr> = (0..4).map(|i| local(11_000 + i)).collect();
    let mut nodes = Vec::new();
    let mut catchups = Vec::new();
    for addr in &addrs {
        let (config, catchup) = counted_config(addr.port(), &addrs[..1], Duration::from_secs(2));
        nodes.push(spawn_chitchat(config, Vec::new(), &network).await.unwrap());
        catchups.push(catchup);
    }
    let links = ChannelLinks { network, addrs };
    partitioned_node_is_reset(&nodes, &catchups, &links, "channel").await;
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

/// The same over real UDP (io_uring): each node's transport carries a `Partition` handle that
/// drops its sends to the other side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_partition_node_missing_collected_deletions_is_reset_on_heal() {
    if !uring_or_skip("udp_partition_node_missing_collected_deletions_is_reset_on_heal") {
        return;
    }
    let addrs: Vec<SocketAddr> = (0..4).map(|_| local(free_port())).collect();
    let mut nodes = Vec::new();
    let mut catchups = Vec::new();
    let mut partitions = Vec::new();
    for addr in &addrs {
        let partition = Partition::new();
        let transport = UdpTransport {
            mode: UdpMode::Uring,
            faults: Faults {
                partition: Some(partition.clone()),
                ..Faults::NONE
            },
            ..UdpTransport::DEFAULT
        };
        let (config, catchup) = counted_config(addr.port(), &addrs[..1], Duration::from_secs(2));
        nodes.push(
            spawn_chitchat(config, Vec::new(), &transport)
                .await
                .unwrap(),
        );
        catchups.push(catchup);
        partitions.push(partition);
    }
    let links = UdpLinks { partitions, addrs };
    partitioned_node_is_reset(&nodes, &catchups, &links, "udp").await;
    let dropped: u64 = nodes
        .iter()
        .map(|n| n.endpoint_stats().dropped_by_faults)
        .sum();
    assert!(dropped > 0, "the partition dropped datagrams");
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

/// Tombstones win (reference `test_marked_for_deletion_gc_with_network_partition_4_nodes`):
/// node 3 is cut off holding key `k` of node 0, which node 0 then deletes (no GC: long grace).
/// A newcomer that can only reach node 3 learns the stale `k` from it. After healing, `k` is
/// gone everywhere — the stale copies never resurrect it — without any reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_win_over_stale_replicas_after_a_partition_heals() {
    let network = ChannelTransport::new();
    let addrs: Vec<SocketAddr> = (0..5).map(|i| local(12_000 + i)).collect();
    let links = ChannelLinks {
        network: network.clone(),
        addrs: addrs.clone(),
    };
    let mut nodes = Vec::new();
    for addr in &addrs[..4] {
        let config = node_config(addr.port(), GOSSIP_MS, &addrs[..1]);
        nodes.push(spawn_chitchat(config, Vec::new(), &network).await.unwrap());
    }
    let four: Vec<&ChitchatHandle> = nodes.iter().collect();
    wait_all_live(&four, "before").await;
    nodes[0]
        .with_chitchat(|c| c.self_node_state().set("k", "stale-soon"))
        .await;
    let spread = wait_until(WAIT, || {
        nodes.iter().all(|n| get(n, &nodes[0], "k").is_some())
    })
    .await;
    assert!(spread);

    for other in 0..3 {
        links.cut(3, other);
        links.cut(4, other);
    }
    nodes[0]
        .with_chitchat(|c| {
            c.self_node_state().delete("k");
            c.self_node_state().set("k2", "after");
        })
        .await;
    let deleted = wait_until(WAIT, || {
        nodes[..3]
            .iter()
            .all(|n| get(n, &nodes[0], "k").is_none() && get(n, &nodes[0], "k2").is_some())
    })
    .await;
    assert!(deleted, "the deletion did not reach the connected side");
    assert_eq!(
        get(&nodes[3], &nodes[0], "k").as_deref(),
        Some("stale-soon")
    );

    // The newcomer only reaches node 3 and learns the stale key from it.
    let config = node_config(addrs[4].port(), GOSSIP_MS, &addrs[3..4]);
    nodes.push(spawn_chitchat(config, Vec::new(), &network).await.unwrap());
    let learned_stale = wait_until(WAIT, || {
        get(&nodes[4], &nodes[0], "k").as_deref() == Some("stale-soon")
    })
    .await;
    assert!(
        learned_stale,
        "the newcomer did not learn node 0's state from node 3"
    );

    links.heal_all();
    let all: Vec<&ChitchatHandle> = nodes.iter().collect();
    wait_all_live(&all, "after heal").await;
    wait_views_agree(&all, "after heal").await;
    for node in &nodes {
        assert_eq!(get(node, &nodes[0], "k"), None, "{:?}", node.chitchat_id());
        assert_eq!(get(node, &nodes[0], "k2").as_deref(), Some("after"));
        assert_eq!(resets(node), 0, "no reset is needed without GC");
    }
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

/// `Faults::partition` on real UDP, at the level of one node: replies and Syns to a blocked
/// address are dropped and counted, other destinations are served, and unblocking restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_partition_blocks_chosen_destinations_until_unblocked() {
    for mode in [UdpMode::Uring, UdpMode::Epoll] {
        if mode == UdpMode::Uring
            && !uring_or_skip("the io_uring half of udp_partition_blocks_chosen_destinations")
        {
            continue;
        }
        let partition = Partition::new();
        let transport = UdpTransport {
            mode,
            faults: Faults {
                partition: Some(partition.clone()),
                ..Faults::NONE
            },
            ..UdpTransport::DEFAULT
        };
        let port = free_port();
        let node = spawn_chitchat(node_config(port, 60_000, &[]), Vec::new(), &transport)
            .await
            .unwrap();
        let (blocked, open) = (FakePeer::bind(), FakePeer::bind());
        let syn = ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: "test-cluster".to_string(),
                digest: Digest::default(),
            },
        };
        partition.block(blocked.addr());
        blocked.send(local(port), &syn);
        node.gossip(blocked.addr()).unwrap();
        assert!(
            wait_until(WAIT, || node.endpoint_stats().dropped_by_faults == 2).await,
            "{mode:?}: {:?}",
            node.endpoint_stats()
        );
        open.send(local(port), &syn);
        assert!(
            open.recv_within(WAIT).is_some(),
            "{mode:?}: others are served"
        );
        assert!(blocked.recv_within(Duration::from_millis(300)).is_none());
        partition.unblock(blocked.addr());
        blocked.send(local(port), &syn);
        assert!(blocked.recv_within(WAIT).is_some(), "{mode:?}: unblocked");
        node.shutdown().await.unwrap();
    }
}

/// Faults that lose, duplicate, delay (reorder) and truncate datagrams.
fn lossy_faults() -> Faults {
    Faults {
        loss: 0.1,
        duplicate: 0.3,
        truncate: 0.1,
        delay: Some((Duration::ZERO, Duration::from_millis(60))),
        seed: Some(42),
        ..Faults::NONE
    }
}

/// Five nodes write, delete and TTL keys through lossy, duplicating, reordering and truncating
/// links: every replica converges to the owners' key-values with the owners' versions, and
/// the truncated datagrams are counted as malformed.
async fn converges_under_faults(transports: Vec<Box<dyn Transport>>, ports: Vec<u16>, label: &str) {
    let seed = local(ports[0]);
    let mut nodes = Vec::new();
    for (transport, port) in transports.iter().zip(&ports) {
        let config = node_config(*port, GOSSIP_MS, &[seed]);
        nodes.push(
            spawn_chitchat(config, Vec::new(), transport.as_ref())
                .await
                .unwrap(),
        );
    }
    let all: Vec<&ChitchatHandle> = nodes.iter().collect();
    wait_all_live(&all, label).await;
    // Three rounds of writes, each converging before the next.
    for round in 0..3 {
        for (i, node) in nodes.iter().enumerate() {
            node.with_chitchat(|c| {
                let own = c.self_node_state();
                for k in 0..20 {
                    own.set(format!("key-{k:02}"), format!("value-{i}-{k}-{round}"));
                }
                for k in 0..5 {
                    own.delete(&format!("key-{k:02}"));
                }
                own.set_with_ttl("ttl", format!("visible until the grace period {round}"));
                own.set("key-19", "overwritten");
            })
            .await;
        }
        wait_views_agree(&all, label).await;
        let agreed = view(&nodes[0]);
        for (i, node) in nodes.iter().enumerate() {
            let owner = &*node.chitchat_id().node_id;
            assert_eq!(agreed[owner].len(), 16, "{label}: 15 keys + ttl");
            assert_eq!(agreed[owner]["key-19"].0, "overwritten");
            assert_eq!(agreed[owner]["key-05"].0, format!("value-{i}-5-{round}"));
        }
    }
    let malformed: u64 = nodes.iter().map(|n| n.server_stats().malformed).sum();
    let handled: u64 = nodes
        .iter()
        .map(|n| n.server_stats().datagrams_handled)
        .sum();
    eprintln!(
        "[{label}] converged: {handled} datagrams handled, {malformed} malformed (truncated)"
    );
    assert!(malformed > 0, "{label}: truncated datagrams are counted");
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_duplicated_reordered_truncated_links_converge_over_channels() {
    let network = ChannelTransport::new().with_faults(lossy_faults());
    let transports: Vec<Box<dyn Transport>> = (0..5)
        .map(|_| Box::new(network.clone()) as Box<dyn Transport>)
        .collect();
    converges_under_faults(transports, (13_000..13_005).collect(), "channel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_duplicated_reordered_truncated_links_converge_over_udp() {
    if !uring_or_skip("lossy_duplicated_reordered_truncated_links_converge_over_udp") {
        return;
    }
    let transports: Vec<Box<dyn Transport>> = (0..5)
        .map(|_| {
            Box::new(UdpTransport {
                mode: UdpMode::Uring,
                faults: lossy_faults(),
                ..UdpTransport::DEFAULT
            }) as Box<dyn Transport>
        })
        .collect();
    let ports = (0..5).map(|_| free_port()).collect();
    converges_under_faults(transports, ports, "udp").await;
}

/// Corrupted datagrams (1–3 flipped bytes in 20 % of them) over real UDP. The chitchat wire
/// format has no checksum (UDP's own checksum catches corruption in transit), so a flipped
/// byte that still decodes cannot be detected and replica convergence cannot be promised; what
/// is checked is safety: nodes never stop, undecodable datagrams are counted as malformed
/// (exactly: received = handled + malformed), each node's own state is untouched, and every
/// node still answers a Syn with a SynAck that decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_datagrams_are_counted_and_never_crash_a_node() {
    if !uring_or_skip("corrupted_datagrams_are_counted_and_never_crash_a_node") {
        return;
    }
    let transport = UdpTransport {
        mode: UdpMode::Uring,
        faults: Faults {
            corrupt: 0.2,
            seed: Some(7),
            ..Faults::NONE
        },
        ..UdpTransport::DEFAULT
    };
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let seed = local(ports[0]);
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let own: Vec<(String, String)> = (0..10)
            .map(|k| (format!("own-{k}"), format!("node-{i}-{k}")))
            .collect();
        let config = node_config(*port, GOSSIP_MS, &[seed]);
        nodes.push(spawn_chitchat(config, own, &transport).await.unwrap());
    }
    let enough = wait_until(WAIT, || {
        nodes
            .iter()
            .map(|n| n.server_stats().malformed)
            .sum::<u64>()
            >= 50
    })
    .await;
    assert!(enough, "corrupted datagrams are counted as malformed");
    let watchers: Vec<_> = nodes.iter().map(|n| n.termination_watcher()).collect();
    for watcher in watchers {
        assert!(
            tokio::time::timeout(Duration::from_millis(1), watcher)
                .await
                .is_err(),
            "a node stopped"
        );
    }
    let peer = FakePeer::bind();
    let syn = ChitchatEnvelope {
        version: ProtocolVersion::V1,
        message: ChitchatMessage::Syn {
            cluster_id: "test-cluster".to_string(),
            digest: Digest::default(),
        },
    };
    for (i, node) in nodes.iter().enumerate() {
        let own: BTreeMap<String, String> = node
            .chitchat()
            .lock()
            .self_node_state()
            .key_values()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let expected: BTreeMap<String, String> = (0..10)
            .map(|k| (format!("own-{k}"), format!("node-{i}-{k}")))
            .collect();
        assert_eq!(own, expected, "node {i}'s own state");
        // Replies are corrupted too (20 %): retry until one decodes.
        let answered = (0..20).any(|_| {
            peer.send(local(ports[i]), &syn);
            peer.recv_matching(Duration::from_millis(500), |e| {
                matches!(e.message, ChitchatMessage::SynAck { .. })
            })
            .is_some()
        });
        assert!(answered, "node {i} answers");
    }
    let mut totals = (0, 0, 0);
    for node in nodes {
        node.initiate_shutdown().unwrap();
        node.termination_watcher().await.unwrap();
        let (server, endpoint) = (node.server_stats(), node.endpoint_stats());
        assert_eq!(server.abandoned, 0);
        assert_eq!(
            endpoint.datagrams_received,
            server.datagrams_handled + server.malformed,
            "{server:?} {endpoint:?}"
        );
        totals.0 += endpoint.datagrams_received;
        totals.1 += server.malformed;
        totals.2 += endpoint.datagrams_sent;
    }
    eprintln!(
        "[corrupt] {} datagrams received, {} malformed, {} sent",
        totals.0, totals.1, totals.2
    );
}
