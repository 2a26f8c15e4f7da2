//! `Chitchat`: the sans-IO state machine. It takes messages (or datagrams) and returns replies;
//! it knows no sockets, threads or timers. Time comes from the `Clock` it is given, randomness
//! from a seeded RNG.
//!
//! Beyond chitchat 0.13's API it exposes, deliberately, what a driver needs to run a node
//! without our server (the simulation does): [`Chitchat::with_clock`], the gossip round
//! ([`Chitchat::begin_gossip_round`], [`Chitchat::end_gossip_round`]), [`Chitchat::write_syn`],
//! the byte path [`Chitchat::handle_datagram`] and the owned-message path
//! ([`Chitchat::process_message`], [`Chitchat::process_envelope`]), plus read-only
//! introspection (config, clock, counters, digest).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::config::ChitchatConfig;
use crate::message::NodeDigest;
use crate::message::{ChitchatEnvelope, ChitchatMessage, Digest, ProtocolVersion};
use crate::protocol::amplification::{AmplificationLimiter, AmplificationLimits};
use crate::protocol::cluster_state::{ClusterState, ClusterStateSnapshot};
use crate::protocol::digest_match::PeerDigest;
use crate::protocol::failure_detector::FailureDetector;
use crate::protocol::limits::{Limits, Refusal, RefusalCounts, RefusalLog};
use crate::protocol::listener::{KeyChangeEvent, ListenerHandle, Listeners};
use crate::protocol::member_addrs::MemberAddrs;
use crate::protocol::node_state::NodeState;
use crate::protocol::peer_selection::{GossipTargets, select_from_pool};
use crate::protocol::received::{self, DigestHint, Received};
use crate::protocol::reply::{self, ReplyOutcome};
#[cfg(test)]
use crate::types::Heartbeat;
use crate::types::{ChitchatId, Version, VersionedValue};
use crate::wire::{self, DecodeError};
use crate::wire::{ChitchatIdRef, DeltaView, DigestView, MessageView, sort_and_dedup};

/// Most node states one `Chitchat` keeps: a digest cannot carry more (u16 count), and it bounds
/// what forged digests can make a node allocate.
pub const MAX_NODE_STATES: usize = 65_535;

/// Counters of what the state machine saw and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProtocolStats {
    /// Syns handled.
    pub syn_received: u64,
    /// SynAcks handled.
    pub syn_ack_received: u64,
    /// Acks handled.
    pub ack_received: u64,
    /// BadCluster answers received: we gossiped with a node of another cluster (a wrong seed).
    pub bad_cluster_received: u64,
    /// Syns of another cluster, answered with BadCluster.
    pub bad_cluster_sent: u64,
    /// Node deltas applied to a node state.
    pub node_deltas_applied: u64,
    /// Node deltas that reset a node state first (the peer garbage-collected what we hold).
    pub node_deltas_reset: u64,
    /// Node deltas refused as stale or from the future.
    pub node_deltas_rejected: u64,
    /// Replies whose digest did not fit and was sent partial.
    pub digests_truncated: u64,
    /// Replies whose delta left stale data behind for lack of room.
    pub deltas_truncated: u64,
    /// Digest entries ignored because the node-state cap was reached.
    pub nodes_refused: u64,
    /// Received values ignored as implausible or over a byte budget, by kind (DESIGN-13).
    pub refused: RefusalCounts,
    /// SynAcks from an address we sent no recent Syn to: dropped unanswered and unapplied
    /// (kind `unsolicited_syn_ack`).
    pub unsolicited_syn_ack: u64,
    /// Replies to non-members withheld because not even a minimal one fit the
    /// anti-amplification budget (kind `amplification_limited`).
    pub amplification_limited: u64,
    /// Non-member datagrams dropped undecoded, their source's receive allowance spent (kind
    /// `non_member_flood`).
    pub non_member_flood: u64,
}

/// One node's view of the cluster and the rules that change it (SPEC §4). Lock it, feed it
/// datagrams and gossip rounds; it answers with bytes to send.
pub struct Chitchat {
    config: ChitchatConfig,
    cluster_state: ClusterState,
    failure_detector: FailureDetector,
    /// Max versions of the live nodes (self included) in id order, as last published. The ids
    /// are not kept: the live set is the node states' liveness, which only the evaluation
    /// changes, and the membership epoch tells whether it may have (a copy of every live id
    /// was about 100 B per node state, 100 MB in a process of 1,000 nodes of 1,000).
    previous_live_versions: Vec<Version>,
    /// The cluster state's membership epoch when `previous_live_versions` was taken.
    previous_live_epoch: u64,
    live_nodes_tx: watch::Sender<BTreeMap<ChitchatId, NodeState>>,
    /// The live set changed while nobody watched: publish before the next subscription.
    live_nodes_stale: std::cell::Cell<bool>,
    seed_addrs: watch::Receiver<HashSet<SocketAddr>>,
    clock: Clock,
    rng: SmallRng,
    stats: ProtocolStats,
    limits: Limits,
    refusal_log: RefusalLog,
    amplification: AmplificationLimiter,
    /// Gossip addresses of the nodes held live (self excluded), as of the last round.
    member_addrs: MemberAddrs,
    /// The nodes held dead (self excluded), in id order, and the live ones counted, as of
    /// the last evaluation: with `member_addrs`, a round's lists while the membership and
    /// liveness are unchanged.
    dead_addrs: Vec<SocketAddr>,
    live_others: usize,
    /// Rounds that walked the node states (tests check that steady rounds do not).
    #[cfg(test)]
    pub(crate) rounds_walked: u64,
    /// The digest being handled, matched against the node states: the thread's scratch
    /// buffer while a message is handled, empty otherwise.
    peer_digest: PeerDigest,
}

/// Buffers that live only while one message or one gossip round is handled, kept per thread
/// rather than per node: they grow to the node count once and are reused by every node the
/// thread serves (kept per node, they were about 100 B per node state, 100 MB in a process of
/// 1,000 nodes of 1,000). Every use fills them before reading them.
struct Scratch {
    peer_digest: std::cell::Cell<PeerDigest>,
    round_lists: std::cell::Cell<RoundLists>,
}

thread_local! {
    static SCRATCH: Scratch = Scratch {
        peer_digest: std::cell::Cell::new(PeerDigest::default()),
        round_lists: std::cell::Cell::new(RoundLists::default()),
    };
}

/// The addresses a gossip round chooses from, in node-id order; the thread's scratch buffers
/// ([`SCRATCH`]), so that a round allocates nothing once they have grown.
#[derive(Debug, Default)]
struct RoundLists {
    /// Every other node state's address (the pool while no node is live).
    peers: Vec<SocketAddr>,
    live: Vec<SocketAddr>,
    /// Dead nodes, scheduled for deletion included.
    dead: Vec<SocketAddr>,
    /// Resolved seeds other than this node, sorted.
    seeds: Vec<SocketAddr>,
}

impl RoundLists {
    fn clear(&mut self) {
        self.peers.clear();
        self.live.clear();
        self.dead.clear();
    }

    /// Another node's state, in id order.
    fn note(&mut self, id: &ChitchatId, state: &NodeState) {
        let addr = id.gossip_advertise_addr;
        self.peers.push(addr);
        if state.liveness.is_live() {
            self.live.push(addr);
        } else if state.liveness.is_dead() {
            self.dead.push(addr);
        }
    }

    fn set_seeds(&mut self, seeds: &watch::Receiver<HashSet<SocketAddr>>, own: SocketAddr) {
        self.seeds.clear();
        self.seeds
            .extend(seeds.borrow().iter().copied().filter(|addr| *addr != own));
        self.seeds.sort_unstable();
    }
}

/// How a datagram admitted before decoding may be answered ([`Chitchat::admit_datagram`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The source is the gossip address of a node held live: its replies are not bounded.
    member: bool,
    /// The most bytes a reply to it may take.
    reply_budget: usize,
}

impl Chitchat {
    /// A node on the system clock, with a random seed for tie-breaking.
    pub fn with_chitchat_id_and_seeds(
        config: ChitchatConfig,
        seed_addrs: watch::Receiver<HashSet<SocketAddr>>,
        initial_key_values: Vec<(String, String)>,
    ) -> Self {
        Chitchat::with_clock(
            config,
            seed_addrs,
            initial_key_values,
            Clock::System,
            rand::random(),
        )
    }

    /// A node whose time comes from `clock` and whose random choices derive from `rng_seed`:
    /// deterministic given the same inputs.
    pub fn with_clock(
        config: ChitchatConfig,
        seed_addrs: watch::Receiver<HashSet<SocketAddr>>,
        initial_key_values: Vec<(String, String)>,
        clock: Clock,
        rng_seed: u64,
    ) -> Self {
        let failure_detector = FailureDetector::new(config.failure_detector_config.clone());
        let (live_nodes_tx, _) = watch::channel(BTreeMap::new());
        let amplification = AmplificationLimiter::new(
            AmplificationLimits::default(),
            config.gossip_interval,
            clock.now(),
        );
        let mut chitchat = Chitchat {
            cluster_state: ClusterState::new(Listeners::default(), clock.clone()),
            config,
            failure_detector,
            previous_live_versions: Vec::new(),
            previous_live_epoch: u64::MAX,
            live_nodes_tx,
            live_nodes_stale: std::cell::Cell::new(false),
            seed_addrs,
            clock,
            rng: SmallRng::seed_from_u64(rng_seed),
            stats: ProtocolStats::default(),
            limits: Limits::default(),
            refusal_log: RefusalLog::default(),
            amplification,
            member_addrs: MemberAddrs::default(),
            dead_addrs: Vec::new(),
            live_others: 0,
            #[cfg(test)]
            rounds_walked: 0,
            peer_digest: PeerDigest::default(),
        };
        let self_id = chitchat.config.chitchat_id.clone();
        chitchat.cluster_state.set_self_id(self_id);
        let created = chitchat.clock.now();
        let own = chitchat.self_node_state();
        own.anchor_own(created);
        own.inc_heartbeat();
        for (key, value) in initial_key_values {
            own.set(key, value);
        }
        chitchat
    }

    /// Bounds every datagram this node writes (Syn, SynAck, Ack) and every key-value its own
    /// state accepts to `max_datagram_len` bytes: the server sets it from its endpoint, which is
    /// smaller than the UDP maximum where the transport adds bytes (sealing, in keyed clusters).
    pub fn set_datagram_budget(&mut self, max_datagram_len: usize) {
        let budget = max_datagram_len.min(crate::wire::MAX_UDP_DATAGRAM_PAYLOAD_SIZE);
        self.cluster_state.set_datagram_budget(budget);
    }

    /// The config this node was created with (read-only: a changed config means a new node).
    pub fn config(&self) -> &ChitchatConfig {
        &self.config
    }

    /// The current time on this node's clock.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The clock every instant of this node comes from (a driver computes deadlines on it).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// What the state machine saw and did so far.
    pub fn stats(&self) -> &ProtocolStats {
        &self.stats
    }

    /// The byte budgets applied to received state.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the byte budgets; what is already held is kept (a lower cap refuses only new
    /// nodes and further growth).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Bytes of remote state held (ids, keys, values of every other node), the figure
    /// `Limits::max_remote_state_bytes` bounds.
    pub fn remote_state_bytes(&self) -> usize {
        self.cluster_state.remote_bytes()
    }

    /// Counts and logs (rate-limited per kind) received values that were ignored.
    fn refuse(&mut self, refusal: Refusal, n: u64, now: Instant, detail: std::fmt::Arguments<'_>) {
        if n == 0 {
            return;
        }
        self.stats.refused.add(refusal, n);
        self.refusal_log.note(refusal, now, detail);
    }

    /// The cluster this node belongs to: Syns of other clusters get BadCluster.
    pub fn cluster_id(&self) -> &str {
        &self.config.cluster_id
    }

    /// This node's id.
    pub fn self_chitchat_id(&self) -> &ChitchatId {
        &self.config.chitchat_id
    }

    /// Every node state known, self included, in id order.
    pub fn node_states(&self) -> &BTreeMap<ChitchatId, NodeState> {
        &self.cluster_state.node_states
    }

    /// The state of one node, if known.
    pub fn node_state(&self, chitchat_id: &ChitchatId) -> Option<&NodeState> {
        self.cluster_state.node_state(chitchat_id)
    }

    /// This node's own state, to read or write its key-values.
    pub fn self_node_state(&mut self) -> &mut NodeState {
        let id = self.config.chitchat_id.clone();
        self.cluster_state.node_state_or_create(&id)
    }

    /// Self first, then the nodes the failure detector considers alive.
    pub fn live_nodes(&self) -> impl Iterator<Item = &ChitchatId> {
        let self_id = &self.config.chitchat_id;
        let others = self
            .cluster_state
            .node_states
            .iter()
            .filter(move |(id, state)| *id != self_id && state.liveness.is_live())
            .map(|(id, _)| id);
        std::iter::once(self_id).chain(others)
    }

    /// The nodes the failure detector considers dead (scheduled for deletion included).
    pub fn dead_nodes(&self) -> impl Iterator<Item = &ChitchatId> {
        self.cluster_state
            .node_states
            .iter()
            .filter(|(_, state)| state.liveness.is_dead())
            .map(|(id, _)| id)
    }

    /// Dead for more than half the dead-node grace period: no longer shared.
    pub fn scheduled_for_deletion_nodes(&self) -> impl Iterator<Item = &ChitchatId> {
        let schedule = self.failure_detector.deletion_schedule(self.clock.now());
        self.cluster_state
            .node_states
            .iter()
            .filter(move |(_, state)| schedule.is_scheduled(&state.liveness))
            .map(|(id, _)| id)
    }

    /// How long a silence of this node would make it dead (None for self, unknown nodes and
    /// nodes without interval samples).
    pub fn failure_detection_timeout(&self, chitchat_id: &ChitchatId) -> Option<Duration> {
        if chitchat_id == &self.config.chitchat_id {
            return None;
        }
        let state = self.cluster_state.node_state(chitchat_id)?;
        self.failure_detector
            .failure_detection_timeout(&state.liveness)
    }

    /// Live nodes (self included, extra liveness predicate applied), published at the end of a
    /// gossip round whenever the set of live nodes or one of their max versions changed.
    pub fn live_nodes_watcher(&self) -> watch::Receiver<BTreeMap<ChitchatId, NodeState>> {
        if self.live_nodes_stale.replace(false) {
            self.live_nodes_tx
                .send_replace(self.live_nodes_to_publish());
        }
        self.live_nodes_tx.subscribe()
    }

    /// The live nodes of the last evaluation (self included) that pass the extra liveness
    /// predicate, with their current states.
    fn live_nodes_to_publish(&self) -> BTreeMap<ChitchatId, NodeState> {
        let self_id = &self.config.chitchat_id;
        self.cluster_state
            .node_states
            .iter()
            .filter(|(id, state)| *id == self_id || state.liveness.is_live())
            .filter_map(|(id, state)| {
                let keep = self
                    .config
                    .extra_liveness_predicate
                    .as_ref()
                    .is_none_or(|predicate| predicate(state));
                keep.then(|| (id.clone(), state.clone()))
            })
            .collect()
    }

    /// [`Chitchat::live_nodes_watcher`] as a stream.
    pub fn live_nodes_watch_stream(&self) -> WatchStream<BTreeMap<ChitchatId, NodeState>> {
        WatchStream::new(self.live_nodes_watcher())
    }

    /// The seed addresses currently resolved.
    pub fn seed_nodes(&self) -> HashSet<SocketAddr> {
        self.seed_addrs.borrow().clone()
    }

    /// A copy of every node state and the seeds, for inspection and JSON output.
    pub fn state_snapshot(&self) -> ClusterStateSnapshot {
        self.cluster_state.snapshot(self.seed_nodes())
    }

    /// Calls `callback` whenever a key starting with `prefix` is set (or set with a TTL) on any
    /// node, with the prefix stripped. Callbacks run under the state lock: keep them short and
    /// never touch the `Chitchat` from them.
    pub fn subscribe_event(
        &self,
        prefix: impl ToString,
        callback: impl Fn(KeyChangeEvent) + Send + Sync + 'static,
    ) -> ListenerHandle {
        self.cluster_state.listeners().subscribe(prefix, callback)
    }

    /// Key-change listener calls that panicked (each caught, logged, and skipped: the node goes
    /// on).
    pub fn listener_panics(&self) -> u64 {
        self.cluster_state.listeners().panics()
    }

    /// Catch-up API: replaces a node state with one fetched by other means, if it is newer
    /// (SPEC §4.9). Keys absent from `key_values` are removed without tombstones.
    pub fn reset_node_state_if_update(
        &mut self,
        chitchat_id: &ChitchatId,
        key_values: impl Iterator<Item = (String, VersionedValue)>,
        max_version: Version,
        last_gc_version: Version,
    ) {
        if chitchat_id == &self.config.chitchat_id {
            warn!("refusing to reset this node's own state");
            return;
        }
        let state = if self.cluster_state.is_garbage_collected(chitchat_id) {
            match self.cluster_state.node_state_mut(chitchat_id) {
                Some(state) => state,
                None => {
                    info!(node = ?chitchat_id, "not resetting a recently garbage-collected node");
                    return;
                }
            }
        } else {
            self.cluster_state.node_state_or_create(chitchat_id)
        };
        let bytes_before = state.bytes();
        let before = state.monotonic_property();
        if before >= (last_gc_version, max_version) {
            warn!(node = ?chitchat_id, ?before, last_gc_version, max_version,
                  "attempted to reset a node with an obsolete state");
            return;
        }
        state.set_max_version(max_version);
        let mut previous_keys: HashSet<String> = state
            .key_values_including_deleted()
            .map(|(key, _)| key.to_string())
            .collect();
        for (key, value) in key_values {
            previous_keys.remove(&key);
            state.set_versioned_value(&key, value);
        }
        for key in previous_keys {
            state.remove_key(&key);
        }
        state.set_last_gc_version(last_gc_version);
        // Known to the failure detector (so it is eventually collected), but not seen alive.
        self.failure_detector.ensure_window(&mut state.liveness);
        let bytes_after = state.bytes();
        self.cluster_state
            .account(chitchat_id, bytes_before, bytes_after);
    }

    /// Bumps the own heartbeat: every round and every message handled.
    pub(crate) fn update_self_heartbeat(&mut self) {
        // One lookup, no clone of the id (the own state always exists after construction).
        if let Some(own) = self
            .cluster_state
            .node_states
            .get_mut(&self.config.chitchat_id)
        {
            own.inc_heartbeat();
            return;
        }
        self.self_node_state().inc_heartbeat();
    }

    /// Tombstone and TTL garbage collection on every node state.
    #[cfg(test)]
    pub(crate) fn gc_keys_marked_for_deletion(&mut self) {
        let now = self.clock.now();
        let grace = self.config.marked_for_deletion_grace_period;
        self.cluster_state.gc_keys_marked_for_deletion(grace, now);
    }

    /// Records a heartbeat seen in a digest (SPEC §4.6). This is how membership spreads.
    #[cfg(test)]
    pub(crate) fn report_heartbeat(&mut self, chitchat_id: &ChitchatId, heartbeat: Heartbeat) {
        let now = self.clock.now();
        self.report_heartbeat_at(chitchat_id, NodeDigest::new(heartbeat, 0, 0), now);
    }

    /// One digest entry: a heartbeat about another node (plausible ones only, DESIGN-13 §1),
    /// or a claim about our own node, which we outgrow (§2).
    fn report_heartbeat_at(&mut self, chitchat_id: &ChitchatId, entry: NodeDigest, now: Instant) {
        let heartbeat = entry.heartbeat;
        if chitchat_id == &self.config.chitchat_id {
            self.own_claim(entry, now);
            return;
        }
        if chitchat_id.node_id.len() > self.limits.max_node_id_len {
            let len = chitchat_id.node_id.len();
            self.refuse(
                Refusal::IdTooLong,
                1,
                now,
                format_args!("a node id of {len} bytes"),
            );
            return;
        }
        if let Some(last) = self.cluster_state.last_heartbeat_if_deleted(chitchat_id)
            && heartbeat <= last
        {
            // A stale copy of a garbage-collected node: do not resurrect it.
            let reported = self
                .cluster_state
                .node_state_mut(chitchat_id)
                .map(|state| state.try_set_received_heartbeat(heartbeat, now));
            match reported {
                Some(Ok(true)) => {
                    if let Some(state) = self.cluster_state.node_state_mut(chitchat_id) {
                        self.failure_detector
                            .report_heartbeat(&mut state.liveness, now);
                    }
                }
                Some(Err(refusal)) => self.refuse(
                    refusal,
                    1,
                    now,
                    format_args!("{heartbeat:?} about {chitchat_id:?}"),
                ),
                _ => {}
            }
            return;
        }
        if self.cluster_state.node_state(chitchat_id).is_none() {
            if !crate::protocol::limits::is_plausible(heartbeat.0, None, now) {
                self.refuse(
                    Refusal::ImplausibleHeartbeat,
                    1,
                    now,
                    format_args!("{heartbeat:?} about the new node {chitchat_id:?}"),
                );
                return;
            }
            if let Some(refusal) = self
                .cluster_state
                .refuses_new_node(&self.limits, MAX_NODE_STATES)
            {
                self.stats.nodes_refused += 1;
                let held = self.cluster_state.remote_bytes();
                self.refuse(
                    refusal,
                    1,
                    now,
                    format_args!("new node refused: {held} bytes of remote state held"),
                );
                return;
            }
        }
        let state = self.cluster_state.node_state_or_create(chitchat_id);
        match state.try_set_received_heartbeat(heartbeat, now) {
            Ok(true) => self
                .failure_detector
                .report_heartbeat(&mut state.liveness, now),
            Ok(false) => {}
            Err(refusal) => self.refuse(
                refusal,
                1,
                now,
                format_args!("{heartbeat:?} about {chitchat_id:?}"),
            ),
        }
    }

    /// Owner authority (DESIGN-13 §2): a digest entry about our own id claiming more than we
    /// have is outgrown, so our next word supersedes the claim at every peer holding it.
    fn own_claim(&mut self, entry: NodeDigest, now: Instant) {
        let refusals = apply_own_claim(self.self_node_state(), entry, now);
        self.refuse_own_claim(entry, refusals, now);
    }

    /// Counts and logs what [`apply_own_claim`] refused.
    fn refuse_own_claim(&mut self, entry: NodeDigest, refusals: OwnClaimRefusals, now: Instant) {
        let OwnClaimRefusals {
            heartbeat,
            versions,
        } = refusals;
        let claim = entry.max_version.max(entry.last_gc_version);
        if let Some(refusal) = heartbeat {
            self.refuse(
                refusal,
                1,
                now,
                format_args!("a claim of {:?} about this node", entry.heartbeat),
            );
        }
        if let Some(refusal) = versions {
            let refusal = if entry.last_gc_version > entry.max_version {
                Refusal::ImplausibleLastGcVersion
            } else {
                refusal
            };
            self.refuse(
                refusal,
                1,
                now,
                format_args!("a claim of version {claim} about this node"),
            );
        }
    }

    /// `report_heartbeat` for every entry of a digest, which is matched against the node
    /// states by wire bytes first (`self.peer_digest`, by state position): known nodes take
    /// one pass over the states (our own id included: its claim is applied there), only
    /// unknown ids take the general path. On return `self.peer_digest` matches the digest
    /// against the node states as they are now (new nodes included), for the reply's delta.
    /// Bumps the own heartbeat too (every message handled does), before anything reads it.
    fn report_heartbeats(&mut self, digest: &DigestView<'_>, now: Instant) {
        self.cluster_state
            .match_digest(digest, &mut self.peer_digest);
        let self_position = self.cluster_state.id_table().self_position();
        let mut implausible = 0u64;
        let end = self.peer_digest.end();
        // Whether the peer is behind on no state: its delta is then empty (write_delta skips
        // its pass over the states).
        let mut up_to_date = end == self.cluster_state.node_states.len();
        let mut own_claim = None;
        let mut bumped = false;
        for (k, state) in self
            .cluster_state
            .node_states
            .values_mut()
            .take(end)
            .enumerate()
        {
            if Some(k) == self_position {
                state.inc_heartbeat();
                bumped = true;
                match self.peer_digest.get(k) {
                    // The claim is applied here, on the state at hand (every digest from a
                    // peer that knows us has one: through the general path it cost two map
                    // lookups, a sort and an id allocation per message).
                    Some(entry) => {
                        own_claim = Some((entry, apply_own_claim(state, entry, now)));
                        up_to_date &= state.max_version() <= entry.max_version;
                    }
                    None => up_to_date = false,
                }
                continue;
            }
            let Some(node_digest) = self.peer_digest.get(k) else {
                up_to_date = false;
                continue;
            };
            up_to_date &= state.max_version() <= node_digest.max_version;
            match state.try_set_received_heartbeat(node_digest.heartbeat, now) {
                Ok(true) => self
                    .failure_detector
                    .report_heartbeat(&mut state.liveness, now),
                Ok(false) => {}
                Err(_) => implausible += 1,
            }
        }
        self.refuse(
            Refusal::ImplausibleHeartbeat,
            implausible,
            now,
            format_args!("{implausible} heartbeats of known nodes in one digest"),
        );
        if !bumped {
            self.update_self_heartbeat();
        }
        if let Some((entry, refusals)) = own_claim {
            self.refuse_own_claim(entry, refusals, now);
        }
        if self.peer_digest.unknown().is_empty() {
            self.peer_digest.set_up_to_date(up_to_date);
            return;
        }
        // Unknown ids, in id order, the last received of each id (the own id is known: its
        // claim was applied above).
        let others: Vec<(ChitchatIdRef<'_>, NodeDigest)> = self
            .peer_digest
            .unknown()
            .iter()
            .filter_map(|&position| digest.entry_at(position))
            .map(|entry| (entry.id(), entry.digest))
            .collect();
        let others: Vec<(ChitchatId, NodeDigest)> = sort_and_dedup(others)
            .into_iter()
            .map(|(id, entry)| (id.to_owned_id(), entry))
            .collect();
        for (id, entry) in others {
            self.report_heartbeat_at(&id, entry, now);
        }
        // Node states may have been added: match again against the new positions (which
        // clears `up_to_date`).
        self.cluster_state
            .match_digest(digest, &mut self.peer_digest);
    }

    /// Applies a received delta; calls the catch-up callback once if a node state was reset.
    fn process_delta(&mut self, delta: &DeltaView<'_>) {
        let now = self.clock.now();
        let outcome = self.cluster_state.apply_delta_within(
            delta,
            &self.config.chitchat_id,
            now,
            &self.limits,
        );
        for (refusal, n) in outcome.refusals.iter() {
            self.refuse(
                refusal,
                n,
                now,
                format_args!("{n} node deltas or key-values in one delta"),
            );
        }
        self.stats.node_deltas_applied += outcome.nodes_applied as u64;
        self.stats.node_deltas_reset += outcome.nodes_reset as u64;
        self.stats.node_deltas_rejected += outcome.nodes_rejected as u64;
        if outcome.nodes_reset > 0
            && let Some(callback) = &self.config.catchup_callback
        {
            info!(
                resets = outcome.nodes_reset,
                "node states reset by gossip: calling the catch-up callback"
            );
            callback();
        }
    }

    /// Re-evaluates liveness, publishes the live nodes if they changed, and forgets nodes dead
    /// for longer than the grace period. Called at the end of every gossip round.
    pub(crate) fn update_nodes_liveness(&mut self) {
        let now = self.clock.now();
        let self_id = &self.config.chitchat_id;
        // One pass: liveness, the live nodes' max versions against those published last, and
        // whether any node is due for collection (three passes were 4 % of a 100-node process).
        // Live nodes (self included) and their max versions, in id order, are compared without
        // allocating and republished only when they changed. When no node changed liveness and
        // none was added or removed, the ids are the same as last time and only the versions
        // need comparing (comparing every id each round was 5 % of a 500-node process).
        let mut flipped = false;
        let mut expired_any = false;
        let mut live_count = 0usize;
        let mut same_versions = true;
        for (id, state) in self.cluster_state.node_states.iter_mut() {
            let own = id == self_id;
            if !own {
                flipped |= self
                    .failure_detector
                    .update_node_liveness(&mut state.liveness, now);
                expired_any |= self
                    .failure_detector
                    .is_garbage_collectable(&state.liveness, now);
            }
            if own || state.liveness.is_live() {
                same_versions &=
                    self.previous_live_versions.get(live_count) == Some(&state.max_version());
                live_count += 1;
            }
        }
        let epoch = self.cluster_state.membership_epoch();
        let unchanged = !flipped
            && epoch == self.previous_live_epoch
            && same_versions
            && live_count == self.previous_live_versions.len();
        if !unchanged {
            let live = self
                .cluster_state
                .node_states
                .iter()
                .filter(|(id, state)| *id == self_id || state.liveness.is_live())
                .map(|(_, state)| state.max_version());
            self.previous_live_versions.clear();
            self.previous_live_versions.extend(live);
            self.previous_live_epoch = epoch;
            // The published map clones every live node state: built only for a watcher, or
            // when one subscribes (a process of 500 nodes that nobody watches spent 3 % of its
            // time cloning them).
            if self.live_nodes_tx.receiver_count() > 0 {
                self.live_nodes_tx
                    .send_replace(self.live_nodes_to_publish());
                self.live_nodes_stale.set(false);
            } else {
                self.live_nodes_stale.set(true);
            }
            // Rebuilt only when the live set changed, not every round.
            self.member_addrs = self.live_addrs();
            self.live_others = live_count.saturating_sub(1);
            self.dead_addrs.clear();
            self.dead_addrs.extend(
                self.cluster_state
                    .node_states
                    .iter()
                    .filter(|(id, state)| *id != self_id && state.liveness.is_dead())
                    .map(|(id, _)| id.gossip_advertise_addr),
            );
        }
        if expired_any {
            let expired: Vec<ChitchatId> = self
                .cluster_state
                .node_states
                .iter()
                .filter(|(_, state)| {
                    self.failure_detector
                        .is_garbage_collectable(&state.liveness, now)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                self.cluster_state.garbage_collect_node(&id);
            }
        }
        self.cluster_state.compact_when_settled();
    }

    /// Node states added since the node-state map was last repacked.
    #[cfg(test)]
    pub(crate) fn node_states_inserted_since_pack(&self) -> usize {
        self.cluster_state.inserted_since_pack()
    }

    /// Whether the node-state map was repacked since the membership last changed.
    #[cfg(test)]
    pub(crate) fn node_states_compacted(&self) -> bool {
        self.cluster_state.is_compacted()
    }

    /// The own digest: every node state not scheduled for deletion (public for tools and
    /// benchmarks that build messages a node would answer).
    pub fn compute_digest(&self) -> Digest {
        let now = self.clock.now();
        let scheduled = self.failure_detector.deletion_schedule(now);
        self.cluster_state.compute_digest(&scheduled)
    }

    /// The Syn this node sends to start a handshake (full digest; the byte path, `write_syn`,
    /// trims it to fit a datagram).
    #[cfg(test)]
    pub(crate) fn create_syn_message(&self) -> ChitchatMessage {
        ChitchatMessage::Syn {
            cluster_id: self.config.cluster_id.clone(),
            digest: self.compute_digest(),
        }
    }

    /// Encodes a Syn in `version` into `out` (cleared first): the gossip path, no intermediate
    /// message. A driver uses it for a Syn outside the rounds (`ChitchatHandle::gossip`).
    pub fn write_syn(&mut self, version: ProtocolVersion, out: &mut Vec<u8>) {
        out.clear();
        let now = self.clock.now();
        let scheduled = self.failure_detector.deletion_schedule(now);
        let truncated = reply::write_syn(
            &self.cluster_state,
            &self.config.chitchat_id,
            &self.config.cluster_id,
            &scheduled,
            version,
            &mut self.rng,
            out,
        );
        if truncated {
            self.stats.digests_truncated += 1;
        }
    }

    /// Handles a message received in the protocol version of this node's config.
    pub fn process_message(&mut self, message: ChitchatMessage) -> Option<ChitchatMessage> {
        let envelope = ChitchatEnvelope {
            version: self.config.protocol_version,
            message,
        };
        self.process_envelope(envelope).map(|reply| reply.message)
    }

    /// Handles a message; the reply (if any) is in the version received.
    pub fn process_envelope(&mut self, envelope: ChitchatEnvelope) -> Option<ChitchatEnvelope> {
        let mut buf = Vec::new();
        let outcome = self.process_envelope_into(envelope, &mut buf, None);
        if !outcome.replied {
            return None;
        }
        match received::decode(&buf) {
            Ok(reply) => Some(reply),
            Err(error) => {
                error!(%error, "a reply of this node does not decode: dropped");
                None
            }
        }
    }

    /// Decodes a datagram, handles it and encodes the reply (if any) into `reply` (cleared
    /// first). The server's hot path: replies are written straight from the state. Past
    /// `deadline`, an instant of this node's [`Chitchat::clock`], the reply's delta is cut short.
    pub fn handle_datagram(
        &mut self,
        payload: &[u8],
        reply: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<ReplyOutcome, DecodeError> {
        let hint = self.digest_hint_for(payload);
        received::with_view(payload, hint.as_ref().map(|hint| &*hint.0), |view| {
            self.process_view_into(view.version, view.message, reply, deadline)
        })
    }

    /// [`Chitchat::handle_datagram`] for a datagram from `from`, with the anti-amplification
    /// rules (DESIGN-13 §4): a non-member source's datagrams are dropped undecoded once its
    /// receive allowance is spent, its replies are bounded by its budget, a SynAck from an
    /// address we sent no recent Syn to is dropped, and a V1 Syn's cluster id is checked before
    /// its digest is decompressed. The three steps the server takes apart, so that it decodes outside
    /// the node lock: [`Chitchat::admit_datagram`], [`decode_received`](crate::protocol::decode_received),
    /// [`Chitchat::handle_received`].
    pub fn handle_datagram_from(
        &mut self,
        from: SocketAddr,
        payload: &[u8],
        reply: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<ReplyOutcome, DecodeError> {
        reply.clear();
        let Some(admission) = self.admit_datagram(from, payload.len()) else {
            return Ok(ReplyOutcome::none(self.config.protocol_version));
        };
        let cluster_id = self.config.cluster_id.clone();
        let hint = self.digest_hint_for(payload);
        received::decode_received_with(hint.as_ref(), &cluster_id, payload, |received| {
            self.handle_received(from, admission, received, reply, deadline)
        })
    }

    /// The ids this node holds, to decode `payload` with outside the lock
    /// ([`decode_received_with`](crate::protocol::decode_received_with)), if it is a message
    /// with a digest (a Syn or a SynAck). One reference count.
    pub fn digest_hint_for(&self, payload: &[u8]) -> Option<DigestHint> {
        wire::carries_digest(payload).then(|| DigestHint(self.cluster_state.shared_id_table()))
    }

    /// Before a datagram of `len` bytes from `from` is decoded: `None` drops it undecoded (a
    /// non-member source past its receive allowance); otherwise how its reply is bounded.
    pub fn admit_datagram(&mut self, from: SocketAddr, len: usize) -> Option<Admission> {
        let now = self.clock.now();
        let member = !self.amplification.limits().enabled || self.member_addrs.contains(&from);
        if !member && !self.amplification.admit(from, len, now) {
            self.stats.non_member_flood += 1;
            return None;
        }
        let reply_budget = if member {
            usize::MAX
        } else {
            self.amplification.reply_budget(from, now)
        };
        Some(Admission {
            member,
            reply_budget,
        })
    }

    /// Handles a datagram from `from`, admitted by [`Chitchat::admit_datagram`] and decoded by
    /// [`decode_received`](crate::protocol::decode_received), writing the reply (if any) into
    /// `reply` (cleared first).
    pub fn handle_received(
        &mut self,
        from: SocketAddr,
        admission: Admission,
        received: Received<'_>,
        reply: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> ReplyOutcome {
        reply.clear();
        let now = self.clock.now();
        let budget = admission.reply_budget;
        let outcome = match received {
            Received::OtherClusterSyn {
                version,
                cluster_id,
            } => {
                self.stats.syn_received += 1;
                self.stats.bad_cluster_sent += 1;
                warn!(their = %cluster_id, ours = %self.config.cluster_id,
                      "syn from another cluster: answering BadCluster");
                reply::write_bad_cluster(version, reply);
                ReplyOutcome {
                    replied: true,
                    ..ReplyOutcome::none(version)
                }
            }
            Received::Message(view) => {
                if matches!(view.message, MessageView::SynAck { .. })
                    && !self.amplification.accept_syn_ack(from, now)
                {
                    self.stats.unsolicited_syn_ack += 1;
                    return ReplyOutcome::none(view.version);
                }
                self.process_view_budgeted(view.version, view.message, reply, deadline, budget)
            }
        };
        if !outcome.replied {
            return outcome;
        }
        if reply.len() > budget {
            reply.clear();
            self.stats.amplification_limited += 1;
            return ReplyOutcome {
                replied: false,
                ..outcome
            };
        }
        if !admission.member {
            self.amplification.charge(from, reply.len(), now);
        }
        outcome
    }

    /// Records a Syn sent to `to` outside the rounds (a driver's manual gossip), so that its
    /// SynAck is accepted.
    pub fn note_syn_sent(&mut self, to: SocketAddr) {
        let now = self.clock.now();
        self.amplification.note_syn_sent(to, now);
    }

    /// The anti-amplification configuration.
    pub fn amplification_limits(&self) -> &AmplificationLimits {
        self.amplification.limits()
    }

    /// Replaces the anti-amplification configuration (its state starts afresh).
    pub fn set_amplification_limits(&mut self, limits: AmplificationLimits) {
        let now = self.clock.now();
        self.amplification = AmplificationLimiter::new(limits, self.config.gossip_interval, now);
    }

    /// Handles an owned message, writing the reply (if any) into `out`.
    pub(crate) fn process_envelope_into(
        &mut self,
        envelope: ChitchatEnvelope,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> ReplyOutcome {
        let message = MessageView::of(&envelope.message);
        self.process_view_into(envelope.version, message, out, deadline)
    }

    /// The handshake logic (SPEC §4.1), writing the reply into `out`.
    fn process_view_into(
        &mut self,
        version: ProtocolVersion,
        message: MessageView<'_>,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> ReplyOutcome {
        self.process_view_budgeted(version, message, out, deadline, usize::MAX)
    }

    /// [`Chitchat::process_view_into`] with replies shrunk to at most `max_len` bytes, matching
    /// the digest in the thread's scratch buffer (see [`SCRATCH`]).
    fn process_view_budgeted(
        &mut self,
        version: ProtocolVersion,
        message: MessageView<'_>,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
        max_len: usize,
    ) -> ReplyOutcome {
        // `try_with`: a thread being torn down gets fresh buffers rather than a panic. Given
        // back at the end (no early return in between). Only messages with a digest use it.
        let matches_digest = matches!(
            message,
            MessageView::Syn { .. } | MessageView::SynAck { .. }
        );
        if matches_digest {
            self.peer_digest = SCRATCH
                .try_with(|scratch| scratch.peer_digest.take())
                .unwrap_or_default();
        }
        out.clear();
        let now = self.clock.now();
        // Every message handled bumps the own heartbeat, first thing in each arm; a digest's
        // pass over the node states does it on its way past the own state
        // (`report_heartbeats`), saving the map lookup that was 5 % of a 100-node process.
        let mut outcome = ReplyOutcome {
            version,
            replied: false,
            digest_truncated: false,
            delta_truncated: false,
        };
        match message {
            MessageView::Syn { cluster_id, .. } if cluster_id != self.config.cluster_id => {
                self.update_self_heartbeat();
                self.stats.syn_received += 1;
                warn!(their = %cluster_id, ours = %self.config.cluster_id,
                      "syn from another cluster: answering BadCluster");
                self.stats.bad_cluster_sent += 1;
                reply::write_bad_cluster(version, out);
                outcome.replied = true;
            }
            MessageView::Syn { digest, .. } => {
                self.stats.syn_received += 1;
                self.report_heartbeats(&digest, now);
                let scheduled = self.failure_detector.deletion_schedule(now);
                let (digest_truncated, summary) = reply::write_syn_ack(
                    &self.cluster_state,
                    &self.config.chitchat_id,
                    &scheduled,
                    version,
                    &self.peer_digest,
                    &mut self.rng,
                    out,
                    deadline,
                    max_len,
                );
                outcome.replied = true;
                outcome.digest_truncated = digest_truncated;
                outcome.delta_truncated = summary.truncated;
                self.stats
                    .refused
                    .add(Refusal::UnrelayableKeyValue, summary.unrelayable as u64);
            }
            MessageView::SynAck { digest, delta } => {
                self.stats.syn_ack_received += 1;
                self.report_heartbeats(&digest, now);
                self.process_delta(&delta);
                // The delta changed versions: whether the peer is behind is for write_delta
                // to find out.
                self.peer_digest.set_up_to_date(false);
                if !self.cluster_state.is_matched(&self.peer_digest) {
                    self.cluster_state
                        .match_digest(&digest, &mut self.peer_digest);
                }
                let scheduled = self.failure_detector.deletion_schedule(now);
                let summary = reply::write_ack(
                    &self.cluster_state,
                    &scheduled,
                    version,
                    &self.peer_digest,
                    &mut self.rng,
                    out,
                    deadline,
                    max_len,
                );
                outcome.replied = true;
                outcome.delta_truncated = summary.truncated;
                self.stats
                    .refused
                    .add(Refusal::UnrelayableKeyValue, summary.unrelayable as u64);
            }
            MessageView::Ack { delta } => {
                self.update_self_heartbeat();
                self.stats.ack_received += 1;
                self.process_delta(&delta);
            }
            MessageView::BadCluster => {
                self.update_self_heartbeat();
                self.stats.bad_cluster_received += 1;
                warn!("a peer answered BadCluster: it belongs to another cluster");
            }
        }
        if outcome.digest_truncated {
            self.stats.digests_truncated += 1;
        }
        if outcome.delta_truncated {
            self.stats.deltas_truncated += 1;
        }
        if matches_digest {
            let peer_digest = std::mem::take(&mut self.peer_digest);
            let _ = SCRATCH.try_with(|scratch| scratch.peer_digest.set(peer_digest));
        }
        outcome
    }

    /// Starts a gossip round (SPEC §4.2): picks the targets with this node's seeded RNG, bumps
    /// the own heartbeat, collects due tombstones and writes the round's Syn into `syn` (cleared
    /// first). Every target gets the same digest, so the Syn is encoded once for all of them.
    ///
    /// The driver sends `syn` to every address of the returned targets (`GossipTargets::all`),
    /// then calls [`Chitchat::end_gossip_round`]. The server and the simulation both drive
    /// rounds this way, so the simulation tests the round that ships.
    pub fn begin_gossip_round(&mut self, syn: &mut Vec<u8>) -> GossipTargets {
        let mut lists = SCRATCH
            .try_with(|scratch| scratch.round_lists.take())
            .unwrap_or_default();
        lists.clear();
        let now = self.clock.now();
        let grace = self.config.marked_for_deletion_grace_period;
        // The last evaluation's lists hold while no state was added or removed since (only
        // the evaluation changes liveness), and no tombstone can be due: then the round walks
        // no state at all (the walk was 7 % of a 500-node process).
        let reuse = self.previous_live_epoch == self.cluster_state.membership_epoch()
            && self.live_others > 0
            && !self.cluster_state.tombstones_may_be_due(grace, now);
        if reuse {
            self.update_self_heartbeat();
        } else {
            // One pass over the node states before the Syn's: due tombstones collected, the
            // own heartbeat bumped and the other states sorted into the round's lists (three
            // passes and a map lookup were 3 % of a 100-node process).
            #[cfg(test)]
            {
                self.rounds_walked += 1;
            }
            let self_id = &self.config.chitchat_id;
            let mut bumped = false;
            self.cluster_state
                .gc_keys_marked_for_deletion_visiting(grace, now, |id, state| {
                    if id == self_id {
                        state.inc_heartbeat();
                        bumped = true;
                    } else {
                        lists.note(id, state);
                    }
                });
            if !bumped {
                self.update_self_heartbeat();
            }
        }
        lists.set_seeds(
            &self.seed_addrs,
            self.config.chitchat_id.gossip_advertise_addr,
        );
        let targets = if reuse {
            select_from_pool(
                &mut self.rng,
                &self.member_addrs,
                self.live_others,
                &self.dead_addrs,
                &lists.seeds,
            )
        } else {
            let pool = if lists.live.is_empty() {
                &lists.peers
            } else {
                &lists.live
            };
            select_from_pool(
                &mut self.rng,
                pool.as_slice(),
                lists.live.len(),
                &lists.dead,
                &lists.seeds,
            )
        };
        let _ = SCRATCH.try_with(|scratch| scratch.round_lists.set(lists));
        for addr in targets.all() {
            self.amplification.note_syn_sent(addr, now);
        }
        let version = self.config.protocol_version;
        self.write_syn(version, syn);
        targets
    }

    /// Ends a gossip round once its Syns are sent: re-evaluates liveness, publishes the live
    /// nodes if they changed and forgets nodes dead for longer than the grace period.
    pub fn end_gossip_round(&mut self) {
        self.update_nodes_liveness();
    }

    /// Addresses of the nodes the failure detector considers alive, self excluded.
    fn live_addrs(&self) -> MemberAddrs {
        MemberAddrs::new(
            self.live_nodes()
                .skip(1) // self
                .map(|id| id.gossip_advertise_addr),
        )
    }
}

/// What a peer's claim about our own node refused: a heartbeat or versions beyond what this
/// node could have reached.
#[derive(Debug, Clone, Copy)]
struct OwnClaimRefusals {
    heartbeat: Option<Refusal>,
    versions: Option<Refusal>,
}

/// A peer's digest entry about our own node (SPEC §4.6, DESIGN-13 §2): we outgrow the
/// heartbeat and versions it claims, within what is plausible.
fn apply_own_claim(own: &mut NodeState, entry: NodeDigest, now: Instant) -> OwnClaimRefusals {
    let heartbeat = own.fast_forward_heartbeat(entry.heartbeat, now).err();
    let claim = entry.max_version.max(entry.last_gc_version);
    let versions = own.outgrow_claim(claim, now).err();
    OwnClaimRefusals {
        heartbeat,
        versions,
    }
}
