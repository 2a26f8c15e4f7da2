//! Deltas: a block stream of ops — `00` Node, `01` KeyValue, `02` SetMaxVersion — validated
//! like the reference's `DeltaBuilder`, and the MTU-bounded [`DeltaWriter`].

use std::collections::HashSet;

use super::block_stream::{BlockStreamWriter, max_items_len, read_block_stream};
use super::codec::{Decoder, Encoder};
use super::delta_view::{DeltaView, OP_KEY_VALUE, OP_NODE, OP_SET_MAX_VERSION, read_delta_ops};
use super::error::{DecodeError, EncodeError};
#[cfg(test)]
use super::format::delta_mtu;
use super::format::{BLOCK_THRESHOLD, MAX_STRING_LEN, MAX_UDP_DATAGRAM_PAYLOAD_SIZE, delta_mtu_in};
use super::primitives::{Reader, chitchat_id_len, put_chitchat_id, put_str, put_u8, put_u64};
use crate::message::Delta;
use crate::types::{ChitchatId, DeletionStatusMutation, Version};

/// Tag + last_gc_version + from_version_excluded, besides the id.
const NODE_OP_FIXED_LEN: usize = 1 + 8 + 8;
/// Tag + two string lengths + version + status, besides key and value bytes.
const KV_OP_FIXED_LEN: usize = 1 + 2 + 2 + 8 + 1;
const SET_MAX_VERSION_OP_LEN: usize = 1 + 8;

/// The largest `key.len() + value.len()` of a key-value that fits, alone with its node op, in
/// the delta of an Ack (the largest delta a node sends): a larger one could never be gossiped
/// and would stall its node's replication.
pub(crate) fn max_key_value_len(chitchat_id: &ChitchatId) -> usize {
    max_key_value_len_in(MAX_UDP_DATAGRAM_PAYLOAD_SIZE, chitchat_id)
}

/// [`max_key_value_len`] for datagrams of at most `datagram` bytes.
pub(crate) fn max_key_value_len_in(datagram: usize, chitchat_id: &ChitchatId) -> usize {
    let mtu = delta_mtu_in(datagram, 0);
    let ops_len = max_items_len(mtu, BLOCK_THRESHOLD.min(mtu));
    ops_len.saturating_sub(NODE_OP_FIXED_LEN + chitchat_id_len(chitchat_id) + KV_OP_FIXED_LEN)
}

/// Why the writer refused an op; `DeltaWriter` reports only `false`, `encode_delta` needs more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Over the mtu: the normal end of a delta.
    TooLarge,
    StringTooLong {
        what: &'static str,
        len: usize,
    },
    /// No node op accepted yet, or the last node op was refused.
    NoNode,
    DuplicateNode,
    NonIncreasingVersion {
        previous: Version,
        version: Version,
    },
    /// SetMaxVersion below a KV already written: would make a real node panic.
    BelowKeyValueVersion,
    /// An earlier op of this node was refused: accepting later ones would leave a gap.
    NodeTruncated,
}

/// The node whose ops are being written.
#[derive(Debug, Clone, Copy)]
enum CurrentNode {
    None,
    Open {
        /// What the receiver's `max_version` for this node is so far (KV versions must exceed it).
        max_version: Version,
        /// Highest KV version written for this node (SetMaxVersion must not go below it).
        last_kv_version: Version,
        /// An op of this node was refused: later ones would leave a version gap.
        truncated: bool,
    },
    /// The last node op was refused: its KVs must not attach to the previous node.
    Refused,
}

/// Writes a delta straight into an output buffer, refusing ops that would push the delta over
/// its mtu, with the reference's `DeltaSerializer` size accounting (so truncation decisions
/// match a real node's).
///
/// Unlike the reference it never panics: a tiny mtu just refuses everything (the empty delta
/// `00` is always written), and it refuses any op that would make the delta undecodable or
/// harmful to a real node (KV before a node, repeated node, non-increasing versions, strings
/// over 65 535 bytes, SetMaxVersion below a KV of the same node, KVs of a node after one of its
/// ops was refused). Dropping it without [`DeltaWriter::finish`] still terminates the delta.
pub struct DeltaWriter<'a> {
    stream: BlockStreamWriter<'a>,
    written_nodes: &'a mut HashSet<ChitchatId>,
    mtu: usize,
    current: CurrentNode,
    finished_len: Option<usize>,
}

impl Encoder {
    /// Starts an MTU-bounded delta appended to `out`.
    pub fn delta_writer<'a>(&'a mut self, out: &'a mut Vec<u8>, mtu: usize) -> DeltaWriter<'a> {
        self.written_nodes.clear();
        let stream = BlockStreamWriter::new(
            out,
            &mut self.pending,
            self.cctx.as_mut(),
            BLOCK_THRESHOLD.min(mtu),
        );
        DeltaWriter {
            stream,
            written_nodes: &mut self.written_nodes,
            mtu,
            current: CurrentNode::None,
            finished_len: None,
        }
    }

    /// Appends an owned delta, truncated to `mtu` the way a real node truncates (it stops at
    /// the first node or key-value that does not fit); `usize::MAX` means no truncation.
    /// Returns the delta's length. On error `out` is left as it was.
    pub fn encode_delta(
        &mut self,
        delta: &Delta,
        mtu: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, EncodeError> {
        let start = out.len();
        let result = {
            let mut writer = self.delta_writer(out, mtu);
            match writer.add_owned(delta) {
                Ok(()) => Ok(writer.finish()),
                Err(error) => Err(error),
            }
        };
        if result.is_err() {
            out.truncate(start);
        }
        result
    }
}

impl DeltaWriter<'_> {
    /// Adds a Node op starting the ops of `chitchat_id`. Returns false if it does not fit, if
    /// the id was already written in this delta, or if its node id is over 65 535 bytes.
    pub fn try_add_node(
        &mut self,
        chitchat_id: &ChitchatId,
        last_gc_version: Version,
        from_version_excluded: Version,
    ) -> bool {
        self.add_node(chitchat_id, last_gc_version, from_version_excluded)
            .is_ok()
    }

    /// [`Self::try_add_node`] for a caller whose ids are distinct by construction (the keys of
    /// one map of node states): it skips the duplicate check, whose hashing and id clone were
    /// 2 % of an empty-digest Syn's handling. Ids added this way are not remembered, so mixing
    /// both methods in one delta must not repeat an id.
    pub(crate) fn try_add_distinct_node(
        &mut self,
        chitchat_id: &ChitchatId,
        last_gc_version: Version,
        from_version_excluded: Version,
    ) -> bool {
        self.add_node_op(chitchat_id, last_gc_version, from_version_excluded)
            .is_ok()
    }

    /// Adds a KeyValue op to the current node. Returns false if it does not fit, if there is no
    /// current node, if `version` is not above the node's previous version, if key or value is
    /// over 65 535 bytes, or if an earlier op of this node was refused.
    pub fn try_add_kv(
        &mut self,
        key: &str,
        value: &str,
        version: Version,
        status: DeletionStatusMutation,
    ) -> bool {
        self.add_kv(key, value, version, status).is_ok()
    }

    /// Adds a SetMaxVersion op to the current node. Returns false if it does not fit, if there
    /// is no current node, if it is below a KV version written for this node, or if an earlier
    /// op of this node was refused.
    pub fn try_set_max_version(&mut self, max_version: Version) -> bool {
        self.set_max_version(max_version).is_ok()
    }

    /// Flushes the pending block and writes the `00` terminator; returns the delta's length.
    pub fn finish(mut self) -> usize {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> usize {
        match self.finished_len {
            Some(len) => len,
            None => {
                let len = self.stream.finish();
                self.finished_len = Some(len);
                // Do not keep node ids alive until the next delta.
                self.written_nodes.clear();
                len
            }
        }
    }

    fn fits(&self, op_len: usize) -> bool {
        self.stream.upper_bound_after(op_len) <= self.mtu
    }

    fn add_node(
        &mut self,
        chitchat_id: &ChitchatId,
        last_gc_version: Version,
        from_version_excluded: Version,
    ) -> Result<(), Refusal> {
        // An id over the length limit is refused by `add_node_op`, so it is never remembered.
        self.current = CurrentNode::Refused;
        if self.written_nodes.contains(chitchat_id) {
            return Err(Refusal::DuplicateNode);
        }
        self.add_node_op(chitchat_id, last_gc_version, from_version_excluded)?;
        self.written_nodes.insert(chitchat_id.clone());
        Ok(())
    }

    /// The Node op itself, without the duplicate check.
    fn add_node_op(
        &mut self,
        chitchat_id: &ChitchatId,
        last_gc_version: Version,
        from_version_excluded: Version,
    ) -> Result<(), Refusal> {
        self.current = CurrentNode::Refused;
        if chitchat_id.node_id.len() > MAX_STRING_LEN {
            return Err(Refusal::StringTooLong {
                what: "node id",
                len: chitchat_id.node_id.len(),
            });
        }
        if !self.fits(NODE_OP_FIXED_LEN + chitchat_id_len(chitchat_id)) {
            return Err(Refusal::TooLarge);
        }
        let buf = self.stream.pending();
        put_u8(buf, OP_NODE);
        if put_chitchat_id(buf, chitchat_id).is_err() {
            // Unreachable: the node id length was checked above.
            return Err(Refusal::StringTooLong {
                what: "node id",
                len: chitchat_id.node_id.len(),
            });
        }
        put_u64(buf, last_gc_version);
        put_u64(buf, from_version_excluded);
        self.stream.flush_full_blocks();
        self.current = CurrentNode::Open {
            max_version: 0,
            last_kv_version: 0,
            truncated: false,
        };
        Ok(())
    }

    /// The open node's state, or why ops cannot be added to it.
    fn open_node(&mut self) -> Result<(&mut Version, &mut Version, &mut bool), Refusal> {
        match &mut self.current {
            CurrentNode::Open {
                truncated: true, ..
            } => Err(Refusal::NodeTruncated),
            CurrentNode::Open {
                max_version,
                last_kv_version,
                truncated,
            } => Ok((max_version, last_kv_version, truncated)),
            CurrentNode::None | CurrentNode::Refused => Err(Refusal::NoNode),
        }
    }

    fn add_kv(
        &mut self,
        key: &str,
        value: &str,
        version: Version,
        status: DeletionStatusMutation,
    ) -> Result<(), Refusal> {
        let (max_version, _, truncated) = self.open_node()?;
        if version <= *max_version {
            return Err(Refusal::NonIncreasingVersion {
                previous: *max_version,
                version,
            });
        }
        for (what, s) in [("key", key), ("value", value)] {
            if s.len() > MAX_STRING_LEN {
                *truncated = true;
                return Err(Refusal::StringTooLong { what, len: s.len() });
            }
        }
        if !self.fits(KV_OP_FIXED_LEN + key.len() + value.len()) {
            self.mark_truncated();
            return Err(Refusal::TooLarge);
        }
        let buf = self.stream.pending();
        put_u8(buf, OP_KEY_VALUE);
        // Lengths were checked above.
        let _ = put_str(buf, key, "key");
        let _ = put_str(buf, value, "value");
        put_u64(buf, version);
        put_u8(buf, status.to_code());
        self.stream.flush_full_blocks();
        if let Ok((max_version, last_kv_version, _)) = self.open_node() {
            *max_version = version;
            *last_kv_version = version;
        }
        Ok(())
    }

    fn set_max_version(&mut self, new_max_version: Version) -> Result<(), Refusal> {
        let (_, last_kv_version, _) = self.open_node()?;
        if new_max_version < *last_kv_version {
            return Err(Refusal::BelowKeyValueVersion);
        }
        if !self.fits(SET_MAX_VERSION_OP_LEN) {
            self.mark_truncated();
            return Err(Refusal::TooLarge);
        }
        let buf = self.stream.pending();
        put_u8(buf, OP_SET_MAX_VERSION);
        put_u64(buf, new_max_version);
        self.stream.flush_full_blocks();
        if let Ok((max_version, _, _)) = self.open_node() {
            *max_version = new_max_version;
        }
        Ok(())
    }

    fn mark_truncated(&mut self) {
        if let CurrentNode::Open { truncated, .. } = &mut self.current {
            *truncated = true;
        }
    }

    /// Writes an owned delta the way the reference serializes one (SetMaxVersion only for a
    /// node with no KV and a max version above 0), stopping at the first op over the mtu.
    fn add_owned(&mut self, delta: &Delta) -> Result<(), EncodeError> {
        for node_delta in &delta.node_deltas {
            let id = &node_delta.chitchat_id;
            let added = self.add_node(
                id,
                node_delta.last_gc_version,
                node_delta.from_version_excluded,
            );
            if !owned_op_ok(added, id)? {
                return Ok(());
            }
            for kv in &node_delta.key_values {
                let added = self.add_kv(&kv.key, &kv.value, kv.version, kv.status);
                if !owned_op_ok(added, id)? {
                    return Ok(());
                }
            }
            // As the reference for a node without KVs; after KVs too when the max version is
            // above the last KV's (our own writer sends that), so that every delta the decoder
            // accepts re-encodes to itself.
            let last_kv_version = node_delta.key_values.last().map_or(0, |kv| kv.version);
            if node_delta.max_version > last_kv_version {
                // Like the reference, a SetMaxVersion that does not fit is not the end.
                let _ = owned_op_ok(self.set_max_version(node_delta.max_version), id)?;
            }
        }
        Ok(())
    }
}

/// Ok(true) if the op was written, Ok(false) if it was over the mtu (end of the delta), Err if
/// the owned delta cannot be encoded at all.
fn owned_op_ok(result: Result<(), Refusal>, id: &ChitchatId) -> Result<bool, EncodeError> {
    match result {
        Ok(()) => Ok(true),
        Err(Refusal::TooLarge | Refusal::NodeTruncated) => Ok(false),
        Err(Refusal::StringTooLong { what, len }) => Err(EncodeError::StringTooLong { what, len }),
        Err(Refusal::DuplicateNode) => Err(EncodeError::DuplicateNode(format!("{id:?}"))),
        Err(Refusal::NonIncreasingVersion { previous, version }) => {
            Err(EncodeError::NonIncreasingVersion {
                node: format!("{id:?}"),
                previous,
                version,
            })
        }
        // Owned deltas always start with a node op and emit SetMaxVersion only without KVs.
        Err(Refusal::NoNode | Refusal::BelowKeyValueVersion) => Ok(false),
    }
}

impl Drop for DeltaWriter<'_> {
    /// Guarantees the output holds a terminated delta even if `finish` was not called.
    fn drop(&mut self) {
        self.finish_inner();
    }
}

impl Decoder {
    /// Reads a delta and validates its op sequence like the reference's `DeltaBuilder`.
    pub(crate) fn decode_delta(&mut self, reader: &mut Reader<'_>) -> Result<Delta, DecodeError> {
        let Decoder {
            dctx,
            block,
            stream,
            ..
        } = self;
        decode_delta_with(reader, dctx.as_mut(), block, stream).map(|view| view.to_delta())
    }
}

/// Decodes a delta in place (see [`DeltaView`]), with the decoder's parts passed separately so
/// that a digest view can keep borrowing another of its buffers meanwhile.
pub(crate) fn decode_delta_with<'i: 'o, 'o>(
    reader: &mut Reader<'i>,
    dctx: Option<&mut zstd::zstd_safe::DCtx<'static>>,
    block: &mut [u8],
    stream: &'o mut Vec<u8>,
) -> Result<DeltaView<'o>, DecodeError> {
    let payload = read_block_stream(reader, dctx, block, stream)?;
    read_delta_ops(payload)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::message::{KeyValueUpdate, NodeDelta};
    use crate::wire::testing::{arb_delta, arb_status};

    fn node(port: u16) -> ChitchatId {
        ChitchatId::for_local_test(port)
    }

    /// Whether a delta of `id` with one key-value of `len` bytes (key + value) fits an Ack.
    fn single_kv_fits(id: &ChitchatId, len: usize) -> bool {
        let mut encoder = Encoder::new();
        let mut out = Vec::new();
        let mut writer = encoder.delta_writer(&mut out, delta_mtu(0));
        assert!(writer.try_add_node(id, 0, 0));
        // An incompressible value would not change the bound: the writer counts pending bytes
        // uncompressed.
        writer.try_add_kv("k", &"x".repeat(len - 1), 1, DeletionStatusMutation::Set)
    }

    #[test]
    fn max_key_value_len_is_exactly_what_an_ack_delta_takes() {
        for id in [
            node(10_001),
            ChitchatId::new("n", 7, "[::1]:7280".parse().unwrap()),
            ChitchatId::new(
                "a-much-longer-node-name".repeat(20),
                1,
                "127.0.0.1:1".parse().unwrap(),
            ),
        ] {
            let limit = max_key_value_len(&id);
            assert!(limit > 60_000, "{limit}");
            assert!(single_kv_fits(&id, limit), "{id:?}: {limit} must fit");
            assert!(
                !single_kv_fits(&id, limit + 1),
                "{id:?}: {} must not fit",
                limit + 1
            );
        }
    }

    fn decode(bytes: &[u8]) -> Result<Delta, DecodeError> {
        let mut reader = Reader::new(bytes);
        let delta = Decoder::new().decode_delta(&mut reader)?;
        assert!(reader.is_empty(), "delta not fully consumed");
        Ok(delta)
    }

    fn encode(delta: &Delta) -> Vec<u8> {
        let mut out = Vec::new();
        let len = Encoder::new()
            .encode_delta(delta, usize::MAX, &mut out)
            .unwrap();
        assert_eq!(len, out.len());
        out
    }

    /// Runs `ops` on a writer of `mtu`; returns the bytes after checking they decode.
    fn write_with(mtu: usize, ops: impl FnOnce(&mut DeltaWriter<'_>)) -> (Vec<u8>, Delta) {
        let mut encoder = Encoder::new();
        let mut out = Vec::new();
        let mut writer = encoder.delta_writer(&mut out, mtu);
        ops(&mut writer);
        let len = writer.finish();
        assert_eq!(len, out.len());
        let delta = decode(&out).unwrap();
        (out, delta)
    }

    fn kv(writer: &mut DeltaWriter<'_>, key: &str, value: &str, version: Version) -> bool {
        writer.try_add_kv(key, value, version, DeletionStatusMutation::Set)
    }

    #[test]
    fn empty_delta_is_one_byte() {
        assert_eq!(encode(&Delta::default()), [0]);
        assert_eq!(decode(&[0]).unwrap(), Delta::default());
        for mtu in [0, 1, 100, usize::MAX] {
            let (bytes, _) = write_with(mtu, |_| {});
            assert_eq!(bytes, [0]);
        }
    }

    #[test]
    fn set_max_version_delta_is_57_bytes() {
        let (bytes, delta) = write_with(198, |w| {
            assert!(w.try_add_node(&node(10_001), 80, 50));
            assert!(w.try_set_max_version(100));
        });
        assert_eq!(bytes.len(), 57);
        assert_eq!(delta.node_deltas[0].max_version, 100);
        assert_eq!(delta.node_deltas[0].last_gc_version, 80);
        assert_eq!(delta.node_deltas[0].from_version_excluded, 50);
    }

    #[test]
    fn set_max_version_delta_bytes_match_spec() {
        let delta = Delta {
            node_deltas: vec![NodeDelta {
                chitchat_id: node(10_001),
                from_version_excluded: 9,
                last_gc_version: 7,
                max_version: 12,
                key_values: Vec::new(),
            }],
        };
        let bytes = encode(&delta);
        let mut expected = vec![0x02, 0x35, 0x00, 0x00];
        put_chitchat_id(&mut expected, &node(10_001)).unwrap();
        expected.extend_from_slice(&7u64.to_le_bytes());
        expected.extend_from_slice(&9u64.to_le_bytes());
        expected.push(0x02);
        expected.extend_from_slice(&12u64.to_le_bytes());
        expected.push(0x00);
        assert_eq!(bytes, expected);
        assert_eq!(bytes.len(), 57);
        assert_eq!(decode(&bytes).unwrap(), delta);
    }

    #[test]
    fn two_nodes_four_kvs_compress_to_98_bytes() {
        let (bytes, delta) = write_with(198, |w| {
            assert!(w.try_add_node(&node(10_001), 0, 0));
            assert!(kv(w, "key11", "val11", 1));
            assert!(w.try_add_kv("key12", "", 2, DeletionStatusMutation::Delete));
            assert!(w.try_add_node(&node(10_002), 0, 0));
            assert!(kv(w, "key21", "val21", 2));
            assert!(kv(w, "key22", "val22", 3));
        });
        assert_eq!(bytes.len(), 98);
        assert_eq!(bytes[0], 0x01, "compressed block");
        assert_eq!(delta.num_key_values(), 4);
        assert_eq!(delta.node_deltas[0].max_version, 2);
        assert_eq!(delta.node_deltas[1].max_version, 3);
        // The owned delta encodes to the very same bytes.
        assert_eq!(encode(&delta), bytes);
    }

    /// node-10001 with key11/key12, then node-10002 (the §6.4 scenarios).
    fn two_nodes(w: &mut DeltaWriter<'_>, second_from: Version) -> bool {
        assert!(w.try_add_node(&node(10_001), 0, 0));
        assert!(kv(w, "key11", "val11", 1));
        assert!(kv(w, "key12", "val12", 2));
        w.try_add_node(&node(10_002), 0, second_from)
    }

    #[test]
    fn mtu_140_and_155_fit_the_second_node_in_80_bytes() {
        for mtu in [140, 155] {
            let (bytes, delta) = write_with(mtu, |w| assert!(two_nodes(w, 0)));
            assert_eq!(bytes.len(), 80, "mtu {mtu}");
            assert_eq!(delta.node_deltas.len(), 2);
            assert_eq!(delta.node_deltas[1].max_version, 0);
        }
    }

    #[test]
    fn mtu_100_refuses_the_second_node_72_bytes() {
        let (bytes, delta) = write_with(100, |w| assert!(!two_nodes(w, 1)));
        assert_eq!(bytes.len(), 72);
        assert_eq!(delta.node_deltas.len(), 1);
        // With the threshold at the mtu: 3 + 92 + 44 + 1 = 140 fits 140, not 139.
        let (_, delta) = write_with(140, |w| assert!(two_nodes(w, 1)));
        assert_eq!(delta.node_deltas.len(), 2);
        let (_, delta) = write_with(139, |w| assert!(!two_nodes(w, 1)));
        assert_eq!(delta.node_deltas.len(), 1);
    }

    #[test]
    fn mtu_100_refuses_a_long_value_72_bytes() {
        let (bytes, delta) = write_with(100, |w| {
            assert!(w.try_add_node(&node(10_001), 0, 1));
            assert!(kv(w, "key11", "val11", 1));
            assert!(!kv(w, "key12", "val12aaaaaaaaaabcc", 2));
        });
        assert_eq!(bytes.len(), 72);
        assert_eq!(delta.num_key_values(), 1);
    }

    #[test]
    fn small_mtu_refuses_instead_of_panicking() {
        let (bytes, delta) = write_with(62, |w| {
            assert!(w.try_add_node(&node(10_001), 0, 1));
            assert!(!kv(w, "key11", "val11", 1));
            assert!(!kv(w, "key12", "val12", 2));
            assert!(!w.try_set_max_version(2));
        });
        assert_eq!(bytes.len(), 3 + 44 + 1);
        assert_eq!(delta.node_deltas.len(), 1);
        for mtu in 0..48 {
            let (bytes, _) = write_with(mtu, |w| {
                assert!(!w.try_add_node(&node(10_001), 0, 1));
                assert!(!kv(w, "k", "v", 1));
            });
            assert_eq!(bytes, [0]);
        }
        let (bytes, _) = write_with(48, |w| assert!(w.try_add_node(&node(10_001), 0, 1)));
        assert_eq!(bytes.len(), 48);
    }

    #[test]
    fn op_larger_than_a_block_counts_every_block_header() {
        // node (44) + KV "k" (15 + value): four raw blocks. The reference's bound (one extra
        // header) would accept a value of 65 437 bytes and produce 65 509 > 65 503 bytes.
        let mtu = 65_503;
        let random = make_value(65_437, 7);
        let (bytes, delta) = write_with(mtu, |w| {
            assert!(w.try_add_node(&node(10_001), 0, 0));
            assert!(!kv(w, "k", &random, 1));
        });
        assert_eq!(delta.num_key_values(), 0);
        assert_eq!(bytes.len(), 48);
        let (bytes, delta) = write_with(mtu, |w| {
            assert!(w.try_add_node(&node(10_001), 0, 0));
            assert!(kv(w, "k", &random[..65_431], 1));
        });
        assert_eq!(delta.num_key_values(), 1);
        assert!(bytes.len() <= mtu);
    }

    #[test]
    fn writer_refuses_undecodable_or_harmful_ops() {
        write_with(usize::MAX, |w| {
            assert!(!kv(w, "k", "v", 1), "KV before any node");
            assert!(!w.try_set_max_version(1), "SetMaxVersion before any node");
            assert!(w.try_add_node(&node(1), 0, 0));
            assert!(!kv(w, "k", "v", 0), "version 0 is not above 0");
            assert!(kv(w, "k", "v", 5));
            assert!(!kv(w, "k", "v", 5), "equal version");
            assert!(!kv(w, "k", "v", 4), "lower version");
            assert!(!w.try_set_max_version(4), "SetMaxVersion below a KV");
            assert!(w.try_set_max_version(5));
            assert!(w.try_set_max_version(9));
            assert!(!kv(w, "k", "v", 9), "KV not above SetMaxVersion");
            assert!(kv(w, "k", "v", 10));
            assert!(!w.try_add_node(&node(1), 0, 0), "same node twice");
            assert!(!kv(w, "k", "v", 11), "KV after a refused node");
            assert!(w.try_add_node(&node(2), 0, 0));
            assert!(!kv(w, &"k".repeat(65_536), "v", 1), "key too long");
            assert!(!kv(w, "k", "v", 2), "KV after a refused KV of the node");
            assert!(!w.try_set_max_version(3));
            assert!(w.try_add_node(&node(3), 0, 0));
            assert!(!kv(w, "k", &"v".repeat(65_536), 1), "value too long");
            let long_id = ChitchatId::new("n".repeat(65_536), 0, "127.0.0.1:1".parse().unwrap());
            assert!(!w.try_add_node(&long_id, 0, 0));
            assert!(w.try_add_node(&node(4), 0, 0));
            assert!(
                kv(w, &"k".repeat(65_535), &"v".repeat(65_535), 1),
                "longest strings"
            );
        });
    }

    #[test]
    fn a_refused_kv_truncates_its_node_only() {
        let (_, delta) = write_with(200, |w| {
            assert!(w.try_add_node(&node(1), 0, 0));
            assert!(!kv(w, "k", &"v".repeat(300), 1));
            assert!(!kv(w, "k", "small", 2), "would leave a gap");
            assert!(w.try_add_node(&node(2), 0, 0));
            assert!(kv(w, "k", "small", 1));
        });
        assert_eq!(delta.node_deltas.len(), 2);
        assert_eq!(delta.node_deltas[0].max_version, 0);
        assert_eq!(delta.node_deltas[1].max_version, 1);
    }

    #[test]
    fn dropping_the_writer_terminates_the_delta() {
        let mut encoder = Encoder::new();
        let mut out = vec![9, 9];
        {
            let mut writer = encoder.delta_writer(&mut out, 1_000);
            assert!(writer.try_add_node(&node(1), 0, 0));
        }
        assert_eq!(decode(&out[2..]).unwrap().node_deltas.len(), 1);
    }

    #[test]
    fn large_delta_spans_several_blocks() {
        let mut delta = Delta::default();
        for n in 0..40u16 {
            let mut node_delta = NodeDelta {
                chitchat_id: node(n),
                from_version_excluded: 0,
                last_gc_version: 0,
                max_version: 0,
                key_values: Vec::new(),
            };
            for v in 1..=30u64 {
                node_delta.key_values.push(KeyValueUpdate {
                    key: format!("key-{v}"),
                    value: format!(
                        "{:x}",
                        (u64::from(n) * 7_919 + v).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    )
                    .repeat(8),
                    version: v,
                    status: DeletionStatusMutation::Set,
                });
                node_delta.max_version = v;
            }
            delta.node_deltas.push(node_delta);
        }
        let bytes = encode(&delta);
        assert_eq!(decode(&bytes).unwrap(), delta);
        // Truncated to a datagram: a prefix of the nodes, each a prefix of its KVs.
        let mut out = Vec::new();
        let len = Encoder::new()
            .encode_delta(&delta, 20_000, &mut out)
            .unwrap();
        assert!(len <= 20_000);
        let truncated = decode(&out).unwrap();
        assert!(truncated.node_deltas.len() < delta.node_deltas.len());
        for (got, full) in truncated.node_deltas.iter().zip(&delta.node_deltas) {
            assert_eq!(got.chitchat_id, full.chitchat_id);
            assert_eq!(got.key_values[..], full.key_values[..got.key_values.len()]);
        }
    }

    #[test]
    fn encode_delta_rejects_invalid_owned_deltas() {
        let node_delta = |id: u16, versions: &[u64]| NodeDelta {
            chitchat_id: node(id),
            from_version_excluded: 0,
            last_gc_version: 0,
            max_version: versions.last().copied().unwrap_or(0),
            key_values: versions
                .iter()
                .map(|&version| KeyValueUpdate {
                    key: "k".to_string(),
                    value: "v".to_string(),
                    version,
                    status: DeletionStatusMutation::Set,
                })
                .collect(),
        };
        let mut encoder = Encoder::new();
        let mut out = vec![7];
        let dup = Delta {
            node_deltas: vec![node_delta(1, &[1]), node_delta(1, &[2])],
        };
        assert!(matches!(
            encoder.encode_delta(&dup, usize::MAX, &mut out),
            Err(EncodeError::DuplicateNode(_))
        ));
        let unordered = Delta {
            node_deltas: vec![node_delta(1, &[2, 2])],
        };
        assert!(matches!(
            encoder.encode_delta(&unordered, usize::MAX, &mut out),
            Err(EncodeError::NonIncreasingVersion {
                previous: 2,
                version: 2,
                ..
            })
        ));
        let zero = Delta {
            node_deltas: vec![node_delta(1, &[0])],
        };
        assert!(encoder.encode_delta(&zero, usize::MAX, &mut out).is_err());
        assert_eq!(out, [7], "output untouched on error");
    }

    /// Raw op-stream bytes wrapped in one uncompressed block.
    fn stream_of(ops: &[u8]) -> Vec<u8> {
        let mut bytes = vec![2];
        bytes.extend_from_slice(&(ops.len() as u16).to_le_bytes());
        bytes.extend_from_slice(ops);
        bytes.push(0);
        bytes
    }

    fn node_op(port: u16) -> Vec<u8> {
        let mut op = vec![OP_NODE];
        put_chitchat_id(&mut op, &node(port)).unwrap();
        op.extend_from_slice(&[0; 16]);
        op
    }

    fn kv_op(version: u64, status: u8) -> Vec<u8> {
        let mut op = vec![OP_KEY_VALUE, 1, 0, b'k', 1, 0, b'v'];
        op.extend_from_slice(&version.to_le_bytes());
        op.push(status);
        op
    }

    fn max_op(version: u64) -> Vec<u8> {
        let mut op = vec![OP_SET_MAX_VERSION];
        op.extend_from_slice(&version.to_le_bytes());
        op
    }

    #[test]
    fn decoder_validates_like_the_reference() {
        let ok = [
            node_op(1),
            kv_op(1, 0),
            kv_op(3, 2),
            node_op(2),
            max_op(7),
            max_op(5),
        ]
        .concat();
        let delta = decode(&stream_of(&ok)).unwrap();
        assert_eq!(delta.node_deltas[0].max_version, 3);
        assert_eq!(
            delta.node_deltas[1].max_version, 5,
            "last SetMaxVersion wins"
        );

        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (kv_op(1, 0), DecodeError::OpBeforeNode),
            (max_op(1), DecodeError::OpBeforeNode),
            (
                [node_op(1), node_op(2), node_op(1)].concat(),
                DecodeError::DuplicateNode("node-1:0:127.0.0.1:1".to_string()),
            ),
            (
                [node_op(1), kv_op(0, 0)].concat(),
                DecodeError::NonIncreasingVersion {
                    previous: 0,
                    version: 0,
                },
            ),
            (
                [node_op(1), kv_op(2, 0), kv_op(2, 0)].concat(),
                DecodeError::NonIncreasingVersion {
                    previous: 2,
                    version: 2,
                },
            ),
            (
                [node_op(1), max_op(5), kv_op(5, 0)].concat(),
                DecodeError::NonIncreasingVersion {
                    previous: 5,
                    version: 5,
                },
            ),
            (
                [node_op(1), kv_op(1, 3)].concat(),
                DecodeError::UnknownStatus(3),
            ),
            ([node_op(1), vec![3]].concat(), DecodeError::UnknownOpTag(3)),
            (
                [node_op(1), vec![OP_KEY_VALUE, 1, 0, 0xc3]].concat(),
                DecodeError::InvalidUtf8 { what: "key" },
            ),
            (
                node_op(1)[..20].to_vec(),
                DecodeError::Truncated {
                    what: "IPv4 address",
                },
            ),
        ];
        for (ops, expected) in cases {
            assert_eq!(
                decode(&stream_of(&ops)),
                Err(expected.clone()),
                "{expected}"
            );
        }
        // Ops straddling blocks are fine: one byte per block.
        let mut bytes = Vec::new();
        for byte in &ok {
            bytes.extend_from_slice(&[2, 1, 0, *byte]);
        }
        bytes.push(0);
        assert_eq!(decode(&bytes).unwrap(), delta);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Node {
            id: u16,
            gc: u64,
            from: u64,
        },
        Kv {
            key_len: usize,
            value_len: usize,
            seed: u64,
            version: u64,
            status: DeletionStatusMutation,
        },
        SetMax(u64),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0u16..12, 0u64..50, 0u64..50).prop_map(|(id, gc, from)| Op::Node { id, gc, from }),
            5 => (0usize..40, prop_oneof![0usize..100, 0usize..20_000], any::<u64>(), 0u64..60, arb_status())
                .prop_map(|(key_len, value_len, seed, version, status)| Op::Kv { key_len, value_len, seed, version, status }),
            1 => (0u64..60).prop_map(Op::SetMax),
        ]
    }

    /// A value of `len` bytes: compressible for even seeds, pseudo-random otherwise.
    fn make_value(len: usize, seed: u64) -> String {
        if seed.is_multiple_of(2) {
            return "ab".repeat(len / 2 + 1)[..len].to_string();
        }
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'!' + (state % 90) as u8)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn owned_delta_round_trip(delta in arb_delta(8, 20)) {
            let bytes = encode(&delta);
            prop_assert_eq!(decode(&bytes).unwrap(), delta);
        }

        #[test]
        fn delta_writer_output_decodes_fits_and_is_safe(
            ops in proptest::collection::vec(arb_op(), 0..80),
            mtu in prop_oneof![0usize..200, 0usize..70_000, Just(65_503usize)],
        ) {
            let mut encoder = Encoder::new();
            let mut out = Vec::new();
            let mut expected = Delta::default();
            // Whether the ops since the last accepted node attach to it.
            let mut attached = false;
            let mut last_kv_version = 0;
            {
                let mut writer = encoder.delta_writer(&mut out, mtu);
                for op in ops {
                    match op {
                        Op::Node { id, gc, from } => {
                            let accepted = writer.try_add_node(&node(id), gc, from);
                            attached = accepted;
                            if accepted {
                                last_kv_version = 0;
                                expected.node_deltas.push(NodeDelta {
                                    chitchat_id: node(id),
                                    from_version_excluded: from,
                                    last_gc_version: gc,
                                    max_version: 0,
                                    key_values: Vec::new(),
                                });
                            }
                        }
                        Op::Kv { key_len, value_len, seed, version, status } => {
                            let key = make_value(key_len, seed.wrapping_add(1));
                            let value = make_value(value_len, seed);
                            if writer.try_add_kv(&key, &value, version, status) {
                                prop_assert!(attached);
                                let nd = expected.node_deltas.last_mut().unwrap();
                                prop_assert!(version > nd.max_version);
                                nd.max_version = version;
                                last_kv_version = version;
                                nd.key_values.push(KeyValueUpdate { key, value, version, status });
                            }
                        }
                        Op::SetMax(max_version) => {
                            if writer.try_set_max_version(max_version) {
                                prop_assert!(attached);
                                prop_assert!(max_version >= last_kv_version);
                                expected.node_deltas.last_mut().unwrap().max_version = max_version;
                            }
                        }
                    }
                }
                let len = writer.finish();
                prop_assert!(len <= mtu.max(1), "len {} > mtu {}", len, mtu);
            }
            let decoded = decode(&out).unwrap();
            prop_assert_eq!(&decoded, &expected);
            for nd in &decoded.node_deltas {
                prop_assert!(nd.key_values.iter().all(|kv| kv.version <= nd.max_version));
            }
        }

        #[test]
        fn op_stream_decoder_never_panics(ops in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&stream_of(&ops));
        }
    }
}
