//! Anti-amplification (DESIGN-13 §4), sans-IO: time is passed in, nothing here blocks.
//!
//! Plaintext gossip cannot tell a spoofed source from a real one, so what a node sends to a
//! source that is not a live member is bounded by what that source sent it: 3× the bytes
//! received, plus a join allowance from token buckets (per source and for all non-members
//! together). SynAcks are accepted only from addresses we sent a Syn to: within a window of the
//! Syn, or later as the answer to a Syn not answered yet (one per Syn). Members are not
//! limited; the caller decides membership.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The limiter's configuration. `Default` holds the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmplificationLimits {
    /// `false` treats every source as a member: no budget, no receive allowance, SynAcks
    /// accepted from anyone. Only for benchmarks and networks where sources cannot be spoofed.
    pub enabled: bool,
    /// Bytes a non-member may be sent per byte received from it.
    pub factor: u64,
    /// Join allowance per source, bytes per second.
    pub per_source_rate: u64,
    /// Join allowance per source, burst in bytes.
    pub per_source_burst: u64,
    /// Join allowance of all non-member sources together, bytes per second.
    pub total_rate: u64,
    /// Join allowance of all non-member sources together, burst in bytes.
    pub total_burst: u64,
    /// Bytes of non-member datagrams per source and second that are decoded at all; beyond,
    /// they are dropped before decoding (the cost bound under a flood).
    pub receive_rate_per_source: u64,
    /// Burst of `receive_rate_per_source`, bytes.
    pub receive_burst_per_source: u64,
    /// Sources tracked at once (least recently seen evicted).
    pub max_sources: usize,
    /// A SynAck is accepted from an address we sent a Syn to within
    /// `max(recent_syn_window, 3 × gossip_interval)`, and after that as the answer to a Syn
    /// of ours not answered yet (an overloaded process handles replies late).
    pub recent_syn_window: Duration,
    /// Syn targets remembered at once (oldest evicted).
    pub max_recent_syns: usize,
}

impl Default for AmplificationLimits {
    fn default() -> Self {
        AmplificationLimits {
            enabled: true,
            factor: 3,
            per_source_rate: 64 * 1024,
            per_source_burst: 64 * 1024,
            total_rate: 256 * 1024,
            total_burst: 256 * 1024,
            receive_rate_per_source: 256 * 1024,
            receive_burst_per_source: 256 * 1024,
            max_sources: 4_096,
            recent_syn_window: Duration::from_secs(5),
            max_recent_syns: 4_096,
        }
    }
}

impl AmplificationLimits {
    /// No limits at all (see [`AmplificationLimits::enabled`]): a load generator's sockets,
    /// which are not cluster members, then measure the node's handling rather than its
    /// defences.
    pub fn off() -> Self {
        AmplificationLimits {
            enabled: false,
            ..AmplificationLimits::default()
        }
    }
}

/// A token bucket in bytes, refilled lazily.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    refilled: Instant,
}

impl Bucket {
    fn full(burst: u64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            refilled: now,
        }
    }

    fn refill(&mut self, rate: u64, burst: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let add = (elapsed.as_secs_f64() * rate as f64).min(burst as f64) as u64;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(burst);
            self.refilled = now;
        }
    }

    fn take(&mut self, bytes: u64) -> u64 {
        let taken = bytes.min(self.tokens);
        self.tokens -= taken;
        taken
    }
}

#[derive(Debug, Clone, Copy)]
struct Source {
    /// `factor ×` bytes received, not yet spent on replies (capped by the burst).
    credit: u64,
    allowance: Bucket,
    receive: Bucket,
    last_seen: Instant,
}

/// The anti-amplification state of one node.
#[derive(Debug)]
pub struct AmplificationLimiter {
    limits: AmplificationLimits,
    sources: HashMap<SocketAddr, Source>,
    total: Bucket,
    recent_syns: HashMap<SocketAddr, RecentSyn>,
    syn_window: Duration,
}

/// The Syns sent to one address.
#[derive(Debug, Clone, Copy)]
struct RecentSyn {
    /// When the last one was sent.
    sent: Instant,
    /// How many are not answered yet, up to [`MAX_UNANSWERED_SYNS`].
    unanswered: u8,
}

/// Syns to one address counted as unanswered at most: a late SynAck is accepted for each, so
/// this bounds what forged late SynAcks can draw from us to a few Acks per address.
const MAX_UNANSWERED_SYNS: u8 = 4;

impl AmplificationLimiter {
    /// A limiter with full buckets at `now`; `gossip_interval` widens the recent-Syn window.
    pub fn new(limits: AmplificationLimits, gossip_interval: Duration, now: Instant) -> Self {
        let syn_window = limits
            .recent_syn_window
            .max(gossip_interval.saturating_mul(3));
        AmplificationLimiter {
            total: Bucket::full(limits.total_burst, now),
            limits,
            sources: HashMap::new(),
            recent_syns: HashMap::new(),
            syn_window,
        }
    }

    /// The configuration.
    pub fn limits(&self) -> &AmplificationLimits {
        &self.limits
    }

    fn source(&mut self, from: SocketAddr, now: Instant) -> &mut Source {
        if !self.sources.contains_key(&from) && self.sources.len() >= self.limits.max_sources {
            let oldest = self
                .sources
                .iter()
                .min_by_key(|(_, source)| source.last_seen)
                .map(|(addr, _)| *addr);
            if let Some(oldest) = oldest {
                self.sources.remove(&oldest);
            }
        }
        let limits = &self.limits;
        let source = self.sources.entry(from).or_insert_with(|| Source {
            credit: 0,
            allowance: Bucket::full(limits.per_source_burst, now),
            receive: Bucket::full(limits.receive_burst_per_source, now),
            last_seen: now,
        });
        source.last_seen = now;
        source
            .allowance
            .refill(limits.per_source_rate, limits.per_source_burst, now);
        source.receive.refill(
            limits.receive_rate_per_source,
            limits.receive_burst_per_source,
            now,
        );
        source
    }

    /// A datagram of `len` bytes from non-member `from`: `false` means drop it undecoded (its
    /// receive allowance is spent). An admitted one earns `factor × len` of reply credit.
    pub fn admit(&mut self, from: SocketAddr, len: usize, now: Instant) -> bool {
        let (factor, cap) = (self.limits.factor, self.limits.per_source_burst);
        let len = len as u64;
        let source = self.source(from, now);
        if source.receive.tokens < len {
            return false;
        }
        source.receive.take(len);
        source.credit = source
            .credit
            .saturating_add(factor.saturating_mul(len))
            .min(cap.max(factor.saturating_mul(len)));
        true
    }

    /// Most bytes a reply to non-member `from` may take now.
    pub fn reply_budget(&mut self, from: SocketAddr, now: Instant) -> usize {
        let limits = self.limits.clone();
        self.total
            .refill(limits.total_rate, limits.total_burst, now);
        let total = self.total.tokens;
        let source = self.source(from, now);
        let budget = source
            .credit
            .saturating_add(source.allowance.tokens.min(total));
        usize::try_from(budget).unwrap_or(usize::MAX)
    }

    /// Spends `bytes` sent to non-member `from`: credit first, then both allowances.
    pub fn charge(&mut self, from: SocketAddr, bytes: usize, now: Instant) {
        let bytes = bytes as u64;
        let source = self.source(from, now);
        let from_credit = bytes.min(source.credit);
        source.credit -= from_credit;
        let rest = bytes - from_credit;
        let taken = source.allowance.take(rest);
        self.total.take(taken);
    }

    /// Records a Syn sent to `to` at `now`.
    pub fn note_syn_sent(&mut self, to: SocketAddr, now: Instant) {
        if let Some(recent) = self.recent_syns.get_mut(&to) {
            recent.sent = now;
            recent.unanswered = recent.unanswered.saturating_add(1).min(MAX_UNANSWERED_SYNS);
            return;
        }
        if self.recent_syns.len() >= self.limits.max_recent_syns {
            let window = self.syn_window;
            self.recent_syns.retain(|_, recent| {
                recent.unanswered > 0 || now.saturating_duration_since(recent.sent) <= window
            });
            if self.recent_syns.len() >= self.limits.max_recent_syns {
                let oldest = self
                    .recent_syns
                    .iter()
                    .min_by_key(|(_, recent)| recent.sent)
                    .map(|(addr, _)| *addr);
                if let Some(oldest) = oldest {
                    self.recent_syns.remove(&oldest);
                }
            }
        }
        self.recent_syns.insert(
            to,
            RecentSyn {
                sent: now,
                unanswered: 1,
            },
        );
    }

    /// Whether a SynAck from `from` answers a Syn of ours: one sent within the window, or one
    /// not answered yet (which it then answers). Without limits every SynAck is accepted.
    pub fn accept_syn_ack(&mut self, from: SocketAddr, now: Instant) -> bool {
        if !self.limits.enabled {
            return true;
        }
        let Some(recent) = self.recent_syns.get_mut(&from) else {
            return false;
        };
        let recent_enough = now.saturating_duration_since(recent.sent) <= self.syn_window;
        if !recent_enough && recent.unanswered == 0 {
            return false;
        }
        recent.unanswered = recent.unanswered.saturating_sub(1);
        true
    }

    /// Sources tracked now (bounded by `max_sources`).
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn limiter(clock: &ManualClock) -> AmplificationLimiter {
        AmplificationLimiter::new(
            AmplificationLimits::default(),
            Duration::from_millis(100),
            clock.now(),
        )
    }

    #[test]
    fn replies_stay_within_three_times_received_plus_the_allowance() {
        let clock = ManualClock::new();
        let mut limiter = limiter(&clock);
        let source = addr(1);
        let mut received = 0u64;
        let mut sent = 0u64;
        for _ in 0..10_000 {
            clock.advance(Duration::from_millis(1));
            assert!(limiter.admit(source, 12, clock.now()));
            received += 12;
            let budget = limiter.reply_budget(source, clock.now());
            let reply = budget.min(40_000);
            if reply >= 7 {
                limiter.charge(source, reply, clock.now());
                sent += reply as u64;
            }
        }
        let elapsed = clock.elapsed().as_secs_f64();
        let bound = 3 * received + (64.0 * 1024.0 * elapsed) as u64 + 64 * 1024;
        assert!(sent <= bound, "{sent} > {bound}");
        // The first reply got a full 40 KB from the burst.
        assert!(sent >= 40_000);
    }

    #[test]
    fn the_total_allowance_bounds_many_sources() {
        let clock = ManualClock::new();
        let mut limiter = limiter(&clock);
        let mut sent = 0u64;
        for port in 0..100 {
            let source = addr(port);
            assert!(limiter.admit(source, 10, clock.now()));
            let budget = limiter.reply_budget(source, clock.now());
            limiter.charge(source, budget, clock.now());
            sent += budget as u64;
        }
        assert!(sent <= 256 * 1024 + 100 * 30, "{sent}");
    }

    #[test]
    fn receive_allowance_drops_a_flood_before_decoding_and_refills() {
        let clock = ManualClock::new();
        let mut limiter = limiter(&clock);
        let source = addr(2);
        let admitted = (0..1_000)
            .filter(|_| limiter.admit(source, 1_266, clock.now()))
            .count();
        assert_eq!(admitted, 256 * 1024 / 1_266);
        clock.advance(Duration::from_secs(1));
        assert!(limiter.admit(source, 1_266, clock.now()));
    }

    #[test]
    fn syn_acks_are_accepted_only_from_syn_targets() {
        let clock = ManualClock::new();
        let mut limiter = limiter(&clock);
        limiter.note_syn_sent(addr(3), clock.now());
        assert!(limiter.accept_syn_ack(addr(3), clock.now()));
        assert!(!limiter.accept_syn_ack(addr(4), clock.now()));
        // Within the window, repeated SynAcks are accepted; past it, none is owed.
        assert!(limiter.accept_syn_ack(addr(3), clock.now()));
        clock.advance(Duration::from_secs(6));
        assert!(!limiter.accept_syn_ack(addr(3), clock.now()));
    }

    #[test]
    fn a_late_syn_ack_is_accepted_once_per_unanswered_syn() {
        let clock = ManualClock::new();
        let mut limiter = limiter(&clock);
        // Two Syns, neither answered: two late SynAcks accepted, a third refused.
        limiter.note_syn_sent(addr(5), clock.now());
        limiter.note_syn_sent(addr(5), clock.now());
        clock.advance(Duration::from_secs(30));
        assert!(limiter.accept_syn_ack(addr(5), clock.now()));
        assert!(limiter.accept_syn_ack(addr(5), clock.now()));
        assert!(!limiter.accept_syn_ack(addr(5), clock.now()));
        // Many unanswered Syns owe at most MAX_UNANSWERED_SYNS late SynAcks.
        for _ in 0..100 {
            limiter.note_syn_sent(addr(6), clock.now());
        }
        clock.advance(Duration::from_secs(30));
        let accepted = (0..100)
            .filter(|_| limiter.accept_syn_ack(addr(6), clock.now()))
            .count();
        assert_eq!(accepted, usize::from(MAX_UNANSWERED_SYNS));
    }

    #[test]
    fn tables_are_bounded() {
        let clock = ManualClock::new();
        let limits = AmplificationLimits {
            max_sources: 8,
            max_recent_syns: 8,
            ..AmplificationLimits::default()
        };
        let mut limiter =
            AmplificationLimiter::new(limits, Duration::from_millis(100), clock.now());
        for port in 0..100 {
            clock.advance(Duration::from_millis(1));
            limiter.admit(addr(port), 1, clock.now());
            limiter.note_syn_sent(addr(port), clock.now());
        }
        assert_eq!(limiter.tracked_sources(), 8);
        assert_eq!(limiter.recent_syns.len(), 8);
        assert!(limiter.accept_syn_ack(addr(99), clock.now()));
        assert!(!limiter.accept_syn_ack(addr(0), clock.now()));
    }
}
