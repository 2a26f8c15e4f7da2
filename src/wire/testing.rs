//! proptest strategies for wire messages, shared by the codec's tests.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;

use crate::message::{
    ChitchatEnvelope, ChitchatMessage, Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest,
    ProtocolVersion,
};
use crate::types::{ChitchatId, DeletionStatusMutation, Heartbeat};

pub(crate) fn arb_socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
    ]
}

/// Ids with ASCII and arbitrary unicode node ids, IPv4 and IPv6 addresses.
pub(crate) fn arb_chitchat_id() -> impl Strategy<Value = ChitchatId> {
    (
        prop_oneof!["node-[0-9]{1,5}", "\\PC{0,24}"],
        any::<u64>(),
        arb_socket_addr(),
    )
        .prop_map(|(node_id, generation, addr)| ChitchatId::new(node_id, generation, addr))
}

pub(crate) fn arb_node_digest() -> impl Strategy<Value = NodeDigest> {
    (any::<u64>(), any::<u64>(), any::<u64>())
        .prop_map(|(hb, gc, max)| NodeDigest::new(Heartbeat::from(hb), gc, max))
}

pub(crate) fn arb_digest(max_entries: usize) -> impl Strategy<Value = Digest> {
    btree_map(arb_chitchat_id(), arb_node_digest(), 0..=max_entries)
        .prop_map(|node_digests| Digest { node_digests })
}

pub(crate) fn arb_status() -> impl Strategy<Value = DeletionStatusMutation> {
    prop_oneof![
        Just(DeletionStatusMutation::Set),
        Just(DeletionStatusMutation::Delete),
        Just(DeletionStatusMutation::DeleteAfterTtl),
    ]
}

/// Compressible and incompressible (random unicode) strings.
pub(crate) fn arb_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ab]{0,200}",
        "\\PC{0,40}",
        (0usize..2_000).prop_map(|n| "value-".repeat(n / 6)),
    ]
}

/// A node delta as a real sender emits it: KVs in strictly increasing versions; a node
/// without KVs carries any max version (the SetMaxVersion-only case, or 0).
pub(crate) fn arb_node_delta(max_kvs: usize) -> impl Strategy<Value = NodeDelta> {
    (
        arb_chitchat_id(),
        any::<u64>(),
        any::<u64>(),
        btree_set(1..=u64::MAX, 0..=max_kvs),
        vec(("\\PC{0,20}", arb_value(), arb_status()), max_kvs),
        any::<u64>(),
    )
        .prop_map(|(id, gc, from, versions, kvs, empty_max)| {
            let key_values: Vec<KeyValueUpdate> = versions
                .into_iter()
                .zip(kvs)
                .map(|(version, (key, value, status))| KeyValueUpdate {
                    key,
                    value,
                    version,
                    status,
                })
                .collect();
            let max_version = key_values.last().map_or(empty_max, |kv| kv.version);
            NodeDelta {
                chitchat_id: id,
                from_version_excluded: from,
                last_gc_version: gc,
                max_version,
                key_values,
            }
        })
}

pub(crate) fn arb_delta(max_nodes: usize, max_kvs: usize) -> impl Strategy<Value = Delta> {
    vec(arb_node_delta(max_kvs), 0..=max_nodes).prop_map(|mut node_deltas| {
        let mut seen = std::collections::HashSet::new();
        node_deltas.retain(|nd| seen.insert(nd.chitchat_id.clone()));
        Delta { node_deltas }
    })
}

pub(crate) fn arb_version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(ProtocolVersion::V0), Just(ProtocolVersion::V1)]
}

pub(crate) fn arb_envelope() -> impl Strategy<Value = ChitchatEnvelope> {
    let message = prop_oneof![
        ("\\PC{0,30}", arb_digest(200))
            .prop_map(|(cluster_id, digest)| ChitchatMessage::Syn { cluster_id, digest }),
        (arb_digest(50), arb_delta(6, 12))
            .prop_map(|(digest, delta)| ChitchatMessage::SynAck { digest, delta }),
        arb_delta(8, 20).prop_map(|delta| ChitchatMessage::Ack { delta }),
        Just(ChitchatMessage::BadCluster),
    ];
    (arb_version(), message).prop_map(|(version, message)| ChitchatEnvelope { version, message })
}
