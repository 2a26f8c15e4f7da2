//! Time as an input: the protocol core reads `now` from a `Clock` its owner hands it, so tests and
//! simulations can run on virtual time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The clock of a `Chitchat`: the system's monotonic clock, or a manual one that only moves when
/// told to.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// [`Instant::now`]: what a running node uses.
    #[default]
    System,
    /// Virtual time, for tests and simulations that must not wait on the wall clock.
    Manual(ManualClock),
}

impl Clock {
    /// The current instant: every timestamp the protocol core takes comes from here, so that
    /// virtual time reaches all of it.
    pub fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            Clock::Manual(manual) => manual.now(),
        }
    }
}

/// Virtual time: starts at the `Instant` it was created and advances only through `advance`.
/// Clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    start: Instant,
    elapsed_nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at the present instant that will not move until [`advance`](Self::advance)d.
    pub fn new() -> Self {
        ManualClock {
            start: Instant::now(),
            elapsed_nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The creation instant plus everything advanced so far.
    pub fn now(&self) -> Instant {
        self.start + Duration::from_nanos(self.elapsed_nanos.load(Ordering::Acquire))
    }

    /// Moves this clock and all its clones forward by `by` (saturating at about 584 years).
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.elapsed_nanos.fetch_add(nanos, Ordering::AcqRel);
    }

    /// Time elapsed since the clock was created.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_nanos.load(Ordering::Acquire))
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl From<ManualClock> for Clock {
    fn from(manual: ManualClock) -> Clock {
        Clock::Manual(manual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new();
        let shared = Clock::from(clock.clone());
        let t0 = shared.now();
        assert_eq!(shared.now(), t0);
        clock.advance(Duration::from_secs(3));
        assert_eq!(shared.now() - t0, Duration::from_secs(3));
        assert_eq!(clock.elapsed(), Duration::from_secs(3));
    }
}
