//! `NodeState`: one node's key-values, versions and heartbeat, as seen locally.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::clock::Clock;
#[cfg(test)]
use crate::message::NodeDelta;
use crate::protocol::failure_detector::{DeletionSchedule, NodeLiveness};
use crate::protocol::key_interner::{Key, intern};
use crate::protocol::key_value_map::KeyValueMap;
use crate::protocol::limits::{self, Limits, Refusal, RefusalCounts};
use crate::protocol::listener::{KeyChangeEvent, Listeners};
use crate::types::{
    ChitchatId, DeletionStatus, DeletionStatusMutation, Heartbeat, Version, VersionedValue,
};
#[cfg(test)]
use crate::wire::DeltaView;
use crate::wire::{self, MAX_STRING_LEN, NodeDeltaRef};

/// Which node states are no longer shared with peers (left out of digests and deltas). A trait
/// so that tests can name the set explicitly; nodes use the failure detector's schedule.
pub(crate) trait ScheduledForDeletion {
    /// Whether `state` (of `id`) is left out.
    fn contains(&self, id: &ChitchatId, state: &NodeState) -> bool;
}

impl ScheduledForDeletion for DeletionSchedule {
    fn contains(&self, _: &ChitchatId, state: &NodeState) -> bool {
        self.is_scheduled(&state.liveness)
    }
}

/// An explicit set (tests).
impl ScheduledForDeletion for HashSet<&ChitchatId> {
    fn contains(&self, id: &ChitchatId, _: &NodeState) -> bool {
        HashSet::contains(self, id)
    }
}

/// Why a key-value cannot be written into a node's own state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyValueError {
    /// chitchat 0.13 slices `key[0..1]` when notifying listeners and panics on such a key, so
    /// gossiping one would crash every real chitchat peer.
    #[error(
        "key {key:?} starts with a non-ASCII character: chitchat 0.13 peers crash on such keys, \
         so it is not written"
    )]
    NonAsciiFirstChar {
        /// The refused key.
        key: String,
    },
    /// The key-value would not fit in one delta datagram and would block the node's gossip.
    #[error(
        "key {key:?} with its value takes {size} bytes in a delta; at most {limit} fit in one datagram"
    )]
    TooLarge {
        /// The refused key (cut to 64 characters).
        key: String,
        /// `key.len() + value.len()`.
        size: usize,
        /// The most that fits for this node.
        limit: usize,
    },
}

/// How a received node delta relates to the local state (SPEC §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeltaStatus {
    Apply,
    ApplyAfterReset,
    Reject,
}

/// State of one node as seen locally.
///
/// `repr(C)` with the fields every digest walks (heartbeat, versions, liveness, byte and GC
/// bookkeeping) next to each other: a node handling a Syn reads them for each of its N states,
/// and a process of many nodes holds far more states than its caches (issue 11). The
/// serialized fields keep chitchat's order.
#[derive(Serialize, Deserialize)]
#[repr(C)]
pub struct NodeState {
    chitchat_id: ChitchatId,
    heartbeat: Heartbeat,
    key_values: KeyValueMap,
    max_version: Version,
    last_gc_version: Version,
    /// The failure detector's data about this node (not part of the replicated state).
    #[serde(skip)]
    pub(crate) liveness: NodeLiveness,
    /// Bytes of keys and values held (tombstones included), for the byte budgets.
    #[serde(skip)]
    bytes: usize,
    #[serde(skip)]
    gc_hint: GcHint,
    /// The first heartbeat known and when (own node: 0 at creation). A received heartbeat is
    /// plausible up to `anchor + JUMP_BASE + JUMP_RATE_PER_SEC × secs since`: forgeries can
    /// never push a copy further than its owner could have counted since, so the owner can
    /// always outgrow them in one step (see `limits`).
    #[serde(skip)]
    heartbeat_anchor: Option<(u64, Instant)>,
    /// The same for max_version / last_gc_version.
    #[serde(skip)]
    versions_anchor: Option<(u64, Instant)>,
    /// What every node state of one cluster state shares (one pointer instead of 48 B per
    /// state: 40 MB in a process of 1,000 nodes of 1,000).
    #[serde(skip)]
    context: Arc<NodeContext>,
}

/// The listeners, the clock and the datagram budget of the node states of one node.
pub(crate) struct NodeContext {
    listeners: Listeners,
    clock: Clock,
    /// Largest datagram the node sends (see `Chitchat::set_datagram_budget`): bounds the
    /// key-values the own state accepts, so each can always be gossiped.
    datagram_budget: AtomicUsize,
    /// When a tombstone of these states can first be due, so that a gossip round skips its
    /// pass over every state when none can be (issue 11).
    pub(crate) gc_watch: GcWatch,
}

/// The earliest deletion start noted in any state of one cluster state since its last
/// tombstone pass (which stores the earliest of what it left). An atomic only because the
/// context is shared: every access happens under the node's lock.
#[derive(Debug)]
pub(crate) struct GcWatch {
    /// The origin of `earliest` (a start before it counts as at it: due early, never late).
    base: tokio::time::Instant,
    /// Nanoseconds after `base`; `u64::MAX`: nothing noted.
    earliest: AtomicU64,
}

impl GcWatch {
    fn new() -> Self {
        GcWatch {
            base: tokio::time::Instant::now(),
            earliest: AtomicU64::new(u64::MAX),
        }
    }

    /// `since` in nanoseconds after `base`, below `u64::MAX` (which means "nothing").
    fn offset(&self, since: tokio::time::Instant) -> u64 {
        let nanos = since.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos).map_or(u64::MAX - 1, |nanos| nanos.min(u64::MAX - 1))
    }

    /// A tombstone whose deletion started at `since` now exists.
    fn note(&self, since: tokio::time::Instant) {
        self.earliest
            .fetch_min(self.offset(since), Ordering::Relaxed);
    }

    /// What a tombstone pass left: the earliest start among the tombstones kept.
    pub(crate) fn set(&self, earliest: Option<tokio::time::Instant>) {
        let value = earliest.map_or(u64::MAX, |since| self.offset(since));
        self.earliest.store(value, Ordering::Relaxed);
    }

    /// Whether any tombstone may have outlived `grace_period` at `now`.
    pub(crate) fn may_be_due(&self, grace_period: Duration, now: Instant) -> bool {
        let earliest = self.earliest.load(Ordering::Relaxed);
        if earliest == u64::MAX {
            return false;
        }
        let due = self
            .base
            .checked_add(Duration::from_nanos(earliest))
            .and_then(|start| start.checked_add(grace_period));
        due.is_some_and(|due| tokio::time::Instant::from_std(now) >= due)
    }
}

impl NodeContext {
    pub(crate) fn new(listeners: Listeners, clock: Clock) -> Arc<Self> {
        Arc::new(NodeContext::unshared(listeners, clock))
    }

    fn unshared(listeners: Listeners, clock: Clock) -> Self {
        NodeContext {
            listeners,
            clock,
            datagram_budget: AtomicUsize::new(wire::MAX_UDP_DATAGRAM_PAYLOAD_SIZE),
            gc_watch: GcWatch::new(),
        }
    }

    pub(crate) fn set_datagram_budget(&self, budget: usize) {
        self.datagram_budget.store(budget, Ordering::Relaxed);
    }

    fn datagram_budget(&self) -> usize {
        self.datagram_budget.load(Ordering::Relaxed)
    }
}

impl Default for NodeContext {
    fn default() -> Self {
        NodeContext::unshared(Listeners::default(), Clock::default())
    }
}

/// A copy of the replicated state (key-values, versions, heartbeat) sharing the listeners and
/// clock; the failure detector's samples stay with the original.
impl Clone for NodeState {
    fn clone(&self) -> Self {
        NodeState {
            chitchat_id: self.chitchat_id.clone(),
            heartbeat: self.heartbeat,
            key_values: self.key_values.clone(),
            max_version: self.max_version,
            last_gc_version: self.last_gc_version,
            context: Arc::clone(&self.context),
            gc_hint: self.gc_hint,
            heartbeat_anchor: self.heartbeat_anchor,
            versions_anchor: self.versions_anchor,
            bytes: self.bytes,
            liveness: NodeLiveness::default(),
        }
    }
}

/// What tombstone GC may find in a state, so that a gossip round does not scan every key of
/// every node when nothing can be due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum GcHint {
    /// Not tracked (a deserialized state): scan.
    #[default]
    Unknown,
    /// No entry has a deletion status.
    Nothing,
    /// No entry's deletion started before this instant.
    NotBefore(tokio::time::Instant),
}

impl GcHint {
    fn note(&mut self, status: DeletionStatus) {
        let Some(since) = status.time_of_start_scheduled_for_deletion() else {
            return;
        };
        *self = match *self {
            GcHint::Unknown => GcHint::Unknown,
            GcHint::Nothing => GcHint::NotBefore(since),
            GcHint::NotBefore(earliest) => GcHint::NotBefore(earliest.min(since)),
        };
    }
}

/// Notes an entry's deletion status in its state's hint and in the cluster's watch.
fn note_gc(hint: &mut GcHint, context: &NodeContext, status: DeletionStatus) {
    if let Some(since) = status.time_of_start_scheduled_for_deletion() {
        hint.note(status);
        context.gc_watch.note(since);
    }
}

impl fmt::Debug for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeState")
            .field("chitchat_id", &self.chitchat_id)
            .field("heartbeat", &self.heartbeat)
            .field("key_values", &self.key_values)
            .field("max_version", &self.max_version)
            .field("last_gc_version", &self.last_gc_version)
            .finish()
    }
}

/// Equality of the replicated content: the local instants of deletion statuses (each replica
/// stamps its own) are not compared, only the kind of status.
impl PartialEq for NodeState {
    fn eq(&self, other: &Self) -> bool {
        let same_entries =
            self.key_values.len() == other.key_values.len()
                && self.key_values.iter().zip(other.key_values.iter()).all(
                    |((k1, v1), (k2, v2))| {
                        k1 == k2
                            && v1.value == v2.value
                            && v1.version == v2.version
                            && DeletionStatusMutation::from(v1.status)
                                == DeletionStatusMutation::from(v2.status)
                    },
                );
        self.chitchat_id == other.chitchat_id
            && self.heartbeat == other.heartbeat
            && self.max_version == other.max_version
            && self.last_gc_version == other.last_gc_version
            && same_entries
    }
}

impl NodeState {
    #[cfg(test)]
    pub(crate) fn new(chitchat_id: ChitchatId, listeners: Listeners, clock: Clock) -> NodeState {
        NodeState::with_context(chitchat_id, NodeContext::new(listeners, clock))
    }

    pub(crate) fn with_context(chitchat_id: ChitchatId, context: Arc<NodeContext>) -> NodeState {
        NodeState {
            chitchat_id,
            heartbeat: Heartbeat(0),
            key_values: KeyValueMap::default(),
            max_version: 0,
            last_gc_version: 0,
            context,
            gc_hint: GcHint::Nothing,
            heartbeat_anchor: None,
            versions_anchor: None,
            bytes: 0,
            liveness: NodeLiveness::default(),
        }
    }

    /// A lone state for `test-node:0:127.0.0.1:7280`.
    pub fn for_test() -> NodeState {
        NodeState::with_context(
            ChitchatId::new("test-node", 0, ([127, 0, 0, 1], 7280).into()),
            NodeContext::new(Listeners::default(), Clock::System),
        )
    }

    /// The node this state describes.
    pub fn chitchat_id(&self) -> &ChitchatId {
        &self.chitchat_id
    }

    /// The node's last heartbeat seen (its own counter, bumped every round and message).
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
    }

    /// The highest version of any key-value change of the node, tombstones included.
    pub fn max_version(&self) -> Version {
        self.max_version
    }

    /// The highest version garbage-collected (as a tombstone or TTL'd value) from this state.
    pub fn last_gc_version(&self) -> Version {
        self.last_gc_version
    }

    /// `(last_gc_version, max_version)`: must never decrease lexicographically.
    pub fn monotonic_property(&self) -> (Version, Version) {
        (self.last_gc_version, self.max_version)
    }

    /// Every entry, tombstones included, in key order.
    pub fn key_values_including_deleted(&self) -> impl Iterator<Item = (&str, &VersionedValue)> {
        self.key_values.iter().map(|(k, v)| (&**k, v))
    }

    /// Visible entries (deleted ones excluded, TTL'd ones included), in key order.
    pub fn key_values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.key_values_including_deleted()
            .filter(|(_, v)| !v.is_deleted())
            .map(|(k, v)| (k, v.value.as_str()))
    }

    /// How many visible (not deleted) key-values the node has.
    pub fn num_key_values(&self) -> usize {
        self.key_values().count()
    }

    /// Visible entries whose key starts with `prefix`, in key order.
    pub fn iter_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a VersionedValue)> + 'a {
        self.key_values
            .iter_from(prefix)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter(|(_, v)| !v.is_deleted())
            .map(|(k, v)| (&**k, v))
    }

    /// Whether `key` has a visible value.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The visible value of `key` (None if absent or deleted).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_versioned(key)
            .filter(|v| !v.is_deleted())
            .map(|v| v.value.as_str())
    }

    /// The entry of `key`, tombstones included.
    pub fn get_versioned(&self, key: &str) -> Option<&VersionedValue> {
        self.key_values.get(key)
    }

    /// Sets `key` to `value` (a no-op if it already holds that value). A key that cannot be
    /// gossiped safely is refused with a warning: use [`NodeState::try_set`] to handle it.
    pub fn set(&mut self, key: impl ToString, value: impl ToString) {
        if let Err(error) = self.try_set(key, value) {
            warn!(node = ?self.chitchat_id, %error, "key-value refused");
        }
    }

    /// Like [`NodeState::set`], telling the caller why a key-value is refused.
    pub fn try_set(
        &mut self,
        key: impl ToString,
        value: impl ToString,
    ) -> Result<(), KeyValueError> {
        self.write_value(key.to_string(), value.to_string(), false)
    }

    /// Sets `key` to `value`, visible until `marked_for_deletion_grace_period` after each node
    /// learns it, then collected everywhere.
    pub fn set_with_ttl(&mut self, key: impl ToString, value: impl ToString) {
        if let Err(error) = self.try_set_with_ttl(key, value) {
            warn!(node = ?self.chitchat_id, %error, "key-value refused");
        }
    }

    /// [`NodeState::set_with_ttl`], returning why a key-value is refused.
    pub fn try_set_with_ttl(
        &mut self,
        key: impl ToString,
        value: impl ToString,
    ) -> Result<(), KeyValueError> {
        self.write_value(key.to_string(), value.to_string(), true)
    }

    fn write_value(&mut self, key: String, value: String, ttl: bool) -> Result<(), KeyValueError> {
        self.check_gossipable(&key, &value)?;
        if let Some(existing) = self.key_values.get(key.as_str()) {
            let same_status = match existing.status {
                DeletionStatus::Set => !ttl,
                DeletionStatus::DeleteAfterTtl(_) => ttl,
                DeletionStatus::Deleted(_) => false,
            };
            if same_status && existing.value == value {
                return Ok(());
            }
        }
        let status = if ttl {
            DeletionStatus::DeleteAfterTtl(self.context.clock.now().into())
        } else {
            DeletionStatus::Set
        };
        let version = self.max_version.saturating_add(1);
        self.set_versioned_value(
            &key,
            VersionedValue {
                value,
                version,
                status,
            },
        );
        Ok(())
    }

    /// Refuses what a chitchat 0.13 peer could not take (SPEC §9).
    fn check_gossipable(&self, key: &str, value: &str) -> Result<(), KeyValueError> {
        if key.chars().next().is_some_and(|c| !c.is_ascii()) {
            return Err(KeyValueError::NonAsciiFirstChar {
                key: key.to_string(),
            });
        }
        let limit = wire::max_key_value_len_in(self.context.datagram_budget(), &self.chitchat_id);
        let size = key.len() + value.len();
        if size > limit || key.len() > MAX_STRING_LEN || value.len() > MAX_STRING_LEN {
            return Err(KeyValueError::TooLarge {
                key: truncated(key),
                size,
                limit,
            });
        }
        Ok(())
    }

    /// Deletes `key`: a tombstone with a new version, collected after the grace period.
    /// Listeners are not notified.
    pub fn delete(&mut self, key: &str) {
        let now = self.context.clock.now();
        let Some(entry) = self.key_values.get_mut(key) else {
            warn!(node = ?self.chitchat_id, key, "deleting a key that does not exist");
            return;
        };
        self.max_version = self.max_version.saturating_add(1);
        self.bytes = self.bytes.saturating_sub(entry.value.len());
        *entry = VersionedValue {
            value: String::new(),
            version: self.max_version,
            status: DeletionStatus::Deleted(now.into()),
        };
        note_gc(&mut self.gc_hint, &self.context, entry.status);
    }

    /// Keeps `key` visible but schedules it for collection after the grace period.
    /// Listeners are not notified. A deleted key stays deleted (chitchat would resurrect it
    /// with an empty value).
    pub fn delete_after_ttl(&mut self, key: &str) {
        let now = self.context.clock.now();
        let Some(entry) = self.key_values.get_mut(key) else {
            warn!(node = ?self.chitchat_id, key, "scheduling a key that does not exist");
            return;
        };
        if entry.is_deleted() {
            debug!(node = ?self.chitchat_id, key, "key already deleted");
            return;
        }
        self.max_version = self.max_version.saturating_add(1);
        entry.version = self.max_version;
        entry.status = DeletionStatus::DeleteAfterTtl(now.into());
        note_gc(&mut self.gc_hint, &self.context, entry.status);
    }

    /// Raw setter, for applications restoring a state.
    pub fn set_max_version(&mut self, max_version: Version) {
        self.max_version = max_version;
    }

    /// Stores a heartbeat; true only if it is a strict increase over a known (non-zero) value:
    /// the first value observed is not a sign of life.
    pub fn try_set_heartbeat(&mut self, heartbeat: Heartbeat) -> bool {
        if self.heartbeat.0 == 0 {
            self.heartbeat = heartbeat;
            return false;
        }
        if heartbeat > self.heartbeat {
            self.heartbeat = heartbeat;
            true
        } else {
            false
        }
    }

    /// [`NodeState::try_set_heartbeat`] for a received value about a remote node: an
    /// implausible one (DESIGN-13 §1) is refused and the state left as is.
    pub(crate) fn try_set_received_heartbeat(
        &mut self,
        heartbeat: Heartbeat,
        now: Instant,
    ) -> Result<bool, Refusal> {
        if heartbeat.0 > self.heartbeat.0
            && !limits::is_plausible(heartbeat.0, self.heartbeat_anchor, now)
        {
            return Err(Refusal::ImplausibleHeartbeat);
        }
        let reported = self.try_set_heartbeat(heartbeat);
        if self.heartbeat_anchor.is_none() && self.heartbeat.0 != 0 {
            self.heartbeat_anchor = Some((self.heartbeat.0, now));
        }
        Ok(reported)
    }

    /// Marks this state as the own node's: its claims are bounded from 0 at `now`.
    pub(crate) fn anchor_own(&mut self, now: Instant) {
        self.heartbeat_anchor = Some((self.heartbeat.0, now));
        self.versions_anchor = Some((self.max_version.max(self.last_gc_version), now));
    }

    /// Whether every counter of a received delta about this (remote) node is plausible.
    pub(crate) fn check_delta_plausibility(
        &self,
        delta: NodeDeltaRef<'_, '_>,
        now: Instant,
    ) -> Result<(), Refusal> {
        let known = self.versions_anchor;
        let ok = |v: Version| {
            v <= self.max_version.max(self.last_gc_version) || limits::is_plausible(v, known, now)
        };
        if !ok(delta.last_gc_version) {
            return Err(Refusal::ImplausibleLastGcVersion);
        }
        if !ok(delta.max_version)
            || !ok(delta.from_version_excluded)
            || !delta.key_values.iter().all(|kv| ok(kv.version))
        {
            return Err(Refusal::ImplausibleVersion);
        }
        Ok(())
    }

    pub(crate) fn inc_heartbeat(&mut self) {
        self.heartbeat.inc();
    }

    /// Raises the own heartbeat past what peers remember of a previous incarnation with the
    /// same id, so they see it increase again.
    ///
    /// Own node only: the claim must be plausible relative to the own heartbeat and the time
    /// since this node was created, so forged claims cannot push it toward the ceiling.
    pub(crate) fn fast_forward_heartbeat(
        &mut self,
        heartbeat: Heartbeat,
        now: Instant,
    ) -> Result<(), Refusal> {
        if heartbeat < self.heartbeat {
            return Ok(());
        }
        let known = self.heartbeat_anchor.or(Some((self.heartbeat.0, now)));
        if !limits::is_plausible(heartbeat.0, known, now) {
            return Err(Refusal::ImplausibleHeartbeat);
        }
        self.heartbeat = Heartbeat(heartbeat.0.saturating_add(1));
        Ok(())
    }

    /// Inserts or replaces `key` if `value` is newer, raising `max_version`; notifies listeners
    /// unless the value is a tombstone.
    pub(crate) fn set_versioned_value(&mut self, key: &str, value: VersionedValue) {
        self.max_version = self.max_version.max(value.version);
        let key_len = key.len();
        let added = key_len + value.value.len();
        // One lookup: the existing entry is compared and replaced in place.
        let existing = self.key_values.get_mut(key);
        if existing
            .as_ref()
            .is_some_and(|existing| existing.version >= value.version)
        {
            return;
        }
        note_gc(&mut self.gc_hint, &self.context, value.status);
        if !value.is_deleted() {
            self.context.listeners.trigger(KeyChangeEvent {
                key,
                value: &value.value,
                node: &self.chitchat_id,
            });
        }
        // An existing key keeps its name; only a key new to this state is interned.
        match existing {
            Some(entry) => {
                let old = std::mem::replace(entry, value);
                self.bytes = self.bytes.saturating_sub(key_len + old.value.len());
            }
            None => {
                self.key_values.insert(intern(key), value);
            }
        }
        self.bytes = self.bytes.saturating_add(added);
    }

    /// Removes a key without leaving a tombstone (catch-up resets only).
    pub(crate) fn remove_key(&mut self, key: &str) {
        if let Some(old) = self.key_values.remove(key) {
            self.bytes = self.bytes.saturating_sub(key.len() + old.value.len());
        }
    }

    /// Packs the key-value map (see `ClusterState::compact_when_settled`).
    pub(crate) fn compact_key_values(&mut self) {
        self.key_values.compact();
    }

    /// Bytes of keys and values held, tombstones included.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn set_last_gc_version(&mut self, last_gc_version: Version) {
        self.last_gc_version = last_gc_version;
    }

    /// Entries with `version > floor`, tombstones included, by ascending version: the order a
    /// delta must carry them in.
    #[cfg(test)]
    pub(crate) fn stale_key_values(&self, floor: Version) -> Vec<(&str, &VersionedValue)> {
        let mut stale = Vec::new();
        self.stale_key_values_into(floor, &mut stale);
        stale
    }

    /// [`Self::stale_key_values`] into `out` (cleared first), so that a delta reuses one
    /// buffer for all its nodes: growing a fresh vector per node was 8 % of an empty-digest
    /// Syn's handling (perf, 100 nodes × 10 keys).
    pub(crate) fn stale_key_values_into<'a>(
        &'a self,
        floor: Version,
        out: &mut Vec<(&'a str, &'a VersionedValue)>,
    ) {
        out.clear();
        out.extend(
            self.key_values
                .iter()
                .filter(|(_, v)| v.version > floor)
                .map(|(k, v)| (&**k, v)),
        );
        out.sort_unstable_by_key(|(_, v)| v.version);
    }

    /// How far behind a peer at `floor` is: visible entries if it knows nothing, else entries
    /// newer than what it has.
    pub(crate) fn num_stale_key_values(&self, floor: Version) -> usize {
        if floor == 0 {
            self.key_values.values().filter(|v| !v.is_deleted()).count()
        } else {
            self.key_values
                .values()
                .filter(|v| v.version > floor)
                .count()
        }
    }

    /// Drops tombstones and TTL'd values older than the grace period. Returns the earliest
    /// deletion start among the entries it keeps (`None`: no entry has a deletion status).
    pub(crate) fn gc_keys_marked_for_deletion(
        &mut self,
        grace_period: Duration,
        now: Instant,
    ) -> Option<tokio::time::Instant> {
        // Deletion statuses carry tokio's `Instant` (chitchat's public type); the core's clock
        // is std's: compare on tokio's.
        let now = tokio::time::Instant::from_std(now);
        match self.gc_hint {
            GcHint::Nothing => return None,
            GcHint::NotBefore(earliest) if now < earliest + grace_period => return Some(earliest),
            GcHint::NotBefore(_) | GcHint::Unknown => {}
        }
        let mut last_gc_version = self.last_gc_version;
        let mut remaining = GcHint::Nothing;
        let mut freed = 0usize;
        self.key_values.retain(|key, value| {
            let Some(since) = value.status.time_of_start_scheduled_for_deletion() else {
                return true;
            };
            if now < since + grace_period {
                remaining.note(value.status);
                return true;
            }
            last_gc_version = last_gc_version.max(value.version);
            freed += key.len() + value.value.len();
            false
        });
        self.bytes = self.bytes.saturating_sub(freed);
        self.last_gc_version = last_gc_version;
        self.gc_hint = remaining;
        match remaining {
            GcHint::NotBefore(earliest) => Some(earliest),
            // A scan leaves the hint tracked: `Unknown` is never what it found.
            GcHint::Nothing | GcHint::Unknown => None,
        }
    }

    /// SPEC §4.5: reject deltas from the future, reset when the peer GC'd what we still hold,
    /// apply only what is newer.
    pub(crate) fn delta_status(&self, delta: NodeDeltaRef<'_, '_>) -> DeltaStatus {
        if delta.from_version_excluded > self.max_version {
            debug!(node = ?self.chitchat_id, from = delta.from_version_excluded,
                   max = self.max_version, "delta from the future rejected");
            return DeltaStatus::Reject;
        }
        let compatible = delta.last_gc_version <= self.last_gc_version
            || delta.last_gc_version <= self.max_version;
        if !compatible {
            if delta.from_version_excluded != 0 {
                warn!(node = ?self.chitchat_id, "incompatible delta is not a reset: rejected");
                return DeltaStatus::Reject;
            }
            return DeltaStatus::ApplyAfterReset;
        }
        if self.max_version < delta.max_version {
            DeltaStatus::Apply
        } else {
            DeltaStatus::Reject
        }
    }

    /// Wipes the state before a reset delta: listeners and clock are kept, the heartbeat goes
    /// back to 0 so the next observed value is again a non-reported first value.
    pub(crate) fn reset_for_delta(&mut self, last_gc_version: Version) {
        self.key_values.clear();
        self.bytes = 0;
        self.gc_hint = GcHint::Nothing;
        self.heartbeat = Heartbeat(0);
        self.max_version = 0;
        self.last_gc_version = last_gc_version;
    }

    /// Applies the key-values of an accepted node delta (after a possible reset), within the
    /// per-node budgets of `limits`: over them, the rest of the delta is ignored (and
    /// requested again later: max_version stays at the last entry applied). A key-value that
    /// could never be relayed in a datagram is dropped but does not stop the rest.
    pub(crate) fn apply_delta_within(
        &mut self,
        delta: NodeDeltaRef<'_, '_>,
        now: Instant,
        limits: &Limits,
        refusals: &mut RefusalCounts,
    ) {
        let before = (self.max_version, self.last_gc_version);
        let current_max = self.max_version;
        let relayable_len = wire::max_key_value_len(&self.chitchat_id);
        let mut applied_up_to = current_max;
        let mut stopped = false;
        for kv in delta.key_values {
            if kv.version <= current_max {
                continue;
            }
            if kv.status.scheduled_for_deletion() && kv.version <= self.last_gc_version {
                applied_up_to = applied_up_to.max(kv.version);
                continue;
            }
            let size = kv.key.len() + kv.value.len();
            if size > relayable_len || kv.key.len() > MAX_STRING_LEN {
                refusals.add(Refusal::UnrelayableKeyValue, 1);
                applied_up_to = applied_up_to.max(kv.version);
                continue;
            }
            let existing = self.key_values.get(kv.key);
            if existing.is_none() && self.key_values.len() >= limits.max_keys_per_node {
                refusals.add(Refusal::TooManyKeys, 1);
                stopped = true;
                break;
            }
            let freed = existing.map_or(0, |e| kv.key.len() + e.value.len());
            if self.bytes.saturating_sub(freed).saturating_add(size) > limits.max_node_state_bytes {
                refusals.add(Refusal::NodeStateTooLarge, 1);
                stopped = true;
                break;
            }
            applied_up_to = applied_up_to.max(kv.version);
            self.set_versioned_value(
                kv.key,
                VersionedValue {
                    value: kv.value.to_string(),
                    version: kv.version,
                    status: kv.status.into_status(now.into()),
                },
            );
        }
        // A sender's max_version never goes below its own KVs; a forged one must not lower ours.
        self.max_version = if stopped {
            self.max_version.max(applied_up_to)
        } else {
            self.max_version.max(delta.max_version)
        };
        if self.versions_anchor.is_none() && (self.max_version, self.last_gc_version) > before {
            self.versions_anchor = Some((self.max_version.max(self.last_gc_version), now));
        }
    }

    /// [`NodeState::apply_delta_within`] the default limits (tests).
    #[cfg(test)]
    pub(crate) fn apply_delta(&mut self, delta: &NodeDelta, now: Instant) {
        let mut refusals = RefusalCounts::default();
        let view = DeltaView::of_node_deltas(std::slice::from_ref(delta));
        for node_delta in view.node_deltas() {
            self.apply_delta_within(node_delta, now, &Limits::default(), &mut refusals);
        }
    }

    /// A peer sent us a delta about our own state with versions beyond ours: a forged copy or
    /// the state of a previous incarnation that used the same id. It is never applied; we
    /// outgrow its versions ([`NodeState::outgrow_claim`]) and leave tombstones for the keys
    /// it has that we do not (while the own state holds fewer than `max_keys` entries, so
    /// forged keys cannot grow it without bound).
    pub(crate) fn supersede_stale_self_copy_within(
        &mut self,
        delta: NodeDeltaRef<'_, '_>,
        max_keys: usize,
    ) -> Result<bool, Refusal> {
        let now = self.context.clock.now();
        let claim = delta
            .key_values
            .iter()
            .map(|kv| kv.version)
            .fold(delta.max_version.max(delta.last_gc_version), Version::max);
        if !self.outgrow_claim(claim, now)? {
            return Ok(false);
        }
        for kv in delta.key_values {
            if self.key_values.len() >= max_keys || self.key_values.contains_key(kv.key) {
                continue;
            }
            let Some(version) = self.max_version.checked_add(1) else {
                break;
            };
            self.max_version = version;
            let status = DeletionStatus::Deleted(now.into());
            note_gc(&mut self.gc_hint, &self.context, status);
            self.bytes = self.bytes.saturating_add(kv.key.len());
            self.key_values.insert(
                intern(kv.key),
                VersionedValue {
                    value: String::new(),
                    version,
                    status,
                },
            );
        }
        Ok(true)
    }

    /// [`NodeState::supersede_stale_self_copy_within`] with the default key cap (tests).
    #[cfg(test)]
    pub(crate) fn supersede_stale_self_copy(&mut self, delta: &NodeDelta) {
        let view = DeltaView::of_node_deltas(std::slice::from_ref(delta));
        for node_delta in view.node_deltas() {
            let _ = self
                .supersede_stale_self_copy_within(node_delta, Limits::default().max_keys_per_node);
        }
    }

    /// Owner authority (DESIGN-13 §2), own node only: a peer claims a version of our state
    /// (`claim`: a digest's max_version or last_gc_version, a delta's versions) above ours. It
    /// holds a forged copy or one of a previous incarnation with this id; either way we outgrow
    /// it: `last_gc_version := claim + 1` and every entry re-issued above it, so every peer
    /// below gets a reset (SPEC §4.4) that replaces its copy, forged keys included, with ours.
    /// Re-issuing the entries makes the reset's last version our max_version, so the peer's
    /// next digest no longer looks behind (no reset loop, for chitchat 0.13 peers too).
    /// Refused if the claim is implausible relative to our versions and the time since creation; returns whether the state changed.
    pub(crate) fn outgrow_claim(&mut self, claim: Version, now: Instant) -> Result<bool, Refusal> {
        if claim <= self.max_version {
            return Ok(false);
        }
        let known = self.versions_anchor.or(Some((self.max_version, now)));
        if !limits::is_plausible(claim, known, now) {
            return Err(Refusal::ImplausibleVersion);
        }
        let entries = self.key_values.len() as u64;
        // claim ≤ 2^53 and entries < 2^63: cannot overflow, checked all the same.
        let Some(new_gc) = claim.checked_add(1) else {
            return Err(Refusal::ImplausibleVersion);
        };
        if new_gc.checked_add(entries).is_none() {
            return Err(Refusal::ImplausibleVersion);
        }
        warn!(node = ?self.chitchat_id, claim, own_max = self.max_version,
              "a peer claims versions of this node beyond its own (forged, or a previous \
               incarnation with the same id): outgrowing them");
        let mut entries: Vec<(&Key, &mut VersionedValue)> = self.key_values.iter_mut().collect();
        // Keep the relative order of the writes.
        entries.sort_unstable_by_key(|(_, v)| v.version);
        let mut version = new_gc;
        for (_, entry) in entries {
            version += 1;
            entry.version = version;
        }
        self.last_gc_version = new_gc;
        self.max_version = version;
        Ok(true)
    }
}

fn truncated(key: &str) -> String {
    match key.char_indices().nth(64) {
        Some((idx, _)) => format!("{}…", &key[..idx]),
        None => key.to_string(),
    }
}
