//! Matching a received digest to the node states by wire bytes (issue 11): the cluster state
//! keeps the encoding of every known id, in id order ([`IdTable`]), and an entry is matched by
//! comparing its id's wire bytes with those, a memcmp instead of a parse and a structured
//! comparison. A peer's digest is sorted like ours and usually holds the same ids, so the
//! entry is nearly always the one after the previous match; other entries are looked up in a
//! hash index, and entries that match nothing are the unknown ids, the only ones parsed.
//!
//! The result, [`PeerDigest`], is the peer's node digest of every node state by its position
//! in id order (the dense index both the heartbeat pass and the delta plan walk), plus the
//! unknown entries.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::message::NodeDigest;
use crate::types::ChitchatId;
use crate::wire::{DigestView, KnownIds, put_chitchat_id};

/// heartbeat + last_gc_version + max_version, as a digest entry carries them.
pub(crate) const NODE_DIGEST_LEN: usize = 24;

/// The wire encoding of every known id, in id order (the order of the node-state map), so
/// that position `k` here is the `k`-th node state. Rebuilt when the set of node states
/// changes, which is rare next to the messages matched against it.
/// The encodings are kept as the body of a V0 digest, each id followed by a zeroed 24-byte
/// slot for its node digest, so that the own digest is written as a copy of that body with
/// the slots filled in.
#[derive(Debug)]
pub(crate) struct IdTable {
    /// Every id's encoding followed by its node-digest slot, back to back (an id the wire
    /// cannot carry takes no bytes).
    bytes: Vec<u8>,
    /// Start and end of the `k`-th id in `bytes` (its slot follows).
    spans: Vec<(u32, u32)>,
    /// Ids whose wire bytes do not identify them (an IPv6 flow info or scope id, which the wire
    /// does not carry): never matched by bytes, they take the general path.
    unmatchable: Vec<bool>,
    /// Every id fits the wire (has its encoding in `bytes`).
    all_encodable: bool,
    /// Position of the own id.
    self_position: Option<usize>,
    /// Wire bytes → position, built on the first entry that is not where the walk expects it.
    index: OnceLock<IdIndex>,
    /// Distinct for every table built in this process (see [`KnownIds::token`]).
    token: u64,
}

/// Tokens of the tables built so far.
static TABLES_BUILT: AtomicU64 = AtomicU64::new(0);

/// A keyed hash of an id's wire bytes → its position. Keyed (SipHash, a random key per
/// table) so that received ids cannot be chosen to collide; a collision between two known ids
/// is still handled (by a scan), only slower.
#[derive(Debug)]
struct IdIndex {
    hasher: RandomState,
    positions: HashMap<u64, u32, BuildHasherDefault<PassThrough>>,
    collisions: bool,
}

/// The index's keys are already hashes.
#[derive(Debug, Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

impl IdTable {
    /// The table of `ids`, given in id order.
    pub(crate) fn build<'a>(
        ids: impl ExactSizeIterator<Item = &'a ChitchatId>,
        self_id: Option<&ChitchatId>,
    ) -> Self {
        let mut table = IdTable {
            bytes: Vec::with_capacity(ids.len() * 56),
            spans: Vec::with_capacity(ids.len()),
            unmatchable: Vec::with_capacity(ids.len()),
            all_encodable: true,
            self_position: None,
            index: OnceLock::new(),
            token: TABLES_BUILT.fetch_add(1, Ordering::Relaxed),
        };
        for (position, id) in ids.enumerate() {
            let start = table.bytes.len();
            let end = if put_chitchat_id(&mut table.bytes, id).is_ok() {
                let end = table.bytes.len();
                table.bytes.extend_from_slice(&[0; NODE_DIGEST_LEN]);
                end
            } else {
                table.bytes.truncate(start);
                table.all_encodable = false;
                start
            };
            // Node states are capped (MAX_NODE_STATES ids of at most 65 562 bytes, and their
            // slots) below 4 GiB.
            table.spans.push((
                u32::try_from(start).unwrap_or(u32::MAX),
                u32::try_from(end).unwrap_or(u32::MAX),
            ));
            table.unmatchable.push(!wire_bytes_identify(id));
            if Some(id) == self_id {
                table.self_position = Some(position);
            }
        }
        if u32::try_from(table.bytes.len()).is_err() {
            table.all_encodable = false;
        }
        table
    }

    /// Number of ids (node states).
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    /// Position of the own node state.
    pub(crate) fn self_position(&self) -> Option<usize> {
        self.self_position
    }

    /// The body of a V0 digest of every node state (no count), node-digest slots zeroed.
    pub(crate) fn skeleton(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the `position`-th entry starts in the skeleton.
    pub(crate) fn entry_start(&self, position: usize) -> usize {
        self.spans.get(position).map_or(0, |span| span.0 as usize)
    }

    /// Where the `position`-th node-digest slot starts in the skeleton.
    pub(crate) fn slot_start(&self, position: usize) -> usize {
        self.spans.get(position).map_or(0, |span| span.1 as usize)
    }

    /// Whether every id fits the wire.
    pub(crate) fn all_encodable(&self) -> bool {
        self.all_encodable
    }

    /// The wire encoding of the `position`-th id (empty if the wire cannot carry it).
    #[inline]
    pub(crate) fn id_bytes(&self, position: usize) -> &[u8] {
        let (start, end) = self.spans.get(position).copied().unwrap_or((0, 0));
        self.bytes
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    /// Whether the `position`-th id matches received bytes equal to its encoding.
    #[inline]
    fn matches(&self, position: usize, id_bytes: &[u8]) -> bool {
        self.id_bytes(position) == id_bytes
            && !self.unmatchable.get(position).copied().unwrap_or(true)
    }

    /// The position of the id encoded as `id_bytes`, if known.
    fn find(&self, id_bytes: &[u8]) -> Option<usize> {
        let index = self.index.get_or_init(|| self.build_index());
        let hash = index.hasher.hash_one(id_bytes);
        let position = *index.positions.get(&hash)? as usize;
        if self.matches(position, id_bytes) {
            return Some(position);
        }
        if index.collisions {
            return (0..self.len()).find(|&p| self.matches(p, id_bytes));
        }
        None
    }

    /// Names this table (see [`KnownIds::token`]).
    pub(crate) fn token(&self) -> u64 {
        self.token
    }

    fn build_index(&self) -> IdIndex {
        let hasher = RandomState::new();
        let mut positions =
            HashMap::with_capacity_and_hasher(self.len(), BuildHasherDefault::default());
        let mut collisions = false;
        for position in 0..self.len() {
            let id_bytes = self.id_bytes(position);
            if id_bytes.is_empty() || self.unmatchable.get(position) != Some(&false) {
                continue;
            }
            let hash = hasher.hash_one(id_bytes);
            // Positions are below MAX_NODE_STATES, well within u32.
            let value = u32::try_from(position).unwrap_or(u32::MAX);
            if positions.insert(hash, value).is_some() {
                collisions = true;
            }
        }
        IdIndex {
            hasher,
            positions,
            collisions,
        }
    }
}

/// The scan of a received digest recognises the ids of this table by their bytes (position
/// `k` is the `k`-th node state), so that matching it is a copy per entry.
impl KnownIds for IdTable {
    fn token(&self) -> u64 {
        self.token
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    fn encoding(&self, position: usize) -> &[u8] {
        if self.unmatchable.get(position).copied().unwrap_or(true) {
            return &[];
        }
        self.id_bytes(position)
    }

    fn position_of(&self, id_bytes: &[u8]) -> Option<usize> {
        self.find(id_bytes)
    }
}

/// Whether equal wire bytes mean equal ids: not for IPv6 addresses with a flow info or scope
/// id, which the wire drops (a received id never has them).
fn wire_bytes_identify(id: &ChitchatId) -> bool {
    match id.gossip_advertise_addr {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.flowinfo() == 0 && v6.scope_id() == 0,
    }
}

/// A received digest matched against the node states: the peer's node digest of each state,
/// by position in id order, and the entries about ids we do not hold.
#[derive(Debug, Default)]
pub(crate) struct PeerDigest {
    /// The last entry received about the `k`-th node state, if any.
    by_state: Vec<Option<NodeDigest>>,
    /// Positions (in received order) of the entries about unknown ids, duplicates included.
    unknown: Vec<usize>,
    /// One past the last position matched: states from here on have no entry.
    end: usize,
    /// The cluster state's membership epoch the positions are valid for.
    epoch: u64,
    /// Set by whoever checked, right after the match, that the peer is behind on no node
    /// state (each max_version at most the peer's): its delta is then empty. Cleared by every
    /// match.
    up_to_date: bool,
}

impl PeerDigest {
    /// The membership epoch (see `ClusterState::membership_epoch`) of the table matched.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Matches `digest` against `table`, of membership `epoch`, reusing this value's buffers.
    pub(crate) fn match_table(&mut self, table: &IdTable, epoch: u64, digest: &DigestView<'_>) {
        self.epoch = epoch;
        self.up_to_date = false;
        self.by_state.clear();
        self.by_state.resize(table.len(), None);
        self.unknown.clear();
        self.end = 0;
        if let Some(entries) = digest.known_positions(table.token()) {
            // Scanned with this table: the positions are already known.
            for (position, (known, node_digest)) in entries.enumerate() {
                match known.filter(|&k| k < self.by_state.len()) {
                    Some(k) => {
                        self.by_state[k] = Some(node_digest);
                        self.end = self.end.max(k + 1);
                    }
                    None => self.unknown.push(position),
                }
            }
            return;
        }
        let mut expected = 0;
        for (position, entry) in digest.iter().enumerate() {
            let found = if expected < table.len() && table.matches(expected, entry.id_bytes) {
                Some(expected)
            } else {
                table.find(entry.id_bytes)
            };
            match found {
                Some(k) => {
                    // Later duplicates override earlier ones.
                    self.by_state[k] = Some(entry.digest);
                    expected = k + 1;
                    self.end = self.end.max(k + 1);
                }
                None => self.unknown.push(position),
            }
        }
    }

    /// `digest` matched against `table` (tests).
    #[cfg(test)]
    fn of_table(table: &IdTable, digest: &DigestView<'_>) -> Self {
        let mut peer = PeerDigest::default();
        peer.match_table(table, 0, digest);
        peer
    }

    /// Records that the peer is behind on no node state (or that it may be, `false`).
    pub(crate) fn set_up_to_date(&mut self, up_to_date: bool) {
        self.up_to_date = up_to_date;
    }

    /// Whether the peer was found behind on no node state since the match.
    pub(crate) fn is_up_to_date(&self) -> bool {
        self.up_to_date
    }

    /// The peer's entry about the `k`-th node state.
    pub(crate) fn get(&self, k: usize) -> Option<NodeDigest> {
        self.by_state.get(k).copied().flatten()
    }

    /// Node states past this position have no entry.
    pub(crate) fn end(&self) -> usize {
        self.end
    }

    /// The number of node states matched against.
    pub(crate) fn num_states(&self) -> usize {
        self.by_state.len()
    }

    /// Received positions of the entries about unknown ids.
    pub(crate) fn unknown(&self) -> &[usize] {
        &self.unknown
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use std::collections::BTreeSet;

    use crate::message::Digest;
    use crate::message::ProtocolVersion;
    use crate::types::Heartbeat;
    use crate::wire::Encoder;

    fn version(v1: bool) -> ProtocolVersion {
        if v1 {
            ProtocolVersion::V1
        } else {
            ProtocolVersion::V0
        }
    }

    fn states(ids: &[ChitchatId]) -> BTreeSet<ChitchatId> {
        ids.iter().cloned().collect()
    }

    /// Ids drawn from a small pool, so digests and states share many and collide in names.
    fn arb_id() -> impl Strategy<Value = ChitchatId> {
        let addr = prop_oneof![
            (0u16..4).prop_map(|port| SocketAddr::from(([127, 0, 0, 1], port))),
            (0u16..2).prop_map(|port| SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port))),
            (0u32..2).prop_map(|scope| {
                SocketAddr::V6(std::net::SocketAddrV6::new(
                    std::net::Ipv6Addr::LOCALHOST,
                    1,
                    0,
                    scope,
                ))
            }),
        ];
        ("[ab]{0,2}|é", 0u64..3, addr)
            .prop_map(|(name, generation, addr)| ChitchatId::new(name, generation, addr))
    }

    /// Encodes `entries` in received order as a V0 or V1 digest and decodes its view.
    fn received(entries: &[(ChitchatId, NodeDigest)], v1: bool) -> Vec<u8> {
        let mut out = Vec::new();
        Encoder::new().encode_digest(
            version(v1),
            entries.iter().map(|(id, nd)| (id, *nd)),
            usize::MAX,
            &mut out,
        );
        out
    }

    proptest! {
        /// Matching by wire bytes gives what comparing ids does: for each node state the last
        /// entry received with its id, and as unknown exactly the entries whose id no state has.
        #[test]
        fn matches_the_naive_id_comparison(
            known in proptest::collection::vec(arb_id(), 0..12),
            self_pick in any::<prop::sample::Index>(),
            entries in proptest::collection::vec((arb_id(), 0u64..5), 0..24),
            sorted in any::<bool>(),
            v1 in any::<bool>(),
        ) {
            let states = states(&known);
            let self_id = (!known.is_empty()).then(|| &known[self_pick.index(known.len())]);
            let table = IdTable::build(states.iter(), self_id);
            let mut entries: Vec<(ChitchatId, NodeDigest)> = entries
                .into_iter()
                .map(|(id, hb)| (id, NodeDigest::new(Heartbeat::from(hb), hb, hb + 1)))
                .collect();
            if sorted {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            let bytes = received(&entries, v1);
            let mut decoder = crate::wire::Decoder::new();
            let view = decoder
                .decode_digest_bytes(version(v1), &bytes)
                .unwrap();
            let peer = PeerDigest::of_table(&table, &view);
            prop_assert_eq!(peer.num_states(), states.len());
            // The naive way: received ids (as decoded, so without scope ids) compared with ==.
            let decoded: Vec<(ChitchatId, NodeDigest)> = view
                .iter()
                .map(|entry| (entry.id().to_owned_id(), entry.digest))
                .collect();
            for (k, id) in states.iter().enumerate() {
                let expected = decoded.iter().rev().find(|(d, _)| d == id).map(|(_, nd)| *nd);
                prop_assert_eq!(peer.get(k), expected, "state {:?}", id);
                if expected.is_some() {
                    prop_assert!(k < peer.end());
                }
            }
            let unknown: Vec<usize> = decoded
                .iter()
                .enumerate()
                .filter(|(_, (id, _))| !states.contains(id))
                .map(|(position, _)| position)
                .collect();
            prop_assert_eq!(peer.unknown(), &unknown[..]);
            prop_assert_eq!(
                table.self_position(),
                self_id.map(|id| states.iter().position(|k| k == id).unwrap())
            );
            // Scanned with the table, the same entries, and matched by the positions the scan
            // found: the same result. With another table's token the positions are not used.
            let mut hinted_decoder = crate::wire::Decoder::new();
            let hinted = hinted_decoder
                .decode_digest_bytes_known(version(v1), &bytes, Some(&table))
                .unwrap();
            prop_assert!(hinted.iter().eq(view.iter()));
            prop_assert!(hinted.known_positions(table.token()).is_some());
            let other = IdTable::build(states.iter(), self_id);
            prop_assert!(hinted.known_positions(other.token()).is_none());
            for matched_with in [&table, &other] {
                let hinted_peer = PeerDigest::of_table(matched_with, &hinted);
                prop_assert_eq!(hinted_peer.unknown(), peer.unknown());
                prop_assert_eq!(hinted_peer.end(), peer.end());
                for k in 0..states.len() {
                    prop_assert_eq!(hinted_peer.get(k), peer.get(k));
                }
            }
            // The owned-digest path sees the same thing.
            let owned: Digest = view.to_digest();
            let owned_view = DigestView::from_digest(&owned);
            let owned_peer = PeerDigest::of_table(&table, &owned_view);
            for k in 0..states.len() {
                prop_assert_eq!(owned_peer.get(k), peer.get(k));
            }
        }
    }

    proptest! {
        /// Scanning with known ids accepts and rejects exactly what the plain scan does, and
        /// yields the same entries: on digests cut short, with bytes flipped, or extended.
        #[test]
        fn known_ids_change_nothing_the_scan_accepts(
            known in proptest::collection::vec(arb_id(), 0..8),
            entries in proptest::collection::vec((arb_id(), 0u64..5), 0..12),
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            v1 in any::<bool>(),
        ) {
            let states = states(&known);
            let table = IdTable::build(states.iter(), None);
            let mut entries: Vec<(ChitchatId, NodeDigest)> = entries
                .into_iter()
                .map(|(id, hb)| (id, NodeDigest::new(Heartbeat::from(hb), hb, hb + 1)))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut bytes = received(&entries, v1);
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let at = at.index(bytes.len());
                    bytes[at] ^= byte;
                }
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            let mut plain_decoder = crate::wire::Decoder::new();
            let mut known_decoder = crate::wire::Decoder::new();
            let plain = plain_decoder.decode_digest_bytes(version(v1), &bytes);
            let scanned = known_decoder.decode_digest_bytes_known(version(v1), &bytes, Some(&table));
            match (plain, scanned) {
                (Ok(plain), Ok(scanned)) => {
                    prop_assert!(plain.iter().eq(scanned.iter()));
                    let positions: Vec<Option<usize>> = scanned
                        .known_positions(table.token())
                        .unwrap()
                        .map(|(known, _)| known)
                        .collect();
                    for (entry, position) in plain.iter().zip(positions) {
                        let expected = states
                            .iter()
                            .position(|id| entry.id().cmp_id(id).is_eq() && wire_bytes_identify(id));
                        prop_assert_eq!(position, expected);
                    }
                }
                (Err(plain), Err(scanned)) => prop_assert_eq!(plain, scanned),
                (plain, scanned) => prop_assert!(false, "plain {:?}, with known ids {:?}", plain.is_ok(), scanned.is_ok()),
            }
        }
    }

    #[test]
    fn colliding_index_falls_back_to_a_scan() {
        let ids: Vec<ChitchatId> = (0..5).map(ChitchatId::for_local_test).collect();
        let table = IdTable::build(ids.iter(), None);
        let mut index = table.build_index();
        // Force every id onto one key, as a collision would.
        let hash = index.hasher.hash_one(table.id_bytes(3));
        index.positions.clear();
        index.positions.insert(hash, 0);
        index.collisions = true;
        table.index.set(index).unwrap();
        let mut bytes = Vec::new();
        put_chitchat_id(&mut bytes, &ids[3]).unwrap();
        assert_eq!(table.find(&bytes), Some(3));
    }
}
