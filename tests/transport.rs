//! Behaviour of the datagram layer over io_uring, epoll, the portable backend and the in-memory
//! channel transport. Off Linux only the portable and channel tests run.
#![cfg_attr(not(target_os = "linux"), allow(dead_code, unused_imports))]

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use chitchat_uring::transport::{
    ChannelTransport, Datagram, DatagramHandler, DatagramTransport, Endpoint, Faults,
    MAX_DATAGRAM_LEN, ReplySink, TransportKind, UdpMode, UdpTransport,
};
use common::{uring_or_skip, wait_until_blocking as wait_until};
use parking_lot::Mutex;

const WAIT: Duration = Duration::from_secs(10);

/// Echoes every datagram (unless `echo` is off), records threads, datagrams and panics; panics
/// on the payload `panic`.
#[derive(Default)]
struct Recorder {
    no_echo: bool,
    threads: Mutex<HashSet<ThreadId>>,
    received: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
    panics: Mutex<Vec<String>>,
}

impl Recorder {
    fn silent() -> Arc<Recorder> {
        Arc::new(Recorder {
            no_echo: true,
            ..Recorder::default()
        })
    }

    fn count(&self) -> usize {
        self.received.lock().len()
    }
}

impl DatagramHandler for Recorder {
    fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink) {
        self.threads.lock().insert(std::thread::current().id());
        for d in batch {
            if d.payload == b"panic" {
                panic!("boom from handler");
            }
            self.received.lock().push((d.from, d.payload.to_vec()));
            if !self.no_echo {
                let buf = replies.buffer();
                buf.extend_from_slice(d.payload);
                replies.send(d.from);
            }
        }
    }

    fn on_panic(&self, message: String) {
        self.panics.lock().push(message);
    }
}

fn udp(mode: UdpMode) -> UdpTransport {
    UdpTransport {
        mode,
        ..UdpTransport::DEFAULT
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind(localhost()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let size: i32 = 8 << 20;
    #[cfg(target_os = "linux")]
    let option = libc::SO_RCVBUFFORCE;
    #[cfg(not(target_os = "linux"))]
    let option = libc::SO_RCVBUF;
    // SAFETY: valid int option on a valid socket (root may exceed rmem_max with FORCE).
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&size as *const i32).cast(),
            4,
        );
    }
    s
}

fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some((buf, from))
}

fn check_kind(ep: &dyn Endpoint, mode: UdpMode) {
    match mode {
        UdpMode::Uring => assert_eq!(ep.kind(), TransportKind::Uring),
        UdpMode::Epoll => assert!(matches!(ep.kind(), TransportKind::Epoll { .. })),
        UdpMode::Portable => assert_eq!(ep.kind(), TransportKind::Portable),
        UdpMode::Auto => {}
    }
}

fn echo_round_trip(mode: UdpMode) {
    let handler = Arc::new(Recorder::default());
    let ep = udp(mode)
        .open_endpoint(localhost(), handler.clone())
        .unwrap();
    check_kind(ep.as_ref(), mode);
    let c = client();
    c.send_to(b"hello", ep.local_addr()).unwrap();
    let (reply, from) = recv(&c).expect("echo reply");
    assert_eq!(reply, b"hello");
    assert_eq!(from, ep.local_addr());
    assert!(wait_until(WAIT, || ep.stats().datagrams_sent == 1));
    let stats = ep.stats();
    assert_eq!(stats.datagrams_received, 1);
    assert_eq!(stats.bytes_received, 5);
    assert_eq!(stats.bytes_sent, 5);
    assert_eq!(stats.send_errors, 0);
    // send_to from a plain thread.
    ep.send_to(c.local_addr().unwrap(), b"syn").unwrap();
    assert_eq!(recv(&c).unwrap().0, b"syn");
    assert_eq!(ep.stats().datagrams_sent, 2);
}

fn spread_over_workers(mode: UdpMode) {
    let handler = Arc::new(Recorder::default());
    let transport = UdpTransport {
        workers: Some(2),
        ..udp(mode)
    };
    let ep = transport
        .open_endpoint(localhost(), handler.clone())
        .unwrap();
    let clients: Vec<UdpSocket> = (0..64).map(|_| client()).collect();
    for (i, c) in clients.iter().enumerate() {
        c.send_to(format!("from {i}").as_bytes(), ep.local_addr())
            .unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        let (reply, _) = recv(c).expect("every client is answered");
        assert_eq!(reply, format!("from {i}").as_bytes());
    }
    assert_eq!(handler.count(), 64);
    assert_eq!(
        handler.threads.lock().len(),
        2,
        "SO_REUSEPORT spreads 64 peers over both workers"
    );
}

fn ring_exhaustion(mode: UdpMode) {
    let handler = Arc::new(Recorder::default());
    let transport = UdpTransport {
        workers: Some(1),
        recv_buffers: 4,
        ..udp(mode)
    };
    let ep = transport
        .open_endpoint(localhost(), handler.clone())
        .unwrap();
    let c = client();
    const N: usize = 500;
    for i in 0..N {
        c.send_to(&(i as u32).to_le_bytes(), ep.local_addr())
            .unwrap();
    }
    let mut seen = HashSet::new();
    while seen.len() < N {
        let Some((reply, _)) = recv(&c) else {
            panic!("only {} of {N} replies", seen.len());
        };
        seen.insert(reply);
    }
    assert!(wait_until(WAIT, || ep.stats().datagrams_sent == N as u64));
    let stats = ep.stats();
    assert_eq!(stats.datagrams_received, N as u64);
    if mode == UdpMode::Uring {
        assert!(stats.recv_rearms > 0, "{stats:?}");
    }
}

fn close_frees_port(mode: UdpMode) {
    let handler = Arc::new(Recorder::default());
    let t = udp(mode);
    let ep = t.open_endpoint(localhost(), handler.clone()).unwrap();
    let addr = ep.local_addr();
    ep.close();
    ep.close(); // idempotent
    assert!(ep.send_to(addr, b"x").is_err());
    drop(UdpSocket::bind(addr).expect("port free after close()"));
    // Same address again, explicitly; then freed by drop.
    let ep = t.open_endpoint(addr, handler.clone()).unwrap();
    assert_eq!(ep.local_addr(), addr);
    let c = client();
    c.send_to(b"again", addr).unwrap();
    assert_eq!(recv(&c).unwrap().0, b"again");
    drop(ep);
    drop(UdpSocket::bind(addr).expect("port free after drop"));
}

fn bind_error_names_address(mode: UdpMode) {
    let taken = UdpSocket::bind(localhost()).unwrap();
    let addr = taken.local_addr().unwrap();
    let err = match udp(mode).open_endpoint(addr, Arc::new(Recorder::default())) {
        Ok(_) => panic!("bind to a taken port must fail"),
        Err(e) => e,
    };
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

fn panic_isolation(mode: UdpMode) {
    let t = UdpTransport {
        workers: Some(1),
        ..udp(mode)
    };
    let bad = Arc::new(Recorder::default());
    let good = Arc::new(Recorder::default());
    let bad_ep = t.open_endpoint(localhost(), bad.clone()).unwrap();
    let good_ep = t.open_endpoint(localhost(), good.clone()).unwrap();
    let c = client();
    c.send_to(b"panic", bad_ep.local_addr()).unwrap();
    assert!(wait_until(WAIT, || !bad.panics.lock().is_empty()));
    assert!(bad.panics.lock()[0].contains("boom from handler"));
    assert!(bad_ep.send_to(c.local_addr().unwrap(), b"x").is_err());
    // The other endpoint on the same worker keeps answering.
    c.send_to(b"still here", good_ep.local_addr()).unwrap();
    assert_eq!(recv(&c).unwrap().0, b"still here");
    // The panicked endpoint's sockets get closed: its port becomes free.
    let addr = bad_ep.local_addr();
    assert!(wait_until(WAIT, || UdpSocket::bind(addr).is_ok()));
}

fn large_datagram(mode: UdpMode) {
    let ep = udp(mode)
        .open_endpoint(localhost(), Arc::new(Recorder::default()))
        .unwrap();
    let c = client();
    let payload: Vec<u8> = (0..MAX_DATAGRAM_LEN).map(|i| (i % 251) as u8).collect();
    c.send_to(&payload, ep.local_addr()).unwrap();
    let (reply, _) = recv(&c).expect("large echo");
    assert_eq!(reply.len(), MAX_DATAGRAM_LEN);
    assert_eq!(reply, payload);
    assert_eq!(ep.stats().recv_errors, 0);
}

fn oversized_for_buffers_is_dropped(mode: UdpMode) {
    let t = UdpTransport {
        recv_buffer_len: 1024,
        ..udp(mode)
    };
    let handler = Arc::new(Recorder::default());
    let ep = t.open_endpoint(localhost(), handler.clone()).unwrap();
    let c = client();
    c.send_to(&[7u8; 4000], ep.local_addr()).unwrap();
    c.send_to(b"small", ep.local_addr()).unwrap();
    assert_eq!(recv(&c).unwrap().0, b"small");
    assert!(wait_until(WAIT, || ep.stats().recv_errors == 1));
    assert_eq!(handler.count(), 1);
}

fn udp_faults(mode: UdpMode) {
    let c = client();
    let open = |faults: Faults| {
        UdpTransport {
            faults,
            workers: Some(1),
            ..udp(mode)
        }
        .open_endpoint(localhost(), Arc::new(Recorder::default()))
        .unwrap()
    };
    // Loss 1.0: nothing comes back, everything counted.
    let ep = open(Faults {
        loss: 1.0,
        ..Faults::default()
    });
    for _ in 0..20 {
        c.send_to(b"lost", ep.local_addr()).unwrap();
    }
    ep.send_to(c.local_addr().unwrap(), b"lost too").unwrap();
    assert!(wait_until(WAIT, || ep.stats().dropped_by_faults == 21));
    assert_eq!(ep.stats().datagrams_received, 20);
    assert_eq!(ep.stats().datagrams_sent, 0);
    // Duplicate 1.0: two replies per datagram.
    let ep = open(Faults {
        duplicate: 1.0,
        ..Faults::default()
    });
    c.send_to(b"twice", ep.local_addr()).unwrap();
    assert_eq!(recv(&c).unwrap().0, b"twice");
    assert_eq!(recv(&c).unwrap().0, b"twice");
    // Corrupt 1.0: same length, different bytes.
    let ep = open(Faults {
        corrupt: 1.0,
        seed: Some(1),
        ..Faults::default()
    });
    let msg = [0u8; 64];
    c.send_to(&msg, ep.local_addr()).unwrap();
    let reply = recv(&c).unwrap().0;
    assert_eq!(reply.len(), 64);
    assert_ne!(reply, msg);
    // Truncate 1.0: shorter.
    let ep = open(Faults {
        truncate: 1.0,
        ..Faults::default()
    });
    c.send_to(&msg, ep.local_addr()).unwrap();
    assert!(recv(&c).unwrap().0.len() < 64);
    // Delay: replies arrive, later.
    let ep = open(Faults {
        delay: Some((Duration::from_millis(30), Duration::from_millis(40))),
        ..Faults::default()
    });
    let start = Instant::now();
    c.send_to(b"late", ep.local_addr()).unwrap();
    ep.send_to(c.local_addr().unwrap(), b"late syn").unwrap();
    let mut got = vec![recv(&c).unwrap().0, recv(&c).unwrap().0];
    got.sort();
    assert_eq!(got, vec![b"late".to_vec(), b"late syn".to_vec()]);
    assert!(start.elapsed() >= Duration::from_millis(30));
}

fn ipv6_echo(mode: UdpMode) {
    let ep = udp(mode)
        .open_endpoint("[::1]:0".parse().unwrap(), Arc::new(Recorder::default()))
        .unwrap();
    let c = UdpSocket::bind("[::1]:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.send_to(b"six", ep.local_addr()).unwrap();
    let (reply, from) = recv(&c).expect("v6 echo");
    assert_eq!(reply, b"six");
    assert_eq!(from, ep.local_addr());
}

/// Closes its own endpoint from inside `handle_batch`: must not deadlock its worker.
#[derive(Default)]
struct SelfCloser {
    ep: std::sync::OnceLock<Box<dyn Endpoint>>,
}

impl DatagramHandler for SelfCloser {
    fn handle_batch(&self, _batch: &[Datagram<'_>], _replies: &mut dyn ReplySink) {
        if let Some(ep) = self.ep.get() {
            ep.close();
        }
    }
}

fn close_from_handler(mode: UdpMode) {
    let handler = Arc::new(SelfCloser::default());
    let ep = udp(mode)
        .open_endpoint(localhost(), handler.clone())
        .unwrap();
    let addr = ep.local_addr();
    assert!(handler.ep.set(ep).is_ok());
    client().send_to(b"close yourself", addr).unwrap();
    assert!(wait_until(WAIT, || UdpSocket::bind(addr).is_ok()));
    // The worker is still alive: another endpoint on the same runtime answers.
    let other = udp(mode)
        .open_endpoint(localhost(), Arc::new(Recorder::default()))
        .unwrap();
    let c = client();
    c.send_to(b"alive", other.local_addr()).unwrap();
    assert_eq!(recv(&c).unwrap().0, b"alive");
}

macro_rules! udp_tests {
    ($($name:ident),* $(,)?) => {
        #[cfg(target_os = "linux")]
        mod uring {
            use super::*;
            $( #[test] fn $name() {
                if uring_or_skip(concat!("uring::", stringify!($name))) {
                    super::$name(UdpMode::Uring)
                }
            } )*
        }
        #[cfg(target_os = "linux")]
        mod epoll {
            use super::*;
            $( #[test] fn $name() { super::$name(UdpMode::Epoll) } )*
        }
    };
}

udp_tests!(
    echo_round_trip,
    spread_over_workers,
    ring_exhaustion,
    close_frees_port,
    bind_error_names_address,
    panic_isolation,
    large_datagram,
    oversized_for_buffers_is_dropped,
    udp_faults,
    ipv6_echo,
    close_from_handler,
);

/// The portable backend runs the tests that do not depend on several workers or io_uring's
/// buffer ring.
mod portable {
    use super::*;
    macro_rules! portable_tests {
        ($($name:ident),* $(,)?) => {
            $( #[test] fn $name() { super::$name(UdpMode::Portable) } )*
        };
    }
    portable_tests!(
        echo_round_trip,
        close_frees_port,
        bind_error_names_address,
        panic_isolation,
        large_datagram,
        oversized_for_buffers_is_dropped,
        udp_faults,
        ipv6_echo,
        close_from_handler,
    );
}

#[cfg(target_os = "linux")]
#[test]
fn forced_modes_report_their_kind() {
    let ep = udp(UdpMode::Epoll)
        .open_endpoint(localhost(), Arc::new(Recorder::default()))
        .unwrap();
    match ep.kind() {
        TransportKind::Epoll { reason } => assert!(reason.contains("forced"), "{reason}"),
        other => panic!("{other:?}"),
    }
    if !uring_or_skip("the io_uring half of forced_modes_report_their_kind") {
        return;
    }
    let ep = udp(UdpMode::Uring)
        .open_endpoint(localhost(), Arc::new(Recorder::default()))
        .unwrap();
    assert_eq!(ep.kind(), TransportKind::Uring);
}

#[test]
fn unit_const_is_usable_like_chitchat() {
    fn takes_transport(t: &dyn DatagramTransport) -> Box<dyn Endpoint> {
        t.open_endpoint(localhost(), Arc::new(Recorder::default()))
            .unwrap()
    }
    let ep = takes_transport(&UdpTransport);
    assert_ne!(ep.local_addr().port(), 0);
}

// ---------------------------------------------------------------------------------------------
// Channel transport
// ---------------------------------------------------------------------------------------------

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn channel_echo_and_stats() {
    let t = ChannelTransport::new();
    let server = t
        .open_endpoint(addr(1000), Arc::new(Recorder::default()))
        .unwrap();
    let rec = Recorder::silent();
    let client = t.open_endpoint(addr(1001), rec.clone()).unwrap();
    assert_eq!(server.kind(), TransportKind::Channel);
    client.send_to(addr(1000), b"ping").unwrap();
    assert!(wait_until(WAIT, || rec.count() == 1));
    assert_eq!(rec.received.lock()[0], (addr(1000), b"ping".to_vec()));
    let stats = t.statistics();
    assert_eq!(stats.num_messages_total, 2);
    assert_eq!(stats.num_bytes_total, 8);
    assert_eq!(server.stats().datagrams_received, 1);
    assert_eq!(server.stats().datagrams_sent, 1);
    // Unknown destination: silent drop, still counted.
    client.send_to(addr(4242), b"void").unwrap();
    assert_eq!(t.statistics().num_messages_total, 3);
}

#[test]
fn channel_addresses() {
    let t = ChannelTransport::new();
    let a = t
        .open_endpoint(addr(0), Arc::new(Recorder::default()))
        .unwrap();
    assert_eq!(a.local_addr(), addr(1));
    let b = t
        .open_endpoint(addr(0), Arc::new(Recorder::default()))
        .unwrap();
    assert_eq!(b.local_addr(), addr(2));
    let err = t
        .open_endpoint(addr(1), Arc::new(Recorder::default()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("Address not available"), "{err}");
    drop(a);
    assert!(
        t.open_endpoint(addr(1), Arc::new(Recorder::default()))
            .is_ok()
    );
    // A different network does not share addresses.
    assert!(
        ChannelTransport::new()
            .open_endpoint(addr(2), Arc::new(Recorder::default()))
            .is_ok()
    );
}

#[test]
fn channel_mtu() {
    let t = ChannelTransport::with_mtu(100);
    let a = t.open_endpoint(addr(1), Recorder::silent()).unwrap();
    let rec = Recorder::silent();
    let _b = t.open_endpoint(addr(2), rec.clone()).unwrap();
    let err = a.send_to(addr(2), &[0u8; 101]).unwrap_err();
    assert!(
        err.to_string()
            .contains("Serialized message size exceeds MTU"),
        "{err}"
    );
    a.send_to(addr(2), &[0u8; 100]).unwrap();
    assert!(wait_until(WAIT, || rec.count() == 1));
    assert_eq!(a.stats().send_errors, 1);
    // The UDP-sized network carries a maximal datagram whole.
    let t = ChannelTransport::with_mtu(MAX_DATAGRAM_LEN);
    let a = t.open_endpoint(addr(1), Recorder::silent()).unwrap();
    let rec = Recorder::silent();
    let _b = t.open_endpoint(addr(2), rec.clone()).unwrap();
    a.send_to(addr(2), &[5u8; MAX_DATAGRAM_LEN]).unwrap();
    assert!(a.send_to(addr(2), &[5u8; MAX_DATAGRAM_LEN + 1]).is_err());
    assert!(wait_until(WAIT, || rec.count() == 1));
    assert_eq!(rec.received.lock()[0].1.len(), MAX_DATAGRAM_LEN);
}

#[test]
fn channel_partition_and_heal() {
    let t = ChannelTransport::new();
    let ra = Recorder::silent();
    let rb = Recorder::silent();
    let a = t.open_endpoint(addr(1), ra.clone()).unwrap();
    let b = t.open_endpoint(addr(2), rb.clone()).unwrap();
    t.remove_link_now(addr(2), addr(1));
    a.send_to(addr(2), b"cut").unwrap();
    b.send_to(addr(1), b"cut").unwrap();
    // A third path still works, so a later delivery proves the cut ones were dropped.
    let c = t.open_endpoint(addr(3), Recorder::silent()).unwrap();
    c.send_to(addr(2), b"via c").unwrap();
    assert!(wait_until(WAIT, || rb.count() == 1));
    assert_eq!(rb.received.lock()[0].1, b"via c");
    assert_eq!(ra.count(), 0);
    assert_eq!(t.statistics().num_messages_total, 3);
    t.add_link_now(addr(1), addr(2));
    a.send_to(addr(2), b"healed").unwrap();
    assert!(wait_until(WAIT, || rb.count() == 2));
}

#[test]
fn channel_faults() {
    let base = ChannelTransport::new();
    let rec = Recorder::silent();
    let _sink = base.open_endpoint(addr(9), rec.clone()).unwrap();
    let lossy = base.clone().with_faults(Faults {
        loss: 1.0,
        ..Faults::default()
    });
    let a = lossy.open_endpoint(addr(1), Recorder::silent()).unwrap();
    for _ in 0..10 {
        a.send_to(addr(9), b"x").unwrap();
    }
    assert_eq!(a.stats().dropped_by_faults, 10);
    assert_eq!(base.statistics().num_messages_total, 10);
    let dup = base.clone().with_faults(Faults {
        duplicate: 1.0,
        ..Faults::default()
    });
    let b = dup.open_endpoint(addr(2), Recorder::silent()).unwrap();
    b.send_to(addr(9), b"dd").unwrap();
    assert!(
        wait_until(WAIT, || rec.count() == 2),
        "{:?} {:?} {:?}",
        rec.received.lock(),
        b.stats(),
        base.statistics()
    );
    let corrupt = base.clone().with_faults(Faults {
        corrupt: 1.0,
        truncate: 1.0,
        seed: Some(3),
        ..Faults::default()
    });
    let c = corrupt.open_endpoint(addr(3), Recorder::silent()).unwrap();
    c.send_to(addr(9), &[0u8; 32]).unwrap();
    assert!(wait_until(WAIT, || rec.count() == 3));
    assert!(rec.received.lock()[2].1.len() < 32);
    // Delay reorders: 200 numbered datagrams with random delays arrive, not all in order.
    let delayed = base.clone().with_faults(Faults {
        delay: Some((Duration::ZERO, Duration::from_millis(20))),
        seed: Some(5),
        ..Faults::default()
    });
    let d = delayed.open_endpoint(addr(4), Recorder::silent()).unwrap();
    for i in 0..200u32 {
        d.send_to(addr(9), &i.to_le_bytes()).unwrap();
    }
    assert!(wait_until(WAIT, || rec.count() == 203));
    let order: Vec<u32> = rec.received.lock()[3..]
        .iter()
        .map(|(_, p)| u32::from_le_bytes(p[..4].try_into().unwrap()))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..200).collect::<Vec<_>>());
    assert_ne!(order, sorted, "random delays reorder");
}

#[test]
fn channel_panic_isolation() {
    let t = ChannelTransport::new();
    let bad = Arc::new(Recorder::default());
    let bad_ep = t.open_endpoint(addr(1), bad.clone()).unwrap();
    let _good_ep = t
        .open_endpoint(addr(2), Arc::new(Recorder::default()))
        .unwrap();
    let rec = Recorder::silent();
    let client = t.open_endpoint(addr(3), rec.clone()).unwrap();
    client.send_to(addr(1), b"panic").unwrap();
    assert!(wait_until(WAIT, || !bad.panics.lock().is_empty()));
    assert!(bad_ep.send_to(addr(3), b"x").is_err());
    client.send_to(addr(2), b"ok").unwrap();
    assert!(wait_until(WAIT, || rec.count() == 1));
    // The panicked endpoint's address is free again.
    assert!(wait_until(WAIT, || t
        .open_endpoint(addr(1), Recorder::silent())
        .is_ok()));
}

fn chan_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("cc-chan"))
        .count()
}

/// Relays one hop and counts what it got.
struct Ring {
    next: SocketAddr,
    got: Mutex<usize>,
}

impl DatagramHandler for Ring {
    fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink) {
        for d in batch {
            *self.got.lock() += 1;
            if let Some(&hops) = d.payload.first()
                && hops > 0
            {
                replies.buffer().push(hops - 1);
                replies.send(self.next);
            }
        }
    }
}

#[test]
fn hundred_channel_endpoints_few_threads() {
    let t = ChannelTransport::with_mtu(65_507);
    let n = 100u16;
    let handlers: Vec<Arc<Ring>> = (0..n)
        .map(|i| {
            Arc::new(Ring {
                next: addr(2000 + (i + 1) % n),
                got: Mutex::new(0),
            })
        })
        .collect();
    let eps: Vec<Box<dyn Endpoint>> = (0..n)
        .map(|i| {
            t.open_endpoint(addr(2000 + i), handlers[i as usize].clone())
                .unwrap()
        })
        .collect();
    // Every node starts a 10-hop relay: every node receives 10 datagrams in total.
    for (i, ep) in eps.iter().enumerate() {
        ep.send_to(addr(2000 + (i as u16 + 1) % n), &[9]).unwrap();
    }
    assert!(wait_until(WAIT, || handlers
        .iter()
        .all(|h| *h.got.lock() == 10)));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(chan_threads() <= 2 * workers, "{} threads", chan_threads());
    assert_eq!(t.statistics().num_messages_total, 1000);
}
