//! chitchat-uring (io_uring, epoll) against chitchat 0.13, in one run:
//!
//! 1. one node under Syn load (the `load` generator, 16 source ports): Syns answered per
//!    second and the node's CPU per answered Syn, with 100 and 1 000 nodes of state;
//! 2. local clusters of 10, 50, 100 and 200 nodes (100 ms gossip, 10 keys of 32 B): time to
//!    converge, time for one update to reach all, steady-state CPU, bytes and messages per node,
//!    peak memory.
//!
//! Every node under test (and every cluster) runs in a child process (this binary re-executed
//! with `--child-…`), so CPU and peak memory are that implementation's alone. Writes a
//! markdown table, a JSON dump and an SVG plot under `target/bench-report/`.
//!
//! `cargo bench --bench side_by_side -- [--quick] [--out DIR]` (or `scripts/bench.sh`).

mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use chitchat_uring_tools::bench_support::{
    ClusterReport, ClusterSpec, LocalCluster, MeasureOptions, Progress, UringCluster,
    describe_transport, measure_cluster, pid_cpu_time, pid_peak_rss_bytes,
};
use chitchat_uring_tools::loadgen::{self, DigestMode, LoadConfig, LoadReport};
use common::{CLUSTER_ID, ChitchatCluster, Impl, KEYS, serve};
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
    runtime_secs: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("--child-serve") => child_serve(&args[1..]),
        Some("--child-cluster") => child_cluster(&args[1..]),
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

/// `--child-cluster IMPL NODES STEADY_SECS TIMEOUT_SECS`: measures one local cluster and prints
/// `REPORT {json}`.
fn child_cluster(args: &[String]) -> i32 {
    let parsed = (
        args.first().and_then(|s| Impl::from_slug(s)),
        args.get(1).and_then(|s| s.parse::<usize>().ok()),
        args.get(2).and_then(|s| s.parse::<f64>().ok()),
        args.get(3).and_then(|s| s.parse::<f64>().ok()),
    );
    let (Some(which), Some(nodes), Some(steady), Some(timeout)) = parsed else {
        eprintln!("usage: --child-cluster IMPL NODES STEADY_SECS TIMEOUT_SECS");
        return 2;
    };
    let spec = ClusterSpec {
        nodes,
        keys: KEYS,
        gossip_interval: Duration::from_millis(100),
        cluster_id: CLUSTER_ID.to_string(),
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
    let base = ClusterReport::started(which.name(), transport, nodes, KEYS, 100, started.elapsed());
    let options = MeasureOptions {
        steady: Duration::from_secs_f64(steady),
        timeout: Duration::from_secs_f64(timeout),
        poll: Duration::from_millis(20),
    };
    let stop = AtomicBool::new(false);
    let mut last = "";
    let report = measure_cluster(cluster.as_mut(), base, &options, &stop, &mut |p| {
        let phase = match p {
            Progress::Converging { .. } => "converging",
            Progress::Propagating { .. } => "propagating an update",
            Progress::Steady { .. } => "steady state",
        };
        if phase != last {
            eprintln!("    {} × {nodes}: {phase}", which.name());
            last = phase;
        }
    });
    if let Err(error) = cluster.shutdown() {
        eprintln!("shutdown: {error:#}");
    }
    println!(
        "REPORT {}",
        serde_json::to_string(&report).expect("serializable")
    );
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

fn measure_cluster_child(which: Impl, nodes: usize, plan: &Plan) -> Result<ClusterReport, String> {
    let mut child = self_command()
        .args([
            "--child-cluster",
            which.slug(),
            &nodes.to_string(),
            &plan.steady_secs.to_string(),
            &plan.timeout_secs.to_string(),
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
    let limit = Duration::from_secs_f64(plan.steady_secs + 2.0 * plan.timeout_secs + 60.0);
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
        runtime_secs: 0.0,
    };
    eprintln!("1. one node under Syn load ({} s per case)", plan.load_secs);
    for &n in &plan.state_sizes {
        for which in Impl::ALL {
            match measure_load(which, n, plan.load_secs) {
                Ok(rows) => results.load.extend(rows),
                Err(error) => eprintln!("  {} × {n}: {error}", which.name()),
            }
        }
    }
    eprintln!(
        "2. local clusters (100 ms gossip, {KEYS} keys of 32 B, {} s steady state)",
        plan.steady_secs
    );
    for &nodes in &plan.cluster_sizes {
        for which in Impl::ALL {
            match measure_cluster_child(which, nodes, plan) {
                Ok(report) => results.clusters.push(report),
                Err(error) => eprintln!("  {} × {nodes}: {error}", which.name()),
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

fn render_markdown(results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {} vCPU, Linux {}. Run took {:.0} s.\n",
        results.cpus, results.kernel, results.runtime_secs
    );
    let _ = writeln!(
        md,
        "### One node under Syn load (16 source ports, one Syn in flight each)\n\n\
         | implementation | state (nodes × 10 keys) | digest | Syn/s answered | node CPU per Syn | node CPU (cores) | p50 | p99 | lost (no reply in 1 s) | reply size |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
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
    let _ = writeln!(
        md,
        "\n### Local clusters (all nodes in one process, 100 ms gossip, 10 keys of 32 B per node)\n\n\
         | implementation | nodes | convergence | update reaches all | CPU per node | messages/s per node | bytes/s per node | datagrams lost | peak memory | outcome |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in &results.clusters {
        let _ = writeln!(
            md,
            "| {} | {} | {} s | {} s | {} ms/s | {} | {} | {} % | {} | {:?} |",
            r.implementation,
            r.nodes,
            opt(r.convergence_secs, 2),
            opt(r.update_propagation_secs, 3),
            opt(r.cpu_ms_per_node_per_sec, 2),
            opt(r.messages_per_sec_per_node, 1),
            opt(r.bytes_per_sec_per_node, 0),
            opt(r.datagrams_lost_percent, 2),
            r.peak_rss_bytes.map_or("-".to_string(), |b| format!(
                "{:.1} MiB",
                b as f64 / 1_048_576.0
            )),
            r.outcome
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
    let find_cluster = |who: Impl, n: usize| {
        results
            .clusters
            .iter()
            .find(|r| r.implementation == who.name() && r.nodes == n)
    };
    let mut sizes: Vec<usize> = results.clusters.iter().map(|r| r.nodes).collect();
    sizes.dedup();
    type Figure = fn(&ClusterReport) -> Option<f64>;
    let figures: [(&str, Figure); 4] = [
        ("CPU per node", |r| r.cpu_ms_per_node_per_sec),
        ("convergence time", |r| r.convergence_secs),
        ("bytes/s per node", |r| r.bytes_per_sec_per_node),
        ("peak memory", |r| r.peak_rss_bytes.map(|b| b as f64)),
    ];
    for n in sizes {
        let Some(theirs) = find_cluster(Impl::Chitchat, n) else {
            continue;
        };
        for (name, f) in figures {
            let ratio = |who: Impl| {
                find_cluster(who, n)
                    .and_then(|ours| Some(f(theirs)? / f(ours)?))
                    .map_or("-".to_string(), |r| format!("{r:.2}×"))
            };
            let _ = writeln!(
                md,
                "| cluster of {n} | {name} | {} | {} |",
                ratio(Impl::OursUring),
                ratio(Impl::OursEpoll)
            );
        }
    }
    md
}

fn plot(results: &Results, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    type Figure = fn(&ClusterReport) -> Option<f64>;
    let charts: [(&str, &str, Figure); 2] = [
        ("CPU per node (ms of CPU per second)", "ms/s", |r| {
            r.cpu_ms_per_node_per_sec
        }),
        ("Time to full convergence (s)", "s", |r| r.convergence_secs),
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
            .filter_map(figure)
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_nodes * 1.05, 0.0..max_y)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("cluster size (nodes)")
            .y_desc(unit)
            .draw()?;
        for (which, color) in Impl::ALL.into_iter().zip(colors) {
            let mut points: Vec<(f64, f64)> = results
                .clusters
                .iter()
                .filter(|r| r.implementation == which.name())
                .filter_map(|r| Some((r.nodes as f64, figure(r)?)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(which.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
