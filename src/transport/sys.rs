//! Every libc call of the transport, behind small safe types: socket addresses, UDP sockets and
//! their options, eventfd, poll/epoll, `recvmmsg`/`sendmmsg`, the `msghdr`s io_uring operations
//! point at, anonymous mappings and CPU affinity. The rest of the transport holds no `unsafe`
//! except where it hands pointers to io_uring.

use std::io;
#[cfg(target_os = "linux")]
use std::net::IpAddr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Socket addresses
// ---------------------------------------------------------------------------------------------

/// Parses a kernel `sockaddr` (as bytes); `None` for families other than IPv4/IPv6.
pub(crate) fn sockaddr_from_raw(raw: &[u8]) -> Option<SocketAddr> {
    if raw.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([raw[0], raw[1]]) as i32;
    match family {
        libc::AF_INET if raw.len() >= 8 => {
            let port = u16::from_be_bytes([raw[2], raw[3]]);
            let ip = Ipv4Addr::new(raw[4], raw[5], raw[6], raw[7]);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 if raw.len() >= 24 => {
            let port = u16::from_be_bytes([raw[2], raw[3]]);
            let flowinfo = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&raw[8..24]);
            let scope = if raw.len() >= 28 {
                u32::from_ne_bytes([raw[24], raw[25], raw[26], raw[27]])
            } else {
                0
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(octets),
                port,
                flowinfo,
                scope,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` as a kernel sockaddr; IPv4 becomes v4-mapped IPv6 for an IPv6 socket.
fn sockaddr_to_raw(
    addr: SocketAddr,
    v6_socket: bool,
    out: &mut libc::sockaddr_storage,
) -> libc::socklen_t {
    let addr = match addr {
        SocketAddr::V4(v4) if v6_socket => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        other => other,
    };
    match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is larger than sockaddr_in and at least as aligned, and
            // the exclusive borrow of `out` guarantees no other reference to it exists.
            let sin =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            };
            sin.sin_zero = [0; 8];
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6 (also smaller than sockaddr_storage).
            let sin6 =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_flowinfo = v6.flowinfo().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// An all-zero `sockaddr_storage` (a valid "no address").
fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain integers and byte arrays: all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The first `len` bytes of `storage` (clamped to its size), as the kernel wrote them.
fn storage_bytes(storage: &libc::sockaddr_storage, len: usize) -> &[u8] {
    let len = len.min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: `storage` is a live, initialised value of at least `len` bytes, borrowed for the
    // lifetime of the returned slice; any byte pattern is a valid u8.
    unsafe {
        std::slice::from_raw_parts((storage as *const libc::sockaddr_storage).cast::<u8>(), len)
    }
}

// ---------------------------------------------------------------------------------------------
// UDP sockets
// ---------------------------------------------------------------------------------------------

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_int_opt(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor; the option value is a live i32 whose size is passed.
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

/// A UDP socket with `SO_REUSEPORT` and socket buffers of `buffer` bytes (best effort), bound to
/// `addr`; nonblocking if asked.
#[cfg(target_os = "linux")]
pub(crate) fn bind_udp(addr: SocketAddr, nonblocking: bool, buffer: i32) -> io::Result<OwnedFd> {
    let family = match addr.ip() {
        IpAddr::V6(_) => libc::AF_INET6,
        IpAddr::V4(_) => libc::AF_INET,
    };
    let mut ty = libc::SOCK_DGRAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall with no pointer arguments.
    let raw = cvt(unsafe { libc::socket(family, ty, 0) })?;
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // FORCE exceeds net.core.rmem_max when privileged; else the capped plain option.
        if set_int_opt(&fd, libc::SOL_SOCKET, force, buffer).is_err() {
            let _ = set_int_opt(&fd, libc::SOL_SOCKET, plain, buffer);
        }
    }
    let mut storage = zeroed_storage();
    let len = sockaddr_to_raw(addr, false, &mut storage);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes and outlives the call.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })?;
    Ok(fd)
}

/// The address a socket is bound to.
pub(crate) fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    let mut storage = zeroed_storage();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `storage`, which is that large, and
    // updates `len`; both outlive the call.
    cvt(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    sockaddr_from_raw(storage_bytes(&storage, len as usize))
        .ok_or_else(|| io::Error::other("unknown address family"))
}

/// One nonblocking `sendto` (a full socket buffer is an error, never a stall of the caller).
/// `v6_socket` maps IPv4 destinations for a dual-stack IPv6 socket. Returns the bytes sent.
pub(crate) fn send_to(
    fd: &OwnedFd,
    to: SocketAddr,
    v6_socket: bool,
    payload: &[u8],
) -> io::Result<usize> {
    let mut storage = zeroed_storage();
    let len = sockaddr_to_raw(to, v6_socket, &mut storage);
    // SAFETY: `payload` and `storage` (a valid sockaddr of `len` bytes) are live for the call.
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
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The `errno` of the last failed call on this thread.
fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Message headers for sends and receives
// ---------------------------------------------------------------------------------------------

/// The kernel description of one outgoing datagram (destination, one iovec, the `msghdr`).
/// It points at itself and at the payload: keep it (and the payload) in place, e.g. boxed,
/// while a send that uses it is in flight.
pub(crate) struct SendHeader {
    addr: libc::sockaddr_storage,
    iov: libc::iovec,
    hdr: libc::msghdr,
}

impl SendHeader {
    /// An empty header (points nowhere until [`SendHeader::prepare`]).
    pub(crate) fn new() -> SendHeader {
        // SAFETY: iovec and msghdr are integers and raw pointers: all-zero (null) is valid.
        let (iov, hdr) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        SendHeader {
            addr: zeroed_storage(),
            iov,
            hdr,
        }
    }

    /// Points the header at `payload` and `to`; `v6_socket` maps IPv4 destinations for a
    /// dual-stack IPv6 socket.
    pub(crate) fn prepare(&mut self, payload: &mut [u8], to: SocketAddr, v6_socket: bool) {
        let len = sockaddr_to_raw(to, v6_socket, &mut self.addr);
        self.iov.iov_base = payload.as_mut_ptr().cast();
        self.iov.iov_len = payload.len();
        self.hdr.msg_name = (&mut self.addr as *mut libc::sockaddr_storage).cast();
        self.hdr.msg_namelen = len;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = std::ptr::null_mut();
        self.hdr.msg_controllen = 0;
        self.hdr.msg_flags = 0;
    }

    /// The prepared `msghdr` (for an io_uring `SendMsg` or a `sendmmsg` batch).
    pub(crate) fn msghdr(&self) -> &libc::msghdr {
        &self.hdr
    }
}

/// The `msghdr` a multishot io_uring receive is armed with: only the name length matters (the
/// kernel reserves that much address space in front of every payload). Boxed: in-flight
/// receives point at it.
#[cfg(target_os = "linux")]
pub(crate) fn recv_msghdr(name_len: usize) -> Box<libc::msghdr> {
    // SAFETY: msghdr is integers and raw pointers: all-zero (null) is valid.
    let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    hdr.msg_namelen = name_len as libc::socklen_t;
    hdr
}

/// Up to `n` datagrams per `recvmmsg` into buffers of `buf_len` bytes, allocated once.
#[cfg(target_os = "linux")]
pub(crate) struct RecvBatch {
    buf_len: usize,
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

#[cfg(target_os = "linux")]
impl RecvBatch {
    /// Buffers for `n` datagrams of at most `buf_len` bytes each.
    pub(crate) fn new(n: usize, buf_len: usize) -> RecvBatch {
        // SAFETY: iovec and mmsghdr are integers and raw pointers: all-zero (null) is valid.
        let (iov, msg): (libc::iovec, libc::mmsghdr) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        let mut b = RecvBatch {
            buf_len,
            bufs: vec![0u8; n * buf_len],
            names: vec![zeroed_storage(); n],
            iovs: vec![iov; n],
            msgs: vec![msg; n],
        };
        // The vectors are never resized, so these pointers into their heap buffers stay valid
        // when the struct moves.
        for i in 0..n {
            b.iovs[i].iov_base = b.bufs[i * buf_len..].as_mut_ptr().cast();
            b.iovs[i].iov_len = buf_len;
            let hdr = &mut b.msgs[i].msg_hdr;
            hdr.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_iov = &mut b.iovs[i];
            hdr.msg_iovlen = 1;
        }
        b
    }

    /// One nonblocking `recvmmsg` on `fd`: the number of datagrams received, or the errno.
    pub(crate) fn recv(&mut self, fd: RawFd) -> Result<usize, i32> {
        for m in self.msgs.iter_mut() {
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
        // SAFETY: every mmsghdr points at its own name storage and one iovec of `buf_len` bytes
        // inside `bufs`, all owned by `self` and exclusively borrowed for the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                self.msgs.len() as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            Err(last_errno())
        } else {
            Ok(n as usize)
        }
    }

    /// Datagram `i` of the last `recv`: its sender and payload; `None` if it was truncated
    /// (larger than a buffer) or came from an unknown address family.
    pub(crate) fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        let m = self.msgs.get(i)?;
        let from = sockaddr_from_raw(storage_bytes(
            &self.names[i],
            m.msg_hdr.msg_namelen as usize,
        ))?;
        let len = m.msg_len as usize;
        if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > self.buf_len {
            return None;
        }
        let start = i * self.buf_len;
        Some((from, &self.bufs[start..start + len]))
    }
}

/// A `sendmmsg` batch of prepared [`SendHeader`]s.
#[cfg(target_os = "linux")]
pub(crate) struct SendBatch {
    msgs: Vec<libc::mmsghdr>,
}

#[cfg(target_os = "linux")]
impl SendBatch {
    /// Room for `n` messages per call.
    pub(crate) fn new(n: usize) -> SendBatch {
        // SAFETY: mmsghdr is integers and raw pointers: all-zero (null) is valid.
        let msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        SendBatch { msgs: vec![msg; n] }
    }

    /// Messages one call can carry.
    pub(crate) fn capacity(&self) -> usize {
        self.msgs.len()
    }

    /// Puts `hdr` at position `j` (it must stay prepared and in place until the batch is sent).
    pub(crate) fn set(&mut self, j: usize, hdr: &SendHeader) {
        self.msgs[j].msg_hdr = *hdr.msghdr();
        self.msgs[j].msg_len = 0;
    }

    /// One nonblocking `sendmmsg` of messages `range`: how many went out, or the errno.
    pub(crate) fn send(&mut self, fd: RawFd, range: std::ops::Range<usize>) -> Result<usize, i32> {
        let msgs = &mut self.msgs[range];
        // SAFETY: each message was set from a SendHeader whose name, iovec and payload are
        // still in place (the caller's contract on `set`); the slice is exclusively borrowed.
        let r =
            unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT) };
        if r < 0 {
            Err(last_errno())
        } else {
            Ok(r as usize)
        }
    }

    /// Bytes the kernel reported sent for messages `range` of the last `send`.
    pub(crate) fn sent_bytes(&self, range: std::ops::Range<usize>) -> u64 {
        self.msgs[range].iter().map(|m| m.msg_len as u64).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Wake-ups and readiness
// ---------------------------------------------------------------------------------------------

/// A blocking eventfd (io_uring reads it asynchronously; epoll/poll read it when readable).
#[cfg(target_os = "linux")]
pub(crate) struct EventFd(OwnedFd);

#[cfg(target_os = "linux")]
impl EventFd {
    /// A new counter at zero.
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall with no pointer arguments.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter, waking whoever waits on it.
    pub(crate) fn write(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (impossible in practice) only
        // means the worker is already awake, so the result is not needed.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Resets the counter (blocks if it is zero: only call when readable).
    pub(crate) fn read(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64.
        unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// The descriptor, for poll, epoll or an io_uring read.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Off Linux, an [`EventFd`]-alike on a pipe: `write` puts a byte in (nonblocking: a full pipe
/// already means "awake"), `read` drains it; poll watches the read end.
#[cfg(not(target_os = "linux"))]
pub(crate) struct EventFd {
    read: OwnedFd,
    write: OwnedFd,
}

#[cfg(not(target_os = "linux"))]
impl EventFd {
    /// A new, empty pipe (both ends nonblocking and close-on-exec).
    pub(crate) fn new() -> io::Result<EventFd> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `pipe` writes two descriptors into the live two-element array.
        cvt(unsafe { libc::pipe(fds.as_mut_ptr()) })?;
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            // SAFETY: fcntl on a live descriptor with integer arguments only.
            unsafe {
                let flags = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
                cvt(libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_SETFL,
                    flags | libc::O_NONBLOCK,
                ))?;
                cvt(libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC))?;
            }
        }
        Ok(EventFd { read, write })
    }

    /// Wakes whoever polls the read end.
    pub(crate) fn write(&self) {
        let one = 1u8;
        // SAFETY: writes one byte from a live u8; a full pipe (EAGAIN) means already awake.
        unsafe { libc::write(self.write.as_raw_fd(), (&one as *const u8).cast(), 1) };
    }

    /// Drains the pipe (nonblocking).
    pub(crate) fn read(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads at most `buf.len()` bytes into the live buffer; stops at EAGAIN.
        while unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {
        }
    }

    /// The read end, for poll.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

/// Off Linux: every CPU the standard library reports (no affinity masks).
#[cfg(not(target_os = "linux"))]
pub(crate) fn allowed_cpus() -> Vec<usize> {
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// Off Linux: threads are not pinned.
#[cfg(not(target_os = "linux"))]
pub(crate) fn pin_current_thread(cpu: usize) {
    let _ = cpu;
}

/// A `poll`/`epoll_wait` timeout: -1 (forever) for `None`, else milliseconds rounded up.
pub(crate) fn timeout_ms(wait: Option<Duration>) -> libc::c_int {
    match wait {
        None => -1,
        Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
    }
}

/// Waits until `fd` is readable or `timeout_ms` passed; true if readable.
pub(crate) fn poll_readable(fd: RawFd, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, exclusively borrowed for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// An epoll instance with room for a fixed number of events per wait (level-triggered, read
/// interest only, one `u64` token per descriptor).
#[cfg(target_os = "linux")]
pub(crate) struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

#[cfg(target_os = "linux")]
impl Epoll {
    /// A new instance returning at most `max_events` per wait.
    pub(crate) fn new(max_events: usize) -> io::Result<Epoll> {
        // SAFETY: plain syscall with no pointer arguments.
        let raw = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; max_events.max(1)],
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid descriptors and a live event struct for the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    /// Watches `fd` for reading; its events carry `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token)
    }

    /// Stops watching `fd`.
    pub(crate) fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0)
    }

    /// Waits for events (`timeout_ms` as [`timeout_ms`] makes it); returns how many are ready
    /// (0 on timeout or interruption).
    pub(crate) fn wait(&mut self, timeout_ms: libc::c_int) -> usize {
        // SAFETY: `events` has `len` entries the kernel may fill, exclusively borrowed.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        n.max(0) as usize
    }

    /// The token of ready event `k` of the last wait.
    pub(crate) fn token(&self, k: usize) -> u64 {
        self.events[k].u64
    }
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

#[cfg(target_os = "linux")]
/// An anonymous private read-write mapping (page-aligned, zero-filled, resident only once
/// touched), unmapped on drop.
pub(crate) struct AnonMap {
    ptr: NonNull<u8>,
    len: usize,
}

#[cfg(target_os = "linux")]
impl AnonMap {
    /// Maps `len` bytes.
    pub(crate) fn new(len: usize) -> io::Result<AnonMap> {
        // SAFETY: an anonymous mapping at an address of the kernel's choice touches no existing
        // memory; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(AnonMap { ptr, len })
    }

    /// Start of the mapping.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

#[cfg(target_os = "linux")]
impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; nothing borrows it past `self`
        // (owners drop whatever writes into it, such as an io_uring, first).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------------------------
// CPUs
// ---------------------------------------------------------------------------------------------

/// CPUs in the process's affinity mask (the main thread's: workers are pinned, so asking the
/// current thread from inside a worker would see one CPU only).
#[cfg(target_os = "linux")]
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit array: all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most the size passed into the live `set`.
    let rc = unsafe {
        libc::sched_getaffinity(
            libc::getpid(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads a bit of the initialised set; cpu < CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu` (best effort: a failure is logged and ignored).
#[cfg(target_os = "linux")]
pub(crate) fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is a plain bit array: all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the live set (it ignores cpu >= CPU_SETSIZE);
    // sched_setaffinity only reads the set; pid 0 is the calling thread.
    let rc = unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::debug!(cpu, "pinning worker failed: {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        let mut storage = zeroed_storage();
        for addr in [
            "127.0.0.1:4242".parse::<SocketAddr>().unwrap(),
            "[::1]:9".parse().unwrap(),
        ] {
            let len = sockaddr_to_raw(addr, false, &mut storage) as usize;
            assert_eq!(sockaddr_from_raw(storage_bytes(&storage, len)), Some(addr));
        }
        let len = sockaddr_to_raw("10.0.0.1:7".parse().unwrap(), true, &mut storage) as usize;
        assert_eq!(
            sockaddr_from_raw(storage_bytes(&storage, len)),
            Some("[::ffff:10.0.0.1]:7".parse().unwrap())
        );
        assert_eq!(sockaddr_from_raw(&[1]), None);
        assert_eq!(sockaddr_from_raw(&[0xff, 0xff, 0, 0]), None);
    }

    #[test]
    fn timeout_rounds_up() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Duration::from_micros(1))), 1);
        assert_eq!(timeout_ms(Some(Duration::MAX)), i32::MAX);
    }
}
