//! Writes Syn, SynAck and Ack datagrams straight from the cluster state into a buffer (no
//! intermediate message), within the datagram budget. What goes into a message, and in which
//! order, is decided here; how many bytes each part takes is the wire's to say.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::warn;

use crate::log_limit::LogLimiter;
use crate::message::{NodeDigest, ProtocolVersion};
use crate::protocol::cluster_state::{ClusterState, node_digest};
use crate::protocol::delta_plan::{DeltaSink, DeltaSummary, write_delta};
use crate::protocol::digest_match::{NODE_DIGEST_LEN, PeerDigest};
use crate::protocol::fresh_delta::FreshDeltaCache;
use crate::protocol::node_state::ScheduledForDeletion;
use crate::types::{ChitchatId, DeletionStatusMutation, Version, VersionedValue};
use crate::wire::{self, DeltaWriter, Encoder, MessageType};

/// Room a SynAck keeps for its delta when the digest alone would fill the datagram: the digest
/// is then sent partial rather than leaving no room (the reference panics there).
pub const MIN_SYN_ACK_DELTA_BUDGET: usize = 4_096;

/// What handling one message produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyOutcome {
    /// The version of the message received, which the reply echoes.
    pub version: ProtocolVersion,
    /// A reply was written.
    pub replied: bool,
    /// The reply's digest left nodes out for lack of room.
    pub digest_truncated: bool,
    /// The reply's delta left stale data behind for lack of room.
    pub delta_truncated: bool,
}

impl ReplyOutcome {
    /// Nothing written in answer to a message of `version`.
    pub(crate) fn none(version: ProtocolVersion) -> Self {
        ReplyOutcome {
            version,
            replied: false,
            digest_truncated: false,
            delta_truncated: false,
        }
    }
}

thread_local! {
    /// zstd context and scratch buffers, one per thread that encodes (the decoder is in
    /// `received.rs`).
    static ENCODER: RefCell<Encoder> = RefCell::new(Encoder::new());
    /// The last delta written for a peer that knew nothing (see `fresh_delta.rs`).
    static FRESH_DELTA: RefCell<FreshDeltaCache> = RefCell::new(FreshDeltaCache::default());
}

fn with_encoder<T>(f: impl FnOnce(&mut Encoder) -> T) -> T {
    ENCODER.with(|encoder| f(&mut encoder.borrow_mut()))
}

impl DeltaSink for DeltaWriter<'_> {
    fn try_add_node(&mut self, id: &ChitchatId, last_gc: Version, from: Version) -> bool {
        // `write_delta` adds the node states of one map: their ids are distinct.
        DeltaWriter::try_add_distinct_node(self, id, last_gc, from)
    }

    fn try_add_kv(&mut self, key: &str, value: &VersionedValue) -> bool {
        DeltaWriter::try_add_kv(
            self,
            key,
            &value.value,
            value.version,
            DeletionStatusMutation::from(value.status),
        )
    }

    fn try_set_max_version(&mut self, max_version: Version) -> bool {
        DeltaWriter::try_set_max_version(self, max_version)
    }
}

/// One partial-digest warning per 10 s for the whole process: a cluster too large for one
/// datagram cuts every digest it writes (at 5,000 nodes in V1, every SynAck), and 1,000 nodes
/// in one process would each log a line per message.
static PARTIAL_DIGEST_WARNINGS: parking_lot::Mutex<LogLimiter> =
    parking_lot::const_mutex(LogLimiter::new(PARTIAL_DIGEST_WARN_INTERVAL));
const PARTIAL_DIGEST_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Writes the own digest: every node state not scheduled for deletion, in id order. Only when
/// the entries may not fit in `budget` bytes are they collected and reordered: this node first,
/// the others from a random offset, so a partial digest still carries our heartbeat and, over
/// rounds, every other node's. The common case allocates nothing.
fn write_digest<R: Rng>(
    cluster_state: &ClusterState,
    self_id: &ChitchatId,
    scheduled: &impl ScheduledForDeletion,
    version: ProtocolVersion,
    budget: usize,
    rng: &mut R,
    out: &mut Vec<u8>,
) -> (usize, bool) {
    if version == ProtocolVersion::V0
        && let Some(written) = write_digest_v0_cached(cluster_state, scheduled, budget, out)
    {
        return written;
    }
    let entries = || {
        cluster_state
            .node_states
            .iter()
            .filter(|(id, state)| !scheduled.contains(id, state))
            .map(|(id, state)| (id, node_digest(state)))
    };
    let (count, plain_len) = entries().fold(
        (0usize, wire::V0_DIGEST_COUNT_LEN),
        |(count, len), (id, _)| (count + 1, len + wire::digest_entry_len(id)),
    );
    if plain_len <= budget || count < 2 {
        let encoding =
            with_encoder(|encoder| encoder.encode_digest(version, entries(), budget, out));
        return (encoding.len, encoding.skipped > 0);
    }
    let mut ordered: Vec<(&ChitchatId, NodeDigest)> = entries().collect();
    if let Some(pos) = ordered.iter().position(|(id, _)| *id == self_id) {
        let own = ordered.remove(pos);
        let offset = rng.random_range(0..ordered.len().max(1));
        ordered.rotate_left(offset);
        ordered.insert(0, own);
    }
    let encoding = with_encoder(|encoder| encoder.encode_digest(version, ordered, budget, out));
    if encoding.skipped > 0
        && let Some(suppressed) = PARTIAL_DIGEST_WARNINGS
            .lock()
            .allow_at(cluster_state.clock().now())
    {
        warn!(
            written = encoding.written,
            total = count,
            suppressed,
            "digest does not fit in one datagram: sending a partial digest \
             (further such digests are not logged for 10 s; `suppressed` counts the last ones)"
        );
    }
    (encoding.len, encoding.skipped > 0)
}

/// The V0 digest of every node state not scheduled for deletion, in id order, written from
/// the cluster state's cached encoding (`IdTable::skeleton`): the common case of
/// `write_digest`, byte for byte what `Encoder::encode_digest` writes. The body is copied and
/// each node digest filled in; from the first state left out on, entries are appended one by
/// one instead. `None` (and nothing written) when the full digest may not fit in `budget`
/// bytes or holds an id the wire cannot carry: the general path handles those.
fn write_digest_v0_cached(
    cluster_state: &ClusterState,
    scheduled: &impl ScheduledForDeletion,
    budget: usize,
    out: &mut Vec<u8>,
) -> Option<(usize, bool)> {
    let table = cluster_state.id_table();
    let skeleton = table.skeleton();
    if !table.all_encodable()
        || wire::V0_DIGEST_COUNT_LEN.saturating_add(skeleton.len()) > budget
        || cluster_state.node_states.len() > usize::from(u16::MAX)
    {
        return None;
    }
    let start = out.len();
    out.reserve(wire::V0_DIGEST_COUNT_LEN + skeleton.len());
    out.extend_from_slice(&[0, 0]);
    let body = out.len();
    // In moderate pieces: a plain vector copy each, for the copy of tens of kilobytes.
    for piece in skeleton.chunks(1024) {
        out.extend_from_slice(piece);
    }
    let mut count: u16 = 0;
    let mut appending = false;
    for (k, (id, state)) in cluster_state.node_states.iter().enumerate() {
        if scheduled.contains(id, state) {
            if !appending {
                out.truncate(body + table.entry_start(k));
                appending = true;
            }
            continue;
        }
        let mut node_digest = [0u8; NODE_DIGEST_LEN];
        node_digest[..8].copy_from_slice(&u64::from(state.heartbeat()).to_le_bytes());
        node_digest[8..16].copy_from_slice(&state.last_gc_version().to_le_bytes());
        node_digest[16..].copy_from_slice(&state.max_version().to_le_bytes());
        if appending {
            out.extend_from_slice(table.id_bytes(k));
            out.extend_from_slice(&node_digest);
        } else {
            let slot = body + table.slot_start(k);
            let Some(dst) = out.get_mut(slot..slot + NODE_DIGEST_LEN) else {
                // Unreachable: the skeleton has a slot per state.
                out.truncate(start);
                return None;
            };
            dst.copy_from_slice(&node_digest);
        }
        // At most u16::MAX states, checked above.
        count = count.saturating_add(1);
    }
    out[start..body].copy_from_slice(&count.to_le_bytes());
    Some((out.len() - start, false))
}

/// Syn = digest then cluster id. Returns whether the digest was partial.
pub(crate) fn write_syn<R: Rng>(
    cluster_state: &ClusterState,
    self_id: &ChitchatId,
    cluster_id: &str,
    scheduled: &impl ScheduledForDeletion,
    version: ProtocolVersion,
    rng: &mut R,
    out: &mut Vec<u8>,
) -> bool {
    Encoder::write_header(out, version, MessageType::Syn);
    let budget = wire::syn_digest_budget(cluster_state.datagram_budget, cluster_id);
    let (_, truncated) = write_digest(cluster_state, self_id, scheduled, version, budget, rng, out);
    wire::put_cluster_id(out, cluster_id);
    truncated
}

/// SynAck = own digest (in the version actually used) then the delta the peer needs, within
/// what the digest left of the datagram.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_syn_ack<R: Rng>(
    cluster_state: &ClusterState,
    self_id: &ChitchatId,
    scheduled: &impl ScheduledForDeletion,
    version: ProtocolVersion,
    peer_digest: &PeerDigest,
    rng: &mut R,
    out: &mut Vec<u8>,
    deadline: Option<Instant>,
    max_len: usize,
) -> (bool, DeltaSummary) {
    Encoder::write_header(out, version, MessageType::SynAck);
    // `max_len` (the anti-amplification budget) shrinks digest and delta; one byte is kept
    // for the delta's end marker.
    let digest_budget =
        wire::body_budget_in(cluster_state.datagram_budget, MIN_SYN_ACK_DELTA_BUDGET)
            .min(max_len.saturating_sub(wire::HEADER_LEN + 1));
    let (digest_len, digest_truncated) = write_digest(
        cluster_state,
        self_id,
        scheduled,
        version,
        digest_budget,
        rng,
        out,
    );
    let mtu = wire::delta_mtu_in(cluster_state.datagram_budget, digest_len)
        .min(max_len.saturating_sub(wire::HEADER_LEN.saturating_add(digest_len)));
    let summary = append_delta(
        cluster_state,
        peer_digest,
        scheduled,
        rng,
        mtu,
        out,
        deadline,
    );
    (digest_truncated, summary)
}

/// Ack = the delta the peer needs, with the whole datagram as budget.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_ack<R: Rng>(
    cluster_state: &ClusterState,
    scheduled: &impl ScheduledForDeletion,
    version: ProtocolVersion,
    peer_digest: &PeerDigest,
    rng: &mut R,
    out: &mut Vec<u8>,
    deadline: Option<Instant>,
    max_len: usize,
) -> DeltaSummary {
    Encoder::write_header(out, version, MessageType::Ack);
    let mtu = wire::delta_mtu_in(cluster_state.datagram_budget, 0)
        .min(max_len.saturating_sub(wire::HEADER_LEN));
    append_delta(
        cluster_state,
        peer_digest,
        scheduled,
        rng,
        mtu,
        out,
        deadline,
    )
}

/// Appends the delta a peer with `peer_digest` needs, bounded by `mtu` bytes.
fn append_delta<R: Rng>(
    cluster_state: &ClusterState,
    peer_digest: &PeerDigest,
    scheduled: &impl ScheduledForDeletion,
    rng: &mut R,
    mtu: usize,
    out: &mut Vec<u8>,
    deadline: Option<Instant>,
) -> DeltaSummary {
    let write = |out: &mut Vec<u8>, rng: &mut R| {
        with_encoder(|encoder| {
            let mut writer = encoder.delta_writer(out, mtu);
            let summary = write_delta(
                cluster_state,
                peer_digest,
                scheduled,
                rng,
                &mut writer,
                deadline,
            );
            writer.finish();
            summary
        })
    };
    if peer_digest.is_up_to_date() {
        return write(out, rng);
    }
    FRESH_DELTA.with(|cache| {
        let mut cache = cache.borrow_mut();
        if !cache.peer_is_fresh(cluster_state, peer_digest, scheduled) {
            return write(out, rng);
        }
        if let Some(summary) = cache.lookup(cluster_state, mtu, out) {
            return summary;
        }
        let start = out.len();
        let summary = write(out, rng);
        cache.store(cluster_state, mtu, &out[start..], summary);
        summary
    })
}

pub(crate) fn write_bad_cluster(version: ProtocolVersion, out: &mut Vec<u8>) {
    Encoder::write_header(out, version, MessageType::BadCluster);
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

    use proptest::prelude::*;

    use super::*;
    use crate::clock::Clock;
    use crate::protocol::listener::Listeners;
    use crate::types::Heartbeat;

    fn arb_id() -> impl Strategy<Value = ChitchatId> {
        let addr = prop_oneof![
            (0u16..4).prop_map(|port| SocketAddr::from(([127, 0, 0, 1], port))),
            (0u32..2).prop_map(|scope| {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 1, 0, scope))
            }),
        ];
        ("[ab]{0,3}|é", 0u64..3, addr)
            .prop_map(|(name, generation, addr)| ChitchatId::new(name, generation, addr))
    }

    #[test]
    fn partial_digest_warnings_are_limited_and_counted() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(PARTIAL_DIGEST_WARN_INTERVAL);
        assert_eq!(limiter.allow_at(start), Some(0));
        for i in 1..=5 {
            assert_eq!(
                limiter.allow_at(start + Duration::from_millis(i * 100)),
                None
            );
        }
        assert_eq!(
            limiter.allow_at(start + PARTIAL_DIGEST_WARN_INTERVAL),
            Some(5)
        );
        assert_eq!(limiter.allow_at(start + PARTIAL_DIGEST_WARN_INTERVAL), None);
        // An earlier instant (another clock) is let through rather than muting the process.
        assert_eq!(limiter.allow_at(start), Some(1));
    }

    proptest! {
        /// The digest written from the cached encodings is, byte for byte, what the encoder
        /// writes from the states not scheduled for deletion, in id order; and it gives way to
        /// the general path whenever the digest may not fit.
        #[test]
        fn cached_v0_digest_is_the_encoders(
            states in proptest::collection::vec((arb_id(), 0u64..50, 0u64..9, 0u64..9), 0..16),
            left_out in proptest::collection::vec(any::<bool>(), 16),
            budget in prop_oneof![Just(usize::MAX), 0usize..600],
        ) {
            let mut cluster_state = ClusterState::new(Listeners::default(), Clock::System);
            for (id, heartbeat, gc, max) in &states {
                let state = cluster_state.node_state_or_create(id);
                state.try_set_heartbeat(Heartbeat::from(*heartbeat));
                state.set_max_version(*max);
                state.set_last_gc_version(*gc);
            }
            let scheduled: HashSet<&ChitchatId> = cluster_state
                .node_states
                .keys()
                .zip(&left_out)
                .filter(|(_, out)| **out)
                .map(|(id, _)| id)
                .collect();
            let mut cached = vec![0xaa];
            let written = write_digest_v0_cached(&cluster_state, &scheduled, budget, &mut cached);
            let entries: Vec<(&ChitchatId, NodeDigest)> = cluster_state
                .node_states
                .iter()
                .filter(|(id, _)| !scheduled.contains(id))
                .map(|(id, state)| (id, node_digest(state)))
                .collect();
            let mut encoded = vec![0xaa];
            let encoding = Encoder::new().encode_digest(
                ProtocolVersion::V0,
                entries.iter().copied(),
                usize::MAX,
                &mut encoded,
            );
            match written {
                Some((len, truncated)) => {
                    prop_assert!(!truncated);
                    prop_assert_eq!(&cached, &encoded);
                    prop_assert_eq!(len, encoding.len);
                    prop_assert!(len <= budget);
                }
                None => {
                    prop_assert_eq!(&cached, &[0xaa]);
                    // Only when the digest of every state would not fit.
                    let full: usize = cluster_state
                        .node_states
                        .keys()
                        .map(wire::digest_entry_len)
                        .sum::<usize>()
                        + wire::V0_DIGEST_COUNT_LEN;
                    prop_assert!(full > budget);
                }
            }
        }
    }
}
