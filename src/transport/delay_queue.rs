//! Datagrams held back by the delay fault (see [`Faults::delay`](crate::transport::Faults)),
//! released earliest first by the worker that holds them, which is what reorders them.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One delayed datagram.
pub(crate) struct Delayed {
    /// When it is due.
    pub(crate) at: Instant,
    /// Tie-breaker set by the queue: equal deadlines leave in the order they were queued.
    seq: u64,
    /// The endpoint that sends (UDP) or receives (channel) it.
    pub(crate) id: u64,
    /// The sending address.
    pub(crate) from: SocketAddr,
    /// The destination.
    pub(crate) to: SocketAddr,
    /// The bytes (faults already applied).
    pub(crate) data: Vec<u8>,
}

impl Delayed {
    /// A datagram of endpoint `id` due at `at`.
    pub(crate) fn new(
        at: Instant,
        id: u64,
        from: SocketAddr,
        to: SocketAddr,
        data: Vec<u8>,
    ) -> Delayed {
        Delayed {
            at,
            seq: 0,
            id,
            from,
            to,
            data,
        }
    }
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    /// Reversed so that `BinaryHeap` pops the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Datagrams held back by the delay fault, earliest first.
#[derive(Default)]
pub(crate) struct DelayQueue {
    heap: BinaryHeap<Delayed>,
    seq: u64,
}

impl DelayQueue {
    /// Holds `data` from endpoint `id` back until `at`.
    pub(crate) fn push(
        &mut self,
        at: Instant,
        id: u64,
        from: SocketAddr,
        to: SocketAddr,
        data: Vec<u8>,
    ) {
        self.push_delayed(Delayed::new(at, id, from, to, data));
    }

    /// Holds `d` back until `d.at`.
    pub(crate) fn push_delayed(&mut self, mut d: Delayed) {
        self.seq += 1;
        d.seq = self.seq;
        self.heap.push(d);
    }

    /// When the earliest held datagram is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|d| d.at)
    }

    /// Time to wait before the earliest held datagram is due (`None`: nothing held).
    pub(crate) fn next_wait(&self) -> Option<Duration> {
        self.next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The earliest datagram if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Delayed> {
        if self.heap.peek().is_some_and(|d| d.at <= now) {
            self.heap.pop()
        } else {
            None
        }
    }
}

/// `now + d`, saturating at a year for absurd configured delays (`Instant + Duration` panics on
/// overflow).
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Instant {
    let year = Duration::from_secs(365 * 86_400);
    now.checked_add(d.min(year)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_queue_orders_by_deadline() {
        let mut q = DelayQueue::default();
        let now = Instant::now();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        q.push(now + Duration::from_millis(5), 1, a, a, vec![2]);
        q.push(now + Duration::from_millis(1), 1, a, a, vec![1]);
        assert_eq!(q.next_deadline(), Some(now + Duration::from_millis(1)));
        assert!(q.pop_due(now).is_none());
        let later = now + Duration::from_millis(10);
        assert_eq!(q.pop_due(later).unwrap().data, vec![1]);
        assert_eq!(q.pop_due(later).unwrap().data, vec![2]);
    }

    #[test]
    fn absurd_delay_does_not_overflow() {
        let now = Instant::now();
        assert!(deadline_after(now, Duration::MAX) > now);
    }
}
