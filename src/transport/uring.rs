//! io_uring backend: per worker one ring, one provided-buffer ring (IORING_REGISTER_PBUF_RING:
//! not charged to RLIMIT_MEMLOCK, unlike registered buffers), one multishot `RecvMsgMulti` per
//! socket and batched `SendMsg`s from pre-allocated slots, all submitted with the wait.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};

use crate::runtime::{
    BatchScratch, Command, DelayQueue, EndpointCore, Latch, LogLimiter, Ready, SlotPool, WorkerCtx,
    bump, deliver_batch, endpoint_panicked, log_io_error, sockaddr_from_raw, until,
};
use crate::transport::Datagram;

const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_WAKE: u64 = 3;
const KIND_CANCEL: u64 = 4;

fn user_data(kind: u64, payload: u32) -> u64 {
    (kind << 56) | payload as u64
}

fn split_user_data(ud: u64) -> (u64, u32) {
    (ud >> 56, ud as u32)
}

/// Buffer group id of the worker's provided-buffer ring (one ring per io_uring).
const BGID: u16 = 0;
/// Size of the name field the multishot receive reserves: fits a `sockaddr_in6`.
const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// `io_uring_recvmsg_out` + name field, written before the payload in every receive buffer.
pub(crate) const RECV_HEADER_LEN: usize = 16 + NAME_LEN;

/// Batching is opportunistic: a wake-up waits for one completion, then drains every completion
/// the kernel has. Waiting for more (e.g. 32 completions or 200 µs) starves request/response
/// traffic under DEFER_TASKRUN, where the waiter is only woken once as many task-work items are
/// pending as it asked for: 16 peers with one Syn in flight each got 61 k replies/s that way
/// against 150 k/s now, and blasting open-loop showed no gain from waiting (`udp_paths` bench).
/// How long a shutting-down worker waits for in-flight operations before leaving anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Whether io_uring works here, checked once per process with a real multishot receive (probing
/// opcodes alone cannot tell a kernel without multishot `RecvMsg`).
fn probe_once() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_multishot).clone()
}

fn probe_multishot() -> Result<(), String> {
    let bufs = BufRing::new(2, 64 + RECV_HEADER_LEN).map_err(|e| format!("mmap: {e}"))?;
    let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    check_ring(&ring)?;
    bufs.register(&ring)?;
    let socket = match std::net::UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        // No loopback: the opcode probe above is all we can do.
        Err(_) => return Ok(()),
    };
    let addr = socket.local_addr().map_err(|e| e.to_string())?;
    let hdr = recv_msghdr();
    let entry = opcode::RecvMsgMulti::new(types::Fd(socket.as_raw_fd()), &*hdr, BGID)
        .build()
        .user_data(1);
    // SAFETY: `hdr`, the socket and the buffers outlive the ring (dropped first, below).
    unsafe { ring.submission().push(&entry) }.map_err(|_| "submission queue full".to_string())?;
    ring.submit().map_err(|e| format!("submit: {e}"))?;
    socket
        .send_to(b"x", addr)
        .map_err(|e| format!("probe send: {e}"))?;
    let ts = types::Timespec::from(Duration::from_secs(1));
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
        Err(e) => return Err(format!("io_uring_enter: {e}")),
    }
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| "multishot RecvMsg probe got no completion".to_string())?;
    let result = if cqe.result() < 0 {
        Err(format!(
            "multishot RecvMsg: {}",
            io::Error::from_raw_os_error(-cqe.result())
        ))
    } else if !cqueue::more(cqe.flags()) {
        Err("multishot RecvMsg is not supported (no IORING_CQE_F_MORE)".to_string())
    } else {
        Ok(())
    };
    drop(ring);
    drop(bufs);
    result
}

/// Builds the ring: SINGLE_ISSUER | DEFER_TASKRUN when the kernel has them, else plainer.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let cq = entries.saturating_mul(4);
    IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| {
            IoUring::builder()
                .setup_cqsize(cq)
                .setup_coop_taskrun()
                .build(entries)
        })
        .or_else(|_| IoUring::builder().setup_cqsize(cq).build(entries))
}

/// Checks the features and opcodes this backend relies on.
fn check_ring(ring: &IoUring) -> Result<(), String> {
    if !ring.params().is_feature_ext_arg() {
        return Err("io_uring lacks IORING_FEAT_EXT_ARG (kernel < 5.11)".to_string());
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    for (name, code) in [
        ("RecvMsg", opcode::RecvMsgMulti::CODE),
        ("SendMsg", opcode::SendMsg::CODE),
        ("AsyncCancel", opcode::AsyncCancel::CODE),
        ("Read", opcode::Read::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring opcode {name} not supported"));
        }
    }
    Ok(())
}

/// The msghdr a multishot receive is armed with: only the name and control lengths matter.
fn recv_msghdr() -> Box<libc::msghdr> {
    // SAFETY: all-zero is a valid msghdr.
    let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    hdr.msg_namelen = NAME_LEN as libc::socklen_t;
    hdr
}

/// Anonymous private mapping, page-aligned as the buffer ring requires.
fn mmap_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous mapping, no file; the result is checked.
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
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

/// A provided-buffer ring and the buffers it hands to the kernel.
struct BufRing {
    ring: *mut u8,
    ring_len: usize,
    entries: u16,
    tail: u16,
    mem: *mut u8,
    mem_len: usize,
    buf_len: usize,
}

/// Size of one `io_uring_buf` ring entry.
const RING_ENTRY: usize = 16;

impl BufRing {
    /// `entries` must be a power of two (rounded up by the transport config).
    fn new(entries: u32, buf_len: usize) -> io::Result<BufRing> {
        let entries = entries.clamp(1, 32_768).next_power_of_two() as u16;
        let ring_len = (entries as usize * RING_ENTRY).next_multiple_of(4096);
        let ring = mmap_anon(ring_len)?;
        let mem_len = entries as usize * buf_len;
        let mem = match mmap_anon(mem_len) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: unmapping what was just mapped.
                unsafe { libc::munmap(ring.cast(), ring_len) };
                return Err(e);
            }
        };
        let mut b = BufRing {
            ring,
            ring_len,
            entries,
            tail: 0,
            mem,
            mem_len,
            buf_len,
        };
        for bid in 0..entries {
            b.push(bid);
        }
        b.publish();
        Ok(b)
    }

    fn register(&self, ring: &IoUring) -> Result<(), String> {
        // SAFETY: the ring memory lives as long as `self`, which outlives the io_uring (the
        // workers drop the ring first).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(self.ring as u64, self.entries, BGID, 0)
        }
        .map_err(|e| format!("IORING_REGISTER_PBUF_RING: {e}"))
    }

    /// Hands buffer `bid` back to the kernel (visible after `publish`).
    fn push(&mut self, bid: u16) {
        let idx = (self.tail & (self.entries - 1)) as usize;
        let addr = self.mem as u64 + bid as u64 * self.buf_len as u64;
        // SAFETY: idx < entries, so the entry lies inside the ring mapping. Fields are written
        // one by one so that entry 0's `resv` (the shared tail) is never touched here.
        unsafe {
            let e = self.ring.add(idx * RING_ENTRY);
            std::ptr::write_volatile(e.cast::<u64>(), addr);
            std::ptr::write_volatile(e.add(8).cast::<u32>(), self.buf_len as u32);
            std::ptr::write_volatile(e.add(12).cast::<u16>(), bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail is the u16 at offset 14 of the page-aligned ring; the kernel reads it.
        let tail = unsafe { &*self.ring.add(14).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid` (which the kernel has handed to us).
    fn filled(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.entries {
            return None;
        }
        let len = len.min(self.buf_len);
        // SAFETY: bid < entries, len <= buf_len: inside the mapping; the kernel does not write
        // this buffer until we push it back.
        Some(unsafe { std::slice::from_raw_parts(self.mem.add(bid as usize * self.buf_len), len) })
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mappings; the ring using them is gone.
        unsafe {
            libc::munmap(self.mem.cast(), self.mem_len);
            libc::munmap(self.ring.cast(), self.ring_len);
        }
    }
}

/// One endpoint's socket on this worker.
struct Ep {
    core: Arc<EndpointCore>,
    fd: OwnedFd,
    v6: bool,
    hdr: Box<libc::msghdr>,
    /// A multishot receive is live (its final completion not seen yet).
    armed: bool,
    need_arm: bool,
    /// Re-arming after the first arm counts in `recv_rearms`.
    armed_once: bool,
    closing: bool,
    cancel_sent: bool,
    /// Sends submitted and not completed: the fd must stay open for them.
    inflight: u32,
    waiters: Vec<Arc<Latch>>,
}

/// One received datagram, located in the buffer ring.
struct RecvItem {
    ep: u32,
    bid: u16,
    from: SocketAddr,
    off: u32,
    len: u32,
}

struct Worker {
    // Field order matters: the ring is dropped before the buffers it writes into.
    ring: IoUring,
    bufs: BufRing,
    wake_buf: Box<u64>,
    ctx: WorkerCtx,
    eps: Vec<Option<Ep>>,
    pool: SlotPool,
    queued: Vec<u32>,
    fault_scratch: Vec<u32>,
    items: Vec<RecvItem>,
    recycle: Vec<u16>,
    touched: Vec<u32>,
    batch: BatchScratch,
    cqes: Vec<(u64, i32, u32)>,
    delayed: DelayQueue,
    commands: Vec<Command>,
    woken: bool,
    shutdown_at: Option<Instant>,
    recv_log: LogLimiter,
    send_log: LogLimiter,
    enter_log: LogLimiter,
}

pub(crate) fn run_worker(ctx: WorkerCtx, ready: Ready) {
    let worker = probe_once().and_then(|()| Worker::new(ctx));
    match worker {
        Ok(mut w) => {
            ready(Ok(()));
            w.run();
        }
        Err(e) => ready(Err(e)),
    }
}

impl Worker {
    fn new(ctx: WorkerCtx) -> Result<Worker, String> {
        let cfg = &ctx.config;
        let ring = build_ring(cfg.ring_entries).map_err(|e| format!("io_uring_setup: {e}"))?;
        check_ring(&ring)?;
        let bufs = BufRing::new(cfg.recv_buffers, cfg.recv_buffer_len)
            .map_err(|e| format!("allocating receive buffers: {e}"))?;
        bufs.register(&ring)?;
        let cq = ring.params().cq_entries() as usize;
        let mut w = Worker {
            ring,
            bufs,
            wake_buf: Box::new(0),
            pool: SlotPool::new(cfg.send_slots),
            queued: Vec::with_capacity(cfg.send_slots),
            fault_scratch: Vec::new(),
            items: Vec::with_capacity(cq),
            recycle: Vec::with_capacity(cq),
            touched: Vec::new(),
            batch: BatchScratch::default(),
            cqes: Vec::with_capacity(cq),
            delayed: DelayQueue::default(),
            commands: Vec::new(),
            eps: Vec::new(),
            woken: false,
            shutdown_at: None,
            recv_log: LogLimiter::default(),
            send_log: LogLimiter::default(),
            enter_log: LogLimiter::default(),
            ctx,
        };
        if !w.arm_wake() {
            return Err("cannot queue the wake-up read".to_string());
        }
        Ok(w)
    }

    fn run(&mut self) {
        loop {
            self.wait();
            self.reap();
            self.dispatch();
            self.recycle_buffers();
            self.send_due_delayed();
            if self.woken {
                self.woken = false;
                self.ctx.me.rearm_wake();
                self.arm_wake();
                self.take_commands();
            }
            self.rearm();
            self.queue_sends();
            self.finish_closes();
            if let Some(at) = self.shutdown_at
                && (self.eps.iter().all(Option::is_none) || Instant::now() >= at)
            {
                break;
            }
        }
        // Close what is left (only after the grace period expired).
        for ep in self.eps.iter_mut().filter_map(Option::take) {
            for w in ep.waiters {
                w.ack();
            }
        }
    }

    /// Submits queued SQEs and waits for one completion, never past the next delayed datagram
    /// (nor, while shutting down, longer than 100 ms between checks).
    fn wait(&mut self) {
        let delay = until(self.delayed.next_deadline());
        let result = if delay.is_some() || self.shutdown_at.is_some() {
            let window = delay.map_or(Duration::from_millis(100), |d| {
                d.min(Duration::from_millis(100))
            });
            let ts = types::Timespec::from(window);
            let args = types::SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        } else {
            self.ring.submitter().submit_and_wait(1)
        };
        if let Err(e) = result {
            match e.raw_os_error() {
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                _ => {
                    if let Some(suppressed) = self.enter_log.allow() {
                        tracing::warn!(suppressed, "io_uring_enter failed: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Drains the completion queue into receive items, send accounting and endpoint state.
    fn reap(&mut self) {
        self.cqes.clear();
        for cqe in self.ring.completion() {
            self.cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        for k in 0..self.cqes.len() {
            let (ud, res, flags) = self.cqes[k];
            let (kind, payload) = split_user_data(ud);
            match kind {
                KIND_RECV => self.on_recv(payload, res, flags),
                KIND_SEND => self.on_send(payload, res),
                KIND_WAKE => self.woken = true,
                KIND_CANCEL => {
                    if res == -libc::ENOENT
                        && let Some(Some(ep)) = self.eps.get_mut(payload as usize)
                        && ep.closing
                        && ep.armed
                    {
                        // The receive was not live yet when the cancel ran: try again.
                        ep.cancel_sent = false;
                    }
                }
                _ => {}
            }
        }
    }

    /// One receive completion: a datagram for the handler, an error, or the end of a multishot.
    fn on_recv(&mut self, slot: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let Some(Some(ep)) = self.eps.get_mut(slot as usize) else {
            if let Some(bid) = bid {
                self.recycle.push(bid);
            }
            return;
        };
        if !cqueue::more(flags) {
            ep.armed = false;
            ep.need_arm = !ep.closing;
        }
        if res < 0 {
            let errno = -res;
            match errno {
                // The ring ran dry or the request was cancelled / interrupted: just re-arm.
                libc::ENOBUFS | libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EOPNOTSUPP => {
                    // The socket cannot receive any more: re-arming would spin.
                    ep.need_arm = false;
                    bump(&ep.core.stats.recv_errors, 1);
                    log_io_error(
                        &mut self.recv_log,
                        "multishot recv",
                        ep.core.local_addr,
                        errno,
                    );
                }
                _ => {
                    bump(&ep.core.stats.recv_errors, 1);
                    log_io_error(
                        &mut self.recv_log,
                        "multishot recv",
                        ep.core.local_addr,
                        errno,
                    );
                }
            }
            if let Some(bid) = bid {
                self.recycle.push(bid);
            }
            return;
        }
        let Some(bid) = bid else {
            bump(&ep.core.stats.recv_errors, 1);
            return;
        };
        if ep.closing || ep.core.is_closed() {
            self.recycle.push(bid);
            return;
        }
        let Some(buf) = self.bufs.filled(bid, res as usize) else {
            bump(&ep.core.stats.recv_errors, 1);
            return;
        };
        let item = match types::RecvMsgOut::parse(buf, &ep.hdr) {
            Ok(out) if !out.is_payload_truncated() && !out.is_name_data_truncated() => {
                let payload = out.payload_data();
                sockaddr_from_raw(out.name_data()).map(|from| RecvItem {
                    ep: slot,
                    bid,
                    from,
                    off: (payload.as_ptr() as usize - buf.as_ptr() as usize) as u32,
                    len: payload.len() as u32,
                })
            }
            _ => None,
        };
        match item {
            Some(item) => self.items.push(item),
            None => {
                // Truncated (larger than a receive buffer) or unparsable: dropped, counted.
                bump(&ep.core.stats.recv_errors, 1);
                self.recycle.push(bid);
            }
        }
    }

    fn on_send(&mut self, i: u32, res: i32) {
        if i as usize >= self.pool.slots.len() {
            return;
        }
        let ep_slot = self.pool.slot(i).ep;
        if let Some(Some(ep)) = self.eps.get_mut(ep_slot as usize) {
            ep.inflight = ep.inflight.saturating_sub(1);
            if res >= 0 {
                bump(&ep.core.stats.datagrams_sent, 1);
                bump(&ep.core.stats.bytes_sent, res as u64);
            } else {
                bump(&ep.core.stats.send_errors, 1);
                let to = self.pool.slot(i).to;
                log_io_error(&mut self.send_log, "send", to, -res);
            }
        }
        self.pool.release(i);
    }

    /// Calls each endpoint's handler once with its datagrams of this wake-up.
    fn dispatch(&mut self) {
        if self.items.is_empty() {
            return;
        }
        self.touched.clear();
        for it in &self.items {
            if !self.touched.contains(&it.ep) {
                self.touched.push(it.ep);
            }
        }
        for t in 0..self.touched.len() {
            let s = self.touched[t];
            let Some(Some(ep)) = self.eps.get(s as usize) else {
                continue;
            };
            if ep.closing {
                continue;
            }
            let core = ep.core.clone();
            let mut batch = self.batch.take();
            for it in self.items.iter().filter(|it| it.ep == s) {
                let buf = self.bufs.filled(it.bid, (it.off + it.len) as usize);
                if let Some(payload) = buf.and_then(|b| b.get(it.off as usize..)) {
                    batch.push(Datagram {
                        from: it.from,
                        payload,
                    });
                }
            }
            let result = deliver_batch(
                &core,
                s,
                &batch,
                &mut self.pool,
                &mut self.queued,
                &mut self.fault_scratch,
                &mut self.delayed,
            );
            self.batch.put_back(batch);
            if let Err(message) = result {
                endpoint_panicked(&self.ctx, &core, message);
                self.begin_close(s, None);
            }
        }
        for it in self.items.drain(..) {
            self.recycle.push(it.bid);
        }
    }

    fn recycle_buffers(&mut self) {
        if self.recycle.is_empty() {
            return;
        }
        for bid in self.recycle.drain(..) {
            self.bufs.push(bid);
        }
        self.bufs.publish();
    }

    fn send_due_delayed(&mut self) {
        let now = Instant::now();
        while let Some(d) = self.delayed.pop_due(now) {
            let Some(s) = self.find_ep(d.id) else {
                continue;
            };
            let i = self.pool.take();
            let slot = self.pool.slot(i);
            slot.buf.clear();
            slot.buf.extend_from_slice(&d.data);
            slot.to = d.to;
            slot.ep = s;
            self.queued.push(i);
        }
    }

    fn find_ep(&self, id: u64) -> Option<u32> {
        self.eps
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.core.id == id && !e.closing))
            .map(|p| p as u32)
    }

    fn take_commands(&mut self) {
        self.ctx.me.take_commands(&mut self.commands);
        let commands = std::mem::take(&mut self.commands);
        for command in commands {
            match command {
                Command::Open { core, socket } => self.open(core, socket),
                Command::Close { id, ack } => {
                    match self
                        .eps
                        .iter()
                        .position(|e| e.as_ref().is_some_and(|e| e.core.id == id))
                    {
                        Some(s) => self.begin_close(s as u32, ack),
                        None => {
                            if let Some(a) = ack {
                                a.ack()
                            }
                        }
                    }
                }
                Command::SendLater(d) => self.delayed.push_delayed(d),
                Command::Shutdown => {
                    self.shutdown_at = Some(Instant::now() + SHUTDOWN_GRACE);
                    for s in 0..self.eps.len() {
                        if self.eps[s].is_some() {
                            self.begin_close(s as u32, None);
                        }
                    }
                }
            }
        }
    }

    fn open(&mut self, core: Arc<EndpointCore>, socket: Option<OwnedFd>) {
        let Some(fd) = socket else {
            return;
        };
        let ep = Ep {
            v6: core.local_addr.is_ipv6(),
            core,
            fd,
            hdr: recv_msghdr(),
            armed: false,
            need_arm: true,
            armed_once: false,
            closing: false,
            cancel_sent: false,
            inflight: 0,
            waiters: Vec::new(),
        };
        match self.eps.iter().position(Option::is_none) {
            Some(s) => self.eps[s] = Some(ep),
            None => self.eps.push(Some(ep)),
        }
    }

    fn begin_close(&mut self, s: u32, ack: Option<Arc<Latch>>) {
        let Some(Some(ep)) = self.eps.get_mut(s as usize) else {
            if let Some(a) = ack {
                a.ack();
            }
            return;
        };
        ep.closing = true;
        ep.need_arm = false;
        if let Some(a) = ack {
            ep.waiters.push(a);
        }
    }

    /// Re-arms multishot receives that ended (ENOBUFS, cancellation, ...) and sends cancels for
    /// closing endpoints; buffers were recycled before, so the ring is not dry.
    fn rearm(&mut self) {
        for s in 0..self.eps.len() {
            let Some(ep) = self.eps[s].as_mut() else {
                continue;
            };
            if ep.closing {
                if ep.armed && !ep.cancel_sent {
                    let entry = opcode::AsyncCancel::new(user_data(KIND_RECV, s as u32))
                        .build()
                        .user_data(user_data(KIND_CANCEL, s as u32));
                    ep.cancel_sent = push_sqe(&mut self.ring, &entry);
                }
                continue;
            }
            if ep.need_arm && !ep.armed {
                let entry = opcode::RecvMsgMulti::new(types::Fd(ep.fd.as_raw_fd()), &*ep.hdr, BGID)
                    .build()
                    .user_data(user_data(KIND_RECV, s as u32));
                if push_sqe(&mut self.ring, &entry) {
                    ep.armed = true;
                    ep.need_arm = false;
                    if ep.armed_once {
                        bump(&ep.core.stats.recv_rearms, 1);
                    }
                    ep.armed_once = true;
                }
            }
        }
    }

    /// Turns the replies queued this wake-up into `SendMsg` SQEs (submitted with the next wait).
    fn queue_sends(&mut self) {
        for k in 0..self.queued.len() {
            let i = self.queued[k];
            let ep_slot = self.pool.slot(i).ep;
            let Some(Some(ep)) = self.eps.get_mut(ep_slot as usize) else {
                self.pool.release(i);
                continue;
            };
            let slot = self.pool.slot(i);
            slot.prepare(ep.v6);
            let entry = opcode::SendMsg::new(types::Fd(ep.fd.as_raw_fd()), &slot.hdr)
                .build()
                .user_data(user_data(KIND_SEND, i));
            if push_sqe(&mut self.ring, &entry) {
                ep.inflight += 1;
            } else {
                bump(&ep.core.stats.send_errors, 1);
                self.pool.release(i);
            }
        }
        self.queued.clear();
    }

    /// Closes sockets whose receive has ended and whose sends completed, then acknowledges.
    fn finish_closes(&mut self) {
        for s in 0..self.eps.len() {
            let done = self.eps[s]
                .as_ref()
                .is_some_and(|ep| ep.closing && !ep.armed && ep.inflight == 0);
            if done && let Some(ep) = self.eps[s].take() {
                drop(ep.fd);
                for w in ep.waiters {
                    w.ack();
                }
            }
        }
    }

    fn arm_wake(&mut self) -> bool {
        let entry = opcode::Read::new(
            types::Fd(self.ctx.me.eventfd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(user_data(KIND_WAKE, 0));
        push_sqe(&mut self.ring, &entry)
    }
}

/// Pushes one SQE, submitting first if the queue is full. False if it could not be queued.
fn push_sqe(ring: &mut IoUring, entry: &squeue::Entry) -> bool {
    for _ in 0..4 {
        // SAFETY: every buffer an entry points to (msghdrs, slots, wake buffer, receive buffers)
        // is owned by the worker and outlives the operation: endpoints and slots are only freed
        // after their completions, and the ring is dropped before the buffers.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return true;
        }
        if let Err(e) = ring.submit()
            && !matches!(
                e.raw_os_error(),
                Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
            )
        {
            tracing::warn!("io_uring submit failed: {e}");
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trip() {
        assert_eq!(split_user_data(user_data(KIND_SEND, 77)), (KIND_SEND, 77));
        assert_eq!(
            split_user_data(user_data(KIND_RECV, u32::MAX)),
            (KIND_RECV, u32::MAX)
        );
    }

    #[test]
    fn ring_gets_single_issuer_and_defer_taskrun_here() {
        // Kernel 6.18: the first, fastest configuration must be the one that is used.
        let ring = build_ring(64).unwrap();
        assert!(ring.params().is_setup_single_issuer());
        assert!(check_ring(&ring).is_ok());
    }

    #[test]
    fn buffer_ring_rounds_to_power_of_two() {
        let b = BufRing::new(5, 128).unwrap();
        assert_eq!(b.entries, 8);
        assert!(b.filled(8, 10).is_none());
        assert_eq!(b.filled(7, 1000).unwrap().len(), 128);
    }

    #[test]
    fn probe_works_here() {
        // This machine has io_uring; the probe must agree.
        assert_eq!(probe_once(), Ok(()));
    }
}
