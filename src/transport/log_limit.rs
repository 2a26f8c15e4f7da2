//! Rate-limited logging for the worker loops: a flood of failing sends or receives must not turn
//! into a flood of log lines, yet the first of each kind, and how many followed, must be seen.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// At most one log line per second per limiter; the rest are counted and summarised.
#[derive(Default)]
pub(crate) struct LogLimiter {
    next: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(n)` if a line may be logged now (`n` lines were suppressed since the last one).
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_none_or(|n| now >= n) {
            self.next = Some(now + Duration::from_secs(1));
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Logs a transient send/receive error, rate-limited: common ones at debug, others at warn.
pub(crate) fn log_io_error(limiter: &mut LogLimiter, what: &str, addr: SocketAddr, errno: i32) {
    if let Some(suppressed) = limiter.allow() {
        let err = io::Error::from_raw_os_error(errno);
        match errno {
            libc::ECONNREFUSED
            | libc::EAGAIN
            | libc::ENOBUFS
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ECANCELED => {
                tracing::debug!(%addr, suppressed, "{what}: {err}")
            }
            _ => tracing::warn!(%addr, suppressed, "{what}: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_line_within_a_second_is_suppressed_and_counted() {
        let mut l = LogLimiter::default();
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        assert_eq!(l.suppressed, 2);
    }
}
