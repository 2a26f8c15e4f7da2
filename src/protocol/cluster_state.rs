//! `ClusterState`: every node state known locally, the listener registry they share, and the
//! memory of garbage-collected nodes.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info};

use crate::clock::Clock;
use crate::message::{Delta, Digest, NodeDigest};
use crate::protocol::gc_history::{GARBAGE_COLLECTED_NODE_HISTORY_SIZE, GcHistory};
use crate::protocol::listener::Listeners;
use crate::protocol::node_state::{DeltaStatus, NodeState, ScheduledForDeletion};
use crate::types::{ChitchatId, Heartbeat};
use crate::wire;

pub(crate) struct ClusterState {
    pub(crate) node_states: BTreeMap<ChitchatId, NodeState>,
    listeners: Listeners,
    gc_history: GcHistory,
    clock: Clock,
    /// Largest datagram this node may send: the UDP maximum, less the transport's own bytes
    /// (sealing, in keyed clusters). Every reply and Syn is written within it.
    pub(crate) datagram_budget: usize,
}

/// What applying a delta did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeltaApplication {
    pub(crate) nodes_applied: usize,
    pub(crate) nodes_reset: usize,
    pub(crate) nodes_rejected: usize,
    pub(crate) nodes_unknown: usize,
}

impl ClusterState {
    pub(crate) fn new(listeners: Listeners, clock: Clock) -> Self {
        ClusterState {
            node_states: BTreeMap::new(),
            listeners,
            gc_history: GcHistory::new(GARBAGE_COLLECTED_NODE_HISTORY_SIZE),
            clock,
            datagram_budget: wire::MAX_UDP_DATAGRAM_PAYLOAD_SIZE,
        }
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
            let state = NodeState::new(
                chitchat_id.clone(),
                self.listeners.clone(),
                self.clock.clone(),
            );
            self.node_states.insert(chitchat_id.clone(), state);
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

    pub(crate) fn gc_keys_marked_for_deletion(&mut self, grace_period: Duration, now: Instant) {
        for state in self.node_states.values_mut() {
            state.gc_keys_marked_for_deletion(grace_period, now);
        }
    }

    /// Applies a received delta (SPEC §4.5). Deltas only update nodes that already exist; a
    /// delta about `self_id` never overwrites our own state (we are its only author).
    pub(crate) fn apply_delta(
        &mut self,
        delta: &Delta,
        self_id: &ChitchatId,
        now: Instant,
    ) -> DeltaApplication {
        let mut outcome = DeltaApplication::default();
        for node_delta in &delta.node_deltas {
            if &node_delta.chitchat_id == self_id {
                if let Some(own) = self.node_states.get_mut(self_id) {
                    own.supersede_stale_self_copy(node_delta);
                }
                continue;
            }
            let Some(state) = self.node_states.get_mut(&node_delta.chitchat_id) else {
                outcome.nodes_unknown += 1;
                continue;
            };
            let before = state.monotonic_property();
            match state.delta_status(node_delta) {
                DeltaStatus::Reject => {
                    outcome.nodes_rejected += 1;
                    continue;
                }
                DeltaStatus::ApplyAfterReset => {
                    info!(node = ?node_delta.chitchat_id, last_gc_version = node_delta.last_gc_version,
                          "resetting node state: the peer garbage-collected what we hold");
                    state.reset_for_delta(node_delta.last_gc_version);
                    outcome.nodes_reset += 1;
                }
                DeltaStatus::Apply => {
                    outcome.nodes_applied += 1;
                }
            }
            state.apply_delta(node_delta, now);
            let after = state.monotonic_property();
            if after < before {
                // Unreachable by the acceptance rules; logged rather than asserted so a forged
                // delta cannot take the node down.
                error!(node = ?node_delta.chitchat_id, ?before, ?after,
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
