//! `load`: Syns from many source ports at one node; replies/s and reply latency. With
//! `--cluster-size N`: the node's N-1 peers simulated at the protocol's rate instead (what one
//! host of a large cluster receives), after they have taught it their state.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use chitchat_uring_tools::bench_support::TaskCpu;
use chitchat_uring_tools::loadgen::simulated::{
    NodeKnowledge, SimConfig, SimTraffic, SimulatedCluster,
};
use chitchat_uring_tools::loadgen::{self, DigestMode, LoadConfig};
use clap::ValueEnum;
use serde::Serialize;

use crate::common::{self, ProtocolArg};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node to load, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    target: String,
    /// UDP sockets (source ports), one Syn in flight each.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4_096))]
    senders: u32,
    /// Length of the run, in seconds.
    #[arg(long, default_value_t = 5.0)]
    for_secs: f64,
    /// What the Syns carry: an empty digest (the node sends its state), or the node's own
    /// digest (the node sends an empty delta).
    #[arg(long, value_enum, default_value_t = DigestArg::Empty)]
    digest: DigestArg,
    /// Cluster id of the target.
    #[arg(long, value_name = "ID", default_value = "testing")]
    cluster: String,
    /// Most Syns per second, all senders together (default: as fast as replies come).
    #[arg(long, value_name = "N")]
    rate: Option<f64>,
    /// Protocol version of the Syns.
    #[arg(long, value_enum, default_value_t = ProtocolArg::V0)]
    protocol: ProtocolArg,
    /// Print the report as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    /// Simulate the rest of a cluster of N nodes (the target included) instead of firing
    /// Syns: N-1 peers, each on its own 127.10.x.y address, send the target 3 Syns per gossip
    /// interval with digests of every node (heartbeats rising, keys changing), and answer its
    /// own gossip. They first teach it their state, then measure for --for-secs.
    #[arg(long, value_name = "N", conflicts_with_all = ["senders", "digest", "rate"],
          value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    cluster_size: Option<u32>,
    /// Gossip interval of the simulated cluster, in milliseconds (Quickwit uses 1 s).
    #[arg(long, value_name = "MS", default_value_t = 1_000, requires = "cluster_size",
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    gossip_interval_ms: u64,
    /// Share of the simulated peers that change one key per interval.
    #[arg(
        long,
        value_name = "SHARE",
        default_value_t = 0.01,
        requires = "cluster_size"
    )]
    update_share: f64,
    /// Longest wait for the target to learn the simulated cluster, in seconds.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 120.0,
        requires = "cluster_size"
    )]
    seed_timeout_secs: f64,
    /// Pid of the target's process: its CPU (from /proc) over the measured window is reported.
    #[arg(long, value_name = "PID", requires = "cluster_size")]
    node_pid: Option<u32>,
}

/// What `load --cluster-size` measured.
#[derive(Debug, Serialize)]
struct SimulationReport {
    target: SocketAddr,
    cluster_size: usize,
    gossip_interval_ms: u64,
    protocol: String,
    syn_bytes: usize,
    seed_secs: f64,
    /// What the target's latest digest knew when the window ended.
    knowledge: NodeKnowledge,
    /// The measured window (after seeding and 5 intervals of warm-up).
    traffic: SimTraffic,
    bytes_in_per_sec: f64,
    bytes_out_per_sec: f64,
    /// The target's process CPU, ms per second, when --node-pid is given.
    node_cpu_ms_per_sec: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DigestArg {
    Empty,
    UpToDate,
}

fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    let mut addrs = target
        .to_socket_addrs()
        .map_err(|e| anyhow!("--target {target}: not a HOST:PORT address ({e})"))?;
    let addr = addrs
        .next()
        .ok_or_else(|| anyhow!("--target {target}: resolves to no address"))?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        bail!("--target {target}: not an address a node can listen on");
    }
    Ok(addr)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let target = resolve(&args.target)?;
    if args.cluster_size.is_some() {
        return simulate(&args, target);
    }
    let duration = Duration::try_from_secs_f64(args.for_secs)
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(86_400))
        .ok_or_else(|| {
            anyhow!(
                "--for-secs {}: expected seconds in (0, 86400]",
                args.for_secs
            )
        })?;
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("--rate {rate}: expected a positive number of Syns per second");
    }
    let config = LoadConfig {
        target,
        senders: args.senders as usize,
        duration,
        digest: match args.digest {
            DigestArg::Empty => DigestMode::Empty,
            DigestArg::UpToDate => DigestMode::UpToDate,
        },
        cluster_id: args.cluster.clone(),
        rate: args.rate,
        protocol: args.protocol.into(),
        reply_timeout: Duration::from_secs(1),
    };
    let syn = loadgen::build_syn(&config)?;
    eprintln!(
        "loading {target} for {:.1} s: {} senders, {} digest ({} byte Syn)",
        duration.as_secs_f64(),
        config.senders,
        config.digest,
        syn.len()
    );
    let report = loadgen::run_with_syn(&config, &syn, &common::INTERRUPTED)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let ms = |us: f64| format!("{:.3} ms", us / 1_000.0);
        let avg_reply = report
            .reply_bytes_total
            .checked_div(report.replies)
            .unwrap_or(0);
        common::print_table(&[
            ("target".to_string(), report.target.to_string()),
            ("senders".to_string(), report.senders.to_string()),
            ("digest".to_string(), report.digest.to_string()),
            (
                "duration".to_string(),
                format!("{:.2} s", report.duration_secs),
            ),
            ("Syn size".to_string(), format!("{} B", report.syn_bytes)),
            ("Syns sent".to_string(), report.syns_sent.to_string()),
            ("replies".to_string(), report.replies.to_string()),
            (
                "replies/s".to_string(),
                format!("{:.0}", report.replies_per_sec),
            ),
            (
                "lost (no reply in 1 s)".to_string(),
                report.lost.to_string(),
            ),
            ("send errors".to_string(), report.send_errors.to_string()),
            ("avg reply size".to_string(), format!("{avg_reply} B")),
            ("latency p50".to_string(), ms(report.latency.p50_us)),
            ("latency p90".to_string(), ms(report.latency.p90_us)),
            ("latency p99".to_string(), ms(report.latency.p99_us)),
            ("latency max".to_string(), ms(report.latency.max_us)),
        ]);
    }
    if report.replies == 0 {
        bail!("{target} answered none of {} Syns", report.syns_sent);
    }
    Ok(ExitCode::SUCCESS)
}

/// `load --cluster-size N`.
fn simulate(args: &Args, target: SocketAddr) -> anyhow::Result<ExitCode> {
    let nodes = args.cluster_size.unwrap_or(2) as usize;
    let window = Duration::try_from_secs_f64(args.for_secs)
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(86_400))
        .ok_or_else(|| {
            anyhow!(
                "--for-secs {}: expected seconds in (0, 86400]",
                args.for_secs
            )
        })?;
    let seed_timeout = Duration::try_from_secs_f64(args.seed_timeout_secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            anyhow!(
                "--seed-timeout-secs {}: expected a positive number of seconds",
                args.seed_timeout_secs
            )
        })?;
    if !(0.0..=1.0).contains(&args.update_share) {
        bail!(
            "--update-share {}: expected a share in [0, 1]",
            args.update_share
        );
    }
    if !(target.is_ipv4() && target.ip().is_loopback()) {
        bail!(
            "--target {target}: the simulated peers live on 127.10.0.0/16, the target must be on 127.0.0.0/8"
        );
    }
    let mut config = SimConfig::new(target, nodes - 1, args.cluster.clone());
    config.gossip_interval = Duration::from_millis(args.gossip_interval_ms);
    config.protocol = args.protocol.into();
    config.update_share = args.update_share;
    let mut sim = SimulatedCluster::bind(config)?;
    let syn_bytes = sim.syn_len();
    sim.check_fits()?;
    eprintln!(
        "simulating {} peers of {target} ({nodes}-node cluster, {} ms gossip, {:?}, {syn_bytes} byte Syns)",
        nodes - 1,
        args.gossip_interval_ms,
        sim.config().protocol
    );
    let stop = &common::INTERRUPTED;
    let seed = sim.seed(seed_timeout, stop)?;
    eprintln!(
        "the target learned the cluster in {:.1} s; warming up",
        seed.as_secs_f64()
    );
    sim.run(Duration::from_millis(args.gossip_interval_ms) * 5, stop)?;
    let cpu_before = args.node_pid.map(TaskCpu::read).transpose()?;
    let traffic = sim.run(window, stop)?;
    let node_cpu_ms_per_sec = match (args.node_pid, cpu_before) {
        (Some(pid), Some(before)) => {
            let cpu = TaskCpu::read(pid)?.since(&before).as_secs_f64();
            Some(cpu * 1_000.0 / traffic.secs.max(1e-9))
        }
        _ => None,
    };
    let secs = traffic.secs.max(1e-9);
    let report = SimulationReport {
        target,
        cluster_size: nodes,
        gossip_interval_ms: args.gossip_interval_ms,
        protocol: format!("{:?}", sim.config().protocol),
        syn_bytes,
        seed_secs: seed.as_secs_f64(),
        knowledge: sim.knowledge(),
        bytes_in_per_sec: traffic.bytes_to_node as f64 / secs,
        bytes_out_per_sec: traffic.bytes_from_node as f64 / secs,
        node_cpu_ms_per_sec,
        traffic,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let t = &report.traffic;
        let per_sec = |n: u64| format!("{n} ({:.1}/s)", n as f64 / secs);
        let mut rows = vec![
            ("target".to_string(), report.target.to_string()),
            (
                "cluster".to_string(),
                format!(
                    "{nodes} nodes, {} ms gossip, {}",
                    report.gossip_interval_ms, report.protocol
                ),
            ),
            ("Syn size".to_string(), format!("{syn_bytes} B")),
            ("seeding".to_string(), format!("{:.1} s", report.seed_secs)),
            ("window".to_string(), format!("{:.1} s", t.secs)),
            ("Syns sent to it".to_string(), per_sec(t.syns_sent)),
            ("its SynAcks".to_string(), per_sec(t.syn_acks_received)),
            (
                "its Syns (its rounds)".to_string(),
                per_sec(t.syns_received),
            ),
            ("its Acks".to_string(), per_sec(t.acks_received)),
            (
                "bytes/s in".to_string(),
                format!("{:.0}", report.bytes_in_per_sec),
            ),
            (
                "bytes/s out".to_string(),
                format!("{:.0}", report.bytes_out_per_sec),
            ),
            ("key changes".to_string(), t.key_updates.to_string()),
            (
                "peers it knows".to_string(),
                format!(
                    "{} ({} up to date)",
                    report.knowledge.peers_known, report.knowledge.peers_up_to_date
                ),
            ),
        ];
        if let Some(cpu) = report.node_cpu_ms_per_sec {
            rows.push(("its CPU".to_string(), format!("{cpu:.2} ms/s")));
        }
        common::print_table(&rows);
    }
    if report.traffic.syn_acks_received == 0 {
        bail!(
            "{target} answered none of {} Syns",
            report.traffic.syns_sent
        );
    }
    Ok(ExitCode::SUCCESS)
}
