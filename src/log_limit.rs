//! Rate-limited log lines: a flood of the same event (failing sends, partial digests) must not
//! turn into a flood of lines, yet the first of each kind, and how many followed, must be seen.

use std::time::{Duration, Instant};

/// At most one log line per interval per limiter; the rest are counted and summarised.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    pub(crate) suppressed: u64,
}

impl Default for LogLimiter {
    /// One line per second.
    fn default() -> Self {
        LogLimiter::new(Duration::from_secs(1))
    }
}

impl LogLimiter {
    pub(crate) const fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` if a line may be logged now (`n` lines were suppressed since the last one).
    pub(crate) fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`Self::allow`] at `now`, for callers with a clock of their own. An instant before the
    /// last line's (another instance's clock) lets the line through rather than muting it.
    pub(crate) fn allow_at(&mut self, now: Instant) -> Option<u64> {
        let due = self.last.is_none_or(|last| {
            now.checked_duration_since(last)
                .is_none_or(|since| since >= self.interval)
        });
        if due {
            self.last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}
