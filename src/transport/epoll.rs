//! epoll fallback backend (no io_uring, e.g. seccomp or an old kernel): the same worker
//! structure, with nonblocking sockets, `recvmmsg`/`sendmmsg` in batches of 32 into pre-allocated
//! buffers, and eventfd wake-ups.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use crate::runtime::{
    BatchScratch, Command, DelayQueue, EndpointCore, LogLimiter, Ready, SlotPool, WorkerCtx, bump,
    deliver_batch, endpoint_panicked, log_io_error, sockaddr_from_raw, until,
};
use crate::transport::Datagram;
use crate::transport::uring::RECV_HEADER_LEN;

/// Datagrams per `recvmmsg`/`sendmmsg` call.
const BATCH: usize = 32;
const WAKE_TOKEN: u64 = u64::MAX;
const MAX_EVENTS: usize = 64;

struct Ep {
    core: Arc<EndpointCore>,
    fd: OwnedFd,
    v6: bool,
}

struct Worker {
    epfd: OwnedFd,
    ctx: WorkerCtx,
    eps: Vec<Option<Ep>>,
    pool: SlotPool,
    queued: Vec<u32>,
    fault_scratch: Vec<u32>,
    batch: BatchScratch,
    delayed: DelayQueue,
    commands: Vec<Command>,
    buf_len: usize,
    rbuf: Vec<u8>,
    rnames: Vec<libc::sockaddr_storage>,
    riov: Vec<libc::iovec>,
    rmsgs: Vec<libc::mmsghdr>,
    smsgs: Vec<libc::mmsghdr>,
    events: Vec<libc::epoll_event>,
    shutdown: bool,
    recv_log: LogLimiter,
    send_log: LogLimiter,
}

pub(crate) fn run_worker(ctx: WorkerCtx, ready: Ready) {
    match Worker::new(ctx) {
        Ok(mut w) => {
            ready(Ok(()));
            w.run();
        }
        Err(e) => ready(Err(e)),
    }
}

fn epoll_ctl(epfd: &OwnedFd, op: i32, fd: i32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: valid fds and a valid event struct.
    if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Worker {
    fn new(ctx: WorkerCtx) -> Result<Worker, String> {
        // SAFETY: plain syscall, result checked and owned.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
        }
        // SAFETY: fresh fd we own.
        let epfd = unsafe { OwnedFd::from_raw_fd(raw) };
        epoll_ctl(&epfd, libc::EPOLL_CTL_ADD, ctx.me.eventfd(), WAKE_TOKEN)
            .map_err(|e| format!("epoll_ctl(eventfd): {e}"))?;
        let buf_len = ctx
            .config
            .recv_buffer_len
            .saturating_sub(RECV_HEADER_LEN)
            .max(1);
        // SAFETY: all-zero is valid for these C structs; pointers are filled in below.
        let zero_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let zero_iov: libc::iovec = unsafe { std::mem::zeroed() };
        let zero_msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let zero_ev = libc::epoll_event { events: 0, u64: 0 };
        let mut w = Worker {
            epfd,
            eps: Vec::new(),
            pool: SlotPool::new(ctx.config.send_slots),
            queued: Vec::with_capacity(ctx.config.send_slots),
            fault_scratch: Vec::new(),
            batch: BatchScratch::default(),
            delayed: DelayQueue::default(),
            commands: Vec::new(),
            buf_len,
            rbuf: vec![0u8; BATCH * buf_len],
            rnames: vec![zero_name; BATCH],
            riov: vec![zero_iov; BATCH],
            rmsgs: vec![zero_msg; BATCH],
            smsgs: vec![zero_msg; BATCH],
            events: vec![zero_ev; MAX_EVENTS],
            shutdown: false,
            recv_log: LogLimiter::default(),
            send_log: LogLimiter::default(),
            ctx,
        };
        // The vectors are never resized, so these pointers stay valid.
        for i in 0..BATCH {
            w.riov[i].iov_base = w.rbuf[i * buf_len..].as_mut_ptr().cast();
            w.riov[i].iov_len = buf_len;
            let hdr = &mut w.rmsgs[i].msg_hdr;
            hdr.msg_name = (&mut w.rnames[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_iov = &mut w.riov[i];
            hdr.msg_iovlen = 1;
        }
        Ok(w)
    }

    fn run(&mut self) {
        while !self.shutdown {
            let timeout = match until(self.delayed.next_deadline()) {
                None => -1,
                Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
            };
            // SAFETY: events has MAX_EVENTS entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    MAX_EVENTS as i32,
                    timeout,
                )
            };
            let n = if n < 0 { 0 } else { n as usize };
            for k in 0..n {
                let token = self.events[k].u64;
                if token == WAKE_TOKEN {
                    self.ctx.me.consume_eventfd();
                    self.ctx.me.rearm_wake();
                    self.take_commands();
                } else {
                    self.recv_batch(token as usize);
                }
            }
            self.send_due_delayed();
            self.flush_sends();
        }
        for s in 0..self.eps.len() {
            if let Some(ep) = self.eps[s].take() {
                self.close_ep(ep);
            }
        }
    }

    /// One `recvmmsg` for a readable socket, then its handler call (level-triggered epoll
    /// brings us back if more is queued, which keeps endpoints fair).
    fn recv_batch(&mut self, s: usize) {
        let Some(Some(ep)) = self.eps.get(s) else {
            return;
        };
        let core = ep.core.clone();
        let fd = ep.fd.as_raw_fd();
        for m in self.rmsgs.iter_mut() {
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
        // SAFETY: rmsgs describes BATCH valid buffers owned by the worker.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.rmsgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if errno != libc::EAGAIN && errno != libc::EINTR {
                bump(&core.stats.recv_errors, 1);
                log_io_error(&mut self.recv_log, "recvmmsg", core.local_addr, errno);
            }
            return;
        }
        if core.is_closed() {
            return;
        }
        let mut batch = self.batch.take();
        let mut errors = 0;
        for i in 0..n as usize {
            let m = &self.rmsgs[i];
            let namelen =
                (m.msg_hdr.msg_namelen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
            // SAFETY: the kernel wrote `namelen` bytes of address into rnames[i].
            let name = unsafe {
                std::slice::from_raw_parts(
                    (&self.rnames[i] as *const libc::sockaddr_storage).cast::<u8>(),
                    namelen,
                )
            };
            let from = sockaddr_from_raw(name);
            let len = m.msg_len as usize;
            match from {
                Some(from) if m.msg_hdr.msg_flags & libc::MSG_TRUNC == 0 && len <= self.buf_len => {
                    let start = i * self.buf_len;
                    batch.push(Datagram {
                        from,
                        payload: &self.rbuf[start..start + len],
                    });
                }
                // Larger than a receive buffer, or an unknown address family: dropped, counted.
                _ => errors += 1,
            }
        }
        bump(&core.stats.recv_errors, errors);
        let result = deliver_batch(
            &core,
            s as u32,
            &batch,
            &mut self.pool,
            &mut self.queued,
            &mut self.fault_scratch,
            &mut self.delayed,
        );
        self.batch.put_back(batch);
        if let Err(message) = result {
            endpoint_panicked(&self.ctx, &core, message);
            if let Some(ep) = self.eps[s].take() {
                self.close_ep(ep);
            }
        }
    }

    fn send_due_delayed(&mut self) {
        let now = Instant::now();
        while let Some(d) = self.delayed.pop_due(now) {
            let Some(s) = self
                .eps
                .iter()
                .position(|e| e.as_ref().is_some_and(|e| e.core.id == d.id))
            else {
                continue;
            };
            let i = self.pool.take();
            let slot = self.pool.slot(i);
            slot.buf.clear();
            slot.buf.extend_from_slice(&d.data);
            slot.to = d.to;
            slot.ep = s as u32;
            self.queued.push(i);
        }
    }

    /// Sends the queued replies with `sendmmsg`, one call per run of up to 32 for one socket.
    fn flush_sends(&mut self) {
        let mut k = 0;
        while k < self.queued.len() {
            let ep_slot = self.pool.slot(self.queued[k]).ep as usize;
            let mut n = 0;
            while k + n < self.queued.len()
                && n < BATCH
                && self.pool.slot(self.queued[k + n]).ep as usize == ep_slot
            {
                n += 1;
            }
            if let Some(Some(ep)) = self.eps.get(ep_slot) {
                for j in 0..n {
                    let slot = self.pool.slot(self.queued[k + j]);
                    slot.prepare(ep.v6);
                    self.smsgs[j].msg_hdr = slot.hdr;
                    self.smsgs[j].msg_len = 0;
                }
                send_run(ep, &mut self.smsgs[..n], &mut self.send_log);
            }
            k += n;
        }
        for i in self.queued.drain(..) {
            self.pool.release(i);
        }
    }

    fn take_commands(&mut self) {
        self.ctx.me.take_commands(&mut self.commands);
        let commands = std::mem::take(&mut self.commands);
        for command in commands {
            match command {
                Command::Open { core, socket } => {
                    let Some(fd) = socket else { continue };
                    let s = match self.eps.iter().position(Option::is_none) {
                        Some(s) => s,
                        None => {
                            self.eps.push(None);
                            self.eps.len() - 1
                        }
                    };
                    if let Err(e) =
                        epoll_ctl(&self.epfd, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), s as u64)
                    {
                        tracing::warn!(addr = %core.local_addr, "epoll_ctl(ADD): {e}");
                        bump(&core.stats.recv_errors, 1);
                        continue;
                    }
                    self.eps[s] = Some(Ep {
                        v6: core.local_addr.is_ipv6(),
                        core,
                        fd,
                    });
                }
                Command::Close { id, ack } => {
                    if let Some(s) = self
                        .eps
                        .iter()
                        .position(|e| e.as_ref().is_some_and(|e| e.core.id == id))
                        && let Some(ep) = self.eps[s].take()
                    {
                        self.close_ep(ep);
                    }
                    if let Some(a) = ack {
                        a.ack();
                    }
                }
                Command::SendLater(d) => self.delayed.push_delayed(d),
                Command::Shutdown => self.shutdown = true,
            }
        }
    }

    fn close_ep(&self, ep: Ep) {
        let _ = epoll_ctl(&self.epfd, libc::EPOLL_CTL_DEL, ep.fd.as_raw_fd(), 0);
        drop(ep.fd);
    }
}

/// `sendmmsg` until every message went out or failed; each failure is counted and skipped.
fn send_run(ep: &Ep, msgs: &mut [libc::mmsghdr], log: &mut LogLimiter) {
    let mut off = 0;
    let mut tries = 0;
    while off < msgs.len() && tries < 2 * BATCH {
        tries += 1;
        // SAFETY: msgs[off..] point into boxed send slots that live until after this call.
        let r = unsafe {
            libc::sendmmsg(
                ep.fd.as_raw_fd(),
                msgs[off..].as_mut_ptr(),
                (msgs.len() - off) as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if errno == libc::EINTR {
                continue;
            }
            bump(&ep.core.stats.send_errors, 1);
            log_io_error(log, "sendmmsg", ep.core.local_addr, errno);
            off += 1;
        } else if r == 0 {
            break;
        } else {
            let r = r as usize;
            let bytes: u64 = msgs[off..off + r].iter().map(|m| m.msg_len as u64).sum();
            bump(&ep.core.stats.datagrams_sent, r as u64);
            bump(&ep.core.stats.bytes_sent, bytes);
            off += r;
        }
    }
    bump(&ep.core.stats.send_errors, (msgs.len() - off) as u64);
}
