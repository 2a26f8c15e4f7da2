//! Measurement helpers shared by the command-line tool and the benchmarks: process CPU time and
//! peak memory, free ports, percentiles, and the local-cluster measurement (convergence, update
//! propagation, steady-state cost) run the same way for any implementation.
//!
//! It lives in the library so that the `cluster` subcommand and the side-by-side benchmark
//! measure with one piece of code, whatever implementation they drive.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use chitchat_uring::config::{ChitchatConfig, FailureDetectorConfig};
use chitchat_uring::message::ProtocolVersion;
use chitchat_uring::server::{ChitchatHandle, SpawnOptions, spawn_chitchat_with};
use chitchat_uring::transport::{Transport, TransportKind};
use chitchat_uring::types::ChitchatId;

/// CPU time (user + system) this process has used so far.
pub fn process_cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time (user + system) of another process, from `/proc/PID/stat`.
pub fn pid_cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: fields are counted after its closing ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at indices 11 and 12.
    let parse = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))
    };
    let ticks = parse(11)? + parse(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / hz,
    ))
}

/// On-CPU time of each live thread of a process, in nanoseconds (`/proc/PID/task/*/schedstat`):
/// finer than `/proc/PID/stat`, whose clock ticks (10 ms) are too coarse for a node that uses
/// a few milliseconds of CPU per second.
#[derive(Debug, Clone, Default)]
pub struct TaskCpu {
    by_thread: std::collections::HashMap<u32, u64>,
    /// The same process's CPU from `/proc/PID/stat` (ticks), exited threads included.
    stat: Duration,
}

impl TaskCpu {
    /// Reads every thread of `pid`.
    pub fn read(pid: u32) -> io::Result<TaskCpu> {
        let mut by_thread = std::collections::HashMap::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Ok(entry) = entry else { continue };
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            // A thread may exit between the listing and the read: skip it.
            let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = text.split_whitespace().next().and_then(|f| f.parse().ok()) {
                by_thread.insert(tid, ns);
            }
        }
        Ok(TaskCpu {
            by_thread,
            stat: pid_cpu_time(pid)?,
        })
    }

    /// CPU used between `earlier` and `self`: the per-thread nanoseconds of the threads alive
    /// now, or the tick count if it says more (a thread that exited in between took its
    /// nanoseconds with it, the ticks keep them).
    pub fn since(&self, earlier: &TaskCpu) -> Duration {
        let ns: u64 = self
            .by_thread
            .iter()
            .map(|(tid, now)| now.saturating_sub(earlier.by_thread.get(tid).copied().unwrap_or(0)))
            .sum();
        let ns = Duration::from_nanos(ns);
        let ticks = self.stat.saturating_sub(earlier.stat);
        // Ticks are only trusted beyond their rounding (two ticks of 10 ms).
        if ticks > ns + Duration::from_millis(20) {
            ticks
        } else {
            ns
        }
    }
}

/// Peak resident memory (VmHWM) of this process, in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    read_vm_hwm("/proc/self/status")
}

/// Peak resident memory (VmHWM) of another process, in bytes.
pub fn pid_peak_rss_bytes(pid: u32) -> Option<u64> {
    read_vm_hwm(&format!("/proc/{pid}/status"))
}

fn read_vm_hwm(path: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1_024)
}

/// `n` distinct UDP ports on 127.0.0.1 that were free a moment ago (all bound at once, then
/// released, so they are distinct). Another process may still take one: callers retry.
pub fn free_udp_ports(n: usize) -> io::Result<Vec<u16>> {
    let sockets = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    sockets
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()))
        .collect()
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (microseconds); sorts them. All zero when empty.
    pub fn from_micros(samples: &mut [u64]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            let idx = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[idx] as f64
        };
        Percentiles {
            p50_us: rank(0.50),
            p90_us: rank(0.90),
            p99_us: rank(0.99),
            max_us: samples[samples.len() - 1] as f64,
        }
    }
}

/// Messages and bytes sent by all the nodes of a cluster so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub messages_sent: u64,
    pub bytes_sent: u64,
    /// Datagrams delivered to the nodes: in a cluster that only talks to itself, the shortfall
    /// against `messages_sent` is what the network (or a transport) lost.
    pub messages_received: u64,
}

/// A cluster of nodes running in this process, whatever the implementation: what the
/// measurement needs to observe and poke.
pub trait LocalCluster {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many nodes see every node alive and hold every node's initial keys.
    fn converged_nodes(&mut self) -> usize;

    /// Sets `key` on node `node`.
    fn set_key(&mut self, node: usize, key: &str, value: &str);

    /// How many nodes hold `key = value` in the state of node `owner`.
    fn nodes_with_key(&mut self, owner: usize, key: &str, value: &str) -> usize;

    /// Totals over every node since it started.
    fn traffic(&self) -> Traffic;

    /// Gracefully stops every node.
    fn shutdown(self: Box<Self>) -> anyhow::Result<()>;
}

/// What a local cluster measurement is asked to do.
#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// Length of the steady-state window.
    pub steady: Duration,
    /// Longest wait for full convergence, then for the update to reach everyone.
    pub timeout: Duration,
    /// How often the nodes are polled while waiting.
    pub poll: Duration,
}

/// Where a measurement stands (for progress displays).
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    Converging {
        converged: usize,
        total: usize,
        elapsed: Duration,
    },
    Propagating {
        have: usize,
        total: usize,
        elapsed: Duration,
    },
    Steady {
        elapsed: Duration,
        total: Duration,
    },
}

/// How a measurement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Complete,
    /// Stopped by the caller (Ctrl-C): figures are what was measured so far.
    Interrupted,
    /// The cluster did not converge in time.
    ConvergenceTimeout,
    /// The update did not reach every node in time.
    PropagationTimeout,
    /// The benchmark's child process running the cluster sent no report within its time
    /// limit and was stopped (`convergence_timeout_secs` holds that limit).
    NoReport,
}

/// The figures of one local-cluster run. Absent figures were not reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterReport {
    /// `chitchat-uring` or `chitchat 0.13`.
    pub implementation: String,
    /// The transport in use: `io_uring`, `epoll (why)`, `tokio UDP`.
    pub transport: String,
    pub nodes: usize,
    pub keys_per_node: usize,
    pub gossip_interval_ms: u64,
    pub outcome: Outcome,
    /// Time to start every node.
    pub startup_secs: f64,
    /// From the last node started until every node sees every node alive with all its keys.
    pub convergence_secs: Option<f64>,
    /// Nodes that had converged when the measurement ended.
    pub converged_nodes: usize,
    /// From one `set` until every node holds the new value.
    pub update_propagation_secs: Option<f64>,
    /// Length of the steady-state window actually measured.
    pub steady_secs: Option<f64>,
    /// Datagrams sent per node per second over the steady-state window.
    pub messages_per_sec_per_node: Option<f64>,
    /// Bytes sent per node per second over the steady-state window.
    pub bytes_per_sec_per_node: Option<f64>,
    /// Share of the datagrams sent during the window that no node received, in percent (the
    /// nodes only talk to each other; datagrams in flight at the window's edges blur it a little).
    #[serde(default)]
    pub datagrams_lost_percent: Option<f64>,
    /// Process CPU milliseconds per node per second of the window (1000 = a whole core).
    pub cpu_ms_per_node_per_sec: Option<f64>,
    /// Peak resident memory of the whole process (VmHWM).
    pub peak_rss_bytes: Option<u64>,
    /// The convergence wait of the run (so a report can say "did not converge in N s").
    #[serde(default)]
    pub convergence_timeout_secs: Option<f64>,
    /// Whether the steady-state figures were measured on a cluster that had not converged.
    #[serde(default)]
    pub steady_unconverged: bool,
    /// Time to shut every node down gracefully.
    #[serde(default)]
    pub shutdown_secs: Option<f64>,
    /// Set when the shutdown had not finished after this many seconds (and was abandoned).
    #[serde(default)]
    pub shutdown_limit_secs: Option<f64>,
}

impl ClusterReport {
    /// A report for a cluster just started, before anything was measured.
    pub fn started(
        implementation: impl Into<String>,
        transport: impl Into<String>,
        nodes: usize,
        keys_per_node: usize,
        gossip_interval_ms: u64,
        startup: Duration,
    ) -> Self {
        ClusterReport {
            implementation: implementation.into(),
            transport: transport.into(),
            nodes,
            keys_per_node,
            gossip_interval_ms,
            outcome: Outcome::Complete,
            startup_secs: startup.as_secs_f64(),
            convergence_secs: None,
            converged_nodes: 0,
            update_propagation_secs: None,
            steady_secs: None,
            messages_per_sec_per_node: None,
            bytes_per_sec_per_node: None,
            datagrams_lost_percent: None,
            cpu_ms_per_node_per_sec: None,
            peak_rss_bytes: None,
            convergence_timeout_secs: None,
            steady_unconverged: false,
            shutdown_secs: None,
            shutdown_limit_secs: None,
        }
    }
}

/// Key and value of the update whose propagation is timed.
pub const PROBE_KEY: &str = "probe";
pub const PROBE_VALUE: &str = "updated-value-of-32-bytes-000000";

/// Waits for convergence, times one update, then measures the steady state. Stops early (with
/// what it has) when `stop` is set or a wait times out.
pub fn measure_cluster(
    cluster: &mut dyn LocalCluster,
    base: ClusterReport,
    options: &MeasureOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> ClusterReport {
    let mut report = base;
    report.convergence_timeout_secs = Some(options.timeout.as_secs_f64());
    let total = cluster.len();
    let stopped = || stop.load(Ordering::Relaxed);
    let finish = |mut report: ClusterReport, outcome: Outcome| {
        report.outcome = outcome;
        report.peak_rss_bytes = peak_rss_bytes();
        report
    };

    let start = Instant::now();
    loop {
        let checked = Instant::now();
        let converged = cluster.converged_nodes();
        let check = checked.elapsed();
        report.converged_nodes = converged;
        progress(Progress::Converging {
            converged,
            total,
            elapsed: start.elapsed(),
        });
        if converged == total {
            report.convergence_secs = Some(start.elapsed().as_secs_f64());
            break;
        }
        if stopped() {
            return finish(report, Outcome::Interrupted);
        }
        if start.elapsed() >= options.timeout {
            return finish(report, Outcome::ConvergenceTimeout);
        }
        // A check locks every node and reads N × N states: however large the cluster, at most
        // a fifth of a core goes to watching it.
        std::thread::sleep(options.poll.max(check * 4));
    }

    // The update goes on the last node: not the seed, so it must really travel.
    let owner = total - 1;
    cluster.set_key(owner, PROBE_KEY, PROBE_VALUE);
    let start = Instant::now();
    loop {
        let checked = Instant::now();
        let have = cluster.nodes_with_key(owner, PROBE_KEY, PROBE_VALUE);
        let check = checked.elapsed();
        progress(Progress::Propagating {
            have,
            total,
            elapsed: start.elapsed(),
        });
        if have == total {
            report.update_propagation_secs = Some(start.elapsed().as_secs_f64());
            break;
        }
        if stopped() {
            return finish(report, Outcome::Interrupted);
        }
        if start.elapsed() >= options.timeout {
            return finish(report, Outcome::PropagationTimeout);
        }
        std::thread::sleep(options.poll.min(Duration::from_millis(5)).max(check * 4));
    }

    let outcome = measure_steady(cluster, &mut report, options.steady, stop, progress);
    finish(report, outcome)
}

/// Measures the steady state of `cluster` for `steady` into `report` (messages, bytes, loss,
/// CPU per node); [`measure_cluster`] calls it once the cluster converged, a benchmark may call
/// it on a cluster that did not, to show what such a cluster costs.
pub fn measure_steady(
    cluster: &mut dyn LocalCluster,
    report: &mut ClusterReport,
    steady: Duration,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> Outcome {
    let total = cluster.len().max(1);
    let stopped = || stop.load(Ordering::Relaxed);
    // Steady state: nothing polls the nodes during the window, so the CPU is theirs.
    let traffic_before = cluster.traffic();
    let cpu_before = process_cpu_time();
    let start = Instant::now();
    let mut outcome = Outcome::Complete;
    while start.elapsed() < steady {
        if stopped() {
            outcome = Outcome::Interrupted;
            break;
        }
        progress(Progress::Steady {
            elapsed: start.elapsed(),
            total: steady,
        });
        let left = steady.saturating_sub(start.elapsed());
        std::thread::sleep(left.min(Duration::from_millis(250)));
    }
    let window = start.elapsed().as_secs_f64();
    let cpu = process_cpu_time().saturating_sub(cpu_before).as_secs_f64();
    let traffic = cluster.traffic();
    if window > 0.05 {
        let per_node_sec = |x: f64| x / total as f64 / window;
        report.steady_secs = Some(window);
        report.messages_per_sec_per_node = Some(per_node_sec(
            traffic
                .messages_sent
                .saturating_sub(traffic_before.messages_sent) as f64,
        ));
        report.bytes_per_sec_per_node = Some(per_node_sec(
            traffic.bytes_sent.saturating_sub(traffic_before.bytes_sent) as f64,
        ));
        report.cpu_ms_per_node_per_sec = Some(per_node_sec(cpu * 1_000.0));
        let sent = traffic
            .messages_sent
            .saturating_sub(traffic_before.messages_sent);
        let received = traffic
            .messages_received
            .saturating_sub(traffic_before.messages_received);
        if sent > 0 {
            report.datagrams_lost_percent =
                Some(sent.saturating_sub(received) as f64 * 100.0 / sent as f64);
        }
    }
    report.peak_rss_bytes = peak_rss_bytes();
    outcome
}

/// A 32-byte value for key `key` of node `node`.
pub fn value_32(node: usize, key: usize) -> String {
    format!("{:0>32}", format!("n{node}-k{key}"))
}

/// The initial key-values of node `node`: `keys` keys of 32-byte values.
pub fn initial_key_values(node: usize, keys: usize) -> Vec<(String, String)> {
    (0..keys)
        .map(|k| (format!("key-{k:04}"), value_32(node, k)))
        .collect()
}

/// The failure-detector settings of the local clusters: chitchat's defaults with the prior
/// interval set to the gossip interval (as chitchat's own perf tests do), so that nodes are seen
/// alive after a few rounds rather than after the 5-second default prior.
pub fn cluster_failure_detector(gossip_interval: Duration) -> FailureDetectorConfig {
    FailureDetectorConfig {
        initial_interval: gossip_interval,
        dead_node_grace_period: Duration::from_secs(3_600),
        ..FailureDetectorConfig::default()
    }
}

/// A human name for a transport kind, with the reason of a fallback.
pub fn describe_transport(kind: &TransportKind) -> String {
    match kind {
        TransportKind::Uring => "io_uring".to_string(),
        TransportKind::Epoll { reason } => format!("epoll ({reason})"),
        TransportKind::Channel => "in-memory channel".to_string(),
        TransportKind::Portable => "portable (tokio UdpSocket)".to_string(),
        TransportKind::Socket => "a user transport's socket".to_string(),
    }
}

/// A local cluster of chitchat-uring nodes, all in this process.
pub struct UringCluster {
    handles: Vec<ChitchatHandle>,
    keys: usize,
    // Kept so the runtime outlives the handles' async shutdown.
    runtime: tokio::runtime::Runtime,
}

/// Settings of a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub keys: usize,
    pub gossip_interval: Duration,
    pub cluster_id: String,
    /// The default anti-amplification budget (`false`: `AmplificationLimits::off()`).
    pub amplification_limits: bool,
}

impl UringCluster {
    /// Starts `spec.nodes` nodes on free 127.0.0.1 ports, all seeded with the first.
    pub fn start(spec: &ClusterSpec, transport: &dyn Transport) -> anyhow::Result<UringCluster> {
        anyhow::ensure!(spec.nodes > 0, "a cluster needs at least one node");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut handles: Vec<ChitchatHandle> = Vec::with_capacity(spec.nodes);
        let mut ports = free_udp_ports(spec.nodes)?.into_iter();
        let mut seed: Option<SocketAddr> = None;
        for i in 0..spec.nodes {
            let mut attempt = 0;
            let handle = loop {
                let port = match ports.next() {
                    Some(port) => port,
                    None => free_udp_ports(1)?[0],
                };
                let config = node_config(spec, i, port, seed);
                match runtime.block_on(spawn_chitchat_with(
                    config,
                    initial_key_values(i, spec.keys),
                    transport,
                    spawn_options(spec, i),
                )) {
                    Ok(handle) => break handle,
                    // The port was taken since it was found free: take another.
                    Err(error) if attempt < 5 => {
                        tracing::debug!(%error, "node {i}: retrying on another port");
                        attempt += 1;
                    }
                    Err(error) => return Err(error.context(format!("starting node {i}"))),
                }
            };
            seed.get_or_insert(handle.chitchat_id().gossip_advertise_addr);
            handles.push(handle);
        }
        Ok(UringCluster {
            handles,
            keys: spec.keys,
            runtime,
        })
    }

    /// The transport of the first node (they all share one).
    pub fn transport_kind(&self) -> Option<TransportKind> {
        self.handles.first().map(ChitchatHandle::transport_kind)
    }

    pub fn handles(&self) -> &[ChitchatHandle] {
        &self.handles
    }
}

fn spawn_options(spec: &ClusterSpec, index: usize) -> SpawnOptions {
    // Every node of the process carries its own `node` metrics label.
    let options = SpawnOptions::default().with_metrics_label(format!("node-{index}"));
    if spec.amplification_limits {
        options
    } else {
        options.with_amplification_limits(
            chitchat_uring::protocol::amplification::AmplificationLimits::off(),
        )
    }
}

fn node_config(
    spec: &ClusterSpec,
    index: usize,
    port: u16,
    seed: Option<SocketAddr>,
) -> ChitchatConfig {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut config = ChitchatConfig::for_test(port);
    config.chitchat_id = ChitchatId::new(format!("node-{index}"), 1, addr);
    config.listen_addr = addr;
    config.cluster_id = spec.cluster_id.clone();
    config.gossip_interval = spec.gossip_interval;
    config.seed_nodes = seed.iter().map(ToString::to_string).collect();
    config.failure_detector_config = cluster_failure_detector(spec.gossip_interval);
    config.marked_for_deletion_grace_period = Duration::from_secs(3_600);
    config.protocol_version = ProtocolVersion::V0;
    config
}

impl LocalCluster for UringCluster {
    fn len(&self) -> usize {
        self.handles.len()
    }

    fn converged_nodes(&mut self) -> usize {
        let total = self.handles.len();
        let keys = self.keys as u64;
        self.handles
            .iter()
            .filter(|handle| {
                let chitchat = handle.chitchat();
                let chitchat = chitchat.lock();
                chitchat.live_nodes().count() == total
                    && chitchat.node_states().len() == total
                    && chitchat
                        .node_states()
                        .values()
                        .all(|state| state.max_version() >= keys)
            })
            .count()
    }

    fn set_key(&mut self, node: usize, key: &str, value: &str) {
        if let Some(handle) = self.handles.get(node) {
            handle.chitchat().lock().self_node_state().set(key, value);
        }
    }

    fn nodes_with_key(&mut self, owner: usize, key: &str, value: &str) -> usize {
        let Some(owner_id) = self.handles.get(owner).map(|h| h.chitchat_id().clone()) else {
            return 0;
        };
        self.handles
            .iter()
            .filter(|handle| {
                let chitchat = handle.chitchat();
                let chitchat = chitchat.lock();
                chitchat
                    .node_state(&owner_id)
                    .and_then(|state| state.get(key))
                    == Some(value)
            })
            .count()
    }

    fn traffic(&self) -> Traffic {
        self.handles.iter().fold(Traffic::default(), |acc, handle| {
            let stats = handle.endpoint_stats();
            Traffic {
                messages_sent: acc.messages_sent + stats.datagrams_sent,
                bytes_sent: acc.bytes_sent + stats.bytes_sent,
                messages_received: acc.messages_received + stats.datagrams_received,
            }
        })
    }

    fn shutdown(self: Box<Self>) -> anyhow::Result<()> {
        let UringCluster {
            handles, runtime, ..
        } = *self;
        let mut first_error = None;
        // Ask every node first, then wait: the nodes stop in parallel.
        for handle in &handles {
            let _ = handle.initiate_shutdown();
        }
        for handle in handles {
            if let Err(error) = runtime.block_on(handle.shutdown()) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
