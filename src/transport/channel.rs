//! In-memory datagrams for tests and simulations of many nodes in one process: every endpoint
//! lives on one worker of a shared channel runtime (so 100+ nodes need a handful of threads),
//! datagrams travel through worker inboxes, links can be cut to simulate partitions.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::bail;
use async_trait::async_trait;
use parking_lot::Mutex;

use crate::transport::api::{
    Datagram, DatagramHandler, DatagramTransport, Endpoint, EndpointStats, Socket, Transport,
    TransportKind,
};
use crate::transport::bridge;
use crate::transport::delay_queue::{DelayQueue, Delayed, deadline_after};
use crate::transport::dispatch::{BatchScratch, EndpointCore, Outbox, bump};
use crate::transport::faults::{FaultInjector, Faults};
use crate::transport::runtime::{
    Backend, Command, Ready, Runtime, WorkerCtx, WorkerShared, default_workers, get_runtime,
};
use crate::transport::sys;

/// Datagrams that may wait for one endpoint before new ones are dropped (the reference bounds
/// each socket's queue too, at 100).
const MAX_BACKLOG: usize = 1024;

/// Traffic counters of a channel network: every send attempt, including dropped ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statistics {
    /// Bytes of every message sent.
    pub num_bytes_total: u64,
    /// Messages sent.
    pub num_messages_total: u64,
}

impl Statistics {
    /// Counts one message of `message_num_bytes` (same method as the reference's).
    pub fn record_message_len(&mut self, message_num_bytes: usize) {
        self.num_bytes_total += message_num_bytes as u64;
        self.num_messages_total += 1;
    }
}

/// In-memory transport; clones share one network.
#[derive(Clone)]
pub struct ChannelTransport {
    network: Arc<Network>,
    faults: Faults,
}

impl fmt::Debug for ChannelTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelTransport")
            .field("mtu", &self.network.mtu)
            .field("faults", &self.faults)
            .field("statistics", &self.statistics())
            .finish()
    }
}

impl Default for ChannelTransport {
    fn default() -> Self {
        ChannelTransport::new()
    }
}

impl ChannelTransport {
    /// A new network without MTU.
    pub fn new() -> ChannelTransport {
        ChannelTransport::build(None)
    }

    /// A new network whose sends larger than `mtu` fail ("Serialized message size exceeds MTU").
    pub fn with_mtu(mtu: usize) -> ChannelTransport {
        ChannelTransport::build(Some(mtu))
    }

    fn build(mtu: Option<usize>) -> ChannelTransport {
        ChannelTransport {
            network: Arc::new(Network {
                mtu,
                state: Mutex::new(NetState::default()),
            }),
            faults: Faults::NONE,
        }
    }

    /// The same network, with `faults` applied to the sends of endpoints opened from the result.
    pub fn with_faults(mut self, faults: Faults) -> ChannelTransport {
        self.faults = faults;
        self
    }

    /// Traffic counters of the whole network.
    pub fn statistics(&self) -> Statistics {
        self.network.state.lock().statistics
    }

    /// Restores the (symmetric) link between `a` and `b` (async as in chitchat 0.13; it never
    /// waits: [`add_link_now`](Self::add_link_now) is the same from synchronous code).
    pub async fn add_link(&self, a: SocketAddr, b: SocketAddr) {
        self.add_link_now(a, b);
    }

    /// Cuts the (symmetric) link between `a` and `b`: datagrams are silently dropped (async as in
    /// chitchat 0.13; [`remove_link_now`](Self::remove_link_now) is the synchronous form).
    pub async fn remove_link(&self, a: SocketAddr, b: SocketAddr) {
        self.remove_link_now(a, b);
    }

    /// Restores the (symmetric) link between `a` and `b`, from synchronous code.
    pub fn add_link_now(&self, a: SocketAddr, b: SocketAddr) {
        let mut st = self.network.state.lock();
        if let Some(set) = st.removed_links.get_mut(&a) {
            set.remove(&b);
        }
        if let Some(set) = st.removed_links.get_mut(&b) {
            set.remove(&a);
        }
    }

    /// Cuts the (symmetric) link between `a` and `b`, from synchronous code.
    pub fn remove_link_now(&self, a: SocketAddr, b: SocketAddr) {
        let mut st = self.network.state.lock();
        st.removed_links.entry(a).or_default().insert(b);
        st.removed_links.entry(b).or_default().insert(a);
    }
}

fn channel_runtime() -> Result<Arc<Runtime<ChannelCommand>>, String> {
    get_runtime(&ChannelBackend { send_slots: 64 }, default_workers())
}

/// chitchat 0.13's transport: `open` returns a message-level socket on this network (it talks
/// to the nodes on it); `spawn_chitchat` takes the fast path.
#[async_trait]
impl Transport for ChannelTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        bridge::open_socket(self, listen_addr)
    }

    fn datagram_transport(&self) -> Option<&dyn DatagramTransport> {
        Some(self)
    }
}

impl DatagramTransport for ChannelTransport {
    fn open_endpoint(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        let runtime = channel_runtime().map_err(anyhow::Error::msg)?;
        let worker_index = runtime.pick_worker();
        let worker = runtime.worker(worker_index).clone();
        let mut st = self.network.state.lock();
        let mut addr = listen_addr;
        if addr.port() == 0 {
            let Some(port) = (1..=u16::MAX).find(|&p| {
                let mut a = addr;
                a.set_port(p);
                !st.endpoints.contains_key(&a)
            }) else {
                bail!("no free port for `{listen_addr}`");
            };
            addr.set_port(port);
        }
        if st.endpoints.contains_key(&addr) {
            bail!("Address not available `{addr}`");
        }
        let ep = Arc::new(ChannelCore {
            core: EndpointCore::new(
                addr,
                handler,
                FaultInjector::for_endpoint(&self.faults, addr),
            ),
            network: self.network.clone(),
            backlog: AtomicUsize::new(0),
        });
        // Queued before the route exists, so no datagram can overtake the Open.
        worker.push_backend(ChannelCommand::Open(ep.clone()));
        st.endpoints.insert(
            addr,
            Route {
                ep: ep.clone(),
                worker: worker.clone(),
            },
        );
        drop(st);
        Ok(Box::new(ChannelEndpoint {
            ep,
            runtime,
            worker: worker_index,
            closed: AtomicBool::new(false),
        }))
    }
}

/// A channel endpoint as its handle, its route and its worker see it.
struct ChannelCore {
    core: EndpointCore,
    /// The network it is registered in (to free its address after a panic).
    network: Arc<Network>,
    /// Datagrams queued for this endpoint, bounded like the reference's mpsc.
    backlog: AtomicUsize,
}

/// A datagram travelling through the in-memory network to a channel worker.
struct Incoming {
    id: u64,
    from: SocketAddr,
    data: Vec<u8>,
    /// When the delay fault releases it (`None`: at once).
    at: Option<Instant>,
}

/// What a channel worker is asked to do besides closing and shutting down.
enum ChannelCommand {
    /// Serve this endpoint.
    Open(Arc<ChannelCore>),
    /// A datagram for one of its endpoints.
    Deliver(Incoming),
}

/// The shared in-memory network.
struct Network {
    mtu: Option<usize>,
    state: Mutex<NetState>,
}

#[derive(Default)]
struct NetState {
    endpoints: HashMap<SocketAddr, Route>,
    removed_links: HashMap<SocketAddr, HashSet<SocketAddr>>,
    statistics: Statistics,
}

struct Route {
    ep: Arc<ChannelCore>,
    worker: Arc<WorkerShared<ChannelCommand>>,
}

impl Network {
    /// Frees `addr` if endpoint `id` still holds it.
    fn unregister(&self, addr: SocketAddr, id: u64) {
        let mut st = self.state.lock();
        if st.endpoints.get(&addr).is_some_and(|r| r.ep.core.id == id) {
            st.endpoints.remove(&addr);
        }
    }

    /// Sends `payload` from `sender`: MTU check, statistics, faults, links, then the
    /// destination worker's inbox. Unknown destinations and cut links drop silently.
    fn send(&self, sender: &EndpointCore, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        if let Some(mtu) = self.mtu
            && payload.len() > mtu
        {
            bump(&sender.stats.send_errors, 1);
            return Err(io::Error::other("Serialized message size exceeds MTU"));
        }
        let mut data = payload.to_vec();
        let plan = sender.faults.as_ref().map(|inj| inj.apply(to, &mut data));
        let mut st = self.state.lock();
        st.statistics.record_message_len(payload.len());
        if plan.is_some_and(|p| p.drop) {
            drop(st);
            bump(&sender.stats.dropped_by_faults, 1);
            return Ok(());
        }
        bump(&sender.stats.datagrams_sent, 1);
        bump(&sender.stats.bytes_sent, data.len() as u64);
        let from = sender.local_addr;
        if st
            .removed_links
            .get(&from)
            .is_some_and(|set| set.contains(&to))
        {
            return Ok(());
        }
        let Some(route) = st.endpoints.get(&to) else {
            return Ok(());
        };
        let now = Instant::now();
        let (duplicate, delays) = match plan {
            Some(p) => (p.duplicate, p.delay),
            None => (false, [None, None]),
        };
        let copies = if duplicate { 2 } else { 1 };
        for (k, delay) in delays.iter().enumerate().take(copies) {
            if route.ep.backlog.fetch_add(1, Ordering::Relaxed) >= MAX_BACKLOG {
                route.ep.backlog.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let bytes = if k + 1 == copies {
                std::mem::take(&mut data)
            } else {
                data.clone()
            };
            route.worker.push_backend(ChannelCommand::Deliver(Incoming {
                id: route.ep.core.id,
                from,
                data: bytes,
                at: delay.map(|d| deadline_after(now, d)),
            }));
        }
        Ok(())
    }
}

/// A channel endpoint handle.
struct ChannelEndpoint {
    ep: Arc<ChannelCore>,
    runtime: Arc<Runtime<ChannelCommand>>,
    worker: usize,
    closed: AtomicBool,
}

impl Endpoint for ChannelEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.ep.core.local_addr
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Channel
    }

    fn send_to(&self, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        if self.ep.core.is_closed() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "endpoint closed",
            ));
        }
        self.ep.network.send(&self.ep.core, to, payload)
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let core = &self.ep.core;
        core.mark_closed();
        self.ep.network.unregister(core.local_addr, core.id);
        self.runtime.close_endpoint(core.id, Some(self.worker));
    }

    fn stats(&self) -> EndpointStats {
        self.ep.core.stats.snapshot()
    }
}

impl Drop for ChannelEndpoint {
    fn drop(&mut self) {
        self.close();
    }
}

// ---------------------------------------------------------------------------------------------
// Channel worker
// ---------------------------------------------------------------------------------------------

/// The in-memory backend: workers that take datagrams from their queue instead of a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChannelBackend {
    send_slots: usize,
}

impl Backend for ChannelBackend {
    type Command = ChannelCommand;
    const NAME: &'static str = "chan";

    fn run_worker(&self, ctx: WorkerCtx<ChannelCommand>, ready: Ready) {
        ready(Ok(()));
        let mut w = Worker {
            out: Outbox::new(self.send_slots),
            ctx,
            eps: HashMap::new(),
            ready: Vec::new(),
            batch: BatchScratch::default(),
            arriving: DelayQueue::default(),
            commands: Vec::new(),
            shutdown: false,
        };
        w.run();
    }
}

struct Worker {
    ctx: WorkerCtx<ChannelCommand>,
    eps: HashMap<u64, Arc<ChannelCore>>,
    /// Datagrams to hand to their handlers this wake-up.
    ready: Vec<Incoming>,
    out: Outbox,
    batch: BatchScratch,
    /// Datagrams held back by the delay fault of their sender until due.
    arriving: DelayQueue,
    commands: Vec<Command<ChannelCommand>>,
    shutdown: bool,
}

impl Worker {
    fn run(&mut self) {
        while !self.shutdown {
            self.wait();
            // One queue, in order: a datagram is only routed after its endpoint's Open was
            // queued, so every datagram taken here finds its endpoint opened before dispatch.
            self.ctx.me.take_commands(&mut self.commands);
            for command in std::mem::take(&mut self.commands) {
                match command {
                    Command::Backend(ChannelCommand::Open(ep)) => {
                        self.eps.insert(ep.core.id, ep);
                    }
                    Command::Backend(ChannelCommand::Deliver(inc)) => match inc.at {
                        // Even if already due: the queue releases them in deadline order, which
                        // is what reorders them (a late wake-up must not restore the send order).
                        Some(at) => self
                            .arriving
                            .push_delayed(Delayed::new(at, inc.id, inc.from, inc.from, inc.data)),
                        None => self.ready.push(inc),
                    },
                    Command::Close { id, ack } => {
                        self.eps.remove(&id);
                        if let Some(a) = ack {
                            a.ack();
                        }
                    }
                    Command::Shutdown => self.shutdown = true,
                }
            }
            let now = Instant::now();
            while let Some(d) = self.arriving.pop_due(now) {
                self.ready.push(Incoming {
                    id: d.id,
                    from: d.from,
                    data: d.data,
                    at: None,
                });
            }
            self.dispatch();
        }
    }

    /// Sleeps on the eventfd until woken or the next delayed datagram is due.
    fn wait(&mut self) {
        let timeout = sys::timeout_ms(self.arriving.next_wait());
        if sys::poll_readable(self.ctx.me.eventfd(), timeout) {
            self.ctx.me.consume_eventfd();
            self.ctx.me.rearm_wake();
        }
    }

    /// Groups ready datagrams per endpoint (arrival order kept) and calls each handler once.
    fn dispatch(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        for inc in &self.ready {
            if let Some(ep) = self.eps.get(&inc.id) {
                ep.backlog.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.ready.sort_by_key(|inc| inc.id);
        let mut k = 0;
        while k < self.ready.len() {
            let id = self.ready[k].id;
            let end = k + self.ready[k..].iter().take_while(|i| i.id == id).count();
            if let Some(ep) = self.eps.get(&id).cloned()
                && !ep.core.is_closed()
            {
                let mut batch = self.batch.take();
                batch.extend(self.ready[k..end].iter().map(|i| Datagram {
                    from: i.from,
                    payload: &i.data,
                }));
                let start = self.out.queued.len();
                let result = self.out.handle(&ep.core, 0, &batch);
                self.batch.put_back(batch);
                match result {
                    Ok(()) => {
                        for &i in &self.out.queued[start..] {
                            let slot = self.out.pool.slot(i);
                            if let Err(e) = ep.network.send(&ep.core, slot.to, &slot.buf) {
                                tracing::debug!(addr = %ep.core.local_addr, "channel reply: {e}");
                            }
                        }
                    }
                    Err(message) => {
                        ep.core.panicked(message);
                        self.ctx.close_on_other_workers(id);
                        ep.network.unregister(ep.core.local_addr, id);
                        self.eps.remove(&id);
                    }
                }
                for i in self.out.queued.drain(..) {
                    self.out.pool.release(i);
                }
            }
            k = end;
        }
        self.ready.clear();
    }
}
