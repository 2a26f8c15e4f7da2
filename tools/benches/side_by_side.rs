//! chitchat-uring (io_uring, epoll) against chitchat 0.13, in one run:
//!
//! 1. one node under Syn load (the `load` generator, 16 source ports): Syns answered per
//!    second and the node's CPU per answered Syn, with 100 and 1 000 nodes of state;
//! 2. local clusters of 10, 50, 100 and 200 nodes (100 ms gossip, 10 keys of 32 B): time to
//!    converge, time for one update to reach all, steady-state CPU, bytes and messages per node,
//!    peak memory;
//! 3. (`--large`) large clusters in one process: 500 nodes at 100 ms gossip and 1,000 nodes at
//!    1 s (Quickwit's interval), the same figures plus shutdown time; a cluster that does not
//!    converge in the bound is reported so, with its steady-state cost measured anyway;
//! 4. (`--one-host`) one host in a large cluster: one real node receiving gossip at the
//!    protocol's rate from a simulated cluster of 1,000 and 5,000 nodes
//!    ([`loadgen::simulated`]), V0 and V1: the node's CPU per second and bytes per second.
//!
//! Every node under test (and every cluster) runs in a child process (this binary re-executed
//! with `--child-…`), so CPU and peak memory are that implementation's alone. Writes a
//! markdown table, a JSON dump and an SVG plot under `target/bench-report/`.
//!
//! `cargo bench --bench side_by_side -- [--quick] [--large] [--one-host] [--cases LIST]
//! [--out DIR]` (or `scripts/bench.sh`); the flags are listed in `scripts/bench.sh`.

mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use chitchat_uring::ProtocolVersion;
use chitchat_uring_tools::bench_support::{
    ClusterReport, ClusterSpec, LocalCluster, MeasureOptions, Outcome, Progress, TaskCpu,
    UringCluster, describe_transport, measure_cluster, measure_steady, pid_cpu_time,
    pid_peak_rss_bytes,
};
use chitchat_uring_tools::loadgen::simulated::{
    SimConfig, SimTraffic, SimulatedCluster, raise_open_file_limit,
};
use chitchat_uring_tools::loadgen::{self, DigestMode, LoadConfig, LoadReport};
use common::{CLUSTER_ID, ChitchatCluster, Impl, KEYS, serve, serve_host};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// Settings of one run.
#[derive(Debug, Clone)]
struct Plan {
    state_sizes: Vec<usize>,
    load_secs: f64,
    cluster_sizes: Vec<usize>,
    steady_secs: f64,
    timeout_secs: f64,
    out: PathBuf,
    quick: bool,
    /// Redraw the report from a saved `side_by_side.json` instead of measuring.
    from_json: Option<PathBuf>,
    cases: Cases,
    /// Implementations measured (all three by default).
    impls: Vec<Impl>,
    /// Large clusters: (nodes, gossip interval in ms).
    large: Vec<(usize, u64)>,
    large_timeout_secs: f64,
    large_steady_secs: f64,
    /// Longest wait for the graceful shutdown of a whole cluster.
    shutdown_limit_secs: f64,
    /// One host in a large cluster: simulated cluster sizes (peers + the node under test).
    host_sizes: Vec<usize>,
    host_interval_ms: u64,
    host_protocols: Vec<ProtocolVersion>,
    /// Length of the measured window (after seeding and a warm-up of 5 intervals).
    host_secs: f64,
    host_seed_timeout_secs: f64,
}

/// Which parts of the benchmark run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cases {
    load: bool,
    clusters: bool,
    large: bool,
    one_host: bool,
}

impl Cases {
    fn parse(list: &str) -> Result<Cases, String> {
        let mut cases = Cases {
            load: false,
            clusters: false,
            large: false,
            one_host: false,
        };
        for case in list.split(',').map(str::trim) {
            match case {
                "load" => cases.load = true,
                "clusters" => cases.clusters = true,
                "large" => cases.large = true,
                "one-host" => cases.one_host = true,
                "all" => {
                    cases = Cases {
                        load: true,
                        clusters: true,
                        large: true,
                        one_host: true,
                    }
                }
                other => {
                    return Err(format!(
                        "unknown case {other:?} (load, clusters, large, one-host, all)"
                    ));
                }
            }
        }
        Ok(cases)
    }
}

impl Plan {
    fn from_args(args: &[String]) -> Result<Plan, String> {
        let mut plan = Plan {
            state_sizes: vec![100, 1_000],
            load_secs: 5.0,
            cluster_sizes: vec![10, 50, 100, 200],
            steady_secs: 10.0,
            timeout_secs: 90.0,
            out: PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/bench-report"
            )),
            quick: false,
            from_json: None,
            cases: Cases {
                load: true,
                clusters: true,
                large: false,
                one_host: false,
            },
            impls: Impl::ALL.to_vec(),
            large: vec![(500, 100), (1_000, 1_000)],
            large_timeout_secs: 120.0,
            large_steady_secs: 10.0,
            shutdown_limit_secs: 60.0,
            host_sizes: vec![1_000, 5_000],
            host_interval_ms: 1_000,
            host_protocols: vec![ProtocolVersion::V0, ProtocolVersion::V1],
            host_secs: 20.0,
            host_seed_timeout_secs: 120.0,
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let mut value = |name: &str| {
                iter.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match arg.as_str() {
                "--quick" => {
                    plan.quick = true;
                    plan.state_sizes = vec![100, 1_000];
                    plan.load_secs = 1.5;
                    plan.cluster_sizes = vec![10, 50];
                    plan.steady_secs = 3.0;
                    plan.timeout_secs = 45.0;
                    plan.large_steady_secs = 3.0;
                    plan.host_secs = 5.0;
                }
                "--large" => plan.cases.large = true,
                "--one-host" => plan.cases.one_host = true,
                "--cases" => plan.cases = Cases::parse(&value("--cases")?)?,
                "--impls" => {
                    plan.impls = value("--impls")?
                        .split(',')
                        .map(|s| {
                            Impl::from_slug(s.trim()).ok_or_else(|| {
                                format!("unknown implementation {s:?} (ours-uring, ours-epoll, chitchat)")
                            })
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--large-clusters" => plan.large = parse_large(&value("--large-clusters")?)?,
                "--large-timeout-secs" => {
                    plan.large_timeout_secs = parse_num(&value("--large-timeout-secs")?)?
                }
                "--large-steady-secs" => {
                    plan.large_steady_secs = parse_num(&value("--large-steady-secs")?)?
                }
                "--shutdown-limit-secs" => {
                    plan.shutdown_limit_secs = parse_num(&value("--shutdown-limit-secs")?)?
                }
                "--host-sizes" => plan.host_sizes = parse_list(&value("--host-sizes")?)?,
                "--host-interval-ms" => {
                    plan.host_interval_ms = parse_num(&value("--host-interval-ms")?)? as u64
                }
                "--host-protocols" => {
                    plan.host_protocols = value("--host-protocols")?
                        .split(',')
                        .map(|s| match s.trim() {
                            "v0" | "V0" => Ok(ProtocolVersion::V0),
                            "v1" | "V1" => Ok(ProtocolVersion::V1),
                            other => Err(format!("unknown protocol {other:?} (v0, v1)")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--host-secs" => plan.host_secs = parse_num(&value("--host-secs")?)?,
                "--host-seed-timeout-secs" => {
                    plan.host_seed_timeout_secs = parse_num(&value("--host-seed-timeout-secs")?)?
                }
                "--out" => plan.out = PathBuf::from(value("--out")?),
                "--from-json" => plan.from_json = Some(PathBuf::from(value("--from-json")?)),
                "--sizes" => plan.cluster_sizes = parse_list(&value("--sizes")?)?,
                "--steady-secs" => plan.steady_secs = parse_num(&value("--steady-secs")?)?,
                "--load-secs" => plan.load_secs = parse_num(&value("--load-secs")?)?,
                // Passed by `cargo bench`.
                "--bench" => {}
                other if other.starts_with("--") => return Err(format!("unknown flag {other}")),
                _ => {} // a criterion-style filter: ignored
            }
        }
        Ok(plan)
    }
}

fn parse_list(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| format!("bad size {x:?}")))
        .collect()
}

/// `500@100,1000@1000`: nodes @ gossip interval in ms.
fn parse_large(s: &str) -> Result<Vec<(usize, u64)>, String> {
    s.split(',')
        .map(|x| {
            let (nodes, ms) = x
                .trim()
                .split_once('@')
                .ok_or_else(|| format!("bad cluster {x:?}: expected NODES@INTERVAL_MS"))?;
            let nodes = nodes
                .parse()
                .map_err(|_| format!("bad node count {nodes:?}"))?;
            let ms: u64 = ms.parse().map_err(|_| format!("bad interval {ms:?}"))?;
            if nodes == 0 || ms == 0 {
                return Err(format!(
                    "bad cluster {x:?}: nodes and interval must be positive"
                ));
            }
            Ok((nodes, ms))
        })
        .collect()
}

fn parse_num(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x > 0.0)
        .ok_or_else(|| format!("bad number {s:?}"))
}

/// One load measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoadRow {
    implementation: String,
    state_nodes: usize,
    digest: DigestMode,
    replies_per_sec: f64,
    /// The node's CPU (user + system) per answered Syn.
    cpu_us_per_syn: f64,
    /// The node's CPU over the run, in cores (1.0 = one core busy).
    node_cores: f64,
    p50_us: f64,
    p99_us: f64,
    lost: u64,
    reply_bytes_avg: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Results {
    kernel: String,
    cpus: usize,
    load: Vec<LoadRow>,
    clusters: Vec<ClusterReport>,
    /// One host in a large cluster (absent from reports of older runs).
    #[serde(default)]
    one_host: Vec<HostRow>,
    runtime_secs: f64,
}

/// One node under test among simulated peers.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostRow {
    implementation: String,
    /// Nodes of the simulated cluster, the node under test included.
    cluster_nodes: usize,
    protocol: String,
    gossip_interval_ms: u64,
    /// `measured`, or why not (e.g. the digest does not fit a datagram in V0).
    outcome: String,
    /// Bytes of one Syn of a simulated peer (its digest lists every node).
    syn_bytes: Option<usize>,
    /// Time for the node to learn every peer with all its keys.
    seed_secs: Option<f64>,
    window_secs: Option<f64>,
    /// The node's process CPU, milliseconds per second (1000 = one core).
    cpu_ms_per_sec: Option<f64>,
    /// UDP payload bytes per second into and out of the node.
    bytes_in_per_sec: Option<f64>,
    bytes_out_per_sec: Option<f64>,
    datagrams_in_per_sec: Option<f64>,
    datagrams_out_per_sec: Option<f64>,
    /// SynAcks received for the Syns the peers sent, in percent.
    syns_answered_percent: Option<f64>,
    /// Syns the node itself sent per second (its gossip rounds × 3).
    node_syns_per_sec: Option<f64>,
    peak_rss_bytes: Option<u64>,
    traffic: Option<SimTraffic>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("--child-serve") => child_serve(&args[1..]),
        Some("--child-cluster") => child_cluster(&args[1..]),
        Some("--child-host") => child_host(&args[1..]),
        _ => match Plan::from_args(&args) {
            Ok(plan) => orchestrate(&plan),
            Err(error) => {
                eprintln!("side_by_side: {error}");
                2
            }
        },
    };
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------------------------

/// `--child-serve IMPL NODES`: a node with NODES remote states; prints `READY addr`, serves
/// until stdin closes.
fn child_serve(args: &[String]) -> i32 {
    let (Some(which), Some(n)) = (
        args.first().and_then(|s| Impl::from_slug(s)),
        args.get(1).and_then(|s| s.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: --child-serve IMPL NODES");
        return 2;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (node, addr) = serve(which, n, &rt);
    println!("READY {addr}");
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    node.shutdown(&rt);
    0
}

/// `--child-cluster IMPL NODES STEADY_SECS TIMEOUT_SECS [INTERVAL_MS STEADY_ANYWAY
/// SHUTDOWN_LIMIT_SECS]`: measures one local cluster and prints `REPORT {json}`. With
/// STEADY_ANYWAY = 1 a cluster that did not converge still gets its steady state measured.
fn child_cluster(args: &[String]) -> i32 {
    let parsed = (
        args.first().and_then(|s| Impl::from_slug(s)),
        args.get(1).and_then(|s| s.parse::<usize>().ok()),
        args.get(2).and_then(|s| s.parse::<f64>().ok()),
        args.get(3).and_then(|s| s.parse::<f64>().ok()),
    );
    let (Some(which), Some(nodes), Some(steady), Some(timeout)) = parsed else {
        eprintln!(
            "usage: --child-cluster IMPL NODES STEADY_SECS TIMEOUT_SECS [INTERVAL_MS STEADY_ANYWAY SHUTDOWN_LIMIT_SECS]"
        );
        return 2;
    };
    let interval_ms = args
        .get(4)
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(100);
    let steady_anyway = args.get(5).is_some_and(|s| s == "1");
    let shutdown_limit = args
        .get(6)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(60.0);
    // Hundreds of nodes hold thousands of descriptors (sockets, rings, timers).
    if let Err(error) = raise_open_file_limit(nodes * 8 + 256) {
        eprintln!("    {error:#}; starting anyway");
    }
    let spec = ClusterSpec {
        nodes,
        keys: KEYS,
        gossip_interval: Duration::from_millis(interval_ms),
        cluster_id: CLUSTER_ID.to_string(),
        amplification_limits: true,
    };
    let started = Instant::now();
    let (mut cluster, transport): (Box<dyn LocalCluster>, String) = match which {
        Impl::OursUring | Impl::OursEpoll => match UringCluster::start(&spec, &which.transport()) {
            Ok(cluster) => {
                let kind = cluster
                    .transport_kind()
                    .map(|k| describe_transport(&k))
                    .unwrap_or_default();
                (Box::new(cluster), kind)
            }
            Err(error) => {
                eprintln!("starting the cluster: {error:#}");
                return 1;
            }
        },
        Impl::Chitchat => match ChitchatCluster::start(&spec) {
            Ok(cluster) => (Box::new(cluster), "tokio UDP".to_string()),
            Err(error) => {
                eprintln!("starting the cluster: {error:#}");
                return 1;
            }
        },
    };
    let base = ClusterReport::started(
        which.name(),
        transport,
        nodes,
        KEYS,
        interval_ms,
        started.elapsed(),
    );
    let options = MeasureOptions {
        steady: Duration::from_secs_f64(steady),
        timeout: Duration::from_secs_f64(timeout),
        poll: Duration::from_millis(if nodes > 200 { 250 } else { 20 }),
    };
    let stop = AtomicBool::new(false);
    let mut last = "";
    let mut progress = |p: Progress| {
        let phase = match p {
            Progress::Converging { .. } => "converging",
            Progress::Propagating { .. } => "propagating an update",
            Progress::Steady { .. } => "steady state",
        };
        if phase != last {
            eprintln!("    {} × {nodes}: {phase}", which.name());
            last = phase;
        }
    };
    let mut report = measure_cluster(cluster.as_mut(), base, &options, &stop, &mut progress);
    if steady_anyway && report.outcome == Outcome::ConvergenceTimeout {
        eprintln!(
            "    {} × {nodes}: {} of {nodes} converged in {timeout} s; measuring the steady state anyway",
            which.name(),
            report.converged_nodes
        );
        measure_steady(
            cluster.as_mut(),
            &mut report,
            options.steady,
            &stop,
            &mut progress,
        );
        report.steady_unconverged = true;
    }
    // A shutdown that hangs must not hang the benchmark: a watchdog reports it and exits.
    let printed = std::sync::Arc::new(std::sync::Mutex::new(false));
    let mut abandoned = report.clone();
    abandoned.shutdown_limit_secs = Some(shutdown_limit);
    let watchdog_printed = printed.clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx
            .recv_timeout(Duration::from_secs_f64(shutdown_limit))
            .is_err()
        {
            let mut printed = watchdog_printed.lock().unwrap_or_else(|e| e.into_inner());
            if !*printed {
                *printed = true;
                println!(
                    "REPORT {}",
                    serde_json::to_string(&abandoned).expect("serializable")
                );
                let _ = std::io::stdout().flush();
                std::process::exit(0);
            }
        }
    });
    let shutdown_started = Instant::now();
    if let Err(error) = cluster.shutdown() {
        eprintln!("shutdown: {error:#}");
    }
    report.shutdown_secs = Some(shutdown_started.elapsed().as_secs_f64());
    let _ = done_tx.send(());
    let mut printed = printed.lock().unwrap_or_else(|e| e.into_inner());
    if !*printed {
        *printed = true;
        println!(
            "REPORT {}",
            serde_json::to_string(&report).expect("serializable")
        );
    }
    0
}

/// `--child-host IMPL INTERVAL_MS PROTOCOL`: the node under test of the one-host case; prints
/// `READY addr`, gossips and answers until stdin closes.
fn child_host(args: &[String]) -> i32 {
    let parsed = (
        args.first().and_then(|s| Impl::from_slug(s)),
        args.get(1).and_then(|s| s.parse::<u64>().ok()),
        args.get(2).and_then(|s| match s.as_str() {
            "v0" => Some(ProtocolVersion::V0),
            "v1" => Some(ProtocolVersion::V1),
            _ => None,
        }),
    );
    let (Some(which), Some(interval_ms), Some(version)) = parsed else {
        eprintln!("usage: --child-host IMPL INTERVAL_MS v0|v1");
        return 2;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (node, addr) = match serve_host(which, Duration::from_millis(interval_ms), version, &rt) {
        Ok(served) => served,
        Err(error) => {
            eprintln!("{error:#}");
            return 1;
        }
    };
    println!("READY {addr}");
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    node.shutdown(&rt);
    0
}

// ---------------------------------------------------------------------------------------------
// Orchestration
// ---------------------------------------------------------------------------------------------

fn self_command() -> Command {
    Command::new(std::env::current_exe().expect("current exe"))
}

/// Kills the child if the run is abandoned.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn measure_load(which: Impl, n: usize, secs: f64) -> Result<Vec<LoadRow>, String> {
    let mut child = self_command()
        .args(["--child-serve", which.slug(), &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawning the node: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut guard = Guard(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("reading the node's address: {e}"))?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("unexpected line from the node: {line:?}"))?;
    let pid = guard.0.id();
    let stop = AtomicBool::new(false);
    let mut rows = Vec::new();
    for digest in [DigestMode::UpToDate, DigestMode::Empty] {
        let mut config = LoadConfig::new(addr, CLUSTER_ID);
        config.digest = digest;
        config.senders = 16;
        let syn = loadgen::build_syn(&config).map_err(|e| format!("{e:#}"))?;
        // Warm-up (caches, socket buffers), not measured.
        config.duration = Duration::from_millis(500);
        loadgen::run_with_syn(&config, &syn, &stop).map_err(|e| format!("{e:#}"))?;
        config.duration = Duration::from_secs_f64(secs);
        let cpu_before = pid_cpu_time(pid).map_err(|e| e.to_string())?;
        let report: LoadReport =
            loadgen::run_with_syn(&config, &syn, &stop).map_err(|e| format!("{e:#}"))?;
        let cpu = pid_cpu_time(pid)
            .map_err(|e| e.to_string())?
            .saturating_sub(cpu_before)
            .as_secs_f64();
        rows.push(LoadRow {
            implementation: which.name().to_string(),
            state_nodes: n,
            digest,
            replies_per_sec: report.replies_per_sec,
            cpu_us_per_syn: if report.replies > 0 {
                cpu * 1e6 / report.replies as f64
            } else {
                f64::NAN
            },
            node_cores: cpu / report.duration_secs.max(1e-9),
            p50_us: report.latency.p50_us,
            p99_us: report.latency.p99_us,
            lost: report.lost,
            reply_bytes_avg: report
                .reply_bytes_total
                .checked_div(report.replies)
                .unwrap_or(0),
        });
        eprintln!(
            "  {:<26} {n:>5} nodes, {digest:<10} digest: {:>8.0} Syn/s, {:>7.1} µs CPU/Syn",
            which.name(),
            report.replies_per_sec,
            rows.last().map_or(0.0, |r| r.cpu_us_per_syn)
        );
    }
    drop(guard.0.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(20);
    while matches!(guard.0.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(rows)
}

/// One local-cluster run.
#[derive(Debug, Clone, Copy)]
struct ClusterCase {
    nodes: usize,
    interval_ms: u64,
    steady_secs: f64,
    timeout_secs: f64,
    /// Measure the steady state even if the cluster did not converge.
    steady_anyway: bool,
    shutdown_limit_secs: f64,
}

fn measure_cluster_child(which: Impl, case: ClusterCase) -> Result<ClusterReport, String> {
    let mut child = self_command()
        .args([
            "--child-cluster",
            which.slug(),
            &case.nodes.to_string(),
            &case.steady_secs.to_string(),
            &case.timeout_secs.to_string(),
            &case.interval_ms.to_string(),
            if case.steady_anyway { "1" } else { "0" },
            &case.shutdown_limit_secs.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawning the cluster: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut guard = Guard(child);
    let pid = guard.0.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(json) = line.strip_prefix("REPORT ") {
                let _ = tx.send(json.to_string());
            }
        }
    });
    let limit = cluster_child_limit(&case);
    let json = rx
        .recv_timeout(limit)
        .map_err(|_| format!("no report within {limit:?}"))?;
    let mut report: ClusterReport =
        serde_json::from_str(&json).map_err(|e| format!("bad report: {e}"))?;
    // The child's own VmHWM is in the report; the kernel's view is the same figure.
    if report.peak_rss_bytes.is_none() {
        report.peak_rss_bytes = pid_peak_rss_bytes(pid);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(guard.0.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(report)
}

/// The one-host case for one implementation, cluster size and protocol version.
fn measure_one_host(which: Impl, nodes: usize, version: ProtocolVersion, plan: &Plan) -> HostRow {
    let mut row = HostRow {
        implementation: which.name().to_string(),
        cluster_nodes: nodes,
        protocol: format!("{version:?}"),
        gossip_interval_ms: plan.host_interval_ms,
        outcome: "measured".to_string(),
        syn_bytes: None,
        seed_secs: None,
        window_secs: None,
        cpu_ms_per_sec: None,
        bytes_in_per_sec: None,
        bytes_out_per_sec: None,
        datagrams_in_per_sec: None,
        datagrams_out_per_sec: None,
        syns_answered_percent: None,
        node_syns_per_sec: None,
        peak_rss_bytes: None,
        traffic: None,
    };
    if let Err(error) = one_host_into(which, nodes, version, plan, &mut row) {
        row.outcome = format!("{error:#}");
    }
    row
}

fn one_host_into(
    which: Impl,
    nodes: usize,
    version: ProtocolVersion,
    plan: &Plan,
    row: &mut HostRow,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let interval = Duration::from_millis(plan.host_interval_ms);
    let peers = nodes.saturating_sub(1).max(1);
    // The peers are bound first: a cluster whose digest cannot fit a datagram is reported
    // without starting anything.
    let placeholder = SocketAddr::from(([127, 0, 0, 1], 9));
    let mut config = SimConfig::new(placeholder, peers, CLUSTER_ID);
    config.gossip_interval = interval;
    config.protocol = version;
    config.keys_per_peer = KEYS;
    let mut sim = SimulatedCluster::bind(config)?;
    row.syn_bytes = Some(sim.syn_len());
    sim.check_fits()?;
    let version_arg = match version {
        ProtocolVersion::V0 => "v0",
        ProtocolVersion::V1 => "v1",
    };
    let mut child = self_command()
        .args([
            "--child-host",
            which.slug(),
            &plan.host_interval_ms.to_string(),
            version_arg,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning the node")?;
    let stdout = child.stdout.take().expect("piped");
    let mut guard = Guard(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the node's address")?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("unexpected line from the node: {line:?}"))?;
    sim.set_target(addr)?;
    let pid = guard.0.id();
    let stop = AtomicBool::new(false);
    let seed = sim
        .seed(Duration::from_secs_f64(plan.host_seed_timeout_secs), &stop)
        .context("seeding the node's state")?;
    row.seed_secs = Some(seed.as_secs_f64());
    // Warm-up at the protocol's rate: heartbeats rise, the peers become live to the node.
    sim.run(interval * 5, &stop)?;
    let cpu_before = TaskCpu::read(pid)?;
    let traffic = sim.run(Duration::from_secs_f64(plan.host_secs), &stop)?;
    let cpu = TaskCpu::read(pid)?.since(&cpu_before).as_secs_f64();
    let secs = traffic.secs.max(1e-9);
    row.window_secs = Some(traffic.secs);
    row.cpu_ms_per_sec = Some(cpu * 1_000.0 / secs);
    row.bytes_in_per_sec = Some(traffic.bytes_to_node as f64 / secs);
    row.bytes_out_per_sec = Some(traffic.bytes_from_node as f64 / secs);
    row.datagrams_in_per_sec = Some(traffic.datagrams_to_node as f64 / secs);
    row.datagrams_out_per_sec = Some(traffic.datagrams_from_node as f64 / secs);
    row.node_syns_per_sec = Some(traffic.syns_received as f64 / secs);
    if traffic.syns_sent > 0 {
        row.syns_answered_percent =
            Some(traffic.syn_acks_received as f64 * 100.0 / traffic.syns_sent as f64);
    }
    row.peak_rss_bytes = pid_peak_rss_bytes(pid);
    row.traffic = Some(traffic);
    drop(guard.0.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(20);
    while matches!(guard.0.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn orchestrate(plan: &Plan) -> i32 {
    if let Some(path) = &plan.from_json {
        let results = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<Results>(&text).map_err(|e| e.to_string()));
        return match results {
            Ok(results) => write_report(plan, &results),
            Err(error) => {
                eprintln!("cannot read {}: {error}", path.display());
                1
            }
        };
    }
    let started = Instant::now();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "side-by-side benchmark{} — kernel {kernel}, {cpus} CPUs",
        if plan.quick { " (quick)" } else { "" }
    );
    let mut results = Results {
        kernel,
        cpus,
        load: Vec::new(),
        clusters: Vec::new(),
        one_host: Vec::new(),
        runtime_secs: 0.0,
    };
    if plan.cases.load {
        eprintln!("1. one node under Syn load ({} s per case)", plan.load_secs);
        for &n in &plan.state_sizes {
            for &which in &plan.impls {
                match measure_load(which, n, plan.load_secs) {
                    Ok(rows) => results.load.extend(rows),
                    Err(error) => eprintln!("  {} × {n}: {error}", which.name()),
                }
            }
        }
    }
    if plan.cases.clusters {
        eprintln!(
            "2. local clusters (100 ms gossip, {KEYS} keys of 32 B, {} s steady state)",
            plan.steady_secs
        );
        for &nodes in &plan.cluster_sizes {
            for &which in &plan.impls {
                let case = ClusterCase {
                    nodes,
                    interval_ms: 100,
                    steady_secs: plan.steady_secs,
                    timeout_secs: plan.timeout_secs,
                    steady_anyway: false,
                    shutdown_limit_secs: plan.shutdown_limit_secs,
                };
                match measure_cluster_child(which, case) {
                    Ok(report) => results.clusters.push(report),
                    Err(error) => {
                        eprintln!("  {} × {nodes}: {error}", which.name());
                        // In the table too: a cluster that never reported is an outcome.
                        results.clusters.push(no_report(which, case));
                    }
                }
            }
        }
    }
    if plan.cases.large {
        eprintln!(
            "3. large clusters in one process (convergence bound {} s, {} s steady state)",
            plan.large_timeout_secs, plan.large_steady_secs
        );
        for &(nodes, interval_ms) in &plan.large {
            for &which in &plan.impls {
                eprintln!("  {} × {nodes} at {interval_ms} ms", which.name());
                let case = ClusterCase {
                    nodes,
                    interval_ms,
                    steady_secs: plan.large_steady_secs,
                    timeout_secs: plan.large_timeout_secs,
                    steady_anyway: true,
                    shutdown_limit_secs: plan.shutdown_limit_secs,
                };
                match measure_cluster_child(which, case) {
                    Ok(report) => results.clusters.push(report),
                    Err(error) => {
                        eprintln!("  {} × {nodes}: {error}", which.name());
                        // In the table too: a cluster that never reported is an outcome.
                        results.clusters.push(no_report(which, case));
                    }
                }
            }
        }
    }
    if plan.cases.one_host {
        eprintln!(
            "4. one host in a large cluster (simulated peers, {} ms gossip, {} s window)",
            plan.host_interval_ms, plan.host_secs
        );
        for &nodes in &plan.host_sizes {
            for &version in &plan.host_protocols {
                for &which in &plan.impls {
                    let row = measure_one_host(which, nodes, version, plan);
                    eprintln!(
                        "  {:<26} {nodes:>5} nodes {:?}: {}",
                        which.name(),
                        version,
                        match row.cpu_ms_per_sec {
                            Some(cpu) => format!(
                                "{cpu:.2} ms CPU/s, {:.0} B/s in, {:.0} B/s out",
                                row.bytes_in_per_sec.unwrap_or(0.0),
                                row.bytes_out_per_sec.unwrap_or(0.0)
                            ),
                            None => row.outcome.clone(),
                        }
                    );
                    results.one_host.push(row);
                }
            }
        }
    }
    results.runtime_secs = started.elapsed().as_secs_f64();
    write_report(plan, &results)
}

/// Writes the markdown, JSON and SVG reports and prints the markdown.
fn write_report(plan: &Plan, results: &Results) -> i32 {
    if let Err(error) = std::fs::create_dir_all(&plan.out) {
        eprintln!("cannot create {}: {error}", plan.out.display());
        return 1;
    }
    let markdown = render_markdown(results);
    let md_path = plan.out.join("side_by_side.md");
    let json_path = plan.out.join("side_by_side.json");
    let svg_path = plan.out.join("side_by_side.svg");
    let mut code = 0;
    for (path, contents) in [
        (&md_path, markdown.clone()),
        (
            &json_path,
            serde_json::to_string_pretty(results).expect("serializable"),
        ),
    ] {
        if let Err(error) = std::fs::write(path, contents) {
            eprintln!("cannot write {}: {error}", path.display());
            code = 1;
        }
    }
    if let Err(error) = plot(results, &svg_path) {
        eprintln!("cannot draw {}: {error}", svg_path.display());
        code = 1;
    }
    println!("{markdown}");
    eprintln!(
        "report: {} (and {}, {}) — {:.0} s",
        md_path.display(),
        svg_path.display(),
        json_path.display(),
        results.runtime_secs
    );
    code
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.digits$}"))
}

/// "4999 / 4812 of 4999": the fewest peers one of the node's Syn and SynAck digests listed.
fn digest_peers_cell(r: &HostRow) -> String {
    let Some(t) = &r.traffic else {
        return "-".to_string();
    };
    let show = |n: Option<usize>| n.map_or("-".to_string(), |n| n.to_string());
    format!(
        "{} / {} of {}",
        show(t.fewest_peers_in_node_syn),
        show(t.fewest_peers_in_node_syn_ack),
        r.cluster_nodes.saturating_sub(1)
    )
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".to_string(), |b| {
        format!("{:.1} MiB", b as f64 / 1_048_576.0)
    })
}

/// The row of a cluster whose child process sent no report within `cluster_child_limit`.
fn no_report(which: Impl, case: ClusterCase) -> ClusterReport {
    let mut report = ClusterReport::started(
        which.name(),
        "-",
        case.nodes,
        KEYS,
        case.interval_ms,
        Duration::ZERO,
    );
    report.outcome = Outcome::NoReport;
    report.convergence_timeout_secs = Some(cluster_child_limit(&case).as_secs_f64());
    report
}

/// How long a cluster's child process may take to report: startup of a large cluster, two
/// waits, two steady windows at most, the shutdown limit.
fn cluster_child_limit(case: &ClusterCase) -> Duration {
    Duration::from_secs_f64(
        2.0 * case.steady_secs + 2.0 * case.timeout_secs + case.shutdown_limit_secs + 180.0,
    )
}

/// "12.34 s", or "did not converge in 120 s (37/500)".
fn convergence_cell(r: &ClusterReport) -> String {
    match (r.convergence_secs, r.outcome) {
        (Some(secs), _) => format!("{secs:.2} s"),
        (None, Outcome::ConvergenceTimeout) => format!(
            "did not converge in {} s ({}/{})",
            r.convergence_timeout_secs
                .map_or("?".to_string(), |t| format!("{t:.0}")),
            r.converged_nodes,
            r.nodes
        ),
        (None, Outcome::NoReport) => format!(
            "no report in {} s (stopped)",
            r.convergence_timeout_secs
                .map_or("?".to_string(), |t| format!("{t:.0}"))
        ),
        (None, _) => "-".to_string(),
    }
}

fn render_markdown(results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {} vCPU, Linux {}. Run took {:.0} s.\n",
        results.cpus, results.kernel, results.runtime_secs
    );
    if !results.load.is_empty() {
        let _ = writeln!(
            md,
            "### One node under Syn load (16 source ports, one Syn in flight each)\n\n\
             | implementation | state (nodes × 10 keys) | digest | Syn/s answered | node CPU per Syn | node CPU (cores) | p50 | p99 | lost (no reply in 1 s) | reply size |\n\
             |---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
    }
    for row in &results.load {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.1} µs | {:.2} | {:.0} µs | {:.0} µs | {} | {} B |",
            row.implementation,
            row.state_nodes,
            row.digest,
            row.replies_per_sec,
            row.cpu_us_per_syn,
            row.node_cores,
            row.p50_us,
            row.p99_us,
            row.lost,
            row.reply_bytes_avg
        );
    }
    if !results.clusters.is_empty() {
        let _ = writeln!(
            md,
            "\n### Local clusters (all nodes in one process, 10 keys of 32 B per node)\n\n\
             | implementation | nodes | gossip | convergence | update reaches all | CPU per node | messages/s per node | bytes/s per node | datagrams lost | peak memory | shutdown | outcome |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
    }
    let mut any_unconverged = false;
    for r in &results.clusters {
        let mark = if r.steady_unconverged {
            any_unconverged = true;
            " *"
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} ms | {} | {} | {} ms/s{mark} | {}{mark} | {}{mark} | {} %{mark} | {} | {} | {:?} |",
            r.implementation,
            r.nodes,
            r.gossip_interval_ms,
            convergence_cell(r),
            r.update_propagation_secs
                .map_or("-".to_string(), |s| format!("{s:.3} s")),
            opt(r.cpu_ms_per_node_per_sec, 2),
            opt(r.messages_per_sec_per_node, 1),
            opt(r.bytes_per_sec_per_node, 0),
            opt(r.datagrams_lost_percent, 2),
            mib(r.peak_rss_bytes),
            match (r.shutdown_secs, r.shutdown_limit_secs) {
                (_, Some(limit)) => format!("not done in {limit:.0} s"),
                (Some(secs), None) => format!("{secs:.2} s"),
                (None, None) => "-".to_string(),
            },
            r.outcome
        );
    }
    if any_unconverged {
        let _ = writeln!(
            md,
            "\n\\* measured on a cluster that had not converged (its steady state was measured anyway)."
        );
    }
    if !results.one_host.is_empty() {
        let interval = results.one_host[0].gossip_interval_ms;
        let _ = writeln!(
            md,
            "\n### One host in a large cluster (one real node, simulated peers, {interval} ms gossip)\n\n\
             The peers send the node 3 Syns per interval (each node gossips to 3 peers a round) and \
             answer its own 3 rounds per interval; digests list every node with rising heartbeats, \
             1 % of the peers change a key per interval. CPU is the node's process (`/proc`), bytes are \
             UDP payload.\n\n\
             | implementation | cluster | protocol | node CPU | bytes/s in | bytes/s out | datagrams/s in / out | Syns answered | node's Syns/s | Syn size | peers in its digests (Syn / SynAck, fewest) | seeding | peak memory | outcome |\n\
             |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
    }
    for r in &results.one_host {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            r.implementation,
            r.cluster_nodes,
            r.protocol,
            r.cpu_ms_per_sec
                .map_or("-".to_string(), |c| format!("{c:.2} ms/s")),
            opt(r.bytes_in_per_sec, 0),
            opt(r.bytes_out_per_sec, 0),
            opt(r.datagrams_in_per_sec, 1),
            opt(r.datagrams_out_per_sec, 1),
            r.syns_answered_percent
                .map_or("-".to_string(), |p| format!("{p:.0} %")),
            opt(r.node_syns_per_sec, 1),
            r.syn_bytes.map_or("-".to_string(), |b| format!("{b} B")),
            digest_peers_cell(r),
            r.seed_secs.map_or("-".to_string(), |s| format!("{s:.1} s")),
            mib(r.peak_rss_bytes),
            r.outcome.replace('|', "/")
        );
    }
    // Ratios against chitchat, where both figures exist.
    let _ = writeln!(
        md,
        "\n### Ratios (chitchat 0.13 ÷ chitchat-uring; above 1 means chitchat-uring is better)\n\n\
         | comparison | figure | io_uring | epoll |\n|---|---|---:|---:|"
    );
    let find_load = |who: Impl, n: usize, d: DigestMode| {
        results
            .load
            .iter()
            .find(|r| r.implementation == who.name() && r.state_nodes == n && r.digest == d)
    };
    let mut sizes: Vec<usize> = results.load.iter().map(|r| r.state_nodes).collect();
    sizes.dedup();
    for n in sizes {
        for d in [DigestMode::UpToDate, DigestMode::Empty] {
            let Some(theirs) = find_load(Impl::Chitchat, n, d) else {
                continue;
            };
            let ratio = |who: Impl, f: &dyn Fn(&LoadRow) -> f64, inverse: bool| {
                find_load(who, n, d).map_or("-".to_string(), |ours| {
                    let r = if inverse {
                        f(ours) / f(theirs)
                    } else {
                        f(theirs) / f(ours)
                    };
                    format!("{r:.2}×")
                })
            };
            let _ = writeln!(
                md,
                "| load, {n} nodes, {d} digest | Syn/s (ours ÷ chitchat) | {} | {} |",
                ratio(Impl::OursUring, &|r| r.replies_per_sec, true),
                ratio(Impl::OursEpoll, &|r| r.replies_per_sec, true)
            );
            let _ = writeln!(
                md,
                "| load, {n} nodes, {d} digest | CPU per Syn | {} | {} |",
                ratio(Impl::OursUring, &|r| r.cpu_us_per_syn, false),
                ratio(Impl::OursEpoll, &|r| r.cpu_us_per_syn, false)
            );
        }
    }
    let find_cluster = |who: Impl, n: usize, ms: u64| {
        results
            .clusters
            .iter()
            .find(|r| r.implementation == who.name() && r.nodes == n && r.gossip_interval_ms == ms)
    };
    let mut sizes: Vec<(usize, u64)> = results
        .clusters
        .iter()
        .map(|r| (r.nodes, r.gossip_interval_ms))
        .collect();
    sizes.dedup();
    type Figure = fn(&ClusterReport) -> Option<f64>;
    let figures: [(&str, Figure); 4] = [
        ("CPU per node", |r| r.cpu_ms_per_node_per_sec),
        ("convergence time", |r| r.convergence_secs),
        ("bytes/s per node", |r| r.bytes_per_sec_per_node),
        ("peak memory", |r| r.peak_rss_bytes.map(|b| b as f64)),
    ];
    for (n, ms) in sizes {
        let Some(theirs) = find_cluster(Impl::Chitchat, n, ms) else {
            continue;
        };
        for (name, f) in figures {
            let ratio = |who: Impl| {
                let Some(ours) = find_cluster(who, n, ms) else {
                    return "-".to_string();
                };
                match (f(theirs), f(ours)) {
                    (Some(t), Some(o)) => format!("{:.2}×", t / o),
                    (None, Some(_)) if name == "convergence time" => {
                        "ours converged, chitchat did not".to_string()
                    }
                    _ => "-".to_string(),
                }
            };
            let _ = writeln!(
                md,
                "| cluster of {n} at {ms} ms | {name} | {} | {} |",
                ratio(Impl::OursUring),
                ratio(Impl::OursEpoll)
            );
        }
    }
    let find_host = |who: Impl, n: usize, p: &str| {
        results
            .one_host
            .iter()
            .find(|r| r.implementation == who.name() && r.cluster_nodes == n && r.protocol == p)
    };
    let mut hosts: Vec<(usize, String)> = results
        .one_host
        .iter()
        .map(|r| (r.cluster_nodes, r.protocol.clone()))
        .collect();
    hosts.dedup();
    type HostFigure = fn(&HostRow) -> Option<f64>;
    let host_figures: [(&str, HostFigure); 2] = [
        ("node CPU per second", |r| r.cpu_ms_per_sec),
        ("bytes/s out", |r| r.bytes_out_per_sec),
    ];
    for (n, p) in hosts {
        let Some(theirs) = find_host(Impl::Chitchat, n, &p) else {
            continue;
        };
        for (name, f) in host_figures {
            let ratio = |who: Impl| {
                find_host(who, n, &p)
                    .and_then(|ours| Some(f(theirs)? / f(ours)?))
                    .map_or("-".to_string(), |r| format!("{r:.2}×"))
            };
            let _ = writeln!(
                md,
                "| one host, {n}-node cluster, {p} | {name} | {} | {} |",
                ratio(Impl::OursUring),
                ratio(Impl::OursEpoll)
            );
        }
    }
    md
}

/// The y of a point on a panel: the figure, or for a cluster that did not converge, its bound
/// on the convergence panel (drawn as a cross).
type PlotFigure = fn(&ClusterReport) -> Option<(f64, bool)>;

fn plot(results: &Results, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let with_host = results.one_host.iter().any(|r| r.cpu_ms_per_sec.is_some());
    let width = if with_host { 1800 } else { 1200 };
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, if with_host { 3 } else { 2 }));
    let charts: [(&str, &str, PlotFigure); 2] = [
        ("CPU per node (ms of CPU per second)", "ms/s", |r| {
            r.cpu_ms_per_node_per_sec.map(|c| (c, r.steady_unconverged))
        }),
        ("Time to full convergence (s)", "s", |r| {
            match r.convergence_secs {
                Some(secs) => Some((secs, false)),
                None if r.outcome == Outcome::ConvergenceTimeout => {
                    r.convergence_timeout_secs.map(|t| (t, true))
                }
                None => None,
            }
        }),
    ];
    let colors = [
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0x2c, 0xa0, 0x2c),
    ];
    let max_nodes = results.clusters.iter().map(|r| r.nodes).max().unwrap_or(10) as f64;
    for (panel, (title, unit, figure)) in panels.iter().zip(charts) {
        let max_y = results
            .clusters
            .iter()
            .filter_map(|r| figure(r).map(|(y, _)| y))
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(55)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_nodes * 1.05, 0.0..max_y)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("cluster size (nodes); ● 100 ms gossip, ▲ other intervals, × not converged")
            .y_desc(unit)
            .draw()?;
        for (which, color) in Impl::ALL.into_iter().zip(colors) {
            let mine = || {
                results
                    .clusters
                    .iter()
                    .filter(move |r| r.implementation == which.name())
            };
            // The line joins the 100 ms clusters that converged.
            let mut line: Vec<(f64, f64)> = mine()
                .filter(|r| r.gossip_interval_ms == 100)
                .filter_map(|r| match figure(r)? {
                    (y, false) => Some((r.nodes as f64, y)),
                    (_, true) => None,
                })
                .collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(which.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
            let others: Vec<(f64, f64, bool)> = mine()
                .filter_map(|r| {
                    let (y, unconverged) = figure(r)?;
                    (r.gossip_interval_ms != 100 || unconverged).then_some((
                        r.nodes as f64,
                        y,
                        unconverged,
                    ))
                })
                .collect();
            chart.draw_series(
                others
                    .iter()
                    .filter(|p| !p.2)
                    .map(|&(x, y, _)| TriangleMarker::new((x, y), 6, color.filled())),
            )?;
            chart.draw_series(
                others
                    .iter()
                    .filter(|p| p.2)
                    .map(|&(x, y, _)| Cross::new((x, y), 6, color.stroke_width(2))),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    if with_host && let Some(panel) = panels.get(2) {
        plot_one_host(results, panel, &colors)?;
    }
    root.present()?;
    Ok(())
}

/// The one-host case: the node's CPU against the simulated cluster size, per protocol version.
fn plot_one_host(
    results: &Results,
    panel: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    colors: &[RGBColor; 3],
) -> Result<(), Box<dyn std::error::Error>> {
    let max_nodes = results
        .one_host
        .iter()
        .map(|r| r.cluster_nodes)
        .max()
        .unwrap_or(10) as f64;
    let max_y = results
        .one_host
        .iter()
        .filter_map(|r| r.cpu_ms_per_sec)
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.15;
    let interval = results.one_host.first().map_or(0, |r| r.gossip_interval_ms);
    let mut chart = ChartBuilder::on(panel)
        .caption(
            format!("One host in a large cluster: node CPU ({interval} ms gossip)"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_nodes * 1.05, 0.0..max_y)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("simulated cluster size (nodes); thick ● V0, thin ▲ V1")
        .y_desc("ms of CPU per second")
        .draw()?;
    for (which, color) in Impl::ALL.into_iter().zip(colors.iter().copied()) {
        for protocol in ["V0", "V1"] {
            let mut points: Vec<(f64, f64)> = results
                .one_host
                .iter()
                .filter(|r| r.implementation == which.name() && r.protocol == protocol)
                .filter_map(|r| Some((r.cluster_nodes as f64, r.cpu_ms_per_sec?)))
                .collect();
            if points.is_empty() {
                continue;
            }
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let width = if protocol == "V0" { 2 } else { 1 };
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(width)))?
                .label(format!("{} {protocol}", which.name()))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
                });
            if protocol == "V0" {
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )?;
            } else {
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| TriangleMarker::new(p, 6, color.filled())),
                )?;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
