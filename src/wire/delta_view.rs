//! A received delta read in place: node ids, keys and values borrowed from the decompressed op
//! stream, so decoding a delta takes two allocations whatever it carries. The owned
//! [`Delta`] allocated an id per node and a key and a value per key-value, and applying it
//! copied both again; at a 1,000-node cold start, where a SynAck carries up to 64 KB of
//! key-values and a third of its node deltas turn out stale, that was 7 % of the process's
//! CPU in `malloc` under `decode_delta` alone (perf, issue 11). Only what is applied is copied.
//!
//! Validation is the reference's `DeltaBuilder`'s, done here once: the owned decoder
//! ([`Decoder::decode_delta`](super::Decoder)) is this view turned into a [`Delta`].

use std::collections::HashSet;
use std::ops::Range;

use super::error::DecodeError;
use super::primitives::{ChitchatIdRef, Reader};
use crate::message::{Delta, KeyValueUpdate, NodeDelta};
use crate::types::{DeletionStatusMutation, Version};

pub(super) const OP_NODE: u8 = 0;
pub(super) const OP_KEY_VALUE: u8 = 1;
pub(super) const OP_SET_MAX_VERSION: u8 = 2;

/// Up to this many node deltas, duplicates are found by comparing with each earlier one;
/// beyond, with a hash set (a full datagram holds about a thousand).
const LINEAR_DUPLICATE_SCAN: usize = 16;

/// One key-value of a delta, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyValueRef<'a> {
    /// The key, unique within its node.
    pub key: &'a str,
    /// The value: empty for a tombstone.
    pub value: &'a str,
    /// The owner's version of this write.
    pub version: Version,
    /// Set, deleted, or deleted after a TTL.
    pub status: DeletionStatusMutation,
}

/// The part of a delta about one node, borrowed (see [`NodeDelta`] for the fields' meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeDeltaRef<'v, 'a> {
    /// The node the updates are about.
    pub chitchat_id: ChitchatIdRef<'a>,
    /// The updates start after this version.
    pub from_version_excluded: Version,
    /// The sender's garbage-collection point for this node.
    pub last_gc_version: Version,
    /// The last key-value version, or the value of a SetMaxVersion op, or 0.
    pub max_version: Version,
    /// In strictly increasing version order.
    pub key_values: &'v [KeyValueRef<'a>],
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeHeader<'a> {
    chitchat_id: ChitchatIdRef<'a>,
    from_version_excluded: Version,
    last_gc_version: Version,
    max_version: Version,
    key_values: Range<usize>,
}

/// A decoded delta borrowing its strings: from a datagram's op stream
/// ([`Decoder::decode_view`](super::Decoder::decode_view)) or from an owned [`Delta`]
/// ([`DeltaView::of`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaView<'a> {
    nodes: Vec<NodeHeader<'a>>,
    key_values: Vec<KeyValueRef<'a>>,
}

impl<'a> DeltaView<'a> {
    /// A view of an owned delta (allocates two vectors, copies no string).
    pub fn of(delta: &'a Delta) -> Self {
        DeltaView::of_node_deltas(&delta.node_deltas)
    }

    /// A view of owned node deltas.
    pub fn of_node_deltas(node_deltas: &'a [NodeDelta]) -> Self {
        let mut view = DeltaView {
            nodes: Vec::with_capacity(node_deltas.len()),
            key_values: Vec::with_capacity(node_deltas.iter().map(|n| n.key_values.len()).sum()),
        };
        for node_delta in node_deltas {
            let start = view.key_values.len();
            view.key_values
                .extend(node_delta.key_values.iter().map(|kv| KeyValueRef {
                    key: &kv.key,
                    value: &kv.value,
                    version: kv.version,
                    status: kv.status,
                }));
            view.nodes.push(NodeHeader {
                chitchat_id: ChitchatIdRef::from(&node_delta.chitchat_id),
                from_version_excluded: node_delta.from_version_excluded,
                last_gc_version: node_delta.last_gc_version,
                max_version: node_delta.max_version,
                key_values: start..view.key_values.len(),
            });
        }
        view
    }

    /// Nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Number of node deltas.
    pub fn num_node_deltas(&self) -> usize {
        self.nodes.len()
    }

    /// Key-values over every node.
    pub fn num_key_values(&self) -> usize {
        self.key_values.len()
    }

    /// The node deltas, in the order they were written.
    pub fn node_deltas(&self) -> impl ExactSizeIterator<Item = NodeDeltaRef<'_, 'a>> + '_ {
        self.nodes.iter().map(|node| NodeDeltaRef {
            chitchat_id: node.chitchat_id,
            from_version_excluded: node.from_version_excluded,
            last_gc_version: node.last_gc_version,
            max_version: node.max_version,
            key_values: &self.key_values[node.key_values.clone()],
        })
    }

    /// An owned copy.
    pub fn to_delta(&self) -> Delta {
        Delta {
            node_deltas: self.node_deltas().map(|n| n.to_node_delta()).collect(),
        }
    }
}

impl NodeDeltaRef<'_, '_> {
    /// An owned copy.
    pub fn to_node_delta(&self) -> NodeDelta {
        NodeDelta {
            chitchat_id: self.chitchat_id.to_owned_id(),
            from_version_excluded: self.from_version_excluded,
            last_gc_version: self.last_gc_version,
            max_version: self.max_version,
            key_values: self
                .key_values
                .iter()
                .map(|kv| KeyValueUpdate {
                    key: kv.key.to_string(),
                    value: kv.value.to_string(),
                    version: kv.version,
                    status: kv.status,
                })
                .collect(),
        }
    }
}

/// Reads the op stream of a delta (the block stream's payload) and validates it like the
/// reference's `DeltaBuilder`: known op tags and statuses, no op before a Node op, one Node op
/// per id, strictly increasing versions within a node, no SetMaxVersion below a key-value.
pub(super) fn read_delta_ops(payload: &[u8]) -> Result<DeltaView<'_>, DecodeError> {
    let mut ops = Reader::new(payload);
    let mut view = DeltaView::default();
    // Filled only past LINEAR_DUPLICATE_SCAN nodes, so that small deltas allocate no set.
    let mut seen: HashSet<ChitchatIdRef<'_>> = HashSet::new();
    while !ops.is_empty() {
        match ops.u8("op tag")? {
            OP_NODE => {
                let chitchat_id = ops.chitchat_id_ref()?;
                let last_gc_version = ops.u64("last gc version")?;
                let from_version_excluded = ops.u64("from version")?;
                let duplicate = if view.nodes.len() < LINEAR_DUPLICATE_SCAN {
                    view.nodes.iter().any(|n| n.chitchat_id == chitchat_id)
                } else {
                    if seen.is_empty() {
                        seen.reserve(4 * LINEAR_DUPLICATE_SCAN);
                        seen.extend(view.nodes.iter().map(|n| n.chitchat_id));
                    }
                    !seen.insert(chitchat_id)
                };
                if duplicate {
                    return Err(DecodeError::DuplicateNode(format!(
                        "{:?}",
                        chitchat_id.to_owned_id()
                    )));
                }
                let start = view.key_values.len();
                view.nodes.push(NodeHeader {
                    chitchat_id,
                    from_version_excluded,
                    last_gc_version,
                    max_version: 0,
                    key_values: start..start,
                });
            }
            OP_KEY_VALUE => {
                let key = ops.str("key")?;
                let value = ops.str("value")?;
                let version = ops.u64("version")?;
                let status_code = ops.u8("status")?;
                let status = DeletionStatusMutation::from_code(status_code)
                    .ok_or(DecodeError::UnknownStatus(status_code))?;
                let node = view.nodes.last_mut().ok_or(DecodeError::OpBeforeNode)?;
                if version <= node.max_version {
                    return Err(DecodeError::NonIncreasingVersion {
                        previous: node.max_version,
                        version,
                    });
                }
                node.max_version = version;
                view.key_values.push(KeyValueRef {
                    key,
                    value,
                    version,
                    status,
                });
                node.key_values.end = view.key_values.len();
            }
            OP_SET_MAX_VERSION => {
                let max_version = ops.u64("max version")?;
                let node = view.nodes.last_mut().ok_or(DecodeError::OpBeforeNode)?;
                // Below a KV of the same delta it would contradict it (our writer refuses to
                // write one; applied, it would lower a node's max version under its own KVs).
                if let Some(kv) = view.key_values[node.key_values.clone()].last()
                    && max_version < kv.version
                {
                    return Err(DecodeError::NonIncreasingVersion {
                        previous: kv.version,
                        version: max_version,
                    });
                }
                node.max_version = max_version;
            }
            tag => return Err(DecodeError::UnknownOpTag(tag)),
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::testing::arb_delta;

    proptest! {
        /// Viewing an owned delta and copying the view back gives the delta.
        #[test]
        fn view_of_an_owned_delta_round_trips(delta in arb_delta(8, 20)) {
            let view = DeltaView::of(&delta);
            prop_assert_eq!(view.num_node_deltas(), delta.node_deltas.len());
            prop_assert_eq!(view.num_key_values(), delta.num_key_values());
            prop_assert_eq!(view.to_delta(), delta);
        }
    }

    #[test]
    fn duplicates_are_found_past_the_linear_scan() {
        use crate::types::ChitchatId;
        use crate::wire::primitives::put_chitchat_id;
        for (count, duplicate_of) in [
            (3u16, 0u16),
            (LINEAR_DUPLICATE_SCAN as u16 + 5, 2),
            (40, 39),
        ] {
            let mut ops = Vec::new();
            for port in 0..count {
                ops.push(OP_NODE);
                put_chitchat_id(&mut ops, &ChitchatId::for_local_test(port)).unwrap();
                ops.extend_from_slice(&[0; 16]);
            }
            assert_eq!(
                read_delta_ops(&ops).unwrap().num_node_deltas(),
                usize::from(count)
            );
            ops.push(OP_NODE);
            put_chitchat_id(&mut ops, &ChitchatId::for_local_test(duplicate_of)).unwrap();
            ops.extend_from_slice(&[0; 16]);
            assert!(
                matches!(read_delta_ops(&ops), Err(DecodeError::DuplicateNode(_))),
                "{count} nodes, then node {duplicate_of} again"
            );
        }
    }
}
