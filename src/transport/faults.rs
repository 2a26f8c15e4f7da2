//! Fault injection on the send path: the machine has no `tc netem`, so loss, duplication,
//! corruption, truncation and delay are simulated here, for UDP and in-memory transports alike.

use std::time::Duration;

use parking_lot::Mutex;
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
    };

    /// True when nothing would ever be altered, so the send path can skip the RNG entirely.
    pub fn is_none(&self) -> bool {
        self.loss <= 0.0
            && self.duplicate <= 0.0
            && self.corrupt <= 0.0
            && self.truncate <= 0.0
            && self.delay.is_none()
    }
}

/// What to do with one datagram after faults were applied to its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FaultPlan {
    pub drop: bool,
    pub duplicate: bool,
    /// Delay of the original and of the duplicate.
    pub delay: [Option<Duration>; 2],
}

impl FaultPlan {
    pub fn is_delayed(&self) -> bool {
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
    pub fn new(faults: &Faults, salt: u64) -> Option<FaultInjector> {
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

    /// Decides the fate of one datagram, corrupting or truncating `buf` in place.
    pub fn apply(&self, buf: &mut Vec<u8>) -> FaultPlan {
        let f = &self.faults;
        let mut rng = self.rng.lock();
        let mut plan = FaultPlan {
            drop: false,
            duplicate: false,
            delay: [None, None],
        };
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
            let plan = inj.apply(&mut buf);
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
        inj.apply(&mut buf);
        assert!(buf.len() < 10);
        let mut empty = Vec::new();
        inj.apply(&mut empty);
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
        let plan = inj.apply(&mut vec![1, 2, 3]);
        assert!(!plan.drop);
        for d in plan.delay {
            let d = d.unwrap();
            assert!(d >= Duration::from_millis(1) && d <= Duration::from_millis(5));
        }
    }
}
