//! `cluster`: N nodes in this process on 127.0.0.1; convergence, one update, steady state.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use chitchat_uring_tools::bench_support::{
    ClusterReport, ClusterSpec, LocalCluster, MeasureOptions, Outcome, Progress, UringCluster,
    describe_transport, measure_cluster,
};

use crate::common::{self, TransportArg, human_bytes, human_mib};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes to start.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=5_000))]
    nodes: u32,
    /// Keys per node (32-byte values).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    keys: u32,
    /// Gossip interval in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    gossip_ms: u64,
    /// Length of the steady-state measurement, in seconds.
    #[arg(long, default_value_t = 10.0)]
    for_secs: f64,
    /// Longest wait for convergence (and then for the update), in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    /// Print the summary as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    /// UDP backend.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    transport: TransportArg,
    /// Keyed cluster: every node seals its datagrams under the first key of this file (one
    /// base64-encoded 32-byte key per line), so the summary shows what keyed gossip costs.
    #[arg(long, value_name = "PATH")]
    key_file: Option<std::path::PathBuf>,
    /// Serve every node's Prometheus metrics (label `node`) at `GET /metrics` on this address.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Nodes answer every source in full, as chitchat does (no anti-amplification budget): shows
    /// what the budget costs a cluster whose nodes all join at once.
    #[arg(long)]
    no_amplification_limits: bool,
}

fn secs(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| *d <= Duration::from_secs(7 * 24 * 3_600))
        .ok_or_else(|| anyhow::anyhow!("{flag} {value}: expected seconds between 0 and 604800"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let steady = secs("--for-secs", args.for_secs)?;
    let timeout = secs("--timeout-secs", args.timeout_secs)?;
    let spec = ClusterSpec {
        nodes: args.nodes as usize,
        keys: args.keys as usize,
        gossip_interval: Duration::from_millis(args.gossip_ms),
        cluster_id: "chitchat-uring-local".to_string(),
        amplification_limits: !args.no_amplification_limits,
    };
    common::prepare_for_nodes(spec.nodes)?;
    let transport = common::keyed_or_plain(
        args.transport.transport(),
        args.key_file.as_deref(),
        false,
        &spec.cluster_id,
    )?;
    let keyed = args.key_file.is_some();
    if let Some(addr) = args.metrics_addr {
        common::serve_metrics(addr)?;
    }
    let mut display = ProgressDisplay::new();
    display.line(&format!(
        "starting {} nodes on 127.0.0.1 ({} keys each, gossip every {} ms)",
        spec.nodes, spec.keys, args.gossip_ms
    ));
    let started = Instant::now();
    let cluster = UringCluster::start(&spec, transport.as_ref()).context("starting the cluster")?;
    let startup = started.elapsed();
    let transport_name = cluster
        .transport_kind()
        .map(|k| describe_transport(&k))
        .unwrap_or_default();
    let transport_name = if keyed {
        format!("{transport_name}, keyed (XChaCha20-Poly1305)")
    } else {
        transport_name
    };
    display.line(&format!("transport: {transport_name}"));
    let base = ClusterReport::started(
        "chitchat-uring",
        transport_name,
        spec.nodes,
        spec.keys,
        args.gossip_ms,
        startup,
    );
    let options = MeasureOptions {
        steady,
        timeout,
        poll: Duration::from_millis(20),
    };
    let mut cluster: Box<dyn LocalCluster> = Box::new(cluster);
    let mut report = measure_cluster(
        cluster.as_mut(),
        base,
        &options,
        &common::INTERRUPTED,
        &mut |p| display.progress(p),
    );
    display.finish();
    match report.outcome {
        Outcome::Interrupted => display.line("interrupted: stopping every node"),
        Outcome::ConvergenceTimeout => display.line(&format!(
            "the cluster did not converge within {:.1} s: {}/{} nodes saw the whole cluster",
            timeout.as_secs_f64(),
            report.converged_nodes,
            report.nodes
        )),
        Outcome::PropagationTimeout => display.line(&format!(
            "the update did not reach every node within {:.1} s",
            timeout.as_secs_f64()
        )),
        Outcome::Complete | Outcome::NoReport => {}
    }
    let stopping = Instant::now();
    let shutdown = cluster.shutdown();
    let shutdown_secs = stopping.elapsed().as_secs_f64();
    display.line(&format!("all nodes stopped in {shutdown_secs:.2} s"));
    report.shutdown_secs = Some(shutdown_secs);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    shutdown.context("shutting the nodes down")?;
    Ok(match report.outcome {
        Outcome::Complete => ExitCode::SUCCESS,
        Outcome::Interrupted => ExitCode::from(130),
        Outcome::ConvergenceTimeout | Outcome::PropagationTimeout | Outcome::NoReport => {
            ExitCode::FAILURE
        }
    })
}

fn print_summary(report: &ClusterReport) {
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_string());
    let rows = vec![
        ("transport".to_string(), report.transport.clone()),
        ("nodes".to_string(), report.nodes.to_string()),
        (
            "keys per node".to_string(),
            format!("{} (32-byte values)", report.keys_per_node),
        ),
        (
            "gossip interval".to_string(),
            format!("{} ms", report.gossip_interval_ms),
        ),
        (
            "startup".to_string(),
            format!("{:.3} s", report.startup_secs),
        ),
        (
            "full convergence".to_string(),
            or_dash(report.convergence_secs.map(|s| format!("{s:.3} s"))),
        ),
        (
            "one update reaches all".to_string(),
            or_dash(report.update_propagation_secs.map(|s| format!("{s:.3} s"))),
        ),
        (
            "steady-state window".to_string(),
            or_dash(report.steady_secs.map(|s| format!("{s:.1} s"))),
        ),
        (
            "messages/s per node".to_string(),
            or_dash(report.messages_per_sec_per_node.map(|m| format!("{m:.1}"))),
        ),
        (
            "bytes/s per node".to_string(),
            or_dash(
                report
                    .bytes_per_sec_per_node
                    .map(|b| format!("{}/s", human_bytes(b))),
            ),
        ),
        (
            "datagrams lost".to_string(),
            or_dash(
                report
                    .datagrams_lost_percent
                    .map(|p| format!("{p:.2} % of those sent in the window")),
            ),
        ),
        (
            "CPU per node".to_string(),
            or_dash(
                report
                    .cpu_ms_per_node_per_sec
                    .map(|ms| format!("{ms:.2} ms/s ({:.2} % of a core)", ms / 10.0)),
            ),
        ),
        (
            "peak memory (VmHWM)".to_string(),
            or_dash(report.peak_rss_bytes.map(|b| {
                format!(
                    "{} ({} per node)",
                    human_mib(b),
                    human_mib(b / report.nodes.max(1) as u64)
                )
            })),
        ),
        (
            "shutdown".to_string(),
            or_dash(report.shutdown_secs.map(|s| format!("{s:.3} s"))),
        ),
        (
            "outcome".to_string(),
            match report.outcome {
                Outcome::Complete => "complete",
                Outcome::Interrupted => "interrupted (figures so far)",
                Outcome::ConvergenceTimeout => "did not converge in time",
                Outcome::PropagationTimeout => "the update did not reach every node in time",
                Outcome::NoReport => "no report",
            }
            .to_string(),
        ),
    ];
    common::print_table(&rows);
}

/// Progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise.
struct ProgressDisplay {
    tty: bool,
    drawn: bool,
    last_line: Option<Instant>,
    last_phase: &'static str,
}

impl ProgressDisplay {
    fn new() -> Self {
        ProgressDisplay {
            tty: std::io::stderr().is_terminal(),
            drawn: false,
            last_line: None,
            last_phase: "",
        }
    }

    /// A message on its own line (clears a bar first).
    fn line(&mut self, message: &str) {
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "\r\x1b[2K");
            self.drawn = false;
        }
        let _ = writeln!(err, "{message}");
    }

    fn progress(&mut self, progress: Progress) {
        let (phase, done, total, elapsed, unit) = match progress {
            Progress::Converging {
                converged,
                total,
                elapsed,
            } => (
                "converging",
                converged,
                total,
                elapsed,
                "nodes see the whole cluster",
            ),
            Progress::Propagating {
                have,
                total,
                elapsed,
            } => ("update", have, total, elapsed, "nodes have the update"),
            Progress::Steady { elapsed, total } => (
                "steady state",
                elapsed.as_millis() as usize,
                total.as_millis().max(1) as usize,
                elapsed,
                "ms measured",
            ),
        };
        if self.tty {
            // A finished phase keeps its last bar on its own line.
            if self.drawn && phase != self.last_phase {
                eprintln!();
            }
            self.last_phase = phase;
            let width = 30;
            let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2K{phase:>12} [{}{}] {done}/{total} {unit} ({:.1} s)",
                "#".repeat(filled),
                "-".repeat(width - filled),
                elapsed.as_secs_f64()
            );
            let _ = err.flush();
            self.drawn = true;
        } else {
            // Plain lines: at a phase change, then at most one a second.
            let due = self
                .last_line
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if phase != self.last_phase || due {
                self.last_phase = phase;
                self.last_line = Some(Instant::now());
                eprintln!(
                    "{phase}: {done}/{total} {unit} ({:.1} s)",
                    elapsed.as_secs_f64()
                );
            }
        }
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}
