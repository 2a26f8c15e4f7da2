//! `node`: one node. JSON status lines on stdout (chitchat's JSON shapes), commands on stdin,
//! logs on stderr.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use chitchat_uring::protocol::amplification::AmplificationLimits;
use chitchat_uring::server::SpawnOptions;
use chitchat_uring::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ClusterStateSnapshot, FailureDetectorConfig,
    spawn_chitchat_with,
};
use chitchat_uring_tools::bench_support::describe_transport;
use serde::Serialize;

use crate::common::{self, ProtocolArg, TransportArg, keyed_or_plain};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address the gossip socket binds, e.g. 127.0.0.1:7000.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Address the other nodes gossip to (default: the listen address).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<SocketAddr>,
    /// Node name (the node_id of its ChitchatId).
    #[arg(long, value_name = "NAME")]
    id: String,
    /// Cluster id: Syns of another cluster are answered with BadCluster (chitchat-test uses
    /// `testing`).
    #[arg(long, value_name = "ID", default_value = "testing")]
    cluster: String,
    /// A node to join through (repeatable); hostnames are re-resolved every 60 s.
    #[arg(long = "seed", value_name = "HOST:PORT")]
    seeds: Vec<String>,
    /// A key-value to start with (repeatable).
    #[arg(long = "kv", value_name = "K=V", value_parser = parse_kv)]
    kvs: Vec<(String, String)>,
    /// Gossip interval in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    gossip_ms: u64,
    /// Print a status line every this many milliseconds.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    status_every_ms: u64,
    /// Stop after this many seconds (default: run until Ctrl-C, `quit` or end of stdin).
    #[arg(long, value_name = "S")]
    for_secs: Option<f64>,
    /// UDP backend.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    transport: TransportArg,
    /// Keyed cluster: seal every datagram (XChaCha20-Poly1305) under the first key of this file
    /// (one base64-encoded 32-byte key per line) and accept datagrams sealed under any of them.
    #[arg(long, value_name = "PATH")]
    key_file: Option<std::path::PathBuf>,
    /// With --key-file: also accept plaintext chitchat datagrams (still sending sealed), for
    /// turning keys on in a running cluster.
    #[arg(long)]
    accept_plaintext: bool,
    /// Version of the Syns this node sends (replies echo the version received). Keep v0 next
    /// to chitchat nodes that do not all decode v1.
    #[arg(long, value_enum, default_value_t = ProtocolArg::V0)]
    protocol: ProtocolArg,
    /// Generation of this incarnation; must grow on every restart (default: Unix time, s).
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
    /// A dead node is forgotten after this many seconds.
    #[arg(long, default_value_t = 3_600, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    dead_grace_secs: u64,
    /// Serve Prometheus metrics at `GET /metrics` on this address (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Answer every source in full, members or not (no anti-amplification budget, SynAcks
    /// accepted from anyone), as chitchat does: for load tests with `load`, whose senders are
    /// no cluster members. Never on a network where sources can be spoofed.
    #[arg(long)]
    no_amplification_limits: bool,
}

fn spawn_options(args: &Args) -> SpawnOptions {
    let options = SpawnOptions::default();
    if args.no_amplification_limits {
        options.with_amplification_limits(AmplificationLimits::off())
    } else {
        options
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// One status line: the shape of chitchat-test's `GET /`, minus the cluster id.
#[derive(Serialize)]
struct Status {
    live_nodes: Vec<ChitchatId>,
    dead_nodes: Vec<ChitchatId>,
    cluster_state: ClusterStateSnapshot,
}

/// A line read from stdin.
enum Input {
    Line(String),
    /// A line that is not UTF-8.
    Invalid,
    Eof,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let advertise = args.advertise.unwrap_or(args.listen);
    if advertise.ip().is_unspecified() || advertise.port() == 0 {
        bail!(
            "{} {advertise}: peers cannot reach an unspecified address or port 0; \
             pass --advertise with the address they should use",
            if args.advertise.is_some() {
                "--advertise"
            } else {
                "--listen"
            }
        );
    }
    let run_for = match args.for_secs {
        None => None,
        Some(secs) => Some(
            Duration::try_from_secs_f64(secs)
                .map_err(|_| anyhow!("--for-secs {secs}: expected a non-negative number"))?,
        ),
    };
    if args.listen.port() != 0 {
        common::check_port_free(args.listen, "--listen")?;
    }
    let generation = args.generation.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let gossip_interval = Duration::from_millis(args.gossip_ms);
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(args.id.as_str(), generation, advertise),
        cluster_id: args.cluster.clone(),
        gossip_interval,
        listen_addr: args.listen,
        seed_nodes: args.seeds.clone(),
        failure_detector_config: FailureDetectorConfig {
            // A prior of two rounds: peers are seen alive after a few rounds, not 5 s.
            initial_interval: gossip_interval * 2,
            dead_node_grace_period: Duration::from_secs(args.dead_grace_secs),
            ..FailureDetectorConfig::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(3_600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: args.protocol.into(),
    };
    config.validate().map_err(|e| anyhow!(flag_of(e)))?;

    // Before the node starts: its histogram handles are taken at spawn.
    if let Some(addr) = args.metrics_addr {
        common::serve_metrics(addr)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let transport = keyed_or_plain(
        args.transport.transport(),
        args.key_file.as_deref(),
        args.accept_plaintext,
        &args.cluster,
    )?;
    let handle = runtime
        .block_on(spawn_chitchat_with(
            config,
            args.kvs.clone(),
            transport.as_ref(),
            spawn_options(&args),
        ))
        .with_context(|| format!("--listen {}: cannot start the node", args.listen))?;
    tracing::info!(
        id = ?handle.chitchat_id(),
        listen = %handle.local_addr(),
        transport = %describe_transport(&handle.transport_kind()),
        cluster = %args.cluster,
        "node running"
    );

    let (input_tx, input_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("stdin".to_string())
        .spawn(move || {
            // Raw lines: a line that is not UTF-8 is a bad command, not the end of input.
            for line in std::io::stdin().lock().split(b'\n') {
                let Ok(mut bytes) = line else { break };
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
                let input = match String::from_utf8(bytes) {
                    Ok(line) => Input::Line(line),
                    Err(_) => Input::Invalid,
                };
                if input_tx.send(input).is_err() {
                    return;
                }
            }
            let _ = input_tx.send(Input::Eof);
        })
        .context("starting the stdin reader")?;

    let started = Instant::now();
    let status_every = Duration::from_millis(args.status_every_ms);
    let mut next_status = started + status_every;
    let mut termination = Box::pin(handle.termination_watcher());
    let reason = loop {
        if common::interrupted() {
            break "interrupted";
        }
        if run_for.is_some_and(|d| started.elapsed() >= d) {
            break "--for-secs elapsed";
        }
        // Sleeps up to 20 ms, and notices a server that stopped by itself.
        let ended = runtime.block_on(async {
            tokio::time::timeout(Duration::from_millis(20), &mut termination).await
        });
        if let Ok(result) = ended {
            return match result {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(error) => Err(error.context("the node stopped")),
            };
        }
        let mut quit = None;
        while let Ok(input) = input_rx.try_recv() {
            match input {
                Input::Eof => quit = Some("end of stdin"),
                Input::Invalid => eprintln!("error: a command line that is not UTF-8 was ignored"),
                Input::Line(line) => match handle_command(&handle, &line) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Status) => {
                        if print_status(&handle).is_err() {
                            quit = Some("stdout closed");
                        }
                    }
                    Ok(Flow::Quit) => quit = Some("quit"),
                    Err(error) => eprintln!("error: {error}"),
                },
            }
            if quit.is_some() {
                break;
            }
        }
        if let Some(reason) = quit {
            break reason;
        }
        if Instant::now() >= next_status {
            next_status += status_every;
            if next_status < Instant::now() {
                next_status = Instant::now() + status_every;
            }
            if print_status(&handle).is_err() {
                break "stdout closed";
            }
        }
    };
    tracing::info!(reason, "shutting down");
    drop(termination);
    let stopped = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), handle.shutdown()).await });
    match stopped {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(error)) => Err(error.context("the node stopped with an error")),
        Err(_) => Err(anyhow!("the node did not stop within 15 s")),
    }
}

/// Config errors name the config field; say which flag sets it.
fn flag_of(error: chitchat_uring::ConfigError) -> String {
    let flag = match error.field.as_str() {
        f if f.starts_with("seed_nodes") => "--seed",
        "chitchat_id.node_id" => "--id",
        "cluster_id" => "--cluster",
        "chitchat_id.gossip_advertise_addr" => "--advertise",
        "gossip_interval" => "--gossip-ms",
        f if f.starts_with("failure_detector_config") => "--dead-grace-secs",
        _ => "",
    };
    if flag.is_empty() {
        error.to_string()
    } else {
        format!("{flag}: {error}")
    }
}

enum Flow {
    Continue,
    Status,
    Quit,
}

/// `set KEY VALUE` (the value is the rest of the line), `delete KEY`, `status`, `quit`.
fn handle_command(handle: &ChitchatHandle, line: &str) -> anyhow::Result<Flow> {
    let line = line.trim();
    let (command, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim_start();
    match command {
        "" => Ok(Flow::Continue),
        "set" => {
            let (key, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if key.is_empty() {
                bail!("usage: set KEY VALUE");
            }
            let value = value.trim_start();
            handle
                .chitchat()
                .lock()
                .self_node_state()
                .try_set(key, value)
                .map_err(|e| anyhow!("set {key}: {e}"))?;
            tracing::info!(key, value, "set");
            Ok(Flow::Continue)
        }
        "delete" => {
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                bail!("usage: delete KEY");
            }
            let chitchat = handle.chitchat();
            let mut chitchat = chitchat.lock();
            let state = chitchat.self_node_state();
            if state.get_versioned(rest).is_none() {
                bail!("delete {rest}: no such key");
            }
            state.delete(rest);
            tracing::info!(key = rest, "deleted");
            Ok(Flow::Continue)
        }
        "status" => Ok(Flow::Status),
        "quit" | "exit" => Ok(Flow::Quit),
        other => Err(anyhow!(
            "unknown command {other:?}: expected `set KEY VALUE`, `delete KEY`, `status` or `quit`"
        )),
    }
}

fn print_status(handle: &ChitchatHandle) -> std::io::Result<()> {
    let status = {
        let chitchat = handle.chitchat();
        let chitchat = chitchat.lock();
        Status {
            live_nodes: chitchat.live_nodes().cloned().collect(),
            dead_nodes: chitchat.dead_nodes().cloned().collect(),
            cluster_state: chitchat.state_snapshot(),
        }
    };
    let line = serde_json::to_string(&status).map_err(std::io::Error::other)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}
