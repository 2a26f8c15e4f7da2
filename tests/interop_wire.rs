//! Interop on the wire: a real chitchat 0.13 node (its own `spawn_chitchat` and `UdpTransport`)
//! talks to a plain UDP socket that encodes and decodes with OUR codec. Proves that our
//! encodings (V0/V1 digests, compressed and raw delta blocks, every deletion status) are
//! accepted by the reference, that its messages decode with our decoder, and that a
//! V1-configured node of ours answers a V0 Syn in V0 without overflowing the datagram.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use chitchat_uring::message::{Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest};
use chitchat_uring::types::DeletionStatusMutation;
use chitchat_uring::{
    ChitchatEnvelope, ChitchatId, ChitchatMessage, Heartbeat, MAX_UDP_DATAGRAM_PAYLOAD_SIZE,
    ProtocolVersion,
};
use common::capture::reference_log;
use common::mixed::{CLUSTER_ID, Node, NodeSpec, Side, eventually};
use common::{FakePeer, free_port};

const WAIT: Duration = Duration::from_secs(10);
const VERSIONS: [ProtocolVersion; 2] = [ProtocolVersion::V0, ProtocolVersion::V1];

fn envelope(version: ProtocolVersion, message: ChitchatMessage) -> ChitchatEnvelope {
    ChitchatEnvelope { version, message }
}

fn syn(digest: Digest) -> ChitchatMessage {
    ChitchatMessage::Syn {
        cluster_id: CLUSTER_ID.to_string(),
        digest,
    }
}

/// A real chitchat node that does not gossip by itself during the test (10 s interval, no
/// seeds): everything it sends is an answer to us.
async fn quiet_reference_node(kvs: &[(&str, &str)], v1: bool) -> (Node, SocketAddr) {
    let mut spec = NodeSpec::new(Side::Theirs, free_port());
    spec.gossip = Duration::from_secs(10);
    spec.v1 = v1;
    let node = spec.spawn(kvs).await;
    (node, spec.addr())
}

fn kv(key: &str, value: &str, version: u64, status: DeletionStatusMutation) -> KeyValueUpdate {
    KeyValueUpdate {
        key: key.to_string(),
        value: value.to_string(),
        version,
        status,
    }
}

/// The node state a real node holds for `id`: key → (value, version, deleted?).
async fn reference_state(
    node: &Node,
    id: &ChitchatId,
) -> Option<BTreeMap<String, (String, u64, bool)>> {
    let Node::Theirs(handle) = node else {
        unreachable!()
    };
    let their_id = chitchat::ChitchatId::new(
        id.node_id.to_string(),
        id.generation_id,
        id.gossip_advertise_addr,
    );
    handle
        .with_chitchat(|c| {
            c.node_state(&their_id).map(|state| {
                state
                    .key_values_including_deleted()
                    .map(|(k, v)| (k.to_string(), (v.value.clone(), v.version, v.is_deleted())))
                    .collect()
            })
        })
        .await
}

/// Our V0 and V1 Syns (empty digest) get a SynAck in the version received, which our decoder
/// accepts, carrying the node's key-values; the node config's version does not matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_answers_our_v0_and_v1_syns_in_the_version_received() {
    let log = reference_log();
    for configured_v1 in [false, true] {
        let (node, addr) = quiet_reference_node(&[("k1", "v1"), ("k2", "v2")], configured_v1).await;
        let peer = FakePeer::bind();
        for version in VERSIONS {
            peer.send(addr, &envelope(version, syn(Digest::default())));
            let (from, reply, bytes) = peer
                .recv_matching(WAIT, |e| {
                    matches!(e.message, ChitchatMessage::SynAck { .. })
                })
                .expect("a syn-ack our decoder accepts");
            assert_eq!(from, addr);
            assert_eq!(bytes[2], version.to_code(), "the version byte is echoed");
            assert_eq!(reply.version, version);
            let ChitchatMessage::SynAck { digest, delta } = reply.message else {
                unreachable!()
            };
            let own = digest
                .node_digests
                .keys()
                .find(|id| id.gossip_advertise_addr == addr)
                .expect("its digest lists itself")
                .clone();
            assert_eq!(delta.node_deltas.len(), 1);
            let node_delta = &delta.node_deltas[0];
            assert_eq!(node_delta.chitchat_id, own);
            let kvs: Vec<(&str, &str)> = node_delta
                .key_values
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_str()))
                .collect();
            assert_eq!(kvs, [("k1", "v1"), ("k2", "v2")]);
        }
        assert!(node.is_running().await);
        node.shutdown().await;
    }
    assert!(
        log.reference_failures().is_empty(),
        "{:?}",
        log.reference_failures()
    );
}

/// A node id announced in our digest (V0 or V1) is created on the real node; our Ack with a
/// delta for it (all three deletion statuses, then 300 keys in zstd-compressed blocks) makes
/// those key-values appear in its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_applies_our_ack_for_a_node_announced_in_our_digest() {
    let log = reference_log();
    for version in VERSIONS {
        let (node, addr) = quiet_reference_node(&[("own", "1")], false).await;
        let peer = FakePeer::bind();
        let fake = ChitchatId::new(format!("fake-{}", version.to_code()), 7, peer.addr());
        let mut digest = Digest::default();
        digest.add_node(fake.clone(), NodeDigest::new(Heartbeat::from(5), 0, 3));
        peer.send(addr, &envelope(version, syn(digest)));
        let (_, reply, _) = peer
            .recv_matching(WAIT, |e| {
                matches!(e.message, ChitchatMessage::SynAck { .. })
            })
            .expect("syn-ack");
        let ChitchatMessage::SynAck { digest, .. } = reply.message else {
            unreachable!()
        };
        let announced = digest
            .node_digests
            .get(&fake)
            .expect("it now knows the fake node");
        assert_eq!(
            announced.max_version, 0,
            "it has none of its key-values yet"
        );

        let delta = Delta {
            node_deltas: vec![NodeDelta {
                chitchat_id: fake.clone(),
                from_version_excluded: 0,
                last_gc_version: 0,
                max_version: 3,
                key_values: vec![
                    kv("set", "a", 1, DeletionStatusMutation::Set),
                    kv("ttl", "b", 2, DeletionStatusMutation::DeleteAfterTtl),
                    kv("gone", "", 3, DeletionStatusMutation::Delete),
                ],
            }],
        };
        peer.send(addr, &envelope(version, ChitchatMessage::Ack { delta }));
        let applied = eventually(WAIT, || async {
            reference_state(&node, &fake)
                .await
                .is_some_and(|s| s.len() == 3)
        })
        .await;
        assert!(applied, "the ack was not applied");
        let state = reference_state(&node, &fake).await.unwrap();
        assert_eq!(state["set"], ("a".to_string(), 1, false));
        assert_eq!(state["ttl"], ("b".to_string(), 2, false));
        assert_eq!(state["gone"], (String::new(), 3, true));

        // 300 compressible key-values: our writer emits zstd blocks.
        let key_values: Vec<KeyValueUpdate> = (4..304)
            .map(|v| {
                kv(
                    &format!("service/{v:04}"),
                    "ready ready ready ready",
                    v,
                    DeletionStatusMutation::Set,
                )
            })
            .collect();
        let delta = Delta {
            node_deltas: vec![NodeDelta {
                chitchat_id: fake.clone(),
                from_version_excluded: 3,
                last_gc_version: 0,
                max_version: 303,
                key_values,
            }],
        };
        let bytes = chitchat_uring::wire::encode_envelope(&envelope(
            version,
            ChitchatMessage::Ack { delta },
        ))
        .unwrap();
        assert_eq!(bytes[4], 1, "the delta's first block is compressed");
        peer.send_raw(addr, &bytes);
        let applied = eventually(WAIT, || async {
            reference_state(&node, &fake)
                .await
                .is_some_and(|s| s.len() == 303)
        })
        .await;
        assert!(applied, "the compressed ack was not applied");
        assert!(node.is_running().await);
        node.shutdown().await;
    }
    assert!(
        log.reference_failures().is_empty(),
        "{:?}",
        log.reference_failures()
    );
}

/// Our SynAck (digest + delta) is applied by the real node, which answers with an Ack our
/// decoder accepts, in the same version, carrying its own state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_applies_our_syn_ack_and_answers_with_an_ack() {
    let log = reference_log();
    for version in VERSIONS {
        let (node, addr) = quiet_reference_node(&[("theirs", "x")], false).await;
        let peer = FakePeer::bind();
        let fake = ChitchatId::new("fake-synack", 1, peer.addr());
        let mut digest = Digest::default();
        digest.add_node(fake.clone(), NodeDigest::new(Heartbeat::from(2), 0, 1));
        let delta = Delta {
            node_deltas: vec![NodeDelta {
                chitchat_id: fake.clone(),
                from_version_excluded: 0,
                last_gc_version: 0,
                max_version: 1,
                key_values: vec![kv("hello", "world", 1, DeletionStatusMutation::Set)],
            }],
        };
        peer.send(
            addr,
            &envelope(version, ChitchatMessage::SynAck { digest, delta }),
        );
        let (_, reply, bytes) = peer
            .recv_matching(WAIT, |e| matches!(e.message, ChitchatMessage::Ack { .. }))
            .expect("an ack");
        assert_eq!(bytes[2], version.to_code());
        let ChitchatMessage::Ack { delta } = reply.message else {
            unreachable!()
        };
        assert!(
            delta
                .node_deltas
                .iter()
                .any(|nd| nd.key_values.iter().any(|kv| kv.key == "theirs"))
        );
        let state = reference_state(&node, &fake).await.expect("node created");
        assert_eq!(state["hello"], ("world".to_string(), 1, false));
        node.shutdown().await;
    }
    assert!(
        log.reference_failures().is_empty(),
        "{:?}",
        log.reference_failures()
    );
}

/// A 400-node digest encoded by us, V0 (plain) and V1 (a zstd block stream of two blocks, the
/// writer cutting at 16 KiB so entries straddle blocks), creates the same 400 node states on
/// the real node, and its SynAck digest (V1: compressed and cut by it) decodes with ours and
/// lists them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_decodes_our_large_v0_and_v1_digests() {
    let log = reference_log();
    for version in VERSIONS {
        let (node, addr) = quiet_reference_node(&[], false).await;
        let peer = FakePeer::bind();
        let mut digest = Digest::default();
        for i in 0..400u16 {
            let id = ChitchatId::new(
                format!("digest-node-{i:03}"),
                1,
                SocketAddr::from(([127, 0, 0, 1], 40_000 + i)),
            );
            digest.add_node(id, NodeDigest::new(Heartbeat::from(10), 0, 0));
        }
        let bytes =
            chitchat_uring::wire::encode_envelope(&envelope(version, syn(digest.clone()))).unwrap();
        if version == ProtocolVersion::V1 {
            assert_eq!(bytes[4], 1, "the V1 digest is compressed");
            let first_block = u16::from_le_bytes([bytes[5], bytes[6]]) as usize;
            assert_ne!(bytes[7 + first_block], 0, "and made of more than one block");
        }
        peer.send_raw(addr, &bytes);
        let (_, reply, _) = peer
            .recv_matching(WAIT, |e| {
                matches!(e.message, ChitchatMessage::SynAck { .. })
            })
            .expect("syn-ack");
        let ChitchatMessage::SynAck { digest: theirs, .. } = reply.message else {
            unreachable!()
        };
        for id in digest.node_digests.keys() {
            assert!(theirs.node_digests.contains_key(id), "{id:?} missing");
        }
        assert_eq!(theirs.node_digests.len(), 401);
        let Node::Theirs(handle) = &node else {
            unreachable!()
        };
        assert_eq!(handle.with_chitchat(|c| c.node_states().len()).await, 401);
        node.shutdown().await;
    }
    assert!(
        log.reference_failures().is_empty(),
        "{:?}",
        log.reference_failures()
    );
}

/// The Syns a real node initiates decode with our codec, in the version it is configured for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_syns_decode_with_our_codec_in_the_configured_version() {
    for version in VERSIONS {
        let seed = FakePeer::bind();
        let mut spec = NodeSpec::new(Side::Theirs, free_port());
        spec.seeds = vec![seed.addr()];
        spec.v1 = version == ProtocolVersion::V1;
        let node = spec.spawn(&[("k", "v")]).await;
        let (from, syn, bytes) = seed
            .recv_matching(WAIT, |e| matches!(e.message, ChitchatMessage::Syn { .. }))
            .expect("the seed gets a syn");
        assert_eq!(from, spec.addr());
        assert_eq!(bytes[2], version.to_code());
        let ChitchatMessage::Syn { cluster_id, digest } = syn.message else {
            unreachable!()
        };
        assert_eq!(cluster_id, CLUSTER_ID);
        assert_eq!(digest.node_digests.len(), 1);
        let (id, entry) = digest.node_digests.iter().next().unwrap();
        assert_eq!(id.gossip_advertise_addr, spec.addr());
        assert_eq!(entry.max_version, 1);
        node.shutdown().await;
    }
}

/// SPEC §9.13: the reference budgets a SynAck's delta with the digest length in its *config*
/// version but encodes the reply in the *received* version, so a V1 node answering a V0 Syn
/// can overflow the datagram. Ours is configured V1, holds a large incompressible state and a
/// 400-node membership (V0 digest ≈ 30 KB, V1 much smaller): its answer to a V0 Syn is V0,
/// fits in 65 507 bytes and decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_v1_node_answers_a_v0_syn_in_v0_within_the_datagram_budget() {
    use rand::{Rng, SeedableRng};
    let mut spec = NodeSpec::new(Side::Ours, free_port());
    spec.gossip = Duration::from_secs(10);
    spec.v1 = true;
    let node = spec.spawn(&[]).await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
    {
        let chitchat = node.ours().chitchat();
        let mut chitchat = chitchat.lock();
        for i in 0..70 {
            let value: String = (0..900)
                .map(|_| rng.random_range(b'!'..=b'~') as char)
                .collect();
            chitchat
                .self_node_state()
                .try_set(format!("blob-{i:02}"), value)
                .unwrap();
        }
    }
    let peer = FakePeer::bind();
    let mut digest = Digest::default();
    for i in 0..400u16 {
        let id = ChitchatId::new(
            format!("member-with-a-longish-node-id-{i:04}"),
            1,
            SocketAddr::from(([127, 0, 0, 1], 30_000 + i)),
        );
        digest.add_node(id, NodeDigest::new(Heartbeat::from(3), 0, 0));
    }
    for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
        peer.send(spec.addr(), &envelope(version, syn(digest.clone())));
        let (_, reply, bytes) = peer
            .recv_matching(WAIT, |e| {
                matches!(e.message, ChitchatMessage::SynAck { .. })
            })
            .unwrap_or_else(|| panic!("no {version:?} syn-ack: the reply did not fit?"));
        assert_eq!(reply.version, version);
        assert!(
            bytes.len() <= MAX_UDP_DATAGRAM_PAYLOAD_SIZE,
            "{}",
            bytes.len()
        );
        let ChitchatMessage::SynAck { digest: own, delta } = reply.message else {
            unreachable!()
        };
        assert_eq!(own.node_digests.len(), 401);
        assert!(delta.num_key_values() > 0, "the delta carries what fits");
        eprintln!(
            "{version:?} syn-ack of a V1 node: {} bytes, {} key-values",
            bytes.len(),
            delta.num_key_values()
        );
    }
    node.shutdown().await;
}

/// `Serializable`/`Deserializable` write chitchat 0.13's bytes, and each side reads the other's.
#[test]
fn serializable_values_match_chitchat_byte_for_byte() {
    use chitchat_uring::{Deserializable, Serializable};

    fn same<O, R>(ours: &O, theirs: &R)
    where
        O: Serializable + Deserializable + PartialEq + std::fmt::Debug,
        R: chitchat::Serializable + chitchat::Deserializable + PartialEq + std::fmt::Debug,
    {
        let our_bytes = ours.serialize_to_vec();
        assert_eq!(our_bytes, theirs.serialize_to_vec(), "{ours:?}");
        assert_eq!(ours.serialized_len(), theirs.serialized_len());
        let mut buf = our_bytes.as_slice();
        assert_eq!(&R::deserialize(&mut buf).unwrap(), theirs);
        let their_bytes = theirs.serialize_to_vec();
        let mut buf = their_bytes.as_slice();
        assert_eq!(&O::deserialize(&mut buf).unwrap(), ours);
    }

    same(&0xABu8, &0xABu8);
    same(&0x1234u16, &0x1234u16);
    same(&0xDEAD_BEEFu32, &0xDEAD_BEEFu32);
    same(&(u64::MAX - 1), &(u64::MAX - 1));
    same(&true, &true);
    same(&"clé-1".to_string(), &"clé-1".to_string());
    for addr in ["127.0.0.1:7280", "[2001:db8::1]:9000"] {
        let addr: SocketAddr = addr.parse().unwrap();
        same(&addr, &addr);
        same(
            &chitchat_uring::ChitchatId::new("node-a", 17, addr),
            &chitchat::ChitchatId::new("node-a".to_string(), 17, addr),
        );
    }
    // chitchat's Heartbeat has no public constructor: read it from our bytes.
    let ours = chitchat_uring::Heartbeat::from(99);
    let mut buf: &[u8] = &ours.serialize_to_vec();
    let theirs = <chitchat::Heartbeat as chitchat::Deserializable>::deserialize(&mut buf).unwrap();
    same(&ours, &theirs);
}
