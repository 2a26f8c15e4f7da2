//! The real-UDP transport: picks io_uring, epoll or the portable backend; for the first two,
//! binds one `SO_REUSEPORT` socket per worker on the caller's thread (so bind errors come back
//! synchronously) and hands them to the workers. Off Linux only the portable backend exists.

#[cfg(target_os = "linux")]
use std::io;
use std::net::SocketAddr;
#[cfg(target_os = "linux")]
use std::os::fd::OwnedFd;
use std::sync::Arc;
#[cfg(target_os = "linux")]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(target_os = "linux")]
use std::time::Instant;

use anyhow::anyhow;
use async_trait::async_trait;

use crate::transport::api::{
    DatagramHandler, DatagramTransport, Endpoint, MAX_DATAGRAM_LEN, Socket, Transport,
};
#[cfg(target_os = "linux")]
use crate::transport::api::{EndpointStats, TransportKind};
use crate::transport::bridge;
#[cfg(target_os = "linux")]
use crate::transport::delay_queue::{Delayed, deadline_after};
#[cfg(target_os = "linux")]
use crate::transport::dispatch::{EndpointCore, bump};
#[cfg(target_os = "linux")]
use crate::transport::epoll::EpollBackend;
#[cfg(target_os = "linux")]
use crate::transport::faults::FaultInjector;
use crate::transport::faults::Faults;
use crate::transport::portable;
#[cfg(target_os = "linux")]
use crate::transport::runtime::{Runtime, default_workers, get_runtime};
#[cfg(target_os = "linux")]
use crate::transport::sys;
#[cfg(target_os = "linux")]
use crate::transport::udp_shared::{UdpCommand, UdpCore};
#[cfg(target_os = "linux")]
use crate::transport::uring::UringBackend;

#[cfg(target_os = "linux")]
use crate::transport::udp_shared::RECV_HEADER_LEN;
/// What `udp_shared` defines on Linux (the multishot receive header): the receive buffer sizes
/// of `UdpTransport`'s fields keep the same defaults everywhere.
#[cfg(not(target_os = "linux"))]
const RECV_HEADER_LEN: usize = 44;

/// Environment variable that overrides [`UdpMode::Auto`]: `auto`, `uring`, `epoll` or
/// `portable`.
pub const TRANSPORT_ENV: &str = "CHITCHAT_URING_TRANSPORT";

/// Socket buffer size asked for (best effort): bursts must not overflow while a worker is busy.
const SOCKET_BUFFER: i32 = 4 << 20;

/// Which UDP backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UdpMode {
    /// io_uring when it can be set up here, else epoll (with one warning saying why).
    /// `CHITCHAT_URING_TRANSPORT` overrides it.
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// epoll.
    Epoll,
    /// tokio's `UdpSocket` (see [`TransportKind::Portable`](crate::transport::TransportKind)):
    /// no io_uring, no epoll, one thread per endpoint. What `Auto` means off Linux.
    Portable,
}

/// Real UDP. `UdpTransport` is also a constant equal to [`UdpTransport::DEFAULT`], so code
/// written for chitchat's unit struct (`&UdpTransport`) compiles unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpTransport {
    /// Which backend: io_uring, epoll, or io_uring with a fallback to epoll.
    pub mode: UdpMode,
    /// Worker threads (one socket each); `None`: the CPUs in the process's affinity mask.
    pub workers: Option<usize>,
    /// Faults applied to every datagram sent (replies and `send_to`).
    pub faults: Faults,
    /// Submission queue entries per io_uring (the completion queue gets 4x).
    pub ring_entries: u32,
    /// Receive buffers per worker (rounded up to a power of two, at most 32 768), shared by every
    /// socket the worker serves. When a busy worker lets more datagrams pile up than it has
    /// buffers, every multishot receive ends with ENOBUFS and must be re-armed: with 200 nodes
    /// in one process on a loaded machine, 64 buffers meant about one re-arm per datagram and
    /// overflowing socket queues, 512 none. The memory is mapped, not locked: pages become
    /// resident only as large datagrams land in them.
    pub recv_buffers: u32,
    /// Bytes per receive buffer: the largest datagram received plus the 44-byte header of a
    /// multishot receive. Larger datagrams are dropped and counted as receive errors.
    pub recv_buffer_len: usize,
    /// Pre-allocated send slots per worker (the pool grows if a batch needs more).
    pub send_slots: usize,
}

impl UdpTransport {
    /// Auto mode, a worker per CPU, no faults, 512 receive buffers of 64 KiB per worker.
    pub const DEFAULT: UdpTransport = UdpTransport {
        mode: UdpMode::Auto,
        workers: None,
        faults: Faults::NONE,
        ring_entries: 1024,
        recv_buffers: 512,
        recv_buffer_len: (MAX_DATAGRAM_LEN + RECV_HEADER_LEN).next_multiple_of(64),
        send_slots: 256,
    };
}

impl Default for UdpTransport {
    fn default() -> Self {
        UdpTransport::DEFAULT
    }
}

/// chitchat's `UdpTransport` is a unit struct used as a value (`&UdpTransport`); a braced struct
/// does not occupy the value namespace, so this constant of the same name keeps such code
/// compiling.
#[allow(non_upper_case_globals)]
pub const UdpTransport: UdpTransport = UdpTransport::DEFAULT;

/// What the mode (and the environment) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Choice {
    Auto,
    Uring,
    Epoll(String),
    Portable,
}

fn resolve_mode(mode: UdpMode, env: Option<&str>) -> Choice {
    match mode {
        UdpMode::Uring => Choice::Uring,
        UdpMode::Epoll => Choice::Epoll("forced by UdpMode::Epoll".to_string()),
        UdpMode::Portable => Choice::Portable,
        UdpMode::Auto => match env.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("uring") | Some("io_uring") => Choice::Uring,
            Some("epoll") => Choice::Epoll(format!("forced by {TRANSPORT_ENV}=epoll")),
            Some("portable") => Choice::Portable,
            _ => Choice::Auto,
        },
    }
}

impl DatagramTransport for UdpTransport {
    fn open_endpoint(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        let env = std::env::var(TRANSPORT_ENV).ok();
        match resolve_mode(self.mode, env.as_deref()) {
            Choice::Portable => self.open_portable(listen_addr, handler),
            #[cfg(target_os = "linux")]
            choice => self.open_linux(choice, listen_addr, handler),
            #[cfg(not(target_os = "linux"))]
            Choice::Auto => self.open_portable(listen_addr, handler),
            #[cfg(not(target_os = "linux"))]
            Choice::Uring | Choice::Epoll(_) => Err(anyhow!(
                "UdpMode::{:?}: io_uring and epoll exist only on Linux (use UdpMode::Portable)",
                self.mode
            )),
        }
    }
}

impl UdpTransport {
    /// A portable endpoint, with the largest datagram `recv_buffer_len` allows, as the other
    /// backends.
    fn open_portable(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        let max_datagram = self.recv_buffer_len.saturating_sub(RECV_HEADER_LEN);
        portable::open(listen_addr, handler, &self.faults, max_datagram)
    }
}

/// chitchat 0.13's transport: `open` returns a message-level socket over one of this
/// transport's endpoints (same backend, same faults); `spawn_chitchat` takes the fast path.
#[async_trait]
impl Transport for UdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        bridge::open_socket(self, listen_addr)
    }

    fn datagram_transport(&self) -> Option<&dyn DatagramTransport> {
        Some(self)
    }
}

#[cfg(target_os = "linux")]
static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

/// The workers serving UDP endpoints, whichever backend they run.
#[cfg(target_os = "linux")]
type UdpRuntime = Arc<Runtime<UdpCommand>>;

#[cfg(target_os = "linux")]
impl UdpTransport {
    fn recv_buffer_len(&self) -> usize {
        self.recv_buffer_len
            .clamp(RECV_HEADER_LEN + 1, u32::MAX as usize / 2)
    }

    /// The io_uring backend this configuration asks for.
    fn uring_backend(&self) -> UringBackend {
        UringBackend {
            ring_entries: self.ring_entries.clamp(8, 32_768),
            recv_buffers: self.recv_buffers.clamp(1, 32_768).next_power_of_two(),
            recv_buffer_len: self.recv_buffer_len(),
            send_slots: self.send_slots.max(1),
        }
    }

    /// The epoll backend this configuration asks for (the io_uring settings do not matter).
    fn epoll_backend(&self) -> EpollBackend {
        EpollBackend {
            recv_buffer_len: self.recv_buffer_len(),
            send_slots: self.send_slots.max(1),
        }
    }

    /// The runtime for this configuration and what kind it is.
    fn runtime(&self, choice: Choice) -> anyhow::Result<(UdpRuntime, TransportKind)> {
        let workers = self.workers.unwrap_or_else(default_workers).clamp(1, 1024);
        let epoll = |reason: String| -> anyhow::Result<(UdpRuntime, TransportKind)> {
            let rt = get_runtime(&self.epoll_backend(), workers)
                .map_err(|e| anyhow!("starting epoll workers: {e}"))?;
            Ok((rt, TransportKind::Epoll { reason }))
        };
        match choice {
            Choice::Uring => {
                let rt = get_runtime(&self.uring_backend(), workers)
                    .map_err(|e| anyhow!("io_uring transport unavailable: {e}"))?;
                Ok((rt, TransportKind::Uring))
            }
            Choice::Epoll(reason) => epoll(reason),
            Choice::Auto => match get_runtime(&self.uring_backend(), workers) {
                Ok(rt) => Ok((rt, TransportKind::Uring)),
                Err(reason) => {
                    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!("io_uring unavailable, using epoll: {reason}");
                    }
                    epoll(reason)
                }
            },
            Choice::Portable => Err(anyhow!("the portable backend has no worker runtime")),
        }
    }

    /// An io_uring or epoll endpoint.
    fn open_linux(
        &self,
        choice: Choice,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        let (runtime, kind) = self.runtime(choice)?;
        let nonblocking = matches!(kind, TransportKind::Epoll { .. });
        let sockets = bind_sockets(listen_addr, runtime.workers(), nonblocking)?;
        let local_addr = sys::local_addr(&sockets[0])
            .map_err(|e| anyhow!("getsockname for UDP socket bound to {listen_addr}: {e}"))?;
        let send_socket = sockets[0]
            .try_clone()
            .map_err(|e| anyhow!("dup of UDP socket bound to {listen_addr}: {e}"))?;
        let core = EndpointCore::new(
            local_addr,
            handler,
            FaultInjector::for_endpoint(&self.faults, local_addr),
        );
        let ep = Arc::new(UdpCore::new(core, send_socket));
        for (i, socket) in sockets.into_iter().enumerate() {
            runtime.worker(i).push_backend(UdpCommand::Open {
                ep: ep.clone(),
                socket,
            });
        }
        Ok(Box::new(UdpEndpoint {
            ep,
            runtime,
            kind,
            closed: AtomicBool::new(false),
        }))
    }
}

/// Port ownership: SO_REUSEPORT must only ever group our own worker sockets, so before binding
/// them we probe-bind the address WITHOUT SO_REUSEPORT: that fails if any socket (ours, another
/// node's, anyone's) holds the port. The probe is closed at once. Race left: a process of the
/// same user binding the port with SO_REUSEPORT between the probe and our first bind would still
/// join the group. Port 0 needs no probe (the kernel picks a free port).
#[cfg(target_os = "linux")]
fn ensure_port_free(listen_addr: SocketAddr) -> anyhow::Result<()> {
    if listen_addr.port() == 0 {
        return Ok(());
    }
    std::net::UdpSocket::bind(listen_addr)
        .map(drop)
        .map_err(|e| anyhow!("failed to bind UDP socket to {listen_addr}: already in use? ({e})"))
}

/// `n` sockets on one address; port 0 is resolved by the first bind.
#[cfg(target_os = "linux")]
fn bind_sockets(
    listen_addr: SocketAddr,
    n: usize,
    nonblocking: bool,
) -> anyhow::Result<Vec<OwnedFd>> {
    ensure_port_free(listen_addr)?;
    let mut addr = listen_addr;
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let fd = sys::bind_udp(addr, nonblocking, SOCKET_BUFFER)
            .map_err(|e| anyhow!("cannot bind UDP socket to {listen_addr}: {e}"))?;
        if i == 0 && addr.port() == 0 {
            let bound = sys::local_addr(&fd)
                .map_err(|e| anyhow!("getsockname for UDP socket bound to {listen_addr}: {e}"))?;
            addr.set_port(bound.port());
        }
        sockets.push(fd);
    }
    Ok(sockets)
}

/// A UDP endpoint handle.
#[cfg(target_os = "linux")]
struct UdpEndpoint {
    ep: Arc<UdpCore>,
    runtime: UdpRuntime,
    kind: TransportKind,
    closed: AtomicBool,
}

#[cfg(target_os = "linux")]
impl UdpEndpoint {
    fn raw_send(&self, fd: &OwnedFd, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let stats = &self.ep.core.stats;
        match sys::send_to(fd, to, self.ep.core.local_addr.is_ipv6(), payload) {
            Ok(n) => {
                bump(&stats.datagrams_sent, 1);
                bump(&stats.bytes_sent, n as u64);
                Ok(())
            }
            Err(e) => {
                bump(&stats.send_errors, 1);
                Err(e)
            }
        }
    }
}

#[cfg(target_os = "linux")]
impl Endpoint for UdpEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.ep.core.local_addr
    }

    fn kind(&self) -> TransportKind {
        self.kind.clone()
    }

    fn send_to(&self, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let closed = || io::Error::new(io::ErrorKind::NotConnected, "endpoint closed");
        let core = &self.ep.core;
        if core.is_closed() {
            return Err(closed());
        }
        let guard = self.ep.send_fd();
        let fd = guard.as_ref().ok_or_else(closed)?;
        let Some(injector) = &core.faults else {
            return self.raw_send(fd, to, payload);
        };
        let mut buf = payload.to_vec();
        let plan = injector.apply(to, &mut buf);
        if plan.drop {
            bump(&core.stats.dropped_by_faults, 1);
            return Ok(());
        }
        let copies = if plan.duplicate { 2 } else { 1 };
        if plan.is_delayed() {
            let now = Instant::now();
            for d in plan.delay.iter().take(copies).flatten() {
                self.runtime
                    .worker(0)
                    .push_backend(UdpCommand::SendLater(Delayed::new(
                        deadline_after(now, *d),
                        core.id,
                        core.local_addr,
                        to,
                        buf.clone(),
                    )));
            }
            return Ok(());
        }
        for _ in 0..copies {
            self.raw_send(fd, to, &buf)?;
        }
        Ok(())
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.ep.close();
        self.runtime.close_endpoint(self.ep.core.id, None);
    }

    fn stats(&self) -> EndpointStats {
        self.ep.core.stats.snapshot()
    }
}

#[cfg(target_os = "linux")]
impl Drop for UdpEndpoint {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_auto_only() {
        assert_eq!(resolve_mode(UdpMode::Auto, None), Choice::Auto);
        assert_eq!(resolve_mode(UdpMode::Auto, Some("auto")), Choice::Auto);
        assert_eq!(resolve_mode(UdpMode::Auto, Some("URING")), Choice::Uring);
        assert!(matches!(
            resolve_mode(UdpMode::Auto, Some("epoll")),
            Choice::Epoll(r) if r.contains(TRANSPORT_ENV)
        ));
        assert_eq!(resolve_mode(UdpMode::Uring, Some("epoll")), Choice::Uring);
        assert_eq!(
            resolve_mode(UdpMode::Auto, Some(" Portable ")),
            Choice::Portable
        );
        assert_eq!(
            resolve_mode(UdpMode::Portable, Some("uring")),
            Choice::Portable
        );
        assert!(matches!(
            resolve_mode(UdpMode::Epoll, Some("uring")),
            Choice::Epoll(_)
        ));
    }

    #[test]
    fn const_and_default_agree() {
        let by_const: &UdpTransport = &UdpTransport;
        assert_eq!(by_const, &UdpTransport::default());
        const { assert!(UdpTransport::DEFAULT.recv_buffer_len >= MAX_DATAGRAM_LEN + RECV_HEADER_LEN) };
    }

    struct Nop;
    impl crate::transport::api::DatagramHandler for Nop {
        fn handle_batch(
            &self,
            _batch: &[crate::transport::api::Datagram<'_>],
            _replies: &mut dyn crate::transport::api::ReplySink,
        ) {
        }
    }

    /// Workers exit when the last endpoint of their runtime is gone (no leaked threads).
    #[cfg(target_os = "linux")]
    #[test]
    fn runtime_stops_with_last_endpoint() {
        for mode in [UdpMode::Uring, UdpMode::Epoll] {
            if mode == UdpMode::Uring
                && let Err(reason) = crate::transport::uring::probe::probe_once()
            {
                eprintln!("skipping runtime_stops_with_last_endpoint on io_uring: {reason}");
                continue;
            }
            // An odd slot count no other test uses: this runtime is ours alone.
            let t = UdpTransport {
                mode,
                send_slots: 31,
                workers: Some(2),
                ..UdpTransport::DEFAULT
            };
            let alive = || match mode {
                UdpMode::Uring => crate::transport::runtime::runtime_alive(&t.uring_backend(), 2),
                _ => crate::transport::runtime::runtime_alive(&t.epoll_backend(), 2),
            };
            let a = t
                .open_endpoint("127.0.0.1:0".parse().unwrap(), Arc::new(Nop))
                .unwrap();
            let b = t
                .open_endpoint("127.0.0.1:0".parse().unwrap(), Arc::new(Nop))
                .unwrap();
            assert!(alive());
            drop(a);
            assert!(alive());
            b.close();
            drop(b);
            assert!(!alive());
        }
    }
}
