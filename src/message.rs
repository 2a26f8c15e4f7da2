//! The four gossip messages and what they carry (digests and deltas), as owned values.
//!
//! The byte form lives in [`crate::wire`]; the hot path of the server encodes replies straight from
//! the cluster state and never builds these values, but tests, simulations and the public
//! `process_message` API use them.

use std::collections::BTreeMap;

use crate::types::{ChitchatId, DeletionStatusMutation, Heartbeat, Version};

/// Wire protocol version. It selects only the digest encoding: V0 plain, V1 zstd block stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ProtocolVersion {
    /// Understood by every chitchat since the envelope exists; the safe default.
    #[default]
    V0 = 0,
    /// Compressed digests; only once every node of the cluster decodes them.
    V1 = 1,
}

impl ProtocolVersion {
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ProtocolVersion::V0),
            1 => Some(ProtocolVersion::V1),
            _ => None,
        }
    }

    pub fn to_code(self) -> u8 {
        self as u8
    }
}

/// What a node knows about one node: enough for a peer to tell what it is missing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeDigest {
    pub heartbeat: Heartbeat,
    pub last_gc_version: Version,
    pub max_version: Version,
}

impl NodeDigest {
    pub fn new(heartbeat: Heartbeat, last_gc_version: Version, max_version: Version) -> Self {
        NodeDigest {
            heartbeat,
            last_gc_version,
            max_version,
        }
    }
}

/// A summary of a node's view of the cluster, one entry per node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Digest {
    pub node_digests: BTreeMap<ChitchatId, NodeDigest>,
}

impl Digest {
    /// Adds (or overwrites) the entry of `chitchat_id`.
    pub fn add_node(&mut self, chitchat_id: ChitchatId, node_digest: NodeDigest) {
        self.node_digests.insert(chitchat_id, node_digest);
    }

    pub fn len(&self) -> usize {
        self.node_digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.node_digests.is_empty()
    }
}

/// One key-value as it travels in a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValueUpdate {
    pub key: String,
    pub value: String,
    pub version: Version,
    pub status: DeletionStatusMutation,
}

/// The part of a delta about one node.
///
/// `from_version_excluded == 0` with a `last_gc_version` above the receiver's state is a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDelta {
    pub chitchat_id: ChitchatId,
    pub from_version_excluded: Version,
    pub last_gc_version: Version,
    /// The last KV version of the delta, or the value of a SetMaxVersion op, or 0.
    pub max_version: Version,
    /// In strictly increasing version order.
    pub key_values: Vec<KeyValueUpdate>,
}

/// Updates for the nodes a peer is behind on, in the sender's priority order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    pub node_deltas: Vec<NodeDelta>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.node_deltas.is_empty()
    }

    pub fn num_key_values(&self) -> usize {
        self.node_deltas.iter().map(|nd| nd.key_values.len()).sum()
    }
}

/// The Scuttlebutt handshake: Syn → SynAck → Ack, and BadCluster for a Syn of another cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChitchatMessage {
    Syn { cluster_id: String, digest: Digest },
    SynAck { digest: Digest, delta: Delta },
    Ack { delta: Delta },
    BadCluster,
}

impl ChitchatMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            ChitchatMessage::Syn { .. } => "syn",
            ChitchatMessage::SynAck { .. } => "syn-ack",
            ChitchatMessage::Ack { .. } => "ack",
            ChitchatMessage::BadCluster => "bad-cluster",
        }
    }
}

/// One datagram: a message and the protocol version it is (or will be) encoded in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChitchatEnvelope {
    pub version: ProtocolVersion,
    pub message: ChitchatMessage,
}
