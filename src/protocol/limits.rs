//! Bounds on what received datagrams may make a node believe or store (DESIGN-13 §1, §3).
//!
//! Plaintext gossip cannot be authenticated, so values are judged by plausibility: no real node
//! reaches the absolute ceiling, and no real counter jumps further than its owner could have
//! counted since we last saw it rise. Byte budgets bound what forged nodes can make us store.

use std::time::{Duration, Instant};

use tracing::warn;

/// No real counter (heartbeat, version) reaches this: 285 years at 10^6 increments per second.
/// Received values above it are ignored, which keeps every `+ 1` on them far from wrapping.
pub const MAX_PLAUSIBLE_COUNTER: u64 = 1 << 53;

/// A counter about a known node may exceed its anchor (the first value known of it) by this
/// much at once…
pub const JUMP_BASE: u64 = 1 << 24;

/// …plus this much per second since the anchor (a loaded node's heartbeat rises by one per
/// message it handles, so 10^5–10^6/s is real).
///
/// DESIGN-13 words the bound relative to the last rise; anchoring it at the first value known
/// instead means a run of forged jumps can never add up past what the owner could have
/// counted since (each accepted jump does not reopen the allowance), so the owner, bounded the
/// same way from its creation, can always outgrow what a peer was made to believe.
pub const JUMP_RATE_PER_SEC: u64 = 1 << 20;

/// Ceiling on the counters of a node we do not know yet.
pub const NEW_NODE_CEILING: u64 = 1 << 40;

/// Whether `claimed` is a plausible value of a counter whose anchor is `anchor`: the first
/// value known and when (`None`: nothing known yet, the new-node ceiling applies).
pub fn is_plausible(claimed: u64, anchor: Option<(u64, Instant)>, now: Instant) -> bool {
    if claimed > MAX_PLAUSIBLE_COUNTER {
        return false;
    }
    match anchor {
        None => claimed <= NEW_NODE_CEILING,
        // Within the base allowance no clock is read: the common case by far (a heartbeat
        // grows by about 100 a second in a busy cluster, 2^24 takes two days).
        Some((known, since)) => {
            claimed <= known.saturating_add(JUMP_BASE)
                || claimed <= jump_ceiling(known, now.saturating_duration_since(since))
        }
    }
}

/// The highest plausible value of a counter that was `known` `elapsed` ago.
pub fn jump_ceiling(known: u64, elapsed: Duration) -> u64 {
    // Sub-second precision: the owner's own rises past a claim are covered within microseconds.
    // Whole seconds and the fraction apart: the same floor as `nanos × rate / 10^9`, in u64
    // (the fraction's product stays below 2^50) rather than a u128 division.
    let fraction = u64::from(elapsed.subsec_nanos()) * JUMP_RATE_PER_SEC / 1_000_000_000;
    let grown = elapsed
        .as_secs()
        .saturating_mul(JUMP_RATE_PER_SEC)
        .saturating_add(fraction);
    known
        .saturating_add(JUMP_BASE)
        .saturating_add(grown)
        .min(MAX_PLAUSIBLE_COUNTER)
}

/// Byte budgets of the remote state. Set with `Chitchat::set_limits` or
/// `SpawnOptions::with_limits`; `ChitchatConfig` keeps exactly chitchat's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest node id (name) accepted in a digest entry or node delta.
    pub max_node_id_len: usize,
    /// Most keys (tombstones included) held for one remote node.
    pub max_keys_per_node: usize,
    /// Most bytes (keys + values) held for one remote node.
    pub max_node_state_bytes: usize,
    /// Past this many bytes of remote state (ids, keys, values), new nodes are refused; the
    /// nodes already held keep receiving updates.
    pub max_remote_state_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_node_id_len: 1_024,
            max_keys_per_node: 16_384,
            max_node_state_bytes: 1 << 20,
            max_remote_state_bytes: 128 << 20,
        }
    }
}

impl Limits {
    /// The longest node id accepted.
    pub fn with_max_node_id_len(mut self, len: usize) -> Self {
        self.max_node_id_len = len;
        self
    }

    /// The most keys held per remote node.
    pub fn with_max_keys_per_node(mut self, keys: usize) -> Self {
        self.max_keys_per_node = keys;
        self
    }

    /// The most bytes held per remote node.
    pub fn with_max_node_state_bytes(mut self, bytes: usize) -> Self {
        self.max_node_state_bytes = bytes;
        self
    }

    /// The remote-state size past which new nodes are refused.
    pub fn with_max_remote_state_bytes(mut self, bytes: usize) -> Self {
        self.max_remote_state_bytes = bytes;
        self
    }
}

/// Why a received value was ignored: the `reason` / `kind` labels of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A digest heartbeat beyond the plausible bound.
    ImplausibleHeartbeat,
    /// A max_version, key-value version or SetMaxVersion beyond the bound.
    ImplausibleVersion,
    /// A last_gc_version beyond the bound.
    ImplausibleLastGcVersion,
    /// A node id longer than `Limits::max_node_id_len`.
    IdTooLong,
    /// A node's keys over `Limits::max_keys_per_node`.
    TooManyKeys,
    /// A node's bytes over `Limits::max_node_state_bytes`.
    NodeStateTooLarge,
    /// A new node refused: remote state over `Limits::max_remote_state_bytes` or the node cap.
    RemoteStateFull,
    /// A key-value that could never fit in one datagram's delta: never relayable.
    UnrelayableKeyValue,
}

impl Refusal {
    /// Every kind, in counter order.
    pub const ALL: [Refusal; 8] = [
        Refusal::ImplausibleHeartbeat,
        Refusal::ImplausibleVersion,
        Refusal::ImplausibleLastGcVersion,
        Refusal::IdTooLong,
        Refusal::TooManyKeys,
        Refusal::NodeStateTooLarge,
        Refusal::RemoteStateFull,
        Refusal::UnrelayableKeyValue,
    ];

    /// `(reason, kind)` labels, stable (exported as `chitchat_datagrams_dropped_total`).
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Refusal::ImplausibleHeartbeat => ("implausible", "heartbeat"),
            Refusal::ImplausibleVersion => ("implausible", "version"),
            Refusal::ImplausibleLastGcVersion => ("implausible", "last_gc_version"),
            Refusal::IdTooLong => ("over_budget", "id_too_long"),
            Refusal::TooManyKeys => ("over_budget", "too_many_keys"),
            Refusal::NodeStateTooLarge => ("over_budget", "node_state_too_large"),
            Refusal::RemoteStateFull => ("over_budget", "remote_state_full"),
            Refusal::UnrelayableKeyValue => ("over_budget", "unrelayable_key_value"),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counts of ignored values, one per [`Refusal`] kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RefusalCounts {
    counts: [u64; 8],
}

impl RefusalCounts {
    /// How many values of this kind were ignored.
    pub fn get(&self, kind: Refusal) -> u64 {
        self.counts[kind.index()]
    }

    /// Every kind with its `(reason, kind)` labels and count.
    pub fn iter(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL.iter().map(|k| (*k, self.get(*k)))
    }

    /// The sum over all kinds.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }

    pub(crate) fn add(&mut self, kind: Refusal, n: u64) {
        let c = &mut self.counts[kind.index()];
        *c = c.saturating_add(n);
    }
}

/// Logs the first refusal of each kind, then at most one line per minute per kind.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    next: [Option<Instant>; 8],
}

const LOG_EVERY: Duration = Duration::from_secs(60);

impl RefusalLog {
    pub(crate) fn note(&mut self, kind: Refusal, now: Instant, detail: std::fmt::Arguments<'_>) {
        let next = &mut self.next[kind.index()];
        if next.is_none_or(|n| now >= n) {
            *next = Some(now + LOG_EVERY);
            let (reason, kind) = kind.labels();
            warn!(
                reason,
                kind, "received value ignored: {detail} (logged once a minute per kind)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_never_wrap() {
        let t0 = Instant::now();
        for known in [0, 1 << 40, (1 << 53) - 1, 1 << 53, u64::MAX - 1, u64::MAX] {
            for elapsed in [0, 1, 1 << 30, u64::MAX] {
                let ceiling = jump_ceiling(known, Duration::from_secs(elapsed));
                assert!(ceiling <= MAX_PLAUSIBLE_COUNTER);
            }
            assert!(!is_plausible(u64::MAX, Some((known, t0)), t0));
        }
        assert!(is_plausible(1 << 40, None, t0));
        assert!(!is_plausible((1 << 40) + 1, None, t0));
        assert!(is_plausible(1 << 53, Some(((1 << 53) - 1, t0)), t0));
        assert!(!is_plausible((1 << 53) + 1, Some((1 << 53, t0)), t0));
        assert!(is_plausible(100 + JUMP_BASE, Some((100, t0)), t0));
        assert!(!is_plausible(101 + JUMP_BASE, Some((100, t0)), t0));
        let later = t0 + Duration::from_secs(10);
        assert!(is_plausible(
            100 + JUMP_BASE + 10 * JUMP_RATE_PER_SEC,
            Some((100, t0)),
            later
        ));
        assert!(!is_plausible(
            101 + JUMP_BASE + 10 * JUMP_RATE_PER_SEC,
            Some((100, t0)),
            later
        ));
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> =
            Refusal::ALL.iter().map(|k| k.labels()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        for (i, k) in Refusal::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
