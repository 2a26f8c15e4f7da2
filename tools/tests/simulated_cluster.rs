//! The simulated cluster of the "one host in a large cluster" benchmark against a real node:
//! its digests, heartbeats and deltas are ones the node accepts, so the node learns every
//! simulated peer with all its keys, sees them alive, and follows their key changes.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use chitchat_uring::message::ProtocolVersion;
use chitchat_uring::transport::UdpMode;
use chitchat_uring::{ChitchatConfig, ChitchatHandle, ChitchatId, UdpTransport, spawn_chitchat};
use chitchat_uring_tools::bench_support::cluster_failure_detector;
use chitchat_uring_tools::loadgen::simulated::{SimConfig, SimulatedCluster};
use test_support::{free_port, wait_until_blocking};

const CLUSTER: &str = "sim-test";

fn start_node(
    rt: &tokio::runtime::Runtime,
    interval: Duration,
    version: ProtocolVersion,
) -> (ChitchatHandle, SocketAddr) {
    for _ in 0..5 {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut config = ChitchatConfig::for_test(port);
        config.chitchat_id = ChitchatId::new("host-under-test", 1, addr);
        config.listen_addr = addr;
        config.cluster_id = CLUSTER.to_string();
        config.gossip_interval = interval;
        config.failure_detector_config = cluster_failure_detector(interval);
        config.protocol_version = version;
        let transport = UdpTransport {
            mode: UdpMode::Auto,
            ..UdpTransport::DEFAULT
        };
        let kvs = vec![("own-key".to_string(), "own-value".to_string())];
        if let Ok(handle) = rt.block_on(spawn_chitchat(config, kvs, &transport)) {
            return (handle, addr);
        }
    }
    panic!("could not start the node under test");
}

/// Every simulated peer is in the node's state with the simulator's max_version.
fn node_holds_all(handle: &ChitchatHandle, sim: &SimulatedCluster) -> Result<(), String> {
    let chitchat = handle.chitchat();
    let chitchat = chitchat.lock();
    for (id, max_version) in sim.peer_versions() {
        let Some(state) = chitchat.node_state(id) else {
            return Err(format!("{} unknown to the node", id.node_id));
        };
        if state.max_version() != max_version {
            return Err(format!(
                "{}: node holds version {}, peer is at {max_version}",
                id.node_id,
                state.max_version()
            ));
        }
    }
    Ok(())
}

fn learns_the_whole_cluster(version: ProtocolVersion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let interval = Duration::from_millis(100);
    let (handle, addr) = start_node(&rt, interval, version);
    let peers = 200;
    let mut config = SimConfig::new(addr, peers, CLUSTER);
    config.gossip_interval = interval;
    config.protocol = version;
    config.seed_rate = 50.0;
    config.update_share = 0.05;
    let mut sim = SimulatedCluster::bind(config).unwrap();
    let stop = AtomicBool::new(false);

    // Seeding: the node learns every peer and every key from the simulator's deltas.
    sim.seed(Duration::from_secs(30), &stop).unwrap();
    node_holds_all(&handle, &sim).unwrap();
    assert_eq!(
        handle.chitchat().lock().node_states().len(),
        peers + 1,
        "the node knows the peers and itself, nothing else"
    );

    // Steady state at the protocol's rate: heartbeats rise, so the peers become live; keys
    // change, and the node both answers the peers' Syns and gossips to them.
    let traffic = sim.run(Duration::from_secs(3), &stop).unwrap();
    assert!(traffic.key_updates > 0, "{traffic:?}");
    assert!(traffic.syns_sent >= 20, "3 Syns per interval: {traffic:?}");
    assert!(
        traffic.syn_acks_received * 10 >= traffic.syns_sent * 9,
        "the node answers the peers' Syns: {traffic:?}"
    );
    assert!(
        traffic.syns_received >= 15,
        "the node gossips to the peers (3 per interval): {traffic:?}"
    );
    assert!(
        traffic.acks_received * 10 >= traffic.syn_acks_sent * 9,
        "the node answers the peers' SynAcks: {traffic:?}"
    );
    assert_eq!(traffic.undecodable, 0);
    let live = || handle.chitchat().lock().live_nodes().count();
    assert!(
        wait_until_blocking(Duration::from_secs(1), || live() == peers + 1),
        "rising heartbeats make every peer live: {} of {}",
        live(),
        peers + 1
    );

    // The key changes made during the steady state reach the node.
    sim.seed(Duration::from_secs(30), &stop).unwrap();
    node_holds_all(&handle, &sim).unwrap();
    rt.block_on(handle.shutdown()).unwrap();
}

#[test]
fn node_learns_simulated_cluster_v0() {
    learns_the_whole_cluster(ProtocolVersion::V0);
}

#[test]
fn node_learns_simulated_cluster_v1() {
    learns_the_whole_cluster(ProtocolVersion::V1);
}

#[test]
fn oversized_cluster_is_refused_clearly() {
    // 2,000 peers: a V0 digest of ~100 KB cannot be sent; nothing listens on the target.
    let target = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = SimConfig::new(target, 2_000, CLUSTER);
    let mut sim = SimulatedCluster::bind(config).unwrap();
    let error = sim
        .seed(Duration::from_secs(1), &AtomicBool::new(false))
        .unwrap_err()
        .to_string();
    assert!(error.contains("more than one UDP datagram"), "{error}");
}
