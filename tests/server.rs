//! The running server (SPEC §2.10, §4.2, §5): handshakes over real sockets, seeding, heartbeats,
//! membership, shutdown, panics, config and bind errors, and small clusters over every transport.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use chitchat_uring::message::{Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest};
use chitchat_uring::transport::UdpMode;
use chitchat_uring::types::DeletionStatusMutation;
use chitchat_uring::{
    ChannelTransport, ChitchatEnvelope, ChitchatHandle, ChitchatId, ChitchatMessage, Heartbeat,
    ProtocolVersion, Transport, TransportKind, UdpTransport, spawn_chitchat,
};
use common::{FakePeer, free_port, node_config, transports, udp_transports, wait_until};

const WAIT: Duration = Duration::from_secs(10);

fn syn(cluster_id: &str, digest: Digest, version: ProtocolVersion) -> ChitchatEnvelope {
    ChitchatEnvelope {
        version,
        message: ChitchatMessage::Syn {
            cluster_id: cluster_id.to_string(),
            digest,
        },
    }
}

/// A SynAck from a peer announcing itself (heartbeat 3) with one key-value at version 1.
fn one_key_syn_ack(peer_id: &ChitchatId, key: &str, value: &str) -> ChitchatEnvelope {
    let mut digest = Digest::default();
    digest.add_node(peer_id.clone(), NodeDigest::new(Heartbeat::from(3), 0, 1));
    let delta = Delta {
        node_deltas: vec![NodeDelta {
            chitchat_id: peer_id.clone(),
            from_version_excluded: 0,
            last_gc_version: 0,
            max_version: 1,
            key_values: vec![KeyValueUpdate {
                key: key.to_string(),
                value: value.to_string(),
                version: 1,
                status: DeletionStatusMutation::Set,
            }],
        }],
    };
    ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::SynAck { digest, delta },
    }
}

async fn start(
    port: u16,
    gossip_ms: u64,
    seeds: &[SocketAddr],
    kvs: &[(&str, &str)],
    transport: &dyn Transport,
) -> ChitchatHandle {
    let kvs = kvs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spawn_chitchat(node_config(port, gossip_ms, seeds), kvs, transport)
        .await
        .unwrap()
}

#[tokio::test]
async fn syn_gets_a_syn_ack_in_the_version_received() {
    for (name, transport) in udp_transports() {
        let port = free_port();
        let node = start(port, 10_000, &[], &[("k", "v")], &transport).await;
        assert!(
            matches!(
                (name, node.transport_kind()),
                ("uring", TransportKind::Uring)
                    | ("epoll", TransportKind::Epoll { .. })
                    | ("portable", TransportKind::Portable)
            ),
            "{name}: {:?}",
            node.transport_kind()
        );
        let peer = FakePeer::bind();
        let node_addr = SocketAddr::from(([127, 0, 0, 1], port));
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            peer.send(node_addr, &syn("test-cluster", Digest::default(), version));
            let (from, reply, bytes) = peer
                .recv_matching(WAIT, |e| {
                    matches!(e.message, ChitchatMessage::SynAck { .. })
                })
                .unwrap_or_else(|| panic!("{name}: no syn-ack"));
            assert_eq!(
                from, node_addr,
                "{name}: replies leave from the gossip address"
            );
            assert_eq!(reply.version, version);
            assert_eq!(bytes[2], version.to_code());
            let ChitchatMessage::SynAck { digest, delta } = reply.message else {
                unreachable!()
            };
            assert!(digest.node_digests.contains_key(node.chitchat_id()));
            let node_delta = &delta.node_deltas[0];
            assert_eq!(&node_delta.chitchat_id, node.chitchat_id());
            assert_eq!(node_delta.key_values[0].key, "k");
        }
        node.shutdown().await.unwrap();
    }
}

/// Has `node` send `peer` a Syn and waits for it: a node accepts only a SynAck that answers a
/// Syn it sent that address recently (issue 13).
fn solicit_syn_ack(node: &ChitchatHandle, peer: &FakePeer) {
    node.gossip(peer.addr()).unwrap();
    assert!(
        peer.recv_matching(WAIT, |e| matches!(e.message, ChitchatMessage::Syn { .. }))
            .is_some(),
        "the node sent the fake peer no Syn"
    );
}

#[tokio::test]
async fn syn_ack_gets_an_ack_and_its_delta_is_applied() {
    for (name, transport) in udp_transports() {
        let port = free_port();
        let node = start(port, 10_000, &[], &[("own", "1")], &transport).await;
        let peer = FakePeer::bind();
        let peer_id = ChitchatId::new("fake-peer", 1, peer.addr());
        let syn_ack = one_key_syn_ack(&peer_id, "from-peer", "hello");
        let node_addr = SocketAddr::from(([127, 0, 0, 1], port));
        solicit_syn_ack(&node, &peer);
        peer.send(node_addr, &syn_ack);
        let (_, reply, _) = peer
            .recv_matching(WAIT, |e| matches!(e.message, ChitchatMessage::Ack { .. }))
            .unwrap_or_else(|| panic!("{name}: no ack"));
        let ChitchatMessage::Ack { delta } = reply.message else {
            unreachable!()
        };
        // The node does not know what the peer has of it: it sends its own state.
        assert!(
            delta
                .node_deltas
                .iter()
                .any(|nd| &nd.chitchat_id == node.chitchat_id())
        );
        let value = node
            .with_chitchat(|c| {
                c.node_state(&peer_id)
                    .and_then(|s| s.get("from-peer").map(String::from))
            })
            .await;
        assert_eq!(value.as_deref(), Some("hello"), "{name}");
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn syn_from_another_cluster_gets_bad_cluster() {
    for (name, transport) in udp_transports() {
        let port = free_port();
        let node = start(port, 10_000, &[], &[], &transport).await;
        let peer = FakePeer::bind();
        let node_addr = SocketAddr::from(([127, 0, 0, 1], port));
        peer.send(
            node_addr,
            &syn("other-cluster", Digest::default(), ProtocolVersion::V1),
        );
        let (_, reply, _) = peer
            .recv_matching(WAIT, |e| e.message == ChitchatMessage::BadCluster)
            .unwrap_or_else(|| panic!("{name}: no bad-cluster"));
        assert_eq!(reply.version, ProtocolVersion::V1);
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn handle_gossip_sends_a_syn_with_the_own_digest() {
    for (name, transport) in udp_transports() {
        let port = free_port();
        let node = start(port, 10_000, &[], &[], &transport).await;
        let peer = FakePeer::bind();
        node.gossip(peer.addr()).unwrap();
        let (from, syn, _) = peer
            .recv_matching(WAIT, |e| matches!(e.message, ChitchatMessage::Syn { .. }))
            .unwrap_or_else(|| panic!("{name}: no syn"));
        assert_eq!(from.port(), port);
        let ChitchatMessage::Syn { cluster_id, digest } = syn.message else {
            unreachable!()
        };
        assert_eq!(cluster_id, "test-cluster");
        assert_eq!(digest.node_digests.len(), 1);
        assert!(digest.node_digests.contains_key(node.chitchat_id()));
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn the_first_round_contacts_the_seed_by_address_or_hostname() {
    for (name, transport) in udp_transports() {
        for by_hostname in [false, true] {
            let seed = FakePeer::bind();
            let port = free_port();
            let mut config = node_config(port, 60_000, &[]);
            config.seed_nodes = vec![if by_hostname {
                format!("localhost:{}", seed.addr().port())
            } else {
                seed.addr().to_string()
            }];
            let node = spawn_chitchat(config, Vec::new(), &transport)
                .await
                .unwrap();
            // The gossip interval is a minute: only the immediate first round can explain a Syn.
            let got =
                seed.recv_matching(WAIT, |e| matches!(e.message, ChitchatMessage::Syn { .. }));
            assert!(
                got.is_some(),
                "{name}, hostname {by_hostname}: seed not contacted"
            );
            let seeds = node.with_chitchat(|c| c.seed_nodes()).await;
            assert!(seeds.contains(&seed.addr()), "{seeds:?}");
            node.shutdown().await.unwrap();
        }
    }
}

#[tokio::test]
async fn heartbeats_increase_with_rounds_and_messages() {
    let (_, transport) = &udp_transports()[0];
    let port = free_port();
    let node = start(port, 20, &[], &[], transport).await;
    let node_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let peer = FakePeer::bind();
    let mut heartbeats = Vec::new();
    for _ in 0..3 {
        peer.send(
            node_addr,
            &syn("test-cluster", Digest::default(), ProtocolVersion::V0),
        );
        let (_, reply, _) = peer
            .recv_matching(WAIT, |e| {
                matches!(e.message, ChitchatMessage::SynAck { .. })
            })
            .unwrap();
        let ChitchatMessage::SynAck { digest, .. } = reply.message else {
            unreachable!()
        };
        heartbeats.push(digest.node_digests[node.chitchat_id()].heartbeat);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(heartbeats.windows(2).all(|w| w[1] > w[0]), "{heartbeats:?}");
    // More than one per message: the 20-ms rounds count too.
    assert!(
        u64::from(heartbeats[2]) - u64::from(heartbeats[0]) > 2,
        "{heartbeats:?}"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_datagrams_are_counted_and_dropped() {
    for (name, transport) in udp_transports() {
        let port = free_port();
        let node = start(port, 10_000, &[], &[], &transport).await;
        let node_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let peer = FakePeer::bind();
        let junk: [&[u8]; 5] = [
            b"",
            b"\x53",
            b"\x53\xb0\x07\x00",
            b"\x53\xb0\x00\x00\xff\xff",
            b"hello world",
        ];
        for bytes in junk {
            peer.send_raw(node_addr, bytes);
        }
        peer.send(
            node_addr,
            &syn("test-cluster", Digest::default(), ProtocolVersion::V0),
        );
        assert!(peer.recv_within(WAIT).is_some(), "{name}: still answering");
        assert!(
            wait_until(WAIT, || node.server_stats().malformed == 5).await,
            "{name}: {:?}",
            node.server_stats()
        );
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn many_peers_from_many_ports_are_all_answered() {
    for (name, transport) in udp_transports() {
        let transport = UdpTransport {
            workers: Some(2),
            ..transport
        };
        let port = free_port();
        let node = start(port, 10_000, &[], &[("k", "v")], &transport).await;
        let node_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let peers: Vec<FakePeer> = (0..64).map(|_| FakePeer::bind()).collect();
        for _ in 0..4 {
            for peer in &peers {
                peer.send(
                    node_addr,
                    &syn("test-cluster", Digest::default(), ProtocolVersion::V0),
                );
            }
        }
        for (i, peer) in peers.iter().enumerate() {
            for round in 0..4 {
                assert!(
                    peer.recv_matching(WAIT, |e| matches!(
                        e.message,
                        ChitchatMessage::SynAck { .. }
                    ))
                    .is_some(),
                    "{name}: peer {i} round {round} unanswered"
                );
            }
        }
        assert!(node.server_stats().replies >= 256);
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn shutdown_frees_the_port_at_once_and_drop_stops_the_node() {
    for (name, transport) in udp_transports() {
        let port = free_port();
        let node = start(port, 50, &[], &[], &transport).await;
        node.shutdown().await.unwrap();
        let rebound = UdpSocket::bind(("127.0.0.1", port));
        assert!(rebound.is_ok(), "{name}: port still busy after shutdown");
        drop(rebound);

        let node = start(port, 50, &[], &[], &transport).await;
        let watcher = node.termination_watcher();
        drop(node);
        tokio::time::timeout(WAIT, watcher)
            .await
            .expect("the node stops when its handle is dropped")
            .unwrap();
        assert!(UdpSocket::bind(("127.0.0.1", port)).is_ok(), "{name}");
    }
}

#[tokio::test]
async fn a_panicking_listener_is_caught_counted_and_the_node_goes_on() {
    // Issue 9 changed this contract: a listener panic used to stop the node (reported by the
    // termination watcher); it is now caught, logged and counted, and the node keeps serving.
    for (name, transport) in udp_transports() {
        let port = free_port();
        let node = start(port, 10_000, &[], &[], &transport).await;
        node.with_chitchat(|c| {
            c.subscribe_event("boom", |_| panic!("listener exploded"))
                .forever();
        })
        .await;
        let peer = FakePeer::bind();
        let peer_id = ChitchatId::new("fake-peer", 1, peer.addr());
        let syn_ack = one_key_syn_ack(&peer_id, "boom", "!");
        solicit_syn_ack(&node, &peer);
        peer.send(SocketAddr::from(([127, 0, 0, 1], port)), &syn_ack);
        let chitchat = node.chitchat();
        assert!(
            wait_until(WAIT, || chitchat.lock().listener_panics() == 1).await,
            "{name}: the panic was not counted"
        );
        // The node still answers after the panic.
        peer.send(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &syn("test-cluster", Digest::default(), ProtocolVersion::V0),
        );
        assert!(peer.recv_within(WAIT).is_some(), "{name}: still answering");
        drop(chitchat);
        assert!(
            node.shutdown().await.is_ok(),
            "{name}: the node had stopped"
        );
        assert!(
            UdpSocket::bind(("127.0.0.1", port)).is_ok(),
            "{name}: port freed"
        );
    }
}

/// A message that cannot be handled within the 2-second bound (here: the state is locked by the
/// application for longer) is abandoned and counted; the node goes on answering afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_past_the_handling_bound_are_abandoned_and_counted() {
    for (name, transport) in udp_transports() {
        let port = free_port();
        let node = start(port, 60_000, &[], &[], &transport).await;
        let node_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let peer = FakePeer::bind();
        let chitchat = node.chitchat();
        let guard = chitchat.lock();
        peer.send(
            node_addr,
            &syn("test-cluster", Digest::default(), ProtocolVersion::V0),
        );
        // Hold the state past the bound; the worker is blocked on the lock meanwhile.
        std::thread::sleep(chitchat_uring::MESSAGE_HANDLING_BOUND + Duration::from_millis(500));
        drop(guard);
        assert!(
            wait_until(WAIT, || node.server_stats().abandoned == 1).await,
            "{name}: {:?}",
            node.server_stats()
        );
        assert!(
            peer.recv_within(Duration::from_millis(300)).is_none(),
            "{name}: the late reply must not be sent"
        );
        peer.send(
            node_addr,
            &syn("test-cluster", Digest::default(), ProtocolVersion::V0),
        );
        assert!(peer.recv_within(WAIT).is_some(), "{name}: answering again");
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn bad_config_and_busy_port_are_clear_errors() {
    let (_, transport) = &udp_transports()[0];
    let port = free_port();
    let mut config = node_config(port, 100, &[]);
    config.failure_detector_config.phi_threshold = -1.0;
    let error = spawn_chitchat(config, Vec::new(), transport)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("failure_detector_config.phi_threshold"),
        "{error}"
    );

    let blocker = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let error = spawn_chitchat(node_config(port, 100, &[]), Vec::new(), transport)
        .await
        .err()
        .unwrap();
    let message = format!("{error:#}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    drop(blocker);
}

/// Five nodes seeded with the first: they all see each other, a key set on one reaches all,
/// and a stopped node is seen dead by the others.
async fn five_node_cluster(name: &str, transport: &dyn Transport) {
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let seed = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let mut nodes = Vec::new();
    for &port in &ports {
        nodes.push(start(port, 50, &[seed], &[], transport).await);
    }
    let all_live = |nodes: &[ChitchatHandle], n: usize| {
        nodes
            .iter()
            .all(|node| node.chitchat().lock().live_nodes().count() == n)
    };
    assert!(
        wait_until(Duration::from_secs(20), || all_live(&nodes, 5)).await,
        "{name}: the cluster did not form"
    );
    // Membership is published on the live-nodes watcher too.
    let watched = nodes[4]
        .chitchat()
        .lock()
        .live_nodes_watcher()
        .borrow()
        .len();
    assert_eq!(watched, 5, "{name}");

    nodes[2]
        .with_chitchat(|c| c.self_node_state().set("service", "ready"))
        .await;
    let origin = nodes[2].chitchat_id().clone();
    let everywhere = |nodes: &[ChitchatHandle]| {
        nodes.iter().all(|node| {
            node.chitchat()
                .lock()
                .node_state(&origin)
                .and_then(|s| s.get("service").map(String::from))
                .as_deref()
                == Some("ready")
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), || everywhere(&nodes)).await,
        "{name}: the key did not spread"
    );

    let stopped = nodes.pop().unwrap();
    let stopped_id = stopped.chitchat_id().clone();
    stopped.shutdown().await.unwrap();
    let seen_dead = |nodes: &[ChitchatHandle]| {
        nodes.iter().all(|node| {
            let chitchat = node.chitchat();
            let chitchat = chitchat.lock();
            chitchat.dead_nodes().any(|id| *id == stopped_id)
                && !chitchat.live_nodes().any(|id| *id == stopped_id)
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || seen_dead(&nodes)).await,
        "{name}: the stopped node was not seen dead"
    );
    // The live-nodes watcher drops it too (waiting for the exact set tolerates a transient
    // false suspicion on a loaded machine).
    let watcher = nodes[0].chitchat().lock().live_nodes_watcher();
    let remaining: Vec<ChitchatId> = nodes.iter().map(|n| n.chitchat_id().clone()).collect();
    assert!(
        wait_until(Duration::from_secs(20), || watcher
            .borrow()
            .keys()
            .eq(remaining.iter().collect::<std::collections::BTreeSet<_>>()))
        .await,
        "{name}: the watcher does not list exactly the 4 remaining nodes: {:?}",
        watcher.borrow().keys().collect::<Vec<_>>()
    );
    let views = |nodes: &[ChitchatHandle]| -> Vec<BTreeMap<ChitchatId, u64>> {
        nodes
            .iter()
            .map(|node| {
                node.chitchat()
                    .lock()
                    .node_states()
                    .iter()
                    .map(|(id, s)| (id.clone(), s.max_version()))
                    .collect()
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || views(&nodes)
            .windows(2)
            .all(|w| w[0] == w[1]))
        .await,
        "{name}: {:?}",
        views(&nodes)
    );
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_node_clusters_over_every_transport() {
    for (name, transport) in transports() {
        five_node_cluster(name, transport.as_ref()).await;
    }
}

#[tokio::test]
async fn spawn_and_shutdown_work_from_a_plain_thread() {
    let port = free_port();
    let handle = std::thread::spawn(move || {
        let transport = ChannelTransport::new();
        let node = tokio_free_block_on(spawn_chitchat(
            node_config(port, 50, &[]),
            vec![("k".to_string(), "v".to_string())],
            &transport,
        ))
        .unwrap();
        let value = node
            .chitchat()
            .lock()
            .self_node_state()
            .get("k")
            .map(String::from);
        tokio_free_block_on(node.shutdown()).unwrap();
        value
    });
    assert_eq!(handle.join().unwrap().as_deref(), Some("v"));
}

/// A minimal executor: polls a future on the current thread, parking between wake-ups.
fn tokio_free_block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake};
    struct Unparker(std::thread::Thread);
    impl Wake for Unparker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unparker(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

#[test]
fn udp_transport_is_usable_as_a_value_like_chitchats_unit_struct() {
    let transport: &dyn Transport = &UdpTransport;
    let _ = transport;
    assert_eq!(UdpTransport.mode, UdpMode::Auto);
}

#[test]
fn handle_and_state_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChitchatHandle>();
    assert_send_sync::<chitchat_uring::ChitchatRef>();
}
