//! `ClusterState`: every node state known locally, the listener registry they share, and the
//! memory of garbage-collected nodes.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info};

use crate::clock::Clock;
use crate::message::{Digest, NodeDigest};
use crate::protocol::digest_match::{IdTable, PeerDigest};
use crate::protocol::gc_history::{GARBAGE_COLLECTED_NODE_HISTORY_SIZE, GcHistory};
use crate::protocol::limits::{Limits, Refusal, RefusalCounts};
use crate::protocol::listener::Listeners;
use crate::protocol::node_state::{DeltaStatus, NodeContext, NodeState, ScheduledForDeletion};
use crate::types::{ChitchatId, Heartbeat};
use crate::wire::{self, ChitchatIdRef, DeltaView, DigestView};

pub(crate) struct ClusterState {
    /// Added to and removed from only by `node_state_or_create` and `garbage_collect_node`,
    /// which drop the id table.
    pub(crate) node_states: BTreeMap<ChitchatId, NodeState>,
    listeners: Listeners,
    gc_history: GcHistory,
    clock: Clock,
    /// The own id: its state is not remote and not counted in `remote_bytes`.
    self_id: Option<ChitchatId>,
    /// Bytes of remote state: ids, keys and values of every other node state.
    remote_bytes: usize,
    /// Largest datagram this node may send: the UDP maximum, less the transport's own bytes
    /// (sealing, in keyed clusters). Every reply and Syn is written within it. Set with
    /// `set_datagram_budget`, which tells the node states too.
    pub(crate) datagram_budget: usize,
    /// Shared by every node state (listeners, clock, datagram budget).
    node_context: Arc<NodeContext>,
    /// The wire encoding of every id, in id order: built on first use, dropped whenever a
    /// node state is added or removed.
    /// Shared with the decoders that scan received digests with it (see
    /// `ClusterState::shared_id_table`).
    id_table: OnceLock<Arc<IdTable>>,
    /// Replaced whenever a node state is added or removed (positions in id order change), by a
    /// value no other cluster state of the process has had.
    membership_epoch: u64,
    /// The epoch the node-state map was last repacked at, and the epoch seen by the last
    /// round with how many rounds have seen it (see `compact_when_settled`).
    compacted_epoch: u64,
    settling: (u64, u32),
    /// Node states added since the map was last repacked (see `compact_when_settled`).
    inserted_since_pack: usize,
}

/// Source of membership epochs: one counter for the process, so that no two cluster states
/// (nor two memberships of one) share an epoch, and caches shared by the instances of a thread
/// can key on it.
static NEXT_MEMBERSHIP_EPOCH: AtomicU64 = AtomicU64::new(1);

fn next_membership_epoch() -> u64 {
    NEXT_MEMBERSHIP_EPOCH.fetch_add(1, Ordering::Relaxed)
}

/// Gossip rounds without a node state added or removed before the map is repacked.
const ROUNDS_TO_SETTLE: u32 = 8;

/// Fewest node states added since the last repack for a growing map to be repacked (a small
/// map's leaves weigh little).
const GROWTH_REPACK_MIN: usize = 64;

/// What applying a delta did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeltaApplication {
    pub(crate) nodes_applied: usize,
    pub(crate) nodes_reset: usize,
    pub(crate) nodes_rejected: usize,
    pub(crate) nodes_unknown: usize,
    /// Values ignored, by kind.
    pub(crate) refusals: RefusalCounts,
}

impl ClusterState {
    pub(crate) fn new(listeners: Listeners, clock: Clock) -> Self {
        ClusterState {
            node_states: BTreeMap::new(),
            node_context: NodeContext::new(listeners.clone(), clock.clone()),
            listeners,
            gc_history: GcHistory::new(GARBAGE_COLLECTED_NODE_HISTORY_SIZE),
            clock,
            self_id: None,
            remote_bytes: 0,
            datagram_budget: wire::MAX_UDP_DATAGRAM_PAYLOAD_SIZE,
            id_table: OnceLock::new(),
            membership_epoch: next_membership_epoch(),
            compacted_epoch: u64::MAX,
            settling: (u64::MAX, 0),
            inserted_since_pack: 0,
        }
    }

    /// Repacks the node-state map once the membership has not changed for a few rounds. A map
    /// that grew by insertions in random id order keeps its leaves about two-thirds full, and
    /// each entry (id and state) is over 300 B: rebuilt from its sorted entries the leaves are
    /// full, about 100–150 B less per node state. Key-value maps are packed too (see
    /// `KeyValueMap::compact`). Called once per gossip round; costs one pass over the node
    /// states, once per settled membership.
    ///
    /// A map that is still growing is repacked too, whenever a quarter of its states were
    /// added since the last repack, so that a cluster that takes long to settle does not keep
    /// its half-full leaves meanwhile (massif, 300 nodes × 10 keys during convergence: 52 MB of
    /// leaves, against 32 MB once repacked). Repacks then cost at most four entry moves per
    /// state added.
    pub(crate) fn compact_when_settled(&mut self) {
        if self.inserted_since_pack >= GROWTH_REPACK_MIN
            && self.inserted_since_pack.saturating_mul(4) >= self.node_states.len()
        {
            self.repack_node_states();
        }
        let epoch = self.membership_epoch;
        if self.settling.0 != epoch {
            self.settling = (epoch, 0);
            return;
        }
        if self.compacted_epoch == epoch {
            return;
        }
        self.settling.1 = self.settling.1.saturating_add(1);
        if self.settling.1 < ROUNDS_TO_SETTLE {
            return;
        }
        self.repack_node_states();
        for state in self.node_states.values_mut() {
            state.compact_key_values();
        }
        self.compacted_epoch = epoch;
    }

    /// Rebuilds the node-state map from its sorted entries: full leaves.
    fn repack_node_states(&mut self) {
        // Same entries in the same order: positions (the id table, matched digests) stay valid.
        self.node_states = std::mem::take(&mut self.node_states).into_iter().collect();
        self.inserted_since_pack = 0;
    }

    /// Node states added since the last repack (tests).
    #[cfg(test)]
    pub(crate) fn inserted_since_pack(&self) -> usize {
        self.inserted_since_pack
    }

    /// Whether the map was repacked since the membership last changed.
    #[cfg(test)]
    pub(crate) fn is_compacted(&self) -> bool {
        self.compacted_epoch == self.membership_epoch
    }

    /// Names the own node (its state is left out of the remote byte budget).
    pub(crate) fn set_self_id(&mut self, self_id: ChitchatId) {
        self.self_id = Some(self_id);
        self.membership_changed();
    }

    /// Changes whenever a node state is added or removed.
    pub(crate) fn membership_epoch(&self) -> u64 {
        self.membership_epoch
    }

    fn membership_changed(&mut self) {
        self.id_table.take();
        self.membership_epoch = next_membership_epoch();
    }

    /// The wire encoding of every id, position `k` being the `k`-th node state in id order.
    pub(crate) fn id_table(&self) -> &IdTable {
        self.shared_table()
    }

    /// [`ClusterState::id_table`], to scan a received digest with, while this state may be
    /// changed or locked by others: a new table (with a new token) replaces it when the
    /// membership changes, and a digest scanned with an old one is matched the general way.
    pub(crate) fn shared_id_table(&self) -> Arc<IdTable> {
        Arc::clone(self.shared_table())
    }

    fn shared_table(&self) -> &Arc<IdTable> {
        self.id_table.get_or_init(|| {
            Arc::new(IdTable::build(
                self.node_states.keys(),
                self.self_id.as_ref(),
            ))
        })
    }

    /// Matches a received digest against the node states, into `peer` (buffers reused).
    pub(crate) fn match_digest(&self, digest: &DigestView<'_>, peer: &mut PeerDigest) {
        peer.match_table(self.id_table(), self.membership_epoch, digest);
    }

    /// Whether `peer`'s positions are still those of the node states.
    pub(crate) fn is_matched(&self, peer: &PeerDigest) -> bool {
        peer.epoch() == self.membership_epoch && peer.num_states() == self.node_states.len()
    }

    /// Bytes of remote state held (ids, keys, values).
    pub(crate) fn remote_bytes(&self) -> usize {
        self.remote_bytes
    }

    /// Why a new node state cannot be created under `limits` and the node-count cap, if so.
    pub(crate) fn refuses_new_node(&self, limits: &Limits, max_nodes: usize) -> Option<Refusal> {
        (self.node_states.len() >= max_nodes || self.remote_bytes >= limits.max_remote_state_bytes)
            .then_some(Refusal::RemoteStateFull)
    }

    /// Whether `id` is the own node.
    pub(crate) fn is_self(&self, id: &ChitchatId) -> bool {
        self.self_id.as_ref() == Some(id)
    }

    fn is_remote(&self, id: &ChitchatId) -> bool {
        self.self_id.as_ref() != Some(id)
    }

    /// Records that a remote state's byte count went from `before` to `after`.
    pub(crate) fn account(&mut self, id: &ChitchatId, before: usize, after: usize) {
        if self.is_remote(id) {
            self.remote_bytes = self
                .remote_bytes
                .saturating_sub(before)
                .saturating_add(after);
        }
    }

    /// Sets the datagram budget of every reply and of the own state's key-values.
    pub(crate) fn set_datagram_budget(&mut self, budget: usize) {
        self.datagram_budget = budget;
        self.node_context.set_datagram_budget(budget);
    }

    pub(crate) fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// The node's clock: every instant the protocol compares comes from it.
    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    pub(crate) fn node_state(&self, chitchat_id: &ChitchatId) -> Option<&NodeState> {
        self.node_states.get(chitchat_id)
    }

    pub(crate) fn node_state_mut(&mut self, chitchat_id: &ChitchatId) -> Option<&mut NodeState> {
        self.node_states.get_mut(chitchat_id)
    }

    /// Gets or creates a node state; creating one forgets that the node was garbage-collected.
    pub(crate) fn node_state_or_create(&mut self, chitchat_id: &ChitchatId) -> &mut NodeState {
        if !self.node_states.contains_key(chitchat_id) {
            self.gc_history.remove(chitchat_id);
            let id_len = chitchat_id.node_id.len();
            self.account(chitchat_id, 0, id_len);
            let state =
                NodeState::with_context(chitchat_id.clone(), Arc::clone(&self.node_context));
            self.node_states.insert(chitchat_id.clone(), state);
            self.inserted_since_pack = self.inserted_since_pack.saturating_add(1);
            self.membership_changed();
        }
        self.node_states
            .get_mut(chitchat_id)
            .expect("the state was just inserted")
    }

    /// The heartbeat a garbage-collected node had, if it is still remembered.
    pub(crate) fn last_heartbeat_if_deleted(&self, chitchat_id: &ChitchatId) -> Option<Heartbeat> {
        self.gc_history.get(chitchat_id)
    }

    pub(crate) fn is_garbage_collected(&self, chitchat_id: &ChitchatId) -> bool {
        self.gc_history.contains(chitchat_id)
    }

    /// Removes a dead node and remembers its last heartbeat, so stale copies cannot bring it back.
    pub(crate) fn garbage_collect_node(&mut self, chitchat_id: &ChitchatId) {
        if let Some(state) = self.node_states.remove(chitchat_id) {
            self.membership_changed();
            self.account(chitchat_id, chitchat_id.node_id.len() + state.bytes(), 0);
            info!(node = ?chitchat_id, "garbage-collecting dead node");
            self.gc_history
                .insert(chitchat_id.clone(), state.heartbeat());
        }
    }

    /// Digest of every node state except those scheduled for deletion.
    pub(crate) fn compute_digest(
        &self,
        scheduled_for_deletion: &impl ScheduledForDeletion,
    ) -> Digest {
        let mut digest = Digest::default();
        for (id, state) in &self.node_states {
            if scheduled_for_deletion.contains(id, state) {
                continue;
            }
            digest.add_node(id.clone(), node_digest(state));
        }
        digest
    }

    #[cfg(test)]
    pub(crate) fn gc_keys_marked_for_deletion(&mut self, grace_period: Duration, now: Instant) {
        self.gc_keys_marked_for_deletion_visiting(grace_period, now, |_, _| {});
    }

    /// [`ClusterState::gc_keys_marked_for_deletion`], handing each node state to `visit` after
    /// its collection, in id order: a gossip round's other per-state work rides the same pass.
    pub(crate) fn gc_keys_marked_for_deletion_visiting(
        &mut self,
        grace_period: Duration,
        now: Instant,
        mut visit: impl FnMut(&ChitchatId, &mut NodeState),
    ) {
        let mut freed = 0usize;
        let mut earliest: Option<tokio::time::Instant> = None;
        for (id, state) in self.node_states.iter_mut() {
            let before = state.bytes();
            if let Some(since) = state.gc_keys_marked_for_deletion(grace_period, now) {
                earliest = Some(earliest.map_or(since, |e| e.min(since)));
            }
            // Most rounds free nothing: the ids are compared only when something was freed.
            let freed_here = before.saturating_sub(state.bytes());
            if freed_here > 0 && self.self_id.as_ref() != Some(id) {
                freed += freed_here;
            }
            visit(id, state);
        }
        self.remote_bytes = self.remote_bytes.saturating_sub(freed);
        self.node_context.gc_watch.set(earliest);
    }

    /// Whether a tombstone of any state may have outlived `grace_period` at `now` (if not, a
    /// tombstone pass would collect nothing).
    pub(crate) fn tombstones_may_be_due(&self, grace_period: Duration, now: Instant) -> bool {
        self.node_context.gc_watch.may_be_due(grace_period, now)
    }

    /// Applies a received delta (SPEC §4.5). Deltas only update nodes that already exist; a
    /// delta about `self_id` never overwrites our own state (we are its only author): it
    /// only makes us outgrow the versions it claims. Implausible node deltas (DESIGN-13 §1)
    /// are ignored whole; the per-node budgets of `limits` cut the rest of a node's delta.
    pub(crate) fn apply_delta_within(
        &mut self,
        delta: &DeltaView<'_>,
        self_id: &ChitchatId,
        now: Instant,
        limits: &Limits,
    ) -> DeltaApplication {
        let mut outcome = DeltaApplication::default();
        let own_id = ChitchatIdRef::from(self_id);
        for node_delta in delta.node_deltas() {
            let id = node_delta.chitchat_id;
            if id.node_id.len() > limits.max_node_id_len {
                outcome.refusals.add(Refusal::IdTooLong, 1);
                continue;
            }
            if id == own_id {
                if let Some(own) = self.node_states.get_mut(self_id)
                    && let Err(refusal) =
                        own.supersede_stale_self_copy_within(node_delta, limits.max_keys_per_node)
                {
                    outcome.refusals.add(refusal, 1);
                }
                continue;
            }
            // The map is keyed by owned ids: one id allocation per node delta, none per
            // key-value (those are copied only when applied).
            let chitchat_id = id.to_owned_id();
            let remote = self.is_remote(&chitchat_id);
            let Some(state) = self.node_states.get_mut(&chitchat_id) else {
                outcome.nodes_unknown += 1;
                continue;
            };
            if let Err(refusal) = state.check_delta_plausibility(node_delta, now) {
                outcome.refusals.add(refusal, 1);
                outcome.nodes_rejected += 1;
                continue;
            }
            let bytes_before = state.bytes();
            let before = state.monotonic_property();
            match state.delta_status(node_delta) {
                DeltaStatus::Reject => {
                    outcome.nodes_rejected += 1;
                    continue;
                }
                DeltaStatus::ApplyAfterReset => {
                    info!(node = ?chitchat_id, last_gc_version = node_delta.last_gc_version,
                          "resetting node state: the peer garbage-collected what we hold");
                    state.reset_for_delta(node_delta.last_gc_version);
                    outcome.nodes_reset += 1;
                }
                DeltaStatus::Apply => {
                    outcome.nodes_applied += 1;
                }
            }
            state.apply_delta_within(node_delta, now, limits, &mut outcome.refusals);
            let bytes_after = state.bytes();
            if remote {
                self.remote_bytes = self
                    .remote_bytes
                    .saturating_sub(bytes_before)
                    .saturating_add(bytes_after);
            }
            let after = state.monotonic_property();
            if after < before {
                // Unreachable by the acceptance rules; logged rather than asserted so a forged
                // delta cannot take the node down.
                error!(node = ?chitchat_id, ?before, ?after,
                       "monotonic property (last_gc_version, max_version) decreased");
            }
        }
        if outcome.nodes_unknown > 0 {
            debug!(
                unknown = outcome.nodes_unknown,
                "delta entries for unknown nodes ignored"
            );
        }
        outcome
    }

    pub(crate) fn snapshot(&self, seed_addrs: HashSet<SocketAddr>) -> ClusterStateSnapshot {
        ClusterStateSnapshot {
            node_states: self.node_states.values().cloned().collect(),
            seed_addrs,
        }
    }
}

pub(crate) fn node_digest(state: &NodeState) -> NodeDigest {
    NodeDigest::new(
        state.heartbeat(),
        state.last_gc_version(),
        state.max_version(),
    )
}

/// A copy of every node state, for inspection and JSON output (chitchat's shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStateSnapshot {
    /// Every node state, self included, in id order.
    pub node_states: Vec<NodeState>,
    /// The seed addresses resolved at the time of the snapshot.
    pub seed_addrs: HashSet<SocketAddr>,
}
