//! The real-UDP transport: picks io_uring or epoll, binds one `SO_REUSEPORT` socket per worker
//! on the caller's thread (so bind errors come back synchronously) and hands them to the workers.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::anyhow;

use crate::runtime::{
    Backend, Command, Delayed, EndpointCore, Runtime, RuntimeConfig, bump, deadline_after,
    default_workers, get_runtime, is_v6, sockaddr_from_raw, sockaddr_to_raw,
};
use crate::transport::channel::addr_salt;
use crate::transport::faults::{FaultInjector, Faults};
use crate::transport::uring::RECV_HEADER_LEN;
use crate::transport::{
    DatagramHandler, Endpoint, EndpointStats, MAX_DATAGRAM_LEN, Transport, TransportKind,
};

/// Environment variable that overrides [`UdpMode::Auto`]: `auto`, `uring` or `epoll`.
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
}

/// Real UDP. `UdpTransport` is also a constant equal to [`UdpTransport::DEFAULT`], so code
/// written for chitchat's unit struct (`&UdpTransport`) compiles unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpTransport {
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
}

fn resolve_mode(mode: UdpMode, env: Option<&str>) -> Choice {
    match mode {
        UdpMode::Uring => Choice::Uring,
        UdpMode::Epoll => Choice::Epoll("forced by UdpMode::Epoll".to_string()),
        UdpMode::Auto => match env.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("uring") | Some("io_uring") => Choice::Uring,
            Some("epoll") => Choice::Epoll(format!("forced by {TRANSPORT_ENV}=epoll")),
            _ => Choice::Auto,
        },
    }
}

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

impl UdpTransport {
    fn config(&self, backend: Backend, workers: usize) -> RuntimeConfig {
        let uring = backend == Backend::Uring;
        RuntimeConfig {
            backend,
            workers,
            ring_entries: if uring {
                self.ring_entries.clamp(8, 32_768)
            } else {
                0
            },
            recv_buffers: if uring {
                self.recv_buffers.clamp(1, 32_768).next_power_of_two()
            } else {
                0
            },
            recv_buffer_len: self
                .recv_buffer_len
                .clamp(RECV_HEADER_LEN + 1, u32::MAX as usize / 2),
            send_slots: self.send_slots.max(1),
        }
    }

    /// The runtime for this configuration and what kind it is.
    fn runtime(&self) -> anyhow::Result<(Arc<Runtime>, TransportKind)> {
        let workers = self.workers.unwrap_or_else(default_workers).clamp(1, 1024);
        let env = std::env::var(TRANSPORT_ENV).ok();
        let epoll = |reason: String| -> anyhow::Result<(Arc<Runtime>, TransportKind)> {
            let rt = get_runtime(&self.config(Backend::Epoll, workers))
                .map_err(|e| anyhow!("starting epoll workers: {e}"))?;
            Ok((rt, TransportKind::Epoll { reason }))
        };
        match resolve_mode(self.mode, env.as_deref()) {
            Choice::Uring => {
                let rt = get_runtime(&self.config(Backend::Uring, workers))
                    .map_err(|e| anyhow!("io_uring transport unavailable: {e}"))?;
                Ok((rt, TransportKind::Uring))
            }
            Choice::Epoll(reason) => epoll(reason),
            Choice::Auto => match get_runtime(&self.config(Backend::Uring, workers)) {
                Ok(rt) => Ok((rt, TransportKind::Uring)),
                Err(reason) => {
                    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!("io_uring unavailable, using epoll: {reason}");
                    }
                    epoll(reason)
                }
            },
        }
    }
}

impl Transport for UdpTransport {
    fn open(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        let (runtime, kind) = self.runtime()?;
        let nonblocking = matches!(kind, TransportKind::Epoll { .. });
        let sockets = bind_sockets(listen_addr, runtime.workers(), nonblocking)?;
        let local_addr = local_addr(&sockets[0])
            .map_err(|e| anyhow!("getsockname for UDP socket bound to {listen_addr}: {e}"))?;
        let send_socket = dup(&sockets[0])
            .map_err(|e| anyhow!("dup of UDP socket bound to {listen_addr}: {e}"))?;
        let core = Arc::new(EndpointCore::new(
            local_addr,
            handler,
            FaultInjector::new(&self.faults, addr_salt(local_addr)),
            None,
        ));
        *core.send_fd.write() = Some(send_socket);
        for (i, socket) in sockets.into_iter().enumerate() {
            runtime.worker(i).push(Command::Open {
                core: core.clone(),
                socket: Some(socket),
            });
        }
        Ok(Box::new(UdpEndpoint {
            core,
            runtime,
            kind,
            closed: AtomicBool::new(false),
        }))
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_int_opt(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a valid int option.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A UDP socket with SO_REUSEPORT and large buffers, bound to `addr`.
fn bind_one(addr: SocketAddr, nonblocking: bool) -> io::Result<OwnedFd> {
    let family = if is_v6(addr.ip()) {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let mut ty = libc::SOCK_DGRAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { OwnedFd::from_raw_fd(cvt(libc::socket(family, ty, 0))?) };
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // FORCE exceeds net.core.rmem_max when privileged; else the capped plain option.
        if set_int_opt(&fd, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
            let _ = set_int_opt(&fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
        }
    }
    // SAFETY: all-zero sockaddr_storage, filled by sockaddr_to_raw.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = sockaddr_to_raw(addr, false, &mut storage);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })?;
    Ok(fd)
}

/// `n` sockets on one address; port 0 is resolved by the first bind.
fn bind_sockets(
    listen_addr: SocketAddr,
    n: usize,
    nonblocking: bool,
) -> anyhow::Result<Vec<OwnedFd>> {
    let mut addr = listen_addr;
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let fd = bind_one(addr, nonblocking)
            .map_err(|e| anyhow!("cannot bind UDP socket to {listen_addr}: {e}"))?;
        if i == 0 && addr.port() == 0 {
            let bound = local_addr(&fd)
                .map_err(|e| anyhow!("getsockname for UDP socket bound to {listen_addr}: {e}"))?;
            addr.set_port(bound.port());
        }
        sockets.push(fd);
    }
    Ok(sockets)
}

fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    // SAFETY: getsockname fills at most `len` bytes of storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    cvt(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    // SAFETY: the kernel wrote `len` bytes.
    let raw = unsafe {
        std::slice::from_raw_parts(
            (&storage as *const libc::sockaddr_storage).cast::<u8>(),
            (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>()),
        )
    };
    sockaddr_from_raw(raw).ok_or_else(|| io::Error::other("unknown address family"))
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// A UDP endpoint handle.
struct UdpEndpoint {
    core: Arc<EndpointCore>,
    runtime: Arc<Runtime>,
    kind: TransportKind,
    closed: AtomicBool,
}

impl UdpEndpoint {
    fn raw_send(&self, fd: &OwnedFd, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        // SAFETY: all-zero sockaddr_storage, filled by sockaddr_to_raw.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = sockaddr_to_raw(to, self.core.local_addr.is_ipv6(), &mut storage);
        // SAFETY: valid buffer and address; MSG_DONTWAIT so a full buffer is an error, not a
        // stall of the caller.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                libc::MSG_DONTWAIT,
                (&storage as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if r < 0 {
            bump(&self.core.stats.send_errors, 1);
            return Err(io::Error::last_os_error());
        }
        bump(&self.core.stats.datagrams_sent, 1);
        bump(&self.core.stats.bytes_sent, r as u64);
        Ok(())
    }
}

impl Endpoint for UdpEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.core.local_addr
    }

    fn kind(&self) -> TransportKind {
        self.kind.clone()
    }

    fn send_to(&self, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let closed = || io::Error::new(io::ErrorKind::NotConnected, "endpoint closed");
        if self.core.is_closed() {
            return Err(closed());
        }
        let guard = self.core.send_fd.read();
        let fd = guard.as_ref().ok_or_else(closed)?;
        let Some(injector) = &self.core.faults else {
            return self.raw_send(fd, to, payload);
        };
        let mut buf = payload.to_vec();
        let plan = injector.apply(to, &mut buf);
        if plan.drop {
            bump(&self.core.stats.dropped_by_faults, 1);
            return Ok(());
        }
        let copies = if plan.duplicate { 2 } else { 1 };
        if plan.is_delayed() {
            let now = Instant::now();
            for d in plan.delay.iter().take(copies).flatten() {
                self.runtime.worker(0).push(Command::SendLater(Delayed::new(
                    deadline_after(now, *d),
                    self.core.id,
                    self.core.local_addr,
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
        self.core.closed.store(true, Ordering::Release);
        *self.core.send_fd.write() = None;
        self.runtime.close_endpoint(self.core.id, None);
    }

    fn stats(&self) -> EndpointStats {
        self.core.stats.snapshot()
    }
}

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
    impl crate::transport::DatagramHandler for Nop {
        fn handle_batch(
            &self,
            _batch: &[crate::transport::Datagram<'_>],
            _replies: &mut dyn crate::transport::ReplySink,
        ) {
        }
    }

    /// Workers exit when the last endpoint of their runtime is gone (no leaked threads).
    #[test]
    fn runtime_stops_with_last_endpoint() {
        for mode in [UdpMode::Uring, UdpMode::Epoll] {
            // An odd slot count no other test uses: this runtime is ours alone.
            let t = UdpTransport {
                mode,
                send_slots: 31,
                workers: Some(2),
                ..UdpTransport::DEFAULT
            };
            let backend = if mode == UdpMode::Uring {
                Backend::Uring
            } else {
                Backend::Epoll
            };
            let config = t.config(backend, 2);
            let a = t
                .open("127.0.0.1:0".parse().unwrap(), Arc::new(Nop))
                .unwrap();
            let b = t
                .open("127.0.0.1:0".parse().unwrap(), Arc::new(Nop))
                .unwrap();
            assert!(crate::runtime::runtime_alive(&config));
            drop(a);
            assert!(crate::runtime::runtime_alive(&config));
            b.close();
            drop(b);
            assert!(!crate::runtime::runtime_alive(&config));
        }
    }
}
