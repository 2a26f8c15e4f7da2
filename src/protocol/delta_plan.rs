//! Which node states a peer is missing, in which order, written into a size-bounded sink
//! (SPEC §4.4).

use std::time::Instant;

use rand::Rng;
use tracing::debug;

use crate::protocol::cluster_state::ClusterState;
use crate::protocol::digest_match::PeerDigest;
use crate::protocol::node_state::{NodeState, ScheduledForDeletion};
use crate::types::{ChitchatId, Version, VersionedValue};
use crate::wire;

/// Receives the ops of a delta and says whether each still fits (the wire's `DeltaWriter`, or a
/// collector around it). Once a node or key-value op is refused the delta is over.
pub(crate) trait DeltaSink {
    fn try_add_node(
        &mut self,
        chitchat_id: &ChitchatId,
        last_gc_version: Version,
        from_version_excluded: Version,
    ) -> bool;
    fn try_add_kv(&mut self, key: &str, value: &VersionedValue) -> bool;
    fn try_set_max_version(&mut self, max_version: Version) -> bool;
}

/// What a delta carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeltaSummary {
    pub(crate) nodes: usize,
    pub(crate) key_values: usize,
    /// Some stale node or key-value did not fit.
    pub(crate) truncated: bool,
    /// Key-values left out because no datagram could carry them.
    pub(crate) unrelayable: usize,
    /// The handling deadline cut the delta short (`truncated` is set too).
    pub(crate) deadline_hit: bool,
}

/// One node state the peer is behind on.
struct Candidate<'a> {
    state: &'a NodeState,
    from_version_excluded: Version,
    /// Sort key: this node and the nodes the failure detector holds live first (so nodes
    /// never seen alive, forged ones included, cannot crowd real members out of a delta);
    /// then unknown nodes (smallest max_version first), then known nodes with the most stale
    /// key-values; the last field breaks ties randomly.
    priority: (bool, bool, u64, u64),
}

/// True for keys a chitchat 0.13 peer would crash on (its listener slices `key[0..1]`); such keys
/// can only come from non-conforming peers and are never relayed.
pub(crate) fn is_relayable_key(key: &str) -> bool {
    key.chars().next().is_none_or(|c| c.is_ascii())
}

/// Writes the delta a peer with `peer_digest` (matched against `cluster_state`'s node states)
/// needs into `sink`, most urgent nodes first. Past `deadline` (an instant of the cluster
/// state's clock) the delta is cut short.
pub(crate) fn write_delta<S: DeltaSink, R: Rng>(
    cluster_state: &ClusterState,
    peer_digest: &PeerDigest,
    scheduled_for_deletion: &impl ScheduledForDeletion,
    rng: &mut R,
    sink: &mut S,
    deadline: Option<Instant>,
) -> DeltaSummary {
    debug_assert!(cluster_state.is_matched(peer_digest));
    if peer_digest.is_up_to_date() {
        // Behind on no state: no candidate, nothing to write.
        return DeltaSummary::default();
    }
    let mut candidates: Vec<Candidate> = Vec::with_capacity(cluster_state.node_states.len());
    for (k, (id, state)) in cluster_state.node_states.iter().enumerate() {
        let (peer_gc, peer_max) = peer_digest
            .get(k)
            .map(|d| (d.last_gc_version, d.max_version))
            .unwrap_or((0, 0));
        if state.max_version() <= peer_max || scheduled_for_deletion.contains(id, state) {
            continue;
        }
        let should_reset = peer_gc < state.last_gc_version() && peer_max < state.last_gc_version();
        let from_version_excluded = if should_reset { 0 } else { peer_max };
        let is_unknown = from_version_excluded == 0;
        let is_member = cluster_state.is_self(id) || state.liveness.is_live();
        let rank = if is_unknown {
            state.max_version()
        } else {
            let num_stale = state.num_stale_key_values(from_version_excluded) as u64;
            u64::MAX - num_stale
        };
        candidates.push(Candidate {
            state,
            from_version_excluded,
            priority: (!is_member, !is_unknown, rank, rng.random()),
        });
    }
    candidates.sort_unstable_by_key(|c| c.priority);

    let mut summary = DeltaSummary::default();
    let clock = cluster_state.clock();
    let mut stale = Vec::new();
    for (i, candidate) in candidates.iter().enumerate() {
        if i % 64 == 63 && deadline.is_some_and(|d| clock.now() >= d) {
            summary.truncated = true;
            summary.deadline_hit = true;
            break;
        }
        let state = candidate.state;
        if !sink.try_add_node(
            state.chitchat_id(),
            state.last_gc_version(),
            candidate.from_version_excluded,
        ) {
            summary.truncated = true;
            break;
        }
        summary.nodes += 1;
        let relayable_len =
            wire::max_key_value_len_in(cluster_state.datagram_budget, state.chitchat_id());
        let mut added_kv = false;
        state.stale_key_values_into(candidate.from_version_excluded, &mut stale);
        for &(key, value) in &stale {
            if !is_relayable_key(key) {
                debug!(node = ?state.chitchat_id(), key, "not relaying a key chitchat peers crash on");
                continue;
            }
            if key.len() + value.value.len() > relayable_len {
                // It fits in no datagram: skipping it lets the entries behind it through.
                summary.unrelayable += 1;
                continue;
            }
            if !sink.try_add_kv(key, value) {
                summary.truncated = true;
                return summary;
            }
            added_kv = true;
            summary.key_values += 1;
        }
        if !added_kv {
            // Only GC'd tombstones (or unrelayable keys) were newer: just move the peer's max.
            sink.try_set_max_version(state.max_version());
        }
    }
    summary
}
