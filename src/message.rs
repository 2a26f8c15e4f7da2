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
    /// The version of an envelope's version byte; `None` for versions this node cannot decode.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ProtocolVersion::V0),
            1 => Some(ProtocolVersion::V1),
            _ => None,
        }
    }

    /// The envelope's version byte.
    pub fn to_code(self) -> u8 {
        self as u8
    }
}

/// What a node knows about one node: enough for a peer to tell what it is missing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeDigest {
    /// The node's heartbeat as last seen: a peer with an older one learns the node is alive.
    pub heartbeat: Heartbeat,
    /// Versions up to this were garbage-collected: a peer further behind needs a reset.
    pub last_gc_version: Version,
    /// The highest key-value version known: a peer with less is sent the rest.
    pub max_version: Version,
}

impl NodeDigest {
    /// The three fields, in wire order.
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
    /// Ordered by id, as chitchat orders them on the wire.
    pub node_digests: BTreeMap<ChitchatId, NodeDigest>,
}

impl Digest {
    /// Adds (or overwrites) the entry of `chitchat_id`.
    pub fn add_node(&mut self, chitchat_id: ChitchatId, node_digest: NodeDigest) {
        self.node_digests.insert(chitchat_id, node_digest);
    }

    /// Number of nodes summarised.
    pub fn len(&self) -> usize {
        self.node_digests.len()
    }

    /// An empty digest asks a peer for everything.
    pub fn is_empty(&self) -> bool {
        self.node_digests.is_empty()
    }
}

/// One key-value as it travels in a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValueUpdate {
    /// The key, unique within its node.
    pub key: String,
    /// The value: empty for a tombstone, kept while a TTL runs.
    pub value: String,
    /// The owner's version of this write; the receiver applies it only if newer.
    pub version: Version,
    /// Set, deleted, or deleted after a TTL.
    pub status: DeletionStatusMutation,
}

/// The part of a delta about one node.
///
/// `from_version_excluded == 0` with a `last_gc_version` above the receiver's state is a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDelta {
    /// The node the updates are about.
    pub chitchat_id: ChitchatId,
    /// The updates start after this version: the receiver must hold at least it to apply them.
    pub from_version_excluded: Version,
    /// The sender's garbage-collection point for this node (a reset when the receiver is below).
    pub last_gc_version: Version,
    /// The last KV version of the delta, or the value of a SetMaxVersion op, or 0.
    pub max_version: Version,
    /// In strictly increasing version order.
    pub key_values: Vec<KeyValueUpdate>,
}

/// Updates for the nodes a peer is behind on, in the sender's priority order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// At most one per node, in the order they were written.
    pub node_deltas: Vec<NodeDelta>,
}

impl Delta {
    /// Nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.node_deltas.is_empty()
    }

    /// Key-values over every node (what a datagram-full delta managed to carry).
    pub fn num_key_values(&self) -> usize {
        self.node_deltas.iter().map(|nd| nd.key_values.len()).sum()
    }
}

/// The Scuttlebutt handshake: Syn → SynAck → Ack, and BadCluster for a Syn of another cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChitchatMessage {
    /// Opens a round: "this is what I know".
    Syn {
        /// Checked by the receiver: a Syn of another cluster gets [`ChitchatMessage::BadCluster`].
        cluster_id: String,
        /// The sender's view.
        digest: Digest,
    },
    /// The answer to a Syn: the receiver's view, and what the Syn's sender was missing.
    SynAck {
        /// The receiver's view, so the Syn's sender can answer with what it lacks.
        digest: Digest,
        /// What the Syn's digest showed to be missing, as much as fits in one datagram.
        delta: Delta,
    },
    /// Closes the round: what the SynAck's sender was missing.
    Ack {
        /// What the SynAck's digest showed to be missing, as much as fits.
        delta: Delta,
    },
    /// The Syn came from another cluster; it carries nothing.
    BadCluster,
}

impl ChitchatMessage {
    /// A short name for logs and statistics.
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
    /// Replies carry the version of the message they answer.
    pub version: ProtocolVersion,
    /// The message itself.
    pub message: ChitchatMessage,
}
