//! Thread-per-core runtime shared by every endpoint of the process: worker threads (pinned, one
//! per allowed CPU by default), their command queues and wake-ups, the process-wide registry that
//! hands out one runtime per backend configuration, and the pieces every backend's worker loop
//! shares (send slots, handler dispatch with panic isolation, fault application, delays).

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::transport::channel::Network;
use crate::transport::faults::FaultInjector;
use crate::transport::{Datagram, DatagramHandler, EndpointStats, ReplySink};

/// How long `close()` waits for the workers' acknowledgements before giving up loudly.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long starting a runtime may take before it is considered failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Which event loop the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Backend {
    Uring,
    Epoll,
    Channel,
}

impl Backend {
    fn short(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
            Backend::Channel => "chan",
        }
    }
}

/// Everything that distinguishes one runtime from another; equal configurations share workers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RuntimeConfig {
    pub backend: Backend,
    pub workers: usize,
    pub ring_entries: u32,
    pub recv_buffers: u32,
    pub recv_buffer_len: usize,
    pub send_slots: usize,
}

// ---------------------------------------------------------------------------------------------
// Registry and runtime lifecycle
// ---------------------------------------------------------------------------------------------

/// Weak references so that the workers stop when the last endpoint using them is gone.
static REGISTRY: Mutex<Vec<(RuntimeConfig, Weak<Runtime>)>> = Mutex::new(Vec::new());
static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_ENDPOINT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Id of the runtime whose worker this thread is (0: none), so `close()` never waits on itself.
    static CURRENT_RUNTIME: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub(crate) fn next_endpoint_id() -> u64 {
    NEXT_ENDPOINT_ID.fetch_add(1, Ordering::Relaxed)
}

/// A set of worker threads running one backend.
pub(crate) struct Runtime {
    id: u64,
    config: RuntimeConfig,
    workers: Arc<[Arc<WorkerShared>]>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Round-robin placement of single-worker (channel) endpoints.
    next_worker: AtomicUsize,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("id", &self.id)
            .field("config", &self.config)
            .finish()
    }
}

/// Returns the running runtime for `config`, starting it if none is alive.
pub(crate) fn get_runtime(config: &RuntimeConfig) -> Result<Arc<Runtime>, String> {
    let mut registry = REGISTRY.lock();
    registry.retain(|(_, weak)| weak.strong_count() > 0);
    if let Some(runtime) = registry
        .iter()
        .filter(|(c, _)| c == config)
        .find_map(|(_, weak)| weak.upgrade())
    {
        return Ok(runtime);
    }
    let runtime = Runtime::start(config.clone())?;
    registry.push((config.clone(), Arc::downgrade(&runtime)));
    Ok(runtime)
}

/// Whether a runtime for `config` is alive (tests check that workers go away).
#[cfg(test)]
pub(crate) fn runtime_alive(config: &RuntimeConfig) -> bool {
    REGISTRY
        .lock()
        .iter()
        .any(|(c, weak)| c == config && weak.strong_count() > 0)
}

/// What a worker thread gets.
pub(crate) struct WorkerCtx {
    pub index: usize,
    pub config: RuntimeConfig,
    pub me: Arc<WorkerShared>,
    pub all: Arc<[Arc<WorkerShared>]>,
}

/// How a worker reports that its setup succeeded (or why not).
pub(crate) type Ready = Box<dyn FnOnce(Result<(), String>) + Send>;

impl Runtime {
    fn start(config: RuntimeConfig) -> Result<Arc<Runtime>, String> {
        let n = config.workers.max(1);
        let mut shared = Vec::with_capacity(n);
        for _ in 0..n {
            shared.push(Arc::new(
                WorkerShared::new().map_err(|e| format!("eventfd: {e}"))?,
            ));
        }
        let all: Arc<[Arc<WorkerShared>]> = shared.into();
        let id = NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed);
        let cpus = allowed_cpus();
        let (tx, rx) = mpsc::channel::<(usize, Result<(), String>)>();
        let mut threads = Vec::with_capacity(n);
        let mut spawn_error = None;
        for index in 0..n {
            let ctx = WorkerCtx {
                index,
                config: config.clone(),
                me: all[index].clone(),
                all: all.clone(),
            };
            let cpu = if cpus.is_empty() {
                None
            } else {
                Some(cpus[index % cpus.len()])
            };
            let tx = tx.clone();
            let backend = config.backend;
            let spawned = std::thread::Builder::new()
                .name(format!("cc-{}-{index}", backend.short()))
                .spawn(move || {
                    CURRENT_RUNTIME.with(|c| c.set(id));
                    if let Some(cpu) = cpu {
                        pin_current_thread(cpu);
                    }
                    let ready: Ready = Box::new(move |r| {
                        let _ = tx.send((index, r));
                    });
                    match backend {
                        Backend::Uring => crate::transport::uring::run_worker(ctx, ready),
                        Backend::Epoll => crate::transport::epoll::run_worker(ctx, ready),
                        Backend::Channel => crate::transport::channel::run_worker(ctx, ready),
                    }
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    spawn_error = Some(format!("spawning worker thread: {e}"));
                    break;
                }
            }
        }
        drop(tx);
        let runtime = Arc::new(Runtime {
            id,
            config,
            workers: all,
            threads: Mutex::new(threads),
            next_worker: AtomicUsize::new(0),
        });
        if let Some(e) = spawn_error {
            return Err(e);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((_, Ok(()))) => {}
                Ok((index, Err(e))) => return Err(format!("worker {index}: {e}")),
                Err(_) => return Err("worker setup timed out".to_string()),
            }
        }
        Ok(runtime)
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    pub fn worker(&self, index: usize) -> &Arc<WorkerShared> {
        &self.workers[index % self.workers.len()]
    }

    /// Index of the worker a single-worker endpoint should live on.
    pub fn pick_worker(&self) -> usize {
        self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len()
    }

    /// True on one of this runtime's worker threads (which must never block on a latch).
    pub fn on_worker_thread(&self) -> bool {
        CURRENT_RUNTIME.with(|c| c.get()) == self.id
    }

    /// Asks `workers` (all when `None`) to close endpoint `id` and waits for their
    /// acknowledgements, unless called from one of our own workers.
    pub fn close_endpoint(&self, id: u64, only: Option<usize>) {
        let targets: Vec<usize> = match only {
            Some(i) => vec![i % self.workers.len()],
            None => (0..self.workers.len()).collect(),
        };
        let latch = Arc::new(Latch::new(targets.len()));
        for &i in &targets {
            self.workers[i].push(Command::Close {
                id,
                ack: Some(latch.clone()),
            });
        }
        if self.on_worker_thread() {
            return;
        }
        if !latch.wait(CLOSE_TIMEOUT) {
            tracing::error!(
                endpoint = id,
                "workers did not acknowledge the close within {CLOSE_TIMEOUT:?}"
            );
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for w in self.workers.iter() {
            w.push(Command::Shutdown);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        if self.on_worker_thread() {
            // Dropped from inside a handler of this runtime: the threads exit on their own.
            return;
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Worker command queue and wake-ups
// ---------------------------------------------------------------------------------------------

/// Commands a worker executes between batches.
pub(crate) enum Command {
    /// Serve this endpoint; UDP backends get this worker's socket.
    Open {
        core: Arc<EndpointCore>,
        socket: Option<OwnedFd>,
    },
    /// Stop serving endpoint `id`, close its socket, then acknowledge.
    Close { id: u64, ack: Option<Arc<Latch>> },
    /// A delayed (fault-injected) `send_to`, sent by the worker when due.
    SendLater(Delayed),
    /// Exit the loop (the runtime is being dropped).
    Shutdown,
}

/// A datagram travelling through the in-memory network to a channel worker.
pub(crate) struct Incoming {
    pub id: u64,
    pub from: SocketAddr,
    pub data: Vec<u8>,
    pub at: Option<Instant>,
}

/// The part of a worker other threads talk to.
pub(crate) struct WorkerShared {
    commands: Mutex<Vec<Command>>,
    inbox: Mutex<Vec<Incoming>>,
    waker: EventFd,
    /// Set when the eventfd has been written and not yet consumed: one write per wake-up.
    notified: AtomicBool,
}

impl WorkerShared {
    fn new() -> io::Result<WorkerShared> {
        Ok(WorkerShared {
            commands: Mutex::new(Vec::new()),
            inbox: Mutex::new(Vec::new()),
            waker: EventFd::new()?,
            notified: AtomicBool::new(false),
        })
    }

    pub fn push(&self, command: Command) {
        self.commands.lock().push(command);
        self.wake();
    }

    pub fn deliver(&self, incoming: Incoming) {
        self.inbox.lock().push(incoming);
        self.wake();
    }

    fn wake(&self) {
        if !self.notified.swap(true, Ordering::SeqCst) {
            self.waker.write();
        }
    }

    /// The eventfd the worker waits on.
    pub fn eventfd(&self) -> RawFd {
        self.waker.0.as_raw_fd()
    }

    /// Re-enables wake-ups; call after consuming the eventfd and before taking work.
    pub fn rearm_wake(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }

    /// Consumes the eventfd counter (only call when it is readable: the fd blocks).
    pub fn consume_eventfd(&self) {
        self.waker.read();
    }

    pub fn take_commands(&self, out: &mut Vec<Command>) {
        out.append(&mut self.commands.lock());
    }

    pub fn take_inbox(&self, out: &mut Vec<Incoming>) {
        out.append(&mut self.inbox.lock());
    }
}

/// A blocking eventfd (io_uring reads it asynchronously; epoll/poll read it when readable).
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn write(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. A full counter (impossible in practice) only
        // means the worker is already awake.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn read(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64.
        unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Counts down worker acknowledgements of a close.
pub(crate) struct Latch {
    left: Mutex<usize>,
    cv: Condvar,
}

impl Latch {
    fn new(n: usize) -> Latch {
        Latch {
            left: Mutex::new(n),
            cv: Condvar::new(),
        }
    }

    pub fn ack(&self) {
        let mut left = self.left.lock();
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.cv.notify_all();
        }
    }

    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut left = self.left.lock();
        while *left > 0 {
            if self.cv.wait_until(&mut left, deadline).timed_out() {
                return *left == 0;
            }
        }
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoint state shared by the handle and the workers
// ---------------------------------------------------------------------------------------------

/// Per-endpoint counters, updated by workers once per batch.
#[derive(Debug, Default)]
pub(crate) struct AtomicStats {
    pub datagrams_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub datagrams_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub recv_errors: AtomicU64,
    pub dropped_by_faults: AtomicU64,
    pub recv_rearms: AtomicU64,
}

/// Adds `n` to a counter (relaxed: the counters are statistics, not synchronisation).
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl AtomicStats {
    pub fn snapshot(&self) -> EndpointStats {
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
        }
    }
}

/// One endpoint as the workers see it.
pub(crate) struct EndpointCore {
    pub id: u64,
    pub local_addr: SocketAddr,
    pub handler: Arc<dyn DatagramHandler>,
    pub stats: AtomicStats,
    /// Set by `close()` or after a handler panic: no more deliveries, `send_to` fails.
    pub closed: AtomicBool,
    pub faults: Option<FaultInjector>,
    /// The in-memory network of a channel endpoint (to free its address after a panic).
    pub network: Option<Arc<Network>>,
    /// Channel endpoints: datagrams queued for this endpoint, bounded like the reference's mpsc.
    pub backlog: AtomicUsize,
    /// UDP endpoints: a duplicate of one worker socket for `send_to` from any thread. Held here
    /// so that a handler panic can close it too and free the port.
    pub send_fd: parking_lot::RwLock<Option<OwnedFd>>,
}

impl EndpointCore {
    pub fn new(
        local_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
        faults: Option<FaultInjector>,
        network: Option<Arc<Network>>,
    ) -> EndpointCore {
        EndpointCore {
            id: next_endpoint_id(),
            local_addr,
            handler,
            stats: AtomicStats::default(),
            closed: AtomicBool::new(false),
            faults,
            network,
            backlog: AtomicUsize::new(0),
            send_fd: parking_lot::RwLock::new(None),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

// ---------------------------------------------------------------------------------------------
// Send slots and the ReplySink
// ---------------------------------------------------------------------------------------------

/// One pre-allocated outgoing datagram with the kernel structures that describe it. Boxed, so
/// the pointers in `hdr` stay valid while an io_uring send is in flight.
pub(crate) struct SendSlot {
    pub buf: Vec<u8>,
    pub to: SocketAddr,
    /// Worker-local index of the endpoint that queued it.
    pub ep: u32,
    pub addr: libc::sockaddr_storage,
    pub iov: libc::iovec,
    pub hdr: libc::msghdr,
}

/// Capacity each slot's buffer starts with: a typical gossip reply fits without growing.
const SLOT_INITIAL_CAPACITY: usize = 2048;

impl SendSlot {
    fn new() -> Box<SendSlot> {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let (addr, iov, hdr) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed(), std::mem::zeroed()) };
        Box::new(SendSlot {
            buf: Vec::with_capacity(SLOT_INITIAL_CAPACITY),
            to: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            ep: 0,
            addr,
            iov,
            hdr,
        })
    }

    /// Points `hdr` at this slot's buffer and destination. `v6_socket` maps IPv4 destinations
    /// for a dual-stack IPv6 socket.
    pub fn prepare(&mut self, v6_socket: bool) {
        let len = sockaddr_to_raw(self.to, v6_socket, &mut self.addr);
        self.iov.iov_base = self.buf.as_mut_ptr().cast();
        self.iov.iov_len = self.buf.len();
        self.hdr.msg_name = (&mut self.addr as *mut libc::sockaddr_storage).cast();
        self.hdr.msg_namelen = len;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = std::ptr::null_mut();
        self.hdr.msg_controllen = 0;
        self.hdr.msg_flags = 0;
    }
}

/// The worker's send slots; grows when a batch needs more and keeps what it grew.
pub(crate) struct SlotPool {
    // Boxed on purpose: in-flight io_uring sends point into slots, which must not move when the
    // vector grows.
    #[allow(clippy::vec_box)]
    pub slots: Vec<Box<SendSlot>>,
    pub free: Vec<u32>,
}

impl SlotPool {
    pub fn new(n: usize) -> SlotPool {
        let n = n.max(1);
        SlotPool {
            slots: (0..n).map(|_| SendSlot::new()).collect(),
            free: (0..n as u32).rev().collect(),
        }
    }

    pub fn take(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(SendSlot::new());
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub fn release(&mut self, i: u32) {
        self.free.push(i);
    }

    pub fn slot(&mut self, i: u32) -> &mut SendSlot {
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

/// Calls the handler with one endpoint's batch, isolating panics. Replies are appended to
/// `queued`; on a panic they are discarded and the panic message returned.
pub(crate) fn call_handler(
    core: &EndpointCore,
    ep: u32,
    batch: &[Datagram<'_>],
    pool: &mut SlotPool,
    queued: &mut Vec<u32>,
) -> Result<(), String> {
    let bytes: usize = batch.iter().map(|d| d.payload.len()).sum();
    bump(&core.stats.datagrams_received, batch.len() as u64);
    bump(&core.stats.bytes_received, bytes as u64);
    let start = queued.len();
    let mut sink = Sink {
        pool,
        queued,
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
            for i in queued.drain(start..) {
                pool.release(i);
            }
            Err(panic_message(payload.as_ref()))
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "handler panicked with a non-string payload".to_string()
    }
}

/// After a handler panic: marks the endpoint closed, tells the handler, and asks the other
/// workers to close their sockets too. The calling worker closes its own socket itself.
pub(crate) fn endpoint_panicked(ctx: &WorkerCtx, core: &Arc<EndpointCore>, message: String) {
    core.closed.store(true, Ordering::Release);
    *core.send_fd.write() = None;
    tracing::error!(addr = %core.local_addr, "datagram handler panicked, endpoint closed: {message}");
    let handler = core.handler.clone();
    if catch_unwind(AssertUnwindSafe(|| handler.on_panic(message))).is_err() {
        tracing::error!(addr = %core.local_addr, "on_panic panicked too");
    }
    for (i, w) in ctx.all.iter().enumerate() {
        if i != ctx.index {
            w.push(Command::Close {
                id: core.id,
                ack: None,
            });
        }
    }
}

/// Hands one endpoint's batch to its handler (panics isolated) and applies the endpoint's
/// faults to the replies it queued: what both UDP backends do for every wake-up.
pub(crate) fn deliver_batch(
    core: &EndpointCore,
    ep: u32,
    batch: &[Datagram<'_>],
    pool: &mut SlotPool,
    queued: &mut Vec<u32>,
    fault_scratch: &mut Vec<u32>,
    delayed: &mut DelayQueue,
) -> Result<(), String> {
    if batch.is_empty() {
        return Ok(());
    }
    let start = queued.len();
    call_handler(core, ep, batch, pool, queued)?;
    apply_reply_faults(core, pool, queued, start, fault_scratch, delayed);
    Ok(())
}

/// Applies the endpoint's faults to the replies it queued from `start` on: drops, corrupts,
/// truncates and duplicates in place; delayed ones move to `delayed`.
pub(crate) fn apply_reply_faults(
    core: &EndpointCore,
    pool: &mut SlotPool,
    queued: &mut Vec<u32>,
    start: usize,
    scratch: &mut Vec<u32>,
    delayed: &mut DelayQueue,
) {
    let Some(injector) = &core.faults else {
        return;
    };
    scratch.clear();
    let mut dropped = 0;
    for &i in &queued[start..] {
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
                delayed.push(
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
    queued.truncate(start);
    queued.extend_from_slice(scratch);
    bump(&core.stats.dropped_by_faults, dropped);
}

/// Reuses one allocation for the per-endpoint `Datagram` slices of every batch, whatever the
/// borrow's lifetime (the vector is always empty between uses).
#[derive(Default)]
pub(crate) struct BatchScratch {
    v: Vec<Datagram<'static>>,
}

impl BatchScratch {
    pub fn take<'a>(&mut self) -> Vec<Datagram<'a>> {
        let mut v: Vec<Datagram<'a>> = std::mem::take(&mut self.v);
        v.clear();
        v
    }

    pub fn put_back(&mut self, mut v: Vec<Datagram<'_>>) {
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

// ---------------------------------------------------------------------------------------------
// Delayed datagrams (fault injection)
// ---------------------------------------------------------------------------------------------

pub(crate) struct Delayed {
    pub at: Instant,
    seq: u64,
    pub id: u64,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

impl Delayed {
    pub fn new(at: Instant, id: u64, from: SocketAddr, to: SocketAddr, data: Vec<u8>) -> Delayed {
        Delayed {
            at,
            seq: 0,
            id,
            from,
            to,
            data,
        }
    }
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    /// Reversed so that `BinaryHeap` pops the earliest first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Datagrams held back by the delay fault, earliest first.
#[derive(Default)]
pub(crate) struct DelayQueue {
    heap: BinaryHeap<Delayed>,
    seq: u64,
}

impl DelayQueue {
    pub fn push(&mut self, at: Instant, id: u64, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        self.push_delayed(Delayed::new(at, id, from, to, data));
    }

    pub fn push_delayed(&mut self, mut d: Delayed) {
        self.seq += 1;
        d.seq = self.seq;
        self.heap.push(d);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|d| d.at)
    }

    pub fn pop_due(&mut self, now: Instant) -> Option<Delayed> {
        if self.heap.peek().is_some_and(|d| d.at <= now) {
            self.heap.pop()
        } else {
            None
        }
    }
}

/// `now + d`, saturating at a year for absurd configured delays (`Instant + Duration` panics on
/// overflow).
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Instant {
    let year = Duration::from_secs(365 * 86_400);
    now.checked_add(d.min(year)).unwrap_or(now)
}

/// Time to wait before the next delayed datagram is due (`None`: nothing pending).
pub(crate) fn until(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

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
pub(crate) fn sockaddr_to_raw(
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
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
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
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in6.
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

/// Whether `ip` needs an IPv6 socket.
pub(crate) fn is_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(_))
}

// ---------------------------------------------------------------------------------------------
// CPUs, pinning, rate-limited logs
// ---------------------------------------------------------------------------------------------

/// CPUs in the process's affinity mask (the main thread's: workers are pinned, so asking the
/// current thread from inside a worker would see one CPU only).
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(
            libc::getpid(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        ) != 0
        {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Default worker count: one per CPU the process may use.
pub(crate) fn default_workers() -> usize {
    allowed_cpus().len().max(1)
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; pid 0 = the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::debug!(cpu, "pinning worker failed: {}", io::Error::last_os_error());
    }
}

/// At most one log line per second per limiter; the rest are counted and summarised.
#[derive(Default)]
pub(crate) struct LogLimiter {
    next: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(n)` if a line may be logged now (`n` lines were suppressed since the last one).
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_none_or(|n| now >= n) {
            self.next = Some(now + Duration::from_secs(1));
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Logs a transient send/receive error, rate-limited: common ones at debug, others at warn.
pub(crate) fn log_io_error(limiter: &mut LogLimiter, what: &str, addr: SocketAddr, errno: i32) {
    if let Some(suppressed) = limiter.allow() {
        let err = io::Error::from_raw_os_error(errno);
        match errno {
            libc::ECONNREFUSED
            | libc::EAGAIN
            | libc::ENOBUFS
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ECANCELED => {
                tracing::debug!(%addr, suppressed, "{what}: {err}")
            }
            _ => tracing::warn!(%addr, suppressed, "{what}: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        for addr in [
            "127.0.0.1:4242".parse::<SocketAddr>().unwrap(),
            "[::1]:9".parse().unwrap(),
        ] {
            let len = sockaddr_to_raw(addr, false, &mut storage) as usize;
            let raw = unsafe {
                std::slice::from_raw_parts((&storage as *const libc::sockaddr_storage).cast(), len)
            };
            assert_eq!(sockaddr_from_raw(raw), Some(addr));
        }
        let len = sockaddr_to_raw("10.0.0.1:7".parse().unwrap(), true, &mut storage) as usize;
        let raw = unsafe {
            std::slice::from_raw_parts((&storage as *const libc::sockaddr_storage).cast(), len)
        };
        assert_eq!(
            sockaddr_from_raw(raw),
            Some("[::ffff:10.0.0.1]:7".parse().unwrap())
        );
        assert_eq!(sockaddr_from_raw(&[1]), None);
        assert_eq!(sockaddr_from_raw(&[0xff, 0xff, 0, 0]), None);
    }

    #[test]
    fn delay_queue_orders_by_deadline() {
        let mut q = DelayQueue::default();
        let now = Instant::now();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        q.push(now + Duration::from_millis(5), 1, a, a, vec![2]);
        q.push(now + Duration::from_millis(1), 1, a, a, vec![1]);
        assert_eq!(q.next_deadline(), Some(now + Duration::from_millis(1)));
        assert!(q.pop_due(now).is_none());
        let later = now + Duration::from_millis(10);
        assert_eq!(q.pop_due(later).unwrap().data, vec![1]);
        assert_eq!(q.pop_due(later).unwrap().data, vec![2]);
    }

    #[test]
    fn absurd_delay_does_not_overflow() {
        let now = Instant::now();
        assert!(deadline_after(now, Duration::MAX) > now);
    }

    #[test]
    fn allowed_cpus_not_empty() {
        assert!(!allowed_cpus().is_empty());
        assert!(default_workers() >= 1);
    }
}
