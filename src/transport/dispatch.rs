//! What every backend's worker does with one endpoint's batch, whatever the backend: the
//! endpoint state the workers share with the handle ([`EndpointCore`]), the pre-allocated send
//! slots the handler writes replies into ([`Outbox`]), the handler call with its panics caught,
//! and the faults applied to the replies.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::transport::api::{Datagram, DatagramHandler, EndpointStats, ReplySink};
use crate::transport::delay_queue::{DelayQueue, deadline_after};
use crate::transport::faults::FaultInjector;
use crate::transport::sys::SendHeader;

// ---------------------------------------------------------------------------------------------
// Endpoint state shared by the handle and the workers
// ---------------------------------------------------------------------------------------------

static NEXT_ENDPOINT_ID: AtomicU64 = AtomicU64::new(1);

/// Per-endpoint counters, updated by workers once per batch.
#[derive(Debug, Default)]
pub(crate) struct AtomicStats {
    /// See [`EndpointStats`] for each counter.
    pub(crate) datagrams_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) datagrams_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) recv_errors: AtomicU64,
    pub(crate) dropped_by_faults: AtomicU64,
    pub(crate) recv_rearms: AtomicU64,
}

/// Adds `n` to a counter (relaxed: the counters are statistics, not synchronisation).
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl AtomicStats {
    /// The counters as plain numbers.
    pub(crate) fn snapshot(&self) -> EndpointStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EndpointStats {
            datagrams_received: g(&self.datagrams_received),
            bytes_received: g(&self.bytes_received),
            datagrams_sent: g(&self.datagrams_sent),
            bytes_sent: g(&self.bytes_sent),
            send_errors: g(&self.send_errors),
            recv_errors: g(&self.recv_errors),
            dropped_by_faults: g(&self.dropped_by_faults),
            recv_rearms: g(&self.recv_rearms),
            ..EndpointStats::default()
        }
    }
}

/// One endpoint as every backend's workers see it; each backend wraps it with its own state.
pub(crate) struct EndpointCore {
    /// Process-unique id: how commands and delayed datagrams name the endpoint.
    pub(crate) id: u64,
    /// The bound address.
    pub(crate) local_addr: SocketAddr,
    /// The protocol side.
    pub(crate) handler: Arc<dyn DatagramHandler>,
    /// Counters, summed over the workers.
    pub(crate) stats: AtomicStats,
    /// Set by `close()` or after a handler panic: no more deliveries, `send_to` fails.
    closed: AtomicBool,
    /// The faults applied to everything it sends (`None`: no faults).
    pub(crate) faults: Option<FaultInjector>,
}

impl EndpointCore {
    /// A new, open endpoint with a fresh id.
    pub(crate) fn new(
        local_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
        faults: Option<FaultInjector>,
    ) -> EndpointCore {
        EndpointCore {
            id: NEXT_ENDPOINT_ID.fetch_add(1, Ordering::Relaxed),
            local_addr,
            handler,
            stats: AtomicStats::default(),
            closed: AtomicBool::new(false),
            faults,
        }
    }

    /// Whether `close()` ran or the handler panicked.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the endpoint closed: workers deliver nothing more, `send_to` fails.
    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// After a handler panic: marks the endpoint closed and tells the handler (its own panics
    /// caught too). Closing the sockets is the backend's part.
    pub(crate) fn panicked(&self, message: String) {
        self.mark_closed();
        tracing::error!(addr = %self.local_addr, "datagram handler panicked, endpoint closed: {message}");
        let handler = self.handler.clone();
        if catch_unwind(AssertUnwindSafe(|| handler.on_panic(message))).is_err() {
            tracing::error!(addr = %self.local_addr, "on_panic panicked too");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Send slots
// ---------------------------------------------------------------------------------------------

/// One pre-allocated outgoing datagram with the kernel structures that describe it. Boxed, so
/// the pointers in `hdr` stay valid while an io_uring send is in flight.
pub(crate) struct SendSlot {
    /// The payload.
    pub(crate) buf: Vec<u8>,
    /// The destination.
    pub(crate) to: SocketAddr,
    /// Worker-local index of the endpoint that queued it.
    pub(crate) ep: u32,
    /// Filled by [`SendSlot::prepare`] just before the send.
    hdr: SendHeader,
    /// Counted in its pool's `large` (its buffer had grown past `LARGE_CAPACITY` when last
    /// released).
    large: bool,
}

/// Capacity each slot's buffer starts with: a typical gossip reply fits without growing.
const SLOT_INITIAL_CAPACITY: usize = 2048;

/// A buffer above this has grown for a large reply (a SynAck of a big cluster is up to 64 KiB).
const LARGE_CAPACITY: usize = 16 * 1024;

/// Slots of one pool that keep a large buffer once released; the others give it back. The pool
/// grows to as many slots as one wake-up queues replies, which in a process of 1,000 nodes is
/// thousands: each kept at 64 KiB, that was 60 MB in a 300-node cluster (massif, 200 KB per
/// node). 128 large buffers are 8 MiB per worker. With the shared Syn buffer (see `server`),
/// the in-use heap of a 1,000-node cluster at 1-s gossip fell from 1,946 to 1,841 MB.
const MAX_LARGE_SLOTS: usize = 128;

impl SendSlot {
    fn new() -> Box<SendSlot> {
        Box::new(SendSlot {
            buf: Vec::with_capacity(SLOT_INITIAL_CAPACITY),
            to: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            ep: 0,
            hdr: SendHeader::new(),
            large: false,
        })
    }

    /// Points the kernel header at this slot's buffer and destination and returns it; valid
    /// until the slot is written again. `v6_socket` maps IPv4 destinations for a dual-stack
    /// IPv6 socket.
    pub(crate) fn prepare(&mut self, v6_socket: bool) -> &SendHeader {
        self.hdr.prepare(&mut self.buf, self.to, v6_socket);
        &self.hdr
    }
}

/// The worker's send slots; grows when a batch needs more and keeps what it grew.
pub(crate) struct SlotPool {
    // Boxed on purpose: in-flight io_uring sends point into slots, which must not move when the
    // vector grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<SendSlot>>,
    free: Vec<u32>,
    /// Slots marked `large`: at most `MAX_LARGE_SLOTS`.
    large: usize,
}

impl SlotPool {
    /// `n` slots (at least one).
    pub(crate) fn new(n: usize) -> SlotPool {
        let n = n.max(1);
        SlotPool {
            slots: (0..n).map(|_| SendSlot::new()).collect(),
            free: (0..n as u32).rev().collect(),
            large: 0,
        }
    }

    /// A free slot's index (a new slot if none is free).
    pub(crate) fn take(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(SendSlot::new());
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Returns slot `i` to the free list. Its buffer is no longer in the kernel's hands (a
    /// send's completion has been seen, or it was never sent); a large one is kept only while
    /// fewer than `MAX_LARGE_SLOTS` are.
    pub(crate) fn release(&mut self, i: u32) {
        if let Some(slot) = self.slots.get_mut(i as usize) {
            let large = slot.buf.capacity() > LARGE_CAPACITY;
            if large && !slot.large {
                if self.large < MAX_LARGE_SLOTS {
                    slot.large = true;
                    self.large += 1;
                } else {
                    slot.buf = Vec::with_capacity(SLOT_INITIAL_CAPACITY);
                }
            } else if !large && slot.large {
                slot.large = false;
                self.large -= 1;
            }
        }
        self.free.push(i);
    }

    /// Slots keeping a large buffer.
    #[cfg(test)]
    pub(crate) fn large_slots(&self) -> usize {
        self.large
    }

    /// Slot `i`, if it exists (a completion's user data is checked against this).
    pub(crate) fn get(&mut self, i: u32) -> Option<&mut SendSlot> {
        self.slots.get_mut(i as usize).map(|b| &mut **b)
    }

    /// Slot `i` (an index this pool handed out).
    pub(crate) fn slot(&mut self, i: u32) -> &mut SendSlot {
        &mut self.slots[i as usize]
    }
}

/// The [`ReplySink`] a handler writes into: slots from the pool, queued for one batched send.
struct Sink<'a> {
    pool: &'a mut SlotPool,
    queued: &'a mut Vec<u32>,
    current: Option<u32>,
    ep: u32,
}

impl ReplySink for Sink<'_> {
    fn buffer(&mut self) -> &mut Vec<u8> {
        let i = match self.current {
            Some(i) => i,
            None => {
                let i = self.pool.take();
                self.current = Some(i);
                i
            }
        };
        let buf = &mut self.pool.slot(i).buf;
        buf.clear();
        buf
    }

    fn send(&mut self, to: SocketAddr) {
        if let Some(i) = self.current.take() {
            let ep = self.ep;
            let slot = self.pool.slot(i);
            slot.to = to;
            slot.ep = ep;
            self.queued.push(i);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handler dispatch
// ---------------------------------------------------------------------------------------------

/// A worker's outgoing side: the send slots, the replies queued for the next batched send, and
/// the datagrams the delay fault holds back.
pub(crate) struct Outbox {
    /// The send slots.
    pub(crate) pool: SlotPool,
    /// Slots to send, in order.
    pub(crate) queued: Vec<u32>,
    /// Datagrams held back by the delay fault until due.
    pub(crate) delayed: DelayQueue,
    fault_scratch: Vec<u32>,
}

impl Outbox {
    /// An outbox with `send_slots` pre-allocated slots.
    pub(crate) fn new(send_slots: usize) -> Outbox {
        Outbox {
            pool: SlotPool::new(send_slots),
            queued: Vec::with_capacity(send_slots),
            delayed: DelayQueue::default(),
            fault_scratch: Vec::new(),
        }
    }

    /// Hands one endpoint's batch to its handler (panics isolated) and applies the endpoint's
    /// faults to the replies it queued: what both UDP backends do for every wake-up. `ep` is
    /// the endpoint's worker-local index, stored in each reply's slot. On a panic, the replies
    /// are discarded and the panic message returned.
    pub(crate) fn deliver(
        &mut self,
        core: &EndpointCore,
        ep: u32,
        batch: &[Datagram<'_>],
    ) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let start = self.queued.len();
        self.handle(core, ep, batch)?;
        self.apply_reply_faults(core, start);
        Ok(())
    }

    /// Calls the handler with one endpoint's batch, isolating panics; its replies are appended
    /// to `queued`, without faults (the channel network applies them when it sends). On a
    /// panic they are discarded and the panic message returned.
    pub(crate) fn handle(
        &mut self,
        core: &EndpointCore,
        ep: u32,
        batch: &[Datagram<'_>],
    ) -> Result<(), String> {
        let bytes: usize = batch.iter().map(|d| d.payload.len()).sum();
        bump(&core.stats.datagrams_received, batch.len() as u64);
        bump(&core.stats.bytes_received, bytes as u64);
        let start = self.queued.len();
        let mut sink = Sink {
            pool: &mut self.pool,
            queued: &mut self.queued,
            current: None,
            ep,
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            core.handler.handle_batch(batch, &mut sink)
        }));
        if let Some(i) = sink.current.take() {
            sink.pool.release(i);
        }
        match result {
            Ok(()) => Ok(()),
            Err(payload) => {
                for i in self.queued.drain(start..) {
                    self.pool.release(i);
                }
                Err(panic_message(payload.as_ref()))
            }
        }
    }

    /// Applies the endpoint's faults to the replies it queued from `start` on: drops, corrupts,
    /// truncates and duplicates in place; delayed ones move to `delayed`.
    fn apply_reply_faults(&mut self, core: &EndpointCore, start: usize) {
        let Some(injector) = &core.faults else {
            return;
        };
        let pool = &mut self.pool;
        let scratch = &mut self.fault_scratch;
        scratch.clear();
        let mut dropped = 0;
        for &i in &self.queued[start..] {
            let slot = pool.slot(i);
            let plan = injector.apply(slot.to, &mut slot.buf);
            if plan.drop {
                dropped += 1;
                pool.release(i);
                continue;
            }
            if plan.is_delayed() {
                let now = Instant::now();
                let slot = pool.slot(i);
                let copies = if plan.duplicate { 2 } else { 1 };
                for d in plan.delay.iter().take(copies).flatten() {
                    self.delayed.push(
                        deadline_after(now, *d),
                        core.id,
                        core.local_addr,
                        slot.to,
                        slot.buf.clone(),
                    );
                }
                pool.release(i);
                continue;
            }
            scratch.push(i);
            if plan.duplicate {
                let j = pool.take();
                let src = std::mem::take(&mut pool.slot(i).buf);
                let (to, ep) = (pool.slot(i).to, pool.slot(i).ep);
                let dst = pool.slot(j);
                dst.buf.clear();
                dst.buf.extend_from_slice(&src);
                dst.to = to;
                dst.ep = ep;
                pool.slot(i).buf = src;
                scratch.push(j);
            }
        }
        self.queued.truncate(start);
        self.queued.extend_from_slice(scratch);
        bump(&core.stats.dropped_by_faults, dropped);
    }

    /// Queues the delayed datagrams due at `now` for sending; `ep_of` gives the worker-local
    /// index of an endpoint id (`None`: it is gone, the datagram is dropped).
    pub(crate) fn queue_due_delayed(&mut self, mut ep_of: impl FnMut(u64) -> Option<u32>) {
        if self.delayed.next_deadline().is_none() {
            return;
        }
        let now = Instant::now();
        while let Some(d) = self.delayed.pop_due(now) {
            let Some(ep) = ep_of(d.id) else {
                continue;
            };
            let i = self.pool.take();
            let slot = self.pool.slot(i);
            slot.buf.clear();
            slot.buf.extend_from_slice(&d.data);
            slot.to = d.to;
            slot.ep = ep;
            self.queued.push(i);
        }
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "handler panicked with a non-string payload".to_string()
    }
}

/// Reuses one allocation for the per-endpoint `Datagram` slices of every batch, whatever the
/// borrow's lifetime (the vector is always empty between uses).
#[derive(Default)]
pub(crate) struct BatchScratch {
    v: Vec<Datagram<'static>>,
}

impl BatchScratch {
    /// The empty vector, for one batch.
    pub(crate) fn take<'a>(&mut self) -> Vec<Datagram<'a>> {
        let mut v: Vec<Datagram<'a>> = std::mem::take(&mut self.v);
        v.clear();
        v
    }

    /// Gives the vector back after the batch (its borrows end here).
    pub(crate) fn put_back(&mut self, mut v: Vec<Datagram<'_>>) {
        v.clear();
        // In-place collect keeps the allocation: the vector is empty, nothing is mapped.
        self.v = v
            .into_iter()
            .map(|d| Datagram {
                from: d.from,
                payload: &[],
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn large_buffers(pool: &mut SlotPool, n: usize) -> usize {
        (0..n as u32)
            .filter(|&i| pool.slot(i).buf.capacity() > LARGE_CAPACITY)
            .count()
    }

    #[test]
    fn a_pool_keeps_a_bounded_number_of_large_buffers() {
        let n = MAX_LARGE_SLOTS * 3;
        let mut pool = SlotPool::new(1);
        let taken: Vec<u32> = (0..n).map(|_| pool.take()).collect();
        for &i in &taken {
            pool.slot(i).buf.resize(60_000, 7);
        }
        assert_eq!(large_buffers(&mut pool, n), n);
        for &i in &taken {
            pool.release(i);
        }
        assert_eq!(pool.large_slots(), MAX_LARGE_SLOTS);
        assert_eq!(large_buffers(&mut pool, n), MAX_LARGE_SLOTS);

        // Taken again: a kept buffer serves the next large reply as it is; a slot whose
        // buffer shrank for a small reply leaves room for another large one.
        let taken: Vec<u32> = (0..n).map(|_| pool.take()).collect();
        assert_eq!(pool.slots.len(), n, "released slots are reused");
        let kept = *taken
            .iter()
            .find(|&&i| pool.slot(i).large)
            .expect("a slot keeps a large buffer");
        let capacity = pool.slot(kept).buf.capacity();
        pool.slot(kept).buf.resize(60_000, 8);
        assert_eq!(pool.slot(kept).buf.capacity(), capacity);
        pool.slot(kept).buf = Vec::with_capacity(SLOT_INITIAL_CAPACITY);
        pool.release(kept);
        assert_eq!(pool.large_slots(), MAX_LARGE_SLOTS - 1);
        let shrunk = *taken
            .iter()
            .find(|&&i| pool.slot(i).buf.capacity() <= LARGE_CAPACITY && i != kept)
            .expect("a slot gave its buffer back");
        pool.slot(shrunk).buf.resize(60_000, 9);
        pool.release(shrunk);
        assert_eq!(pool.large_slots(), MAX_LARGE_SLOTS);
        assert_eq!(large_buffers(&mut pool, n), MAX_LARGE_SLOTS);
    }
}
