//! Rate-limited logging of the worker loops' send and receive errors (the limiter itself is
//! `crate::log_limit`).

use std::io;
use std::net::SocketAddr;

pub(crate) use crate::log_limit::LogLimiter;

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
