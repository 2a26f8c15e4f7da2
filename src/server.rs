//! The running node: `spawn_chitchat`, `ChitchatHandle`, the gossip `Server` loop and the
//! datagram handler that the I/O workers call.
//!
//! Datagrams are handled on the transport's worker threads (one lock of the state per batch);
//! the gossip interval, commands and DNS refresh run on the shared control runtime, a task per
//! node.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::ChitchatConfig;
use crate::control::ControlThread;
use crate::dns::{self, DNS_POLLING_DURATION, Seeds};
pub use crate::metrics::ServerStats;
use crate::metrics::{self as node_metrics, MALFORMED_OTHER, MetricsSnapshot, Sources};
use crate::protocol::amplification::AmplificationLimits;
use crate::protocol::{Chitchat, Limits, ProtocolStats, decode_received_with};
use crate::transport::{
    Datagram, DatagramHandler, Endpoint, EndpointStats, ReplySink, Transport, TransportKind,
};
use crate::types::ChitchatId;

pub use crate::protocol::GOSSIP_COUNT;
pub use crate::protocol::peer_selection::{
    select_dead_node_to_gossip_with, select_seed_node_to_gossip_with,
};

/// Longest a received message may take from receipt to reply; past it, the reply is abandoned.
pub const MESSAGE_HANDLING_BOUND: Duration = Duration::from_secs(2);

/// The shared cluster state of a node. Lock it for short protocol work only: the I/O workers
/// and the gossip loop need it too.
#[derive(Clone)]
pub struct ChitchatRef {
    inner: Arc<Mutex<Chitchat>>,
}

impl ChitchatRef {
    /// Shares `chitchat` between the I/O workers, the gossip loop and the application.
    pub fn new(chitchat: Chitchat) -> Self {
        ChitchatRef {
            inner: Arc::new(Mutex::new(chitchat)),
        }
    }

    /// Locks the state (a `parking_lot` mutex: no poisoning, never held across I/O).
    pub fn lock(&self) -> MutexGuard<'_, Chitchat> {
        self.inner.lock()
    }
}

impl ChitchatRef {
    /// A reference that does not keep the state alive (chitchat users hold
    /// `Weak<Mutex<Chitchat>>` in their background tasks; this is its counterpart).
    pub fn downgrade(&self) -> WeakChitchatRef {
        WeakChitchatRef {
            inner: Arc::downgrade(&self.inner),
        }
    }
}

/// A weak [`ChitchatRef`]: [`upgrade`](Self::upgrade) gives the state back while a strong
/// reference exists.
#[derive(Clone, Debug, Default)]
pub struct WeakChitchatRef {
    inner: std::sync::Weak<Mutex<Chitchat>>,
}

impl WeakChitchatRef {
    /// The strong reference, if the state is still alive.
    pub fn upgrade(&self) -> Option<ChitchatRef> {
        self.inner.upgrade().map(|inner| ChitchatRef { inner })
    }
}

/// What the handle asks of the server loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Send a Syn to this address now.
    Gossip(SocketAddr),
    /// Stop gossiping, close the sockets, end.
    Shutdown,
}

/// Counters of one node's server.
#[derive(Debug, Default)]
struct Counters {
    datagrams_handled: AtomicU64,
    malformed: AtomicU64,
    abandoned: AtomicU64,
    replies: AtomicU64,
    syns_sent: AtomicU64,
    gossip_send_errors: AtomicU64,
    gossip_rounds: AtomicU64,
    last_malformed_log_ms: AtomicU64,
    /// `abort()` was called: the stop is reported as an error, as chitchat does.
    aborted: std::sync::atomic::AtomicBool,
    /// Malformed datagrams by `metrics::MALFORMED_KINDS` index (error path only).
    malformed_by_kind: [AtomicU64; MALFORMED_OTHER + 1],
}

impl Counters {
    fn snapshot(&self) -> ServerStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ServerStats {
            datagrams_handled: get(&self.datagrams_handled),
            malformed: get(&self.malformed),
            abandoned: get(&self.abandoned),
            replies: get(&self.replies),
            syns_sent: get(&self.syns_sent),
            gossip_send_errors: get(&self.gossip_send_errors),
            gossip_rounds: get(&self.gossip_rounds),
        }
    }

    fn malformed_by_kind(&self) -> Vec<u64> {
        self.malformed_by_kind
            .iter()
            .map(|counter| counter.load(Ordering::Relaxed))
            .collect()
    }
}

/// Figures of a node, gathered from its counters, state and endpoint.
fn gather_metrics(
    chitchat: &ChitchatRef,
    counters: &Counters,
    endpoint: &dyn Endpoint,
) -> MetricsSnapshot {
    let state = state_figures(&chitchat.lock());
    metrics_from(state, counters, endpoint)
}

/// What the metrics take from the locked state: the protocol's counters and the live, dead and
/// known node counts.
type StateFigures = (ProtocolStats, (u64, u64, u64));

/// Reads the [`StateFigures`] of the locked state.
fn state_figures(chitchat: &Chitchat) -> StateFigures {
    let nodes = (
        chitchat.live_nodes().count() as u64,
        chitchat.dead_nodes().count() as u64,
        chitchat.node_states().len() as u64,
    );
    (chitchat.stats().clone(), nodes)
}

/// The snapshot of a node from its state's figures, counters and endpoint.
fn metrics_from(
    state: StateFigures,
    counters: &Counters,
    endpoint: &dyn Endpoint,
) -> MetricsSnapshot {
    let (protocol, nodes) = state;
    let server = counters.snapshot();
    let malformed = counters.malformed_by_kind();
    let endpoint_stats = endpoint.stats();
    let sources = Sources {
        server: &server,
        malformed: &malformed,
        protocol: &protocol,
        endpoint: &endpoint_stats,
    };
    MetricsSnapshot::gather(&sources, nodes, &endpoint.kind())
}

/// The protocol side of the node's endpoint, called on the I/O worker threads.
struct NodeHandler {
    /// Strong, but only as long as the endpoint, which the server task closes when it ends.
    chitchat: ChitchatRef,
    /// The node's cluster (fixed for its life), for decoding outside the lock.
    cluster_id: String,
    counters: Arc<Counters>,
    panic_tx: watch::Sender<Option<String>>,
    started: Instant,
    /// The runtime of the application that called `spawn_chitchat`: entered around the
    /// protocol's work so listeners and catch-up callbacks can `tokio::spawn` (entering is a
    /// thread-local swap).
    runtime: Option<tokio::runtime::Handle>,
    /// `chitchat_message_handling_seconds`, obtained at spawn (a no-op without a recorder).
    handling_seconds: metrics::Histogram,
}

impl NodeHandler {
    /// Logs malformed datagrams at most once a second per node; every one is counted.
    fn note_malformed(&self, from: SocketAddr, error: &crate::wire::DecodeError) {
        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        self.counters.malformed_by_kind[node_metrics::malformed_index(error.kind())]
            .fetch_add(1, Ordering::Relaxed);
        let now_ms = self.started.elapsed().as_millis() as u64;
        let last = self.counters.last_malformed_log_ms.load(Ordering::Relaxed);
        if (now_ms >= last + 1_000 || last == 0)
            && self
                .counters
                .last_malformed_log_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let total = self.counters.malformed.load(Ordering::Relaxed);
            warn!(%from, kind = error.kind(), %error, total, "dropping malformed datagram");
        }
    }
}

impl DatagramHandler for NodeHandler {
    fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink) {
        // The protocol compares the deadline with its own clock: the nodes the server runs are
        // on the system clock (`with_chitchat_id_and_seeds`), so that is this `Instant::now()`.
        let received_at = Instant::now();
        let deadline = received_at + MESSAGE_HANDLING_BOUND;
        let _runtime = self.runtime.as_ref().map(tokio::runtime::Handle::enter);
        for (i, datagram) in batch.iter().enumerate() {
            if Instant::now() >= deadline {
                let stale = (batch.len() - i) as u64;
                self.counters.abandoned.fetch_add(stale, Ordering::Relaxed);
                warn!(
                    stale,
                    "message handling exceeded {MESSAGE_HANDLING_BOUND:?}: abandoning"
                );
                break;
            }
            // Two short lock holds per datagram, the decoding between them outside the lock:
            // the control thread's gossip round and failure detector, and the application,
            // wait at most one datagram's matching and reply, never a batch or a decode.
            let admitted = {
                let mut chitchat = self.chitchat.lock();
                chitchat
                    .admit_datagram(datagram.from, datagram.payload.len())
                    .map(|admission| (admission, chitchat.digest_hint_for(datagram.payload)))
            };
            let Some((admission, hint)) = admitted else {
                // Handled: dropped undecoded (counted as `non_member_flood`).
                self.counters
                    .datagrams_handled
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let reply = replies.buffer();
            let handled = decode_received_with(
                hint.as_ref(),
                &self.cluster_id,
                datagram.payload,
                |received| {
                    let mut chitchat = self.chitchat.lock();
                    let outcome = chitchat.handle_received(
                        datagram.from,
                        admission,
                        received,
                        reply,
                        Some(deadline),
                    );
                    // Fair: a waiter gets the lock before this worker's next datagram.
                    MutexGuard::unlock_fair(chitchat);
                    outcome
                },
            );
            match handled {
                Ok(outcome) => {
                    self.counters
                        .datagrams_handled
                        .fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    self.handling_seconds
                        .record(now.duration_since(received_at).as_secs_f64());
                    if !outcome.replied {
                        continue;
                    }
                    if now >= deadline {
                        self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
                        warn!(from = %datagram.from,
                              "message handling exceeded {MESSAGE_HANDLING_BOUND:?}: reply abandoned");
                        continue;
                    }
                    replies.send(datagram.from);
                    self.counters.replies.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => self.note_malformed(datagram.from, &error),
            }
        }
    }

    fn on_panic(&self, message: String) {
        error!(%message, "chitchat server panicked while handling a datagram");
        self.panic_tx.send_replace(Some(message));
    }
}

/// Tries of the lock between which a round only yields to the other tasks; after them it also
/// waits a millisecond between tries.
const LOCK_YIELDS: u32 = 16;

/// Locks a node's state from the control runtime without parking a runtime thread while an I/O
/// worker or the application holds it: between tries the task yields, so the other nodes'
/// rounds go on (a parked thread would hold up every task queued behind it).
async fn lock_yielding(chitchat: &ChitchatRef) -> MutexGuard<'_, Chitchat> {
    let mut tries = 0u32;
    loop {
        if let Some(guard) = chitchat.inner.try_lock() {
            return guard;
        }
        tries = tries.saturating_add(1);
        if tries < LOCK_YIELDS {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The gossip loop of one node: rounds every `gossip_interval`, commands from the handle.
struct Server {
    /// Closed when the handle is dropped: the loop ends then, as chitchat's does.
    command_rx: mpsc::UnboundedReceiver<Command>,
    /// Strong, but only until the loop ends (the handle's lifetime at most).
    chitchat: ChitchatRef,
    endpoint: Arc<dyn Endpoint>,
    panic_rx: watch::Receiver<Option<String>>,
    counters: Arc<Counters>,
    /// The `node` label, or nothing.
    metrics_labels: Vec<metrics::Label>,
    /// `chitchat_gossip_round_seconds`, obtained at spawn.
    round_seconds: metrics::Histogram,
    /// When the node's figures were last handed to the metrics facade.
    metrics_published: Option<Instant>,
}

/// The node's figures go to the metrics facade at most this often (the first round's at once):
/// scrapers read them no faster, and gathering them every round (a pass over the node states
/// and some twenty label vectors) was 5 % of a 100-node process at 100 ms gossip.
const METRICS_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    /// The buffer Syns are encoded into, shared by the nodes whose rounds run on this thread
    /// (all of a process's, on the pinned gossip thread): taken and put back with no await in
    /// between. Kept per node it was one digest's worth each, 64 MiB for 1,000 nodes of a
    /// 1,000-node cluster.
    static SYN_SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Server {
    fn new(
        command_rx: mpsc::UnboundedReceiver<Command>,
        chitchat: ChitchatRef,
        endpoint: Arc<dyn Endpoint>,
        panic_rx: watch::Receiver<Option<String>>,
        counters: Arc<Counters>,
        metrics_labels: Vec<metrics::Label>,
    ) -> Self {
        let round_seconds =
            metrics::histogram!(node_metrics::GOSSIP_ROUND_SECONDS, metrics_labels.clone());
        Server {
            command_rx,
            chitchat,
            endpoint,
            panic_rx,
            counters,
            metrics_labels,
            round_seconds,
            metrics_published: None,
        }
    }

    /// Gossips every interval (the first round at once) until shutdown, the handle's drop, or a
    /// panic in the datagram handler.
    async fn run(&mut self) -> anyhow::Result<()> {
        let gossip_interval = lock_yielding(&self.chitchat).await.config().gossip_interval;
        let mut interval = tokio::time::interval(gossip_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => self.gossip_multiple().await,
                command = self.command_rx.recv() => match command {
                    Some(Command::Gossip(addr)) => {
                        if let Err(error) = self.gossip(addr).await {
                            warn!(%addr, %error, "failed to gossip");
                        }
                    }
                    Some(Command::Shutdown) | None => {
                        if self.counters.aborted.load(Ordering::Acquire) {
                            return Err(anyhow!("the chitchat server was aborted"));
                        }
                        break;
                    }
                },
                changed = self.panic_rx.changed() => {
                    let message = self.panic_rx.borrow().clone();
                    if changed.is_ok() && let Some(message) = message {
                        return Err(anyhow!("Chitchat server panicked: {message}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// One round (SPEC §4.2), the protocol core's: targets, heartbeat, tombstones and the Syn
    /// under the lock; the sends outside it; then liveness under the lock again.
    async fn gossip_multiple(&mut self) {
        let started = Instant::now();
        self.counters.gossip_rounds.fetch_add(1, Ordering::Relaxed);
        let mut syn: Vec<u8>;
        let targets = {
            let mut chitchat = lock_yielding(&self.chitchat).await;
            syn = SYN_SCRATCH.take();
            chitchat.begin_gossip_round(&mut syn)
        };
        for addr in targets.all() {
            if let Err(error) = self.send_syn(addr, &syn) {
                if Some(addr) == targets.dead_node {
                    debug!(%addr, %error, "failed to gossip with a dead node");
                } else {
                    warn!(%addr, %error, "failed to gossip");
                }
            }
        }
        SYN_SCRATCH.set(syn);
        let publish = self
            .metrics_published
            .is_none_or(|at| started.saturating_duration_since(at) >= METRICS_PUBLISH_INTERVAL);
        let state = {
            let mut chitchat = lock_yielding(&self.chitchat).await;
            chitchat.end_gossip_round();
            publish.then(|| state_figures(&chitchat))
        };
        self.round_seconds.record(started.elapsed().as_secs_f64());
        if let Some(state) = state {
            self.metrics_published = Some(started);
            metrics_from(state, &self.counters, self.endpoint.as_ref())
                .publish(&self.metrics_labels);
        }
    }

    /// Sends one Syn, built under the lock with a fresh digest.
    async fn gossip(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        let mut syn: Vec<u8>;
        {
            let mut chitchat = lock_yielding(&self.chitchat).await;
            syn = SYN_SCRATCH.take();
            let version = chitchat.config().protocol_version;
            chitchat.write_syn(version, &mut syn);
            chitchat.note_syn_sent(addr);
        }
        let sent = self.send_syn(addr, &syn);
        SYN_SCRATCH.set(syn);
        sent
    }

    /// Sends one encoded Syn.
    fn send_syn(&self, addr: SocketAddr, syn: &[u8]) -> std::io::Result<()> {
        match self.endpoint.send_to(addr, syn) {
            Ok(()) => {
                self.counters.syns_sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                self.counters
                    .gossip_send_errors
                    .fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }
}

/// Longest the server task waits for the I/O workers to release a node's sockets before it
/// reports the node stopped anyway, loudly (only reached if a worker is stuck).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes the node's sockets and waits, without blocking the control thread, until the I/O
/// workers released them: the port is free after. Many nodes stopping at once close together.
async fn close_endpoint(endpoint: Arc<dyn Endpoint>) {
    let local_addr = endpoint.local_addr();
    let closing = endpoint.close_nonblocking();
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        error!(%local_addr, "the I/O workers did not release the socket within {CLOSE_TIMEOUT:?}");
    }
    drop(endpoint);
}

/// How the server task ended: Ok, or the error message.
type Termination = Option<Result<(), String>>;

/// A running node.
///
/// Dropping it stops the node as chitchat 0.13 does (the gossip loop sees the command channel
/// close): the gossip loop and the DNS refresh end and the sockets close within a bounded time,
/// even while the application still holds [`ChitchatRef`]s. Those keep the stopped node's state
/// readable; the node's own tasks hold strong references only while the server runs, so once
/// the application's last one is dropped the state is freed and every [`WeakChitchatRef`]
/// fails to upgrade. `shutdown().await` is the stop that waits until the port is free.
pub struct ChitchatHandle {
    chitchat_id: ChitchatId,
    command_tx: mpsc::UnboundedSender<Command>,
    chitchat: ChitchatRef,
    termination_rx: watch::Receiver<Termination>,
    endpoint: Arc<dyn Endpoint>,
    counters: Arc<Counters>,
    _control: Arc<ControlThread>,
}

impl ChitchatHandle {
    /// The node's id.
    pub fn chitchat_id(&self) -> &ChitchatId {
        &self.chitchat_id
    }

    /// The node's shared state.
    pub fn chitchat(&self) -> ChitchatRef {
        self.chitchat.clone()
    }

    /// Runs `fun` with the state locked.
    pub async fn with_chitchat<F, T>(&self, mut fun: F) -> T
    where
        F: FnMut(&mut Chitchat) -> T,
    {
        let mut chitchat = self.chitchat.lock();
        fun(&mut chitchat)
    }

    /// Sends a Syn to `addr` now (errors only if the server is gone).
    pub fn gossip(&self, addr: SocketAddr) -> anyhow::Result<()> {
        self.command_tx
            .send(Command::Gossip(addr))
            .map_err(|_| anyhow!("the chitchat server has stopped"))
    }

    /// Asks the server to stop without waiting.
    pub fn initiate_shutdown(&self) -> anyhow::Result<()> {
        self.command_tx
            .send(Command::Shutdown)
            .map_err(|_| anyhow!("the chitchat server has stopped"))
    }

    /// Stops the server without waiting; as in chitchat, the termination watcher then reports
    /// the abort as an error (a graceful stop is `shutdown`/`initiate_shutdown`).
    pub fn abort(&self) {
        self.counters.aborted.store(true, Ordering::Release);
        let _ = self.command_tx.send(Command::Shutdown);
    }

    /// Stops the server and waits until its sockets are closed (the port is free when this
    /// returns); returns the error it ended with, if any.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.command_tx.send(Command::Shutdown);
        self.termination_watcher().await
    }

    /// Resolves when the server ends: `Ok`, its error, or "Chitchat server panicked".
    pub fn termination_watcher(&self) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let mut termination_rx = self.termination_rx.clone();
        async move {
            match termination_rx.wait_for(Option::is_some).await {
                Ok(termination) => match termination.as_ref() {
                    Some(Ok(())) => Ok(()),
                    Some(Err(message)) => Err(anyhow!("{message}")),
                    None => Err(anyhow!("Chitchat server panicked")),
                },
                Err(_) => Err(anyhow!("Chitchat server panicked")),
            }
        }
    }

    /// The address the node's sockets are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// The transport serving the node (io_uring, or epoll and why).
    pub fn transport_kind(&self) -> TransportKind {
        self.endpoint.kind()
    }

    /// The transport's counters (datagrams, bytes, drops).
    pub fn endpoint_stats(&self) -> EndpointStats {
        self.endpoint.stats()
    }

    /// The server's counters (handling, replies, gossip).
    pub fn server_stats(&self) -> ServerStats {
        self.counters.snapshot()
    }

    /// The node's metrics as a plain struct: the figures published to the `metrics` facade.
    pub fn metrics(&self) -> MetricsSnapshot {
        gather_metrics(&self.chitchat, &self.counters, self.endpoint.as_ref())
    }
}

/// Re-resolves hostname seeds on the control thread until the node stops (its termination is
/// published) or its state is gone, whichever comes first.
fn spawn_dns_refresh(
    control: &ControlThread,
    resolver: hickory_resolver::TokioResolver,
    seeds: Seeds,
    listen_addr: SocketAddr,
    seed_tx: watch::Sender<HashSet<SocketAddr>>,
    termination_rx: &watch::Receiver<Termination>,
) {
    let mut termination_rx = termination_rx.clone();
    let node_stopped = async move {
        // An error means the sender is gone: stopped as well.
        let _ = termination_rx.wait_for(Option::is_some).await;
    };
    control.handle().spawn(dns::dns_refresh_loop(
        resolver,
        seeds,
        listen_addr,
        seed_tx,
        DNS_POLLING_DURATION,
        node_stopped,
    ));
}

/// Validates the config, resolves the seeds, binds the transport and starts gossiping.
///
/// A bad config is an error naming the field; a bind failure names the address.
pub async fn spawn_chitchat(
    config: ChitchatConfig,
    initial_key_values: Vec<(String, String)>,
    transport: &dyn Transport,
) -> anyhow::Result<ChitchatHandle> {
    spawn_chitchat_with(
        config,
        initial_key_values,
        transport,
        SpawnOptions::default(),
    )
    .await
}

/// What [`spawn_chitchat_with`] takes beyond chitchat's arguments: settings `ChitchatConfig`
/// has no field for (its fields stay exactly chitchat's). Built from `Default` with the
/// `with_*` methods; new fields may be added.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SpawnOptions {
    /// Byte budgets and bounds applied to received state.
    pub limits: Limits,
    /// Anti-amplification budgets for replies to non-members.
    pub amplification: AmplificationLimits,
    /// The `node` label on every metric of this node (for processes running several nodes).
    pub metrics_label: Option<String>,
}

impl SpawnOptions {
    /// The byte budgets applied to received state.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The anti-amplification budgets for replies to sources that are not live members.
    pub fn with_amplification_limits(mut self, limits: AmplificationLimits) -> Self {
        self.amplification = limits;
        self
    }

    /// Labels this node's metrics with `node=label`.
    pub fn with_metrics_label(mut self, label: impl Into<String>) -> Self {
        self.metrics_label = Some(label.into());
        self
    }
}

/// Runs the transport's slow start-up ([`Transport::prepare`]: worker threads, the io_uring
/// probe) on the control runtime's blocking pool, so that the caller's thread keeps running its
/// other tasks meanwhile. A failure is only logged: `open` then meets it again and reports it
/// with its own context.
async fn prepare_transport(
    transport: &dyn Transport,
    control: &ControlThread,
) -> Option<Box<dyn std::any::Any + Send>> {
    let job = transport.datagram_transport()?.prepare()?;
    match control.handle().spawn_blocking(job).await {
        Ok(Ok(kept)) => Some(kept),
        Ok(Err(error)) => {
            debug!(%error, "preparing the transport failed");
            None
        }
        Err(error) => {
            debug!(%error, "preparing the transport did not complete");
            None
        }
    }
}

/// `spawn_chitchat` with what chitchat has no field for ([`SpawnOptions`]).
///
/// Install a `metrics` recorder before calling it: the histograms' handles are taken here.
pub async fn spawn_chitchat_with(
    config: ChitchatConfig,
    initial_key_values: Vec<(String, String)>,
    transport: &dyn Transport,
    options: SpawnOptions,
) -> anyhow::Result<ChitchatHandle> {
    config.validate()?;
    if let Some(label) = transport
        .datagram_transport()
        .and_then(|fast| fast.cluster_label())
        && label != config.cluster_id
    {
        return Err(crate::config::ConfigError::new(
            "cluster_id",
            format!(
                "is {:?} but the keyed transport seals for cluster {label:?}",
                config.cluster_id
            ),
        )
        .into());
    }
    let control = ControlThread::shared().context("failed to start the control thread")?;
    let listen_addr = config.listen_addr;
    let seeds = Seeds::parse(&config.seed_nodes);

    // Resolve hostname seeds once before starting, on the control runtime (hickory needs
    // tokio; the caller may be on any executor).
    let (resolver, seed_addrs) = if seeds.hostnames.is_empty() {
        (None, seeds.static_addrs.clone())
    } else {
        let (tx, rx) = oneshot::channel();
        let to_resolve = seeds.clone();
        control.handle().spawn(async move {
            let resolver = dns::system_resolver();
            let addrs = dns::resolve_seeds(&resolver, &to_resolve, listen_addr).await;
            let _ = tx.send((resolver, addrs));
        });
        let (resolver, addrs) = rx.await.context("seed resolution did not complete")?;
        (Some(resolver), addrs)
    };
    let (seed_tx, seed_rx) = watch::channel::<HashSet<SocketAddr>>(seed_addrs);

    let chitchat_id = config.chitchat_id.clone();
    let cluster_id = config.cluster_id.clone();
    let mut node = Chitchat::with_chitchat_id_and_seeds(config, seed_rx, initial_key_values);
    node.set_limits(options.limits);
    node.set_amplification_limits(options.amplification.clone());
    node.set_datagram_budget(
        transport
            .datagram_transport()
            .map_or(crate::transport::MAX_DATAGRAM_LEN, |fast| {
                fast.max_payload()
            }),
    );
    let chitchat = ChitchatRef::new(node);
    let counters = Arc::new(Counters::default());
    let metrics_labels = node_metrics::base_labels(options.metrics_label.as_deref());
    let (panic_tx, panic_rx) = watch::channel(None);
    let handler = Arc::new(NodeHandler {
        chitchat: chitchat.clone(),
        cluster_id,
        counters: counters.clone(),
        panic_tx,
        started: Instant::now(),
        runtime: tokio::runtime::Handle::try_current().ok(),
        handling_seconds: metrics::histogram!(
            node_metrics::MESSAGE_HANDLING_SECONDS,
            metrics_labels.clone()
        ),
    });
    // Held until the endpoint is open: what the off-thread preparation started.
    let _prepared = prepare_transport(transport, &control).await;
    let endpoint: Arc<dyn Endpoint> = Arc::from(
        open_node_endpoint(transport, listen_addr, handler)
            .await
            .with_context(|| format!("failed to open the gossip socket on {listen_addr}"))?,
    );
    info!(node = ?chitchat_id, local_addr = %endpoint.local_addr(), transport = ?endpoint.kind(),
          "chitchat node started");

    let (command_tx, command_rx) = mpsc::unbounded_channel();
    let (termination_tx, termination_rx) = watch::channel::<Termination>(None);
    if let Some(resolver) = resolver {
        spawn_dns_refresh(
            &control,
            resolver,
            seeds,
            listen_addr,
            seed_tx,
            &termination_rx,
        );
    }
    let mut server = Server::new(
        command_rx,
        chitchat.clone(),
        endpoint.clone(),
        panic_rx,
        counters.clone(),
        metrics_labels,
    );
    let task_endpoint = endpoint.clone();
    let task_control = control.clone();
    control.handle().spawn(async move {
        let task = tokio::spawn(async move { server.run().await });
        let result = match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("{error:#}")),
            Err(join_error) if join_error.is_panic() => Err("Chitchat server panicked".to_string()),
            Err(join_error) => Err(format!("chitchat server task failed: {join_error}")),
        };
        close_endpoint(task_endpoint).await;
        if let Err(message) = &result {
            error!(%message, "chitchat server stopped with an error");
        }
        termination_tx.send_replace(Some(result));
        drop(task_control);
    });

    Ok(ChitchatHandle {
        chitchat_id,
        command_tx,
        chitchat,
        termination_rx,
        endpoint,
        counters,
        _control: control,
    })
}

/// The node's endpoint: our transports' byte-level fast path, or — for a user's transport — its
/// chitchat `Socket` driven by a tokio task on the caller's runtime, behind the same handler.
async fn open_node_endpoint(
    transport: &dyn Transport,
    listen_addr: SocketAddr,
    handler: Arc<dyn DatagramHandler>,
) -> anyhow::Result<Box<dyn Endpoint>> {
    match transport.datagram_transport() {
        Some(fast) => fast.open_endpoint(listen_addr, handler),
        None => crate::transport::drive_socket(transport, listen_addr, handler).await,
    }
}

#[cfg(test)]
mod lifetime_tests {
    use super::*;

    /// The DNS refresh of a node ends when the node's termination is published, although its
    /// state (the seed watcher) is still alive, as when the application holds a `ChitchatRef`
    /// after dropping the handle.
    #[tokio::test]
    async fn dns_refresh_ends_when_the_node_stops() {
        let control = ControlThread::shared().unwrap();
        let seeds = Seeds::parse(&["localhost:7002".to_string()]);
        let (seed_tx, seed_rx) = watch::channel(HashSet::new());
        let (termination_tx, termination_rx) = watch::channel::<Termination>(None);
        let listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let (resolver_tx, resolver_rx) = oneshot::channel();
        control.handle().spawn(async move {
            let _ = resolver_tx.send(dns::system_resolver());
        });
        let resolver = resolver_rx.await.unwrap();
        spawn_dns_refresh(
            &control,
            resolver,
            seeds,
            listen_addr,
            seed_tx,
            &termination_rx,
        );
        // Running: its sender is alive (the first refresh is a minute away).
        assert!(seed_rx.has_changed().is_ok());
        termination_tx.send_replace(Some(Ok(())));
        let ended =
            test_support::wait_until(Duration::from_secs(10), || seed_rx.has_changed().is_err())
                .await;
        assert!(ended, "the DNS refresh outlived its node");
    }
}
