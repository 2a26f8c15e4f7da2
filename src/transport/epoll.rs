//! epoll fallback backend (no io_uring, e.g. seccomp or an old kernel): the same worker
//! structure, with nonblocking sockets, `recvmmsg`/`sendmmsg` in batches of 32 into pre-allocated
//! buffers, and eventfd wake-ups.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::transport::api::Datagram;
use crate::transport::dispatch::{BatchScratch, Outbox, bump};
use crate::transport::log_limit::{LogLimiter, log_io_error};
use crate::transport::runtime::{Backend, Command, Ready, WorkerCtx};
use crate::transport::sys::{self, Epoll, RecvBatch, SendBatch};
use crate::transport::udp_shared::{UdpCommand, UdpCore, max_payload};

/// Datagrams per `recvmmsg`/`sendmmsg` call.
const BATCH: usize = 32;
const WAKE_TOKEN: u64 = u64::MAX;
const MAX_EVENTS: usize = 64;

/// The epoll backend with its configuration (equal configurations share workers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EpollBackend {
    /// Bytes per receive buffer, counted as on the io_uring path (header included).
    pub(crate) recv_buffer_len: usize,
    /// Pre-allocated send slots per worker.
    pub(crate) send_slots: usize,
}

impl Backend for EpollBackend {
    type Command = UdpCommand;
    const NAME: &'static str = "epoll";

    fn run_worker(&self, ctx: WorkerCtx<UdpCommand>, ready: Ready) {
        match Worker::new(self, ctx) {
            Ok(mut w) => {
                ready(Ok(()));
                w.run();
            }
            Err(e) => ready(Err(e)),
        }
    }
}

struct Ep {
    udp: Arc<UdpCore>,
    fd: OwnedFd,
    v6: bool,
}

struct Worker {
    poller: Epoll,
    ctx: WorkerCtx<UdpCommand>,
    eps: Vec<Option<Ep>>,
    out: Outbox,
    batch: BatchScratch,
    commands: Vec<Command<UdpCommand>>,
    recv: RecvBatch,
    send: SendBatch,
    shutdown: bool,
    recv_log: LogLimiter,
    send_log: LogLimiter,
}

impl Worker {
    fn new(cfg: &EpollBackend, ctx: WorkerCtx<UdpCommand>) -> Result<Worker, String> {
        let poller = Epoll::new(MAX_EVENTS).map_err(|e| format!("epoll_create1: {e}"))?;
        poller
            .add(ctx.me.eventfd(), WAKE_TOKEN)
            .map_err(|e| format!("epoll_ctl(eventfd): {e}"))?;
        Ok(Worker {
            poller,
            eps: Vec::new(),
            out: Outbox::new(cfg.send_slots),
            batch: BatchScratch::default(),
            commands: Vec::new(),
            recv: RecvBatch::new(BATCH, max_payload(cfg.recv_buffer_len)),
            send: SendBatch::new(BATCH),
            shutdown: false,
            recv_log: LogLimiter::default(),
            send_log: LogLimiter::default(),
            ctx,
        })
    }

    fn run(&mut self) {
        while !self.shutdown {
            let n = self
                .poller
                .wait(sys::timeout_ms(self.out.delayed.next_wait()));
            for k in 0..n {
                let token = self.poller.token(k);
                if token == WAKE_TOKEN {
                    self.ctx.me.consume_eventfd();
                    self.ctx.me.rearm_wake();
                    self.take_commands();
                } else {
                    self.recv_batch(token as usize);
                }
            }
            self.queue_due_delayed();
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
        let udp = ep.udp.clone();
        let core = &udp.core;
        let n = match self.recv.recv(ep.fd.as_raw_fd()) {
            Ok(n) => n,
            Err(errno) => {
                if errno != libc::EAGAIN && errno != libc::EINTR {
                    bump(&core.stats.recv_errors, 1);
                    log_io_error(&mut self.recv_log, "recvmmsg", core.local_addr, errno);
                }
                return;
            }
        };
        if core.is_closed() {
            return;
        }
        let mut batch = self.batch.take();
        let mut errors = 0;
        for i in 0..n {
            match self.recv.get(i) {
                Some((from, payload)) => batch.push(Datagram { from, payload }),
                // Larger than a receive buffer, or an unknown address family: dropped, counted.
                None => errors += 1,
            }
        }
        bump(&core.stats.recv_errors, errors);
        let result = self.out.deliver(core, s as u32, &batch);
        self.batch.put_back(batch);
        if let Err(message) = result {
            udp.panicked(&self.ctx, message);
            if let Some(ep) = self.eps[s].take() {
                self.close_ep(ep);
            }
        }
    }

    fn queue_due_delayed(&mut self) {
        let eps = &self.eps;
        self.out.queue_due_delayed(|id| {
            eps.iter()
                .position(|e| e.as_ref().is_some_and(|e| e.udp.core.id == id))
                .map(|p| p as u32)
        });
    }

    /// Sends the queued replies with `sendmmsg`, one call per run of up to 32 for one socket.
    fn flush_sends(&mut self) {
        let queued = &self.out.queued;
        let pool = &mut self.out.pool;
        let mut k = 0;
        while k < queued.len() {
            let ep_slot = pool.slot(queued[k]).ep as usize;
            let mut n = 0;
            while k + n < queued.len()
                && n < self.send.capacity()
                && pool.slot(queued[k + n]).ep as usize == ep_slot
            {
                n += 1;
            }
            if let Some(Some(ep)) = self.eps.get(ep_slot) {
                for j in 0..n {
                    let hdr = pool.slot(queued[k + j]).prepare(ep.v6);
                    self.send.set(j, hdr);
                }
                send_run(ep, &mut self.send, n, &mut self.send_log);
            }
            k += n;
        }
        for i in self.out.queued.drain(..) {
            self.out.pool.release(i);
        }
    }

    fn take_commands(&mut self) {
        self.ctx.me.take_commands(&mut self.commands);
        let commands = std::mem::take(&mut self.commands);
        for command in commands {
            match command {
                Command::Backend(UdpCommand::Open {
                    ep: udp,
                    socket: fd,
                }) => {
                    let s = match self.eps.iter().position(Option::is_none) {
                        Some(s) => s,
                        None => {
                            self.eps.push(None);
                            self.eps.len() - 1
                        }
                    };
                    if let Err(e) = self.poller.add(fd.as_raw_fd(), s as u64) {
                        tracing::warn!(addr = %udp.core.local_addr, "epoll_ctl(ADD): {e}");
                        bump(&udp.core.stats.recv_errors, 1);
                        continue;
                    }
                    self.eps[s] = Some(Ep {
                        v6: udp.core.local_addr.is_ipv6(),
                        udp,
                        fd,
                    });
                }
                Command::Backend(UdpCommand::SendLater(d)) => self.out.delayed.push_delayed(d),
                Command::Close { id, ack } => {
                    if let Some(s) = self
                        .eps
                        .iter()
                        .position(|e| e.as_ref().is_some_and(|e| e.udp.core.id == id))
                        && let Some(ep) = self.eps[s].take()
                    {
                        self.close_ep(ep);
                    }
                    if let Some(a) = ack {
                        a.ack();
                    }
                }
                Command::Shutdown => self.shutdown = true,
            }
        }
    }

    fn close_ep(&self, ep: Ep) {
        let _ = self.poller.remove(ep.fd.as_raw_fd());
        drop(ep.fd);
    }
}

/// `sendmmsg` of the first `n` messages of `batch` until every one went out or failed; each
/// failure is counted and skipped.
fn send_run(ep: &Ep, batch: &mut SendBatch, n: usize, log: &mut LogLimiter) {
    let stats = &ep.udp.core.stats;
    let mut off = 0;
    let mut tries = 0;
    while off < n && tries < 2 * BATCH {
        tries += 1;
        match batch.send(ep.fd.as_raw_fd(), off..n) {
            Err(libc::EINTR) => continue,
            Err(errno) => {
                bump(&stats.send_errors, 1);
                log_io_error(log, "sendmmsg", ep.udp.core.local_addr, errno);
                off += 1;
            }
            Ok(0) => break,
            Ok(r) => {
                bump(&stats.datagrams_sent, r as u64);
                bump(&stats.bytes_sent, batch.sent_bytes(off..off + r));
                off += r;
            }
        }
    }
    bump(&stats.send_errors, (n - off) as u64);
}
