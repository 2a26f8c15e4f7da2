//! Fault injection on the send path: the machine has no `tc netem`, so loss, duplication,
//! corruption, truncation and delay are simulated here, for UDP and in-memory transports alike.
//! A [`Partition`] cuts a node off from chosen destinations while it runs.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Probabilities (0.0..=1.0) of faults applied to every sent datagram. `Default` = no faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// The datagram is dropped (counted in `dropped_by_faults`).
    pub loss: f64,
    /// The datagram is sent twice.
    pub duplicate: f64,
    /// One to three random bytes are flipped.
    pub corrupt: f64,
    /// The datagram is cut to a random shorter length.
    pub truncate: f64,
    /// Each copy is held back for a uniform random delay in `[min, max]`, which reorders.
    pub delay: Option<(Duration, Duration)>,
    /// Seed of the fault RNG (mixed with the endpoint address), for reproducible runs.
    pub seed: Option<u64>,
    /// Destinations whose datagrams are dropped (counted in `dropped_by_faults`), changed at run
    /// time through the shared handle: a network partition on real UDP.
    pub partition: Option<Partition>,
}

/// A shared, mutable set of blocked destinations. Clones share the set: keep one to cut and
/// heal the links of the endpoints opened with it while they run.
///
/// Blocking acts on sends only; a symmetric partition between A and B blocks B in A's set and
/// A in B's.
#[derive(Clone, Default)]
pub struct Partition {
    blocked: Arc<RwLock<HashSet<SocketAddr>>>,
}

impl Partition {
    /// An empty set: nothing blocked.
    pub fn new() -> Partition {
        Partition::default()
    }

    /// Drops every datagram sent to `addr` from now on.
    pub fn block(&self, addr: SocketAddr) {
        self.blocked.write().insert(addr);
    }

    /// Delivers datagrams to `addr` again.
    pub fn unblock(&self, addr: SocketAddr) {
        self.blocked.write().remove(&addr);
    }

    /// Unblocks every destination.
    pub fn heal(&self) {
        self.blocked.write().clear();
    }

    /// Whether datagrams to `addr` are dropped now.
    pub fn is_blocked(&self, addr: SocketAddr) -> bool {
        self.blocked.read().contains(&addr)
    }
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.blocked.read().iter()).finish()
    }
}

/// Two partitions are equal when they are the same shared set.
impl PartialEq for Partition {
    fn eq(&self, other: &Partition) -> bool {
        Arc::ptr_eq(&self.blocked, &other.blocked)
    }
}

impl Faults {
    /// No faults, usable in `const` context.
    pub const NONE: Faults = Faults {
        loss: 0.0,
        duplicate: 0.0,
        corrupt: 0.0,
        truncate: 0.0,
        delay: None,
        seed: None,
        partition: None,
    };

    /// True when nothing would ever be altered, so the send path can skip the RNG entirely.
    pub fn is_none(&self) -> bool {
        self.loss <= 0.0
            && self.duplicate <= 0.0
            && self.corrupt <= 0.0
            && self.truncate <= 0.0
            && self.delay.is_none()
            && self.partition.is_none()
    }
}

/// What to do with one datagram after faults were applied to its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FaultPlan {
    /// Drop the datagram.
    pub(crate) drop: bool,
    /// Send it twice.
    pub(crate) duplicate: bool,
    /// Delay of the original and of the duplicate.
    pub(crate) delay: [Option<Duration>; 2],
}

impl FaultPlan {
    /// Whether the datagram (and its duplicate) must wait in a delay queue.
    pub(crate) fn is_delayed(&self) -> bool {
        self.delay[0].is_some()
    }
}

/// The faults of one endpoint with their RNG (locked only when faults are configured).
#[derive(Debug)]
pub(crate) struct FaultInjector {
    faults: Faults,
    rng: Mutex<SmallRng>,
}

impl FaultInjector {
    /// `None` when `faults` does nothing; `salt` decorrelates endpoints sharing one seed.
    pub(crate) fn new(faults: &Faults, salt: u64) -> Option<FaultInjector> {
        if faults.is_none() {
            return None;
        }
        let rng = match faults.seed {
            Some(seed) => SmallRng::seed_from_u64(seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        Some(FaultInjector {
            faults: faults.clone(),
            rng: Mutex::new(rng),
        })
    }

    /// The injector of the endpoint bound to `addr`: its address is the salt.
    pub(crate) fn for_endpoint(faults: &Faults, addr: SocketAddr) -> Option<FaultInjector> {
        FaultInjector::new(faults, addr_salt(addr))
    }

    /// Decides the fate of one datagram to `to`, corrupting or truncating `buf` in place.
    pub(crate) fn apply(&self, to: SocketAddr, buf: &mut Vec<u8>) -> FaultPlan {
        let f = &self.faults;
        let mut plan = FaultPlan {
            drop: false,
            duplicate: false,
            delay: [None, None],
        };
        if f.partition.as_ref().is_some_and(|p| p.is_blocked(to)) {
            plan.drop = true;
            return plan;
        }
        let mut rng = self.rng.lock();
        if chance(&mut rng, f.loss) {
            plan.drop = true;
            return plan;
        }
        if !buf.is_empty() && chance(&mut rng, f.corrupt) {
            let flips = rng.random_range(1..=3usize);
            for _ in 0..flips {
                let at = rng.random_range(0..buf.len());
                // A non-zero mask guarantees the byte changes.
                buf[at] ^= rng.random_range(1..=255u8);
            }
        }
        if !buf.is_empty() && chance(&mut rng, f.truncate) {
            let len = rng.random_range(0..buf.len());
            buf.truncate(len);
        }
        plan.duplicate = chance(&mut rng, f.duplicate);
        if let Some((lo, hi)) = f.delay {
            let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
            for d in plan.delay.iter_mut() {
                *d = Some(if lo == hi {
                    lo
                } else {
                    rng.random_range(lo..=hi)
                });
            }
        }
        plan
    }
}

/// Mixes an address into the fault seed so endpoints sharing a seed draw differently.
fn addr_salt(addr: SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut h);
    h.finish()
}

fn chance(rng: &mut SmallRng, p: f64) -> bool {
    if p.is_nan() || p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        rng.random_bool(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    #[test]
    fn no_faults_is_none() {
        assert!(FaultInjector::new(&Faults::default(), 1).is_none());
        assert!(Faults::NONE.is_none());
    }

    #[test]
    fn corrupt_changes_and_truncate_shortens() {
        let f = Faults {
            corrupt: 1.0,
            seed: Some(7),
            ..Faults::NONE
        };
        let inj = FaultInjector::new(&f, 1).unwrap();
        for _ in 0..100 {
            let mut buf = vec![0u8; 10];
            let plan = inj.apply(TO, &mut buf);
            assert!(!plan.drop);
            assert_ne!(buf, vec![0u8; 10]);
        }
        let f = Faults {
            truncate: 1.0,
            seed: Some(7),
            ..Faults::NONE
        };
        let inj = FaultInjector::new(&f, 1).unwrap();
        let mut buf = vec![1u8; 10];
        inj.apply(TO, &mut buf);
        assert!(buf.len() < 10);
        let mut empty = Vec::new();
        inj.apply(TO, &mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn delay_in_range_and_nan_is_harmless() {
        let f = Faults {
            loss: f64::NAN,
            delay: Some((Duration::from_millis(5), Duration::from_millis(1))),
            ..Faults::NONE
        };
        let inj = FaultInjector::new(&f, 3).unwrap();
        let plan = inj.apply(TO, &mut vec![1, 2, 3]);
        assert!(!plan.drop);
        for d in plan.delay {
            let d = d.unwrap();
            assert!(d >= Duration::from_millis(1) && d <= Duration::from_millis(5));
        }
    }

    #[test]
    fn partition_drops_only_blocked_destinations_until_healed() {
        let partition = Partition::new();
        let f = Faults {
            partition: Some(partition.clone()),
            ..Faults::NONE
        };
        assert!(!f.is_none());
        let inj = FaultInjector::new(&f, 1).unwrap();
        let other: SocketAddr = "127.0.0.1:10".parse().unwrap();
        assert!(!inj.apply(TO, &mut vec![1]).drop);
        partition.block(TO);
        assert!(inj.apply(TO, &mut vec![1]).drop);
        assert!(!inj.apply(other, &mut vec![1]).drop);
        assert_eq!(f.partition.as_ref(), Some(&partition));
        assert_ne!(Some(&Partition::new()), f.partition.as_ref());
        partition.unblock(TO);
        assert!(!inj.apply(TO, &mut vec![1]).drop);
        partition.block(TO);
        partition.block(other);
        partition.heal();
        assert!(!inj.apply(TO, &mut vec![1]).drop && !inj.apply(other, &mut vec![1]).drop);
    }
}
