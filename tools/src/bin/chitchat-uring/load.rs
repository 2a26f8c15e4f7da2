//! `load`: Syns from many source ports at one node; replies/s and reply latency.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use chitchat_uring_tools::loadgen::{self, DigestMode, LoadConfig};
use clap::ValueEnum;

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
