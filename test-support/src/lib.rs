//! Helpers the workspace's test crates share (the library's integration tests and the tools'
//! tests): free loopback ports and bounded waits on a condition. Nothing here knows
//! chitchat-uring, so every crate of the workspace can use it without a dependency cycle.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Lowest and highest port [`free_port`] hands out: below the usual ephemeral range
/// (32 768+ on Linux), so a port it returns is not taken a moment later by some socket bound to
/// port 0.
const PORTS: std::ops::RangeInclusive<u16> = 20_000..=60_000;

/// A UDP port on 127.0.0.1 nobody is bound to right now.
///
/// Each process walks its own stretch of the range (starting from its pid), so the test
/// binaries cargo runs in parallel rarely try the same port, and one process never hands out a
/// port twice until the range wraps. Another process may still take the port before the caller
/// binds it; tests that bind nodes on it tolerate that the same way they tolerate any bind error.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = PORTS.end() - PORTS.start();
    let first = PORTS.start() + (std::process::id() % u32::from(span)) as u16;
    let _ = NEXT.compare_exchange(0, first, Ordering::SeqCst, Ordering::SeqCst);
    // Bounded: the whole range once, then give up loudly rather than spin.
    for _ in 0..=span {
        let mut port = NEXT.fetch_add(1, Ordering::SeqCst);
        if !PORTS.contains(&port) {
            NEXT.store(PORTS.start() + 1, Ordering::SeqCst);
            port = *PORTS.start();
        }
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port on 127.0.0.1 in {PORTS:?}");
}

/// Polls `condition` every 10 ms on the tokio timer until it holds or `timeout` passes; returns
/// whether it held. 10 ms: the conditions lock node state that the nodes under test need too.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`wait_until`] for threads outside an async runtime, polling every millisecond: the
/// conditions it serves are cheap counter reads, and transport tests time round trips with it.
pub fn wait_until_blocking(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable_and_distinct() {
        let ports: Vec<u16> = (0..20).map(|_| free_port()).collect();
        for (i, port) in ports.iter().enumerate() {
            assert!(PORTS.contains(port));
            assert!(!ports[..i].contains(port), "port {port} handed out twice");
        }
        let port = free_port();
        UdpSocket::bind(("127.0.0.1", port)).expect("a free port binds");
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        // Hold the next candidate: free_port must pass over it.
        let held = loop {
            let port = free_port();
            if let Ok(socket) = UdpSocket::bind(("127.0.0.1", port + 1)) {
                break socket;
            }
        };
        let held_port = held.local_addr().unwrap().port();
        assert_ne!(free_port(), held_port);
    }

    #[test]
    fn blocking_wait_sees_a_condition_become_true_and_times_out_otherwise() {
        let start = Instant::now();
        assert!(wait_until_blocking(Duration::from_secs(5), || {
            start.elapsed() >= Duration::from_millis(20)
        }));
        let start = Instant::now();
        assert!(!wait_until_blocking(Duration::from_millis(30), || false));
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn async_wait_sees_a_condition_become_true_and_times_out_otherwise() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let start = Instant::now();
            assert!(
                wait_until(Duration::from_secs(5), || start.elapsed()
                    >= Duration::from_millis(20))
                .await
            );
            let start = Instant::now();
            assert!(!wait_until(Duration::from_millis(30), || false).await);
            assert!(start.elapsed() >= Duration::from_millis(30));
        });
    }
}
