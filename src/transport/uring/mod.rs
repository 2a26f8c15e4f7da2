//! io_uring backend: per worker one ring, one provided-buffer ring ([`buf_ring`]), one
//! multishot `RecvMsgMulti` per socket and batched `SendMsg`s from pre-allocated slots, all
//! submitted with the wait. [`probe`] decides whether it can run here at all.
//!
//! One wake-up of a worker, in order: [`Worker::wait`] submits and waits, [`Worker::reap`]
//! turns completions into received datagrams (located in the buffer ring), [`Worker::dispatch`]
//! hands each endpoint's datagrams to [`Outbox::deliver`] (handler, reply faults), and
//! [`Worker::queue_sends`] turns the queued replies into `SendMsg`s for the next wait.

mod buf_ring;
pub(crate) mod probe;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::transport::api::Datagram;
use crate::transport::dispatch::{BatchScratch, Outbox, bump};
use crate::transport::log_limit::{LogLimiter, log_io_error};
use crate::transport::runtime::{Backend, Command, Latch, Ready, WorkerCtx};
use crate::transport::sys::{recv_msghdr, sockaddr_from_raw};
use crate::transport::udp_shared::{NAME_LEN, UdpCommand, UdpCore};
use crate::transport::uring::buf_ring::{BGID, BufRing};
use crate::transport::uring::probe::{build_ring, check_ring, probe_once};

/// The io_uring backend with its configuration (equal configurations share workers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UringBackend {
    /// Submission queue entries per ring (the completion queue gets 4x).
    pub(crate) ring_entries: u32,
    /// Buffers of each worker's provided-buffer ring (a power of two).
    pub(crate) recv_buffers: u32,
    /// Bytes per receive buffer, header included.
    pub(crate) recv_buffer_len: usize,
    /// Pre-allocated send slots per worker.
    pub(crate) send_slots: usize,
}

impl Backend for UringBackend {
    type Command = UdpCommand;
    const NAME: &'static str = "uring";

    fn run_worker(&self, ctx: WorkerCtx<UdpCommand>, ready: Ready) {
        match probe_once().and_then(|()| Worker::new(self, ctx)) {
            Ok(mut w) => {
                ready(Ok(()));
                w.run();
            }
            Err(e) => ready(Err(e)),
        }
    }
}

/// What an operation in flight is, encoded in its `user_data` (tag in the top byte, the index
/// of the endpoint or send slot in the low 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// The multishot receive of worker-local endpoint `ep`.
    Recv { ep: u32 },
    /// The send of slot `slot`.
    Send { slot: u32 },
    /// The read of the worker's eventfd.
    Wake,
    /// The cancellation of endpoint `ep`'s receive.
    Cancel { ep: u32 },
}

impl Op {
    const TAG_SHIFT: u32 = 56;

    fn encode(self) -> u64 {
        let (tag, index): (u64, u32) = match self {
            Op::Recv { ep } => (1, ep),
            Op::Send { slot } => (2, slot),
            Op::Wake => (3, 0),
            Op::Cancel { ep } => (4, ep),
        };
        (tag << Op::TAG_SHIFT) | index as u64
    }

    /// `None` for user data this worker never submitted.
    fn decode(user_data: u64) -> Option<Op> {
        let index = user_data as u32;
        match user_data >> Op::TAG_SHIFT {
            1 => Some(Op::Recv { ep: index }),
            2 => Some(Op::Send { slot: index }),
            3 => Some(Op::Wake),
            4 => Some(Op::Cancel { ep: index }),
            _ => None,
        }
    }
}

/// Batching is opportunistic: a wake-up waits for one completion, then drains every completion
/// the kernel has. Waiting for more (e.g. 32 completions or 200 µs) starves request/response
/// traffic under DEFER_TASKRUN, where the waiter is only woken once as many task-work items are
/// pending as it asked for: 16 peers with one Syn in flight each got 61 k replies/s that way
/// against 150 k/s now, and blasting open-loop showed no gain from waiting (`udp_paths` bench).
/// How long a shutting-down worker waits for in-flight operations before leaving anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// One endpoint's socket on this worker.
struct Ep {
    udp: Arc<UdpCore>,
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
    ctx: WorkerCtx<UdpCommand>,
    eps: Vec<Option<Ep>>,
    out: Outbox,
    items: Vec<RecvItem>,
    recycle: Vec<u16>,
    touched: Vec<u32>,
    batch: BatchScratch,
    cqes: Vec<(u64, i32, u32)>,
    commands: Vec<Command<UdpCommand>>,
    woken: bool,
    shutdown_at: Option<Instant>,
    recv_log: LogLimiter,
    send_log: LogLimiter,
    enter_log: LogLimiter,
}

impl Worker {
    fn new(cfg: &UringBackend, ctx: WorkerCtx<UdpCommand>) -> Result<Worker, String> {
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
            out: Outbox::new(cfg.send_slots),
            items: Vec::with_capacity(cq),
            recycle: Vec::with_capacity(cq),
            touched: Vec::new(),
            batch: BatchScratch::default(),
            cqes: Vec::with_capacity(cq),
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
            self.queue_due_delayed();
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
        let delay = self.out.delayed.next_wait();
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
            match Op::decode(ud) {
                Some(Op::Recv { ep }) => self.on_recv(ep, res, flags),
                Some(Op::Send { slot }) => self.on_send(slot, res),
                Some(Op::Wake) => self.woken = true,
                Some(Op::Cancel { ep }) => {
                    if res == -libc::ENOENT
                        && let Some(Some(ep)) = self.eps.get_mut(ep as usize)
                        && ep.closing
                        && ep.armed
                    {
                        // The receive was not live yet when the cancel ran: try again.
                        ep.cancel_sent = false;
                    }
                }
                None => {}
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
        let core = &ep.udp.core;
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
                    bump(&core.stats.recv_errors, 1);
                    log_io_error(&mut self.recv_log, "multishot recv", core.local_addr, errno);
                }
                _ => {
                    bump(&core.stats.recv_errors, 1);
                    log_io_error(&mut self.recv_log, "multishot recv", core.local_addr, errno);
                }
            }
            if let Some(bid) = bid {
                self.recycle.push(bid);
            }
            return;
        }
        let Some(bid) = bid else {
            bump(&core.stats.recv_errors, 1);
            return;
        };
        if ep.closing || core.is_closed() {
            self.recycle.push(bid);
            return;
        }
        let Some(buf) = self.bufs.filled(bid, res as usize) else {
            bump(&core.stats.recv_errors, 1);
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
                bump(&core.stats.recv_errors, 1);
                self.recycle.push(bid);
            }
        }
    }

    fn on_send(&mut self, i: u32, res: i32) {
        let Some(slot) = self.out.pool.get(i) else {
            return;
        };
        let (ep_slot, to) = (slot.ep, slot.to);
        if let Some(Some(ep)) = self.eps.get_mut(ep_slot as usize) {
            ep.inflight = ep.inflight.saturating_sub(1);
            let stats = &ep.udp.core.stats;
            if res >= 0 {
                bump(&stats.datagrams_sent, 1);
                bump(&stats.bytes_sent, res as u64);
            } else {
                bump(&stats.send_errors, 1);
                log_io_error(&mut self.send_log, "send", to, -res);
            }
        }
        self.out.pool.release(i);
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
            // Closed by its handle, the close command not taken yet: its datagrams are dropped
            // (a busy worker would otherwise handle a whole batch for nodes already stopping).
            if ep.closing || ep.udp.core.is_closed() {
                continue;
            }
            let udp = ep.udp.clone();
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
            let result = self.out.deliver(&udp.core, s, &batch);
            self.batch.put_back(batch);
            if let Err(message) = result {
                udp.panicked(&self.ctx, message);
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

    fn queue_due_delayed(&mut self) {
        let eps = &self.eps;
        self.out.queue_due_delayed(|id| {
            eps.iter()
                .position(|e| {
                    e.as_ref()
                        .is_some_and(|e| e.udp.core.id == id && !e.closing)
                })
                .map(|p| p as u32)
        });
    }

    fn take_commands(&mut self) {
        self.ctx.me.take_commands(&mut self.commands);
        let commands = std::mem::take(&mut self.commands);
        for command in commands {
            match command {
                Command::Backend(UdpCommand::Open { ep, socket }) => self.open(ep, socket),
                Command::Backend(UdpCommand::SendLater(d)) => self.out.delayed.push_delayed(d),
                Command::Close { id, ack } => {
                    match self
                        .eps
                        .iter()
                        .position(|e| e.as_ref().is_some_and(|e| e.udp.core.id == id))
                    {
                        Some(s) => self.begin_close(s as u32, ack),
                        None => {
                            if let Some(a) = ack {
                                a.ack()
                            }
                        }
                    }
                }
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

    fn open(&mut self, udp: Arc<UdpCore>, fd: OwnedFd) {
        let ep = Ep {
            v6: udp.core.local_addr.is_ipv6(),
            udp,
            fd,
            hdr: recv_msghdr(NAME_LEN),
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
            let s = s as u32;
            if ep.closing {
                if ep.armed && !ep.cancel_sent {
                    let entry = opcode::AsyncCancel::new(Op::Recv { ep: s }.encode())
                        .build()
                        .user_data(Op::Cancel { ep: s }.encode());
                    ep.cancel_sent = push_sqe(&mut self.ring, &entry);
                }
                continue;
            }
            if ep.need_arm && !ep.armed {
                let entry = opcode::RecvMsgMulti::new(types::Fd(ep.fd.as_raw_fd()), &*ep.hdr, BGID)
                    .build()
                    .user_data(Op::Recv { ep: s }.encode());
                if push_sqe(&mut self.ring, &entry) {
                    ep.armed = true;
                    ep.need_arm = false;
                    if ep.armed_once {
                        bump(&ep.udp.core.stats.recv_rearms, 1);
                    }
                    ep.armed_once = true;
                }
            }
        }
    }

    /// Turns the replies queued this wake-up into `SendMsg` SQEs (submitted with the next wait).
    fn queue_sends(&mut self) {
        for k in 0..self.out.queued.len() {
            let i = self.out.queued[k];
            let ep_slot = self.out.pool.slot(i).ep;
            let Some(Some(ep)) = self.eps.get_mut(ep_slot as usize) else {
                self.out.pool.release(i);
                continue;
            };
            let hdr = self.out.pool.slot(i).prepare(ep.v6);
            let entry = opcode::SendMsg::new(types::Fd(ep.fd.as_raw_fd()), hdr.msghdr())
                .build()
                .user_data(Op::Send { slot: i }.encode());
            if push_sqe(&mut self.ring, &entry) {
                ep.inflight += 1;
            } else {
                bump(&ep.udp.core.stats.send_errors, 1);
                self.out.pool.release(i);
            }
        }
        self.out.queued.clear();
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
        .user_data(Op::Wake.encode());
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
        for op in [
            Op::Send { slot: 77 },
            Op::Recv { ep: u32::MAX },
            Op::Wake,
            Op::Cancel { ep: 0 },
        ] {
            assert_eq!(Op::decode(op.encode()), Some(op));
        }
        assert_ne!(Op::Recv { ep: 3 }.encode(), Op::Cancel { ep: 3 }.encode());
        assert_eq!(Op::decode(0), None);
        assert_eq!(Op::decode(u64::MAX), None);
    }
}
