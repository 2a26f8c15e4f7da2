//! Keyed clusters end to end: sealed gossip converges on every transport, outsiders (wrong key,
//! no key, plaintext) learn nothing and are learned by nobody, rotation needs no downtime, and
//! tampered datagrams are dropped before decoding.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use chitchat_uring::message::{Digest, NodeDigest};
use chitchat_uring::transport::seal::{Key, KeyedMode, Keyring, KeyringHandle};
use chitchat_uring::transport::{KeyedTransport, Transport};
use chitchat_uring::wire::encode_envelope;
use chitchat_uring::{
    ChannelTransport, ChitchatEnvelope, ChitchatHandle, ChitchatMessage, ProtocolVersion,
    spawn_chitchat,
};
use common::{free_port, node_config, udp_transports, wait_until};

const WAIT: Duration = Duration::from_secs(15);

fn ring(keys: &[&Key]) -> Arc<KeyringHandle> {
    KeyringHandle::new(Keyring::from_keys(keys.iter().map(|k| (*k).clone())).unwrap())
}

fn key() -> Key {
    Key::generate().unwrap()
}

fn sees(handle: &ChitchatHandle, other: &ChitchatHandle) -> bool {
    handle
        .chitchat()
        .lock()
        .live_nodes()
        .any(|id| id == other.chitchat_id())
}

fn value_at(handle: &ChitchatHandle, of: &ChitchatHandle, key: &str) -> Option<String> {
    let chitchat = handle.chitchat();
    let guard = chitchat.lock();
    guard
        .node_state(of.chitchat_id())
        .and_then(|state| state.get(key).map(str::to_string))
}

fn known_nodes(handle: &ChitchatHandle) -> usize {
    handle.chitchat().lock().node_states().len()
}

/// Spawns a node on 127.0.0.1:`port` seeded with `seeds`, on `transport`.
async fn node(port: u16, seeds: &[SocketAddr], transport: &dyn Transport) -> ChitchatHandle {
    spawn_chitchat(node_config(port, 50, seeds), Vec::new(), transport)
        .await
        .unwrap()
}

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

async fn pair_converges(transport_a: &dyn Transport, transport_b: &dyn Transport, what: &str) {
    let (pa, pb) = (free_port(), free_port());
    let a = node(pa, &[addr(pb)], transport_a).await;
    let b = node(pb, &[addr(pa)], transport_b).await;
    a.with_chitchat(|c| c.self_node_state().set("secret", "sealed"))
        .await;
    assert!(
        wait_until(WAIT, || sees(&a, &b)
            && sees(&b, &a)
            && value_at(&b, &a, "secret").as_deref() == Some("sealed"))
        .await,
        "{what}: the keyed pair did not converge"
    );
    let stats = a.endpoint_stats();
    assert_eq!(stats.auth_failures, 0, "{what}: {stats:?}");
    assert_eq!(stats.seal_failures, 0, "{what}: {stats:?}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_pair_converges_on_every_transport() {
    let k = key();
    for (name, udp) in udp_transports() {
        let t = KeyedTransport::new(udp, ring(&[&k]), "test-cluster", KeyedMode::Required);
        pair_converges(&t, &t, name).await;
    }
    let channel = ChannelTransport::new();
    let t = KeyedTransport::new(channel, ring(&[&k]), "test-cluster", KeyedMode::Required);
    pair_converges(&t, &t, "channel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_or_no_key_learns_nothing_and_is_learned_by_nobody() {
    for (name, udp) in udp_transports() {
        let (k1, k2) = (key(), key());
        let keyed_a = KeyedTransport::new(
            udp.clone(),
            ring(&[&k1]),
            "test-cluster",
            KeyedMode::Required,
        );
        let keyed_b = KeyedTransport::new(
            udp.clone(),
            ring(&[&k2]),
            "test-cluster",
            KeyedMode::Required,
        );
        let (pa, pb, pc) = (free_port(), free_port(), free_port());
        let all = [addr(pa), addr(pb), addr(pc)];
        let a = node(pa, &all, &keyed_a).await;
        let b = node(pb, &all, &keyed_b).await;
        let c = node(pc, &all, &udp).await; // no key at all
        // Evidence that each kind of outsider's datagrams reached A and were refused.
        assert!(
            wait_until(WAIT, || {
                let s = a.endpoint_stats();
                s.auth_failures >= 3 && s.plaintext_refused >= 3
            })
            .await,
            "{name}: A never saw the outsiders' datagrams: {:?}",
            a.endpoint_stats()
        );
        // And C (plaintext) got A's sealed datagrams: they do not even decode there.
        assert!(
            wait_until(WAIT, || c.server_stats().malformed >= 3).await,
            "{name}: C never received A's sealed datagrams: {:?}",
            c.server_stats()
        );
        for (who, handle) in [("A", &a), ("B", &b), ("C", &c)] {
            assert_eq!(known_nodes(handle), 1, "{name}: {who} learned another node");
        }
        for handle in [a, b, c] {
            handle.shutdown().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_datagram_to_a_keyed_node_gets_no_reply_and_changes_nothing() {
    for (name, udp) in udp_transports() {
        let keyed = KeyedTransport::new(udp, ring(&[&key()]), "test-cluster", KeyedMode::Required);
        let port = free_port();
        let a = node(port, &[], &keyed).await;
        let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
        attacker
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        // A plaintext Syn whose digest introduces a forged node: would be answered and learned.
        let mut digest = Digest::default();
        digest.add_node(
            chitchat_uring::ChitchatId::new("forged", 1, addr(1)),
            NodeDigest {
                heartbeat: 5.into(),
                last_gc_version: 0,
                max_version: 3,
            },
        );
        let syn = encode_envelope(&ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: "test-cluster".to_string(),
                digest,
            },
        })
        .unwrap();
        for _ in 0..20 {
            attacker.send_to(&syn, addr(port)).unwrap();
        }
        assert!(
            wait_until(WAIT, || a.endpoint_stats().plaintext_refused >= 20).await,
            "{name}: {:?}",
            a.endpoint_stats()
        );
        let mut buf = [0u8; 65_536];
        assert!(
            attacker.recv_from(&mut buf).is_err(),
            "{name}: a keyed node answered plaintext"
        );
        assert_eq!(known_nodes(&a), 1, "{name}: the forged node was learned");
        assert_eq!(a.server_stats().datagrams_handled, 0, "{name}");
        a.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_sealed_datagrams_are_dropped_before_decoding() {
    for (name, udp) in udp_transports() {
        let keyed = KeyedTransport::new(udp, ring(&[&key()]), "test-cluster", KeyedMode::Required);
        let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
        attacker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let port = free_port();
        // Seeded with the attacker: the node sends it sealed Syns to tamper with.
        let a = node(port, &[attacker.local_addr().unwrap()], &keyed).await;
        let mut buf = vec![0u8; 65_536];
        let (len, _) = attacker.recv_from(&mut buf).unwrap();
        let sealed = buf[..len].to_vec();
        // Magic, version, key id, session, sequence, time, nonce, ciphertext, tag; then a
        // truncated copy and one with a byte appended.
        let mut positions: Vec<usize> = vec![0, 1, 2, 3, 6, 7, 14, 15, 22, 23, 30, 31, 54];
        positions.extend([55, 55 + (len - 71) / 2, len - 17, len - 16, len - 1]);
        let before = a.endpoint_stats().auth_failures;
        let handled_before = a.server_stats().datagrams_handled;
        for &at in &positions {
            let mut forged = sealed.clone();
            forged[at] ^= 0x01;
            attacker.send_to(&forged, addr(port)).unwrap();
        }
        attacker.send_to(&sealed[..len - 1], addr(port)).unwrap();
        let mut longer = sealed.clone();
        longer.push(0);
        attacker.send_to(&longer, addr(port)).unwrap();
        let expected = before + positions.len() as u64 + 2;
        assert!(
            wait_until(WAIT, || a.endpoint_stats().auth_failures >= expected).await,
            "{name}: {:?}",
            a.endpoint_stats()
        );
        assert_eq!(a.endpoint_stats().auth_failures, expected, "{name}");
        assert_eq!(
            a.server_stats().datagrams_handled,
            handled_before,
            "{name}: a tampered datagram reached the protocol"
        );
        assert_eq!(a.server_stats().malformed, 0, "{name}");
        a.shutdown().await.unwrap();
    }
}

/// Install everywhere, then switch the primary everywhere, then remove the old key everywhere,
/// one node at a time, checking after every single change that an update still reaches all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_in_three_steps_never_splits_the_cluster() {
    let channel = ChannelTransport::new();
    let (old, new) = (key(), key());
    let rings: Vec<Arc<KeyringHandle>> = (0..3).map(|_| ring(&[&old])).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let seeds: Vec<SocketAddr> = ports.iter().map(|p| addr(*p)).collect();
    let transports: Vec<_> = rings
        .iter()
        .map(|r| {
            KeyedTransport::new(
                channel.clone(),
                r.clone(),
                "test-cluster",
                KeyedMode::Required,
            )
        })
        .collect();
    let mut nodes = Vec::new();
    for (port, transport) in ports.iter().zip(&transports) {
        nodes.push(node(*port, &seeds, transport).await);
    }
    let mut round = 0;
    let mut check = async |step: &str, nodes: &[ChitchatHandle]| {
        round += 1;
        let value = format!("{step}-{round}");
        let writer = &nodes[round % nodes.len()];
        let v = value.clone();
        writer
            .with_chitchat(move |c| c.self_node_state().set("step", v.clone()))
            .await;
        assert!(
            wait_until(WAIT, || nodes.iter().all(|n| value_at(n, writer, "step")
                .as_deref()
                == Some(value.as_str())))
            .await,
            "an update did not reach every node after {step}"
        );
    };
    check("start", &nodes).await;
    let new_id = new.id();
    for (i, r) in rings.iter().enumerate() {
        r.install(new.clone()).unwrap();
        check(&format!("install on node {i}"), &nodes).await;
    }
    for (i, r) in rings.iter().enumerate() {
        r.set_primary(new_id).unwrap();
        check(&format!("primary on node {i}"), &nodes).await;
    }
    for (i, r) in rings.iter().enumerate() {
        r.remove(old.id()).unwrap();
        check(&format!("removal on node {i}"), &nodes).await;
    }
    for n in &nodes {
        assert_eq!(n.endpoint_stats().auth_failures, 0);
    }
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_refused_on_a_keyed_transport() {
    let t = KeyedTransport::new(
        ChannelTransport::new(),
        ring(&[&key()]),
        "other-cluster",
        KeyedMode::Required,
    );
    let error = spawn_chitchat(node_config(free_port(), 50, &[]), Vec::new(), &t)
        .await
        .err()
        .expect("a cluster-id mismatch must be refused");
    assert!(format!("{error:#}").contains("cluster_id"), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_plaintext_mode_hears_plaintext_nodes_and_sends_sealed() {
    let channel = ChannelTransport::new();
    let keyed = KeyedTransport::new(
        channel.clone(),
        ring(&[&key()]),
        "test-cluster",
        KeyedMode::AcceptPlaintext,
    );
    let (pa, pb) = (free_port(), free_port());
    let a = node(pa, &[addr(pb)], &keyed).await;
    let b = node(pb, &[addr(pa)], &channel).await; // plaintext
    // A hears B's plaintext Syns (and learns B through their digests).
    assert!(
        wait_until(WAIT, || a.endpoint_stats().plaintext_accepted >= 3
            && sees(&a, &b))
        .await,
        "{:?}",
        a.endpoint_stats()
    );
    // Everything A sends is sealed: B cannot decode any of it.
    assert!(wait_until(WAIT, || b.server_stats().malformed >= 3).await);
    assert_eq!(known_nodes(&b), 1, "B learned A from sealed datagrams");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
