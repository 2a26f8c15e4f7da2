//! The last delta written for a peer that knew nothing, kept for the next such peer.
//!
//! A peer whose digest matches no node state with any version (a node joining or restarting,
//! or a load generator with an empty digest) is owed the most expensive reply a node writes: a
//! datagram-full delta, sorted, encoded and zstd-compressed (`handle_datagram/syn_empty_changed_state`
//! at 100 nodes × 10 keys: 172 µs in the run of 2026-12-03, about 65 % of it in zstd). What that delta holds depends only on the
//! node states (their versions, liveness and deletion schedule) and on the room the reply
//! leaves, not on the peer, so a burst of joiners — a cluster starting with every node seeded
//! by the same few — can be answered with one delta written once.
//!
//! The cache is per thread (the encoder's scratch is too): at most one delta (≤ one datagram)
//! and one mark per node state, whatever number of nodes the process runs. It is keyed by the
//! cluster state's membership epoch, which no two cluster states share, and checked against a
//! mark of every node state taken when it was written: any key-value written, deleted or
//! collected changes a node's max version or last GC version; liveness and the deletion
//! schedule are marked too. A delta cut short by the datagram is reused at most
//! [`MAX_REUSES_OF_A_PARTIAL_DELTA`] times, so that successive joiners still get the random
//! share of equally stale nodes the reference gives them.

use crate::protocol::cluster_state::ClusterState;
use crate::protocol::delta_plan::DeltaSummary;
use crate::protocol::digest_match::PeerDigest;
use crate::protocol::node_state::ScheduledForDeletion;

/// How many more peers a delta cut short by the datagram may be sent to before a new one (with
/// a new random tie-break among equally stale nodes) is written.
pub(crate) const MAX_REUSES_OF_A_PARTIAL_DELTA: u32 = 8;

/// A partial delta written with room `mtu` is reused for a room up to this much larger; past
/// that a fresh one would carry noticeably more.
const PARTIAL_DELTA_ROOM_SLACK: usize = 2_048;

/// What the delta of one node state depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StateMark {
    max_version: u64,
    last_gc_version: u64,
    /// Bit 0: this node; bit 1: held live; bit 2: scheduled for deletion.
    flags: u8,
}

#[derive(Debug, Default)]
pub(crate) struct FreshDeltaCache {
    /// The marks of the state the cached delta was written from, and of the state now.
    written_from: Vec<StateMark>,
    current: Vec<StateMark>,
    epoch: u64,
    datagram_budget: usize,
    /// The room the delta was written in, its bytes and what it carried.
    mtu: usize,
    bytes: Vec<u8>,
    summary: DeltaSummary,
    /// `None`: reusable without limit (the delta carries every stale entry).
    reuses_left: Option<u32>,
    valid: bool,
}

impl FreshDeltaCache {
    /// Whether `peer_digest` knows no version of any node state; if so, marks the current
    /// state for [`Self::lookup`] and [`Self::store`]. Stops at the first entry the peer knows.
    pub(crate) fn peer_is_fresh(
        &mut self,
        cluster_state: &ClusterState,
        peer_digest: &PeerDigest,
        scheduled: &impl ScheduledForDeletion,
    ) -> bool {
        self.current.clear();
        for (k, (id, state)) in cluster_state.node_states.iter().enumerate() {
            if peer_digest
                .get(k)
                .is_some_and(|d| d.max_version != 0 || d.last_gc_version != 0)
            {
                self.current.clear();
                return false;
            }
            let flags = u8::from(cluster_state.is_self(id))
                | (u8::from(state.liveness.is_live()) << 1)
                | (u8::from(scheduled.contains(id, state)) << 2);
            self.current.push(StateMark {
                max_version: state.max_version(),
                last_gc_version: state.last_gc_version(),
                flags,
            });
        }
        true
    }

    /// Appends the cached delta to `out` if it was written from the state just marked and fits
    /// `mtu`; returns what it carries.
    pub(crate) fn lookup(
        &mut self,
        cluster_state: &ClusterState,
        mtu: usize,
        out: &mut Vec<u8>,
    ) -> Option<DeltaSummary> {
        let fits = if self.reuses_left.is_none() {
            self.bytes.len() <= mtu
        } else {
            self.bytes.len() <= mtu && mtu <= self.mtu.saturating_add(PARTIAL_DELTA_ROOM_SLACK)
        };
        let hit = self.valid
            && fits
            && self.reuses_left != Some(0)
            && self.epoch == cluster_state.membership_epoch()
            && self.datagram_budget == cluster_state.datagram_budget
            && self.written_from == self.current;
        if !hit {
            return None;
        }
        if let Some(left) = &mut self.reuses_left {
            *left -= 1;
        }
        out.extend_from_slice(&self.bytes);
        Some(self.summary)
    }

    /// Keeps `delta`, just written in room `mtu` from the state just marked, unless it was
    /// cut short by the handling deadline.
    pub(crate) fn store(
        &mut self,
        cluster_state: &ClusterState,
        mtu: usize,
        delta: &[u8],
        summary: DeltaSummary,
    ) {
        if summary.deadline_hit {
            self.valid = false;
            return;
        }
        std::mem::swap(&mut self.written_from, &mut self.current);
        self.epoch = cluster_state.membership_epoch();
        self.datagram_budget = cluster_state.datagram_budget;
        self.mtu = mtu;
        self.bytes.clear();
        self.bytes.extend_from_slice(delta);
        self.summary = summary;
        self.reuses_left = summary.truncated.then_some(MAX_REUSES_OF_A_PARTIAL_DELTA);
        self.valid = true;
    }
}
