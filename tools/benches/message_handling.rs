//! Cost of handling one message, at 100 and 1 000 nodes × 10 keys of 32-byte values.
//!
//! - `process_message/*` and `handle_datagram/*`: our sans-IO state machine, on owned messages
//!   (the public API; it also decodes the reply it returns) and on encoded bytes (the server's
//!   hot path, reply encoded straight from the state).
//! - `udp_round_trip/*`: a Syn or SynAck sent over loopback UDP to a running node until its
//!   reply arrives, for our node (io_uring, epoll) and a chitchat 0.13 node holding the same
//!   state. chitchat's `process_message` is crate-private, so this is the nearest level both
//!   implementations share. An Ack gets no reply, so it has no round trip.
//!
//! - `metrics_hot_path/*`: what the server adds per datagram for
//!   `chitchat_message_handling_seconds` (a clock read and a histogram record) with no
//!   recorder installed, against the clock read alone; then, after installing the Prometheus
//!   recorder (process-wide, so last), the same record and `udp_round_trip_recorded/*`, the
//!   round trips above against our io_uring node with every metric recorded.
//!
//! Cases: a Syn from an up-to-date peer (full digest, empty delta back), a Syn from an empty
//! peer (empty digest, a datagram-full delta back), a SynAck (up-to-date digest plus one new
//! key-value), an Ack (one new key-value), a catch-up Ack (every key of 60 nodes at new
//! versions, about 37 KB of ops: what a cold large cluster exchanges) and a stale Ack (the same
//! delta at versions the receiver holds, all rejected). Each median is also printed as a fraction of the
//! 2-second handling bound.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chitchat_uring::message::{Delta, Digest, KeyValueUpdate, NodeDelta};
use chitchat_uring::types::DeletionStatusMutation;
use chitchat_uring::wire::{Encoder, decode_envelope};
use chitchat_uring::{
    Chitchat, ChitchatEnvelope, ChitchatId, ChitchatMessage, MESSAGE_HANDLING_BOUND,
    ProtocolVersion,
};
use chitchat_uring_tools::bench_support::value_32;
use chitchat_uring_tools::loadgen::{self, DigestMode, LoadConfig};
use common::{CLUSTER_ID, Impl, KEYS, fill_ours, ours_config, remote_id, serve};
use criterion::{BenchmarkId, Criterion};

const SIZES: [usize; 2] = [100, 1_000];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    SynUpToDate,
    SynEmpty,
    /// An empty-digest Syn after a key of this node changed: the delta for fresh peers cannot
    /// be reused, so this is the cost of writing one (the cost of the key set included).
    SynEmptyChanged,
    SynAck,
    Ack,
    AckCatchUp,
    AckStale,
}

impl Case {
    const ALL: [Case; 7] = [
        Case::SynUpToDate,
        Case::SynEmpty,
        Case::SynEmptyChanged,
        Case::SynAck,
        Case::Ack,
        Case::AckCatchUp,
        Case::AckStale,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::SynUpToDate => "syn_up_to_date",
            Case::SynEmpty => "syn_empty",
            Case::SynEmptyChanged => "syn_empty_changed_state",
            Case::SynAck => "syn_ack",
            Case::Ack => "ack",
            Case::AckCatchUp => "ack_catch_up",
            Case::AckStale => "ack_stale",
        }
    }

    /// Messages per generated chunk: few when each carries a large digest.
    fn chunk(self) -> u64 {
        match self {
            Case::Ack => 1_024,
            Case::AckCatchUp | Case::AckStale => 16,
            _ => 32,
        }
    }
}

/// Remote nodes in the delta of a catch-up or stale Ack: with their `KEYS` key-values each,
/// about 37 KB of ops, the size of the SynAcks and Acks of a cold 1,000-node cluster.
const CATCH_UP_NODES: usize = 60;

/// Produces the messages of one case; deltas carry ever newer versions of one remote node's
/// key, so every SynAck and Ack applies a real update (a catch-up Ack, of every key of
/// `CATCH_UP_NODES` nodes; a stale Ack carries the versions the receiver already holds).
struct Generator {
    case: Case,
    digest: Digest,
    writer: ChitchatId,
    next_version: u64,
    /// Max version of each catch-up node as the receiver holds it.
    catch_up_versions: Vec<u64>,
}

impl Generator {
    fn new(case: Case, digest: Digest) -> Generator {
        let (name, addr) = remote_id(0);
        Generator {
            case,
            digest,
            writer: ChitchatId::new(name, 1, addr),
            next_version: KEYS as u64,
            catch_up_versions: vec![KEYS as u64; CATCH_UP_NODES],
        }
    }

    fn next(&mut self) -> ChitchatEnvelope {
        let message = match self.case {
            Case::SynUpToDate => ChitchatMessage::Syn {
                cluster_id: CLUSTER_ID.to_string(),
                digest: self.digest.clone(),
            },
            Case::SynEmpty | Case::SynEmptyChanged => ChitchatMessage::Syn {
                cluster_id: CLUSTER_ID.to_string(),
                digest: Digest::default(),
            },
            Case::SynAck => {
                let delta = self.update();
                let mut digest = self.digest.clone();
                if let Some(entry) = digest.node_digests.get_mut(&self.writer) {
                    entry.max_version = self.next_version;
                }
                ChitchatMessage::SynAck { digest, delta }
            }
            Case::Ack => ChitchatMessage::Ack {
                delta: self.update(),
            },
            Case::AckCatchUp => ChitchatMessage::Ack {
                delta: self.catch_up(true),
            },
            Case::AckStale => ChitchatMessage::Ack {
                delta: self.catch_up(false),
            },
        };
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message,
        }
    }

    /// A delta setting `key-0000` of the writer node to a new value, one version up.
    fn update(&mut self) -> Delta {
        let from = self.next_version;
        self.next_version += 1;
        Delta {
            node_deltas: vec![NodeDelta {
                chitchat_id: self.writer.clone(),
                from_version_excluded: from,
                last_gc_version: 0,
                max_version: from + 1,
                key_values: vec![KeyValueUpdate {
                    key: "key-0000".to_string(),
                    value: value_32(0, from as usize),
                    version: from + 1,
                    status: DeletionStatusMutation::Set,
                }],
            }],
        }
    }

    /// Every key of the first `CATCH_UP_NODES` remote nodes: rewritten at new versions
    /// (`fresh`), or as the receiver holds them (versions 1..=KEYS, all rejected as stale).
    fn catch_up(&mut self, fresh: bool) -> Delta {
        let node_deltas = (0..CATCH_UP_NODES)
            .map(|i| {
                let (name, addr) = remote_id(i);
                let from = if fresh { self.catch_up_versions[i] } else { 0 };
                if fresh {
                    self.catch_up_versions[i] += KEYS as u64;
                }
                let key_values: Vec<KeyValueUpdate> = (0..KEYS)
                    .map(|k| KeyValueUpdate {
                        key: format!("key-{k:04}"),
                        value: value_32(i, from as usize + k),
                        version: from + k as u64 + 1,
                        status: DeletionStatusMutation::Set,
                    })
                    .collect();
                NodeDelta {
                    chitchat_id: ChitchatId::new(name, 1, addr),
                    from_version_excluded: from,
                    last_gc_version: 0,
                    max_version: from + KEYS as u64,
                    key_values,
                }
            })
            .collect();
        Delta { node_deltas }
    }
}

/// One of our nodes as a bare state machine with `n` remote states.
fn ours_state_machine(n: usize) -> Chitchat {
    let addr = SocketAddr::from(([127, 0, 0, 1], 7_280));
    let (_seed_tx, seed_rx) = tokio::sync::watch::channel(HashSet::new());
    let mut chitchat = Chitchat::with_chitchat_id_and_seeds(
        ours_config(addr, Duration::from_secs(3_600)),
        seed_rx,
        vec![],
    );
    fill_ours(&mut chitchat, n);
    chitchat
}

/// Sets one key of the node to a new value: its max version moves, as any write does.
fn change_own_key(chitchat: &mut Chitchat) {
    let state = chitchat.self_node_state();
    let next = state.max_version() + 1;
    state.set("bench-changed", next);
}

fn bench_state_machine(c: &mut Criterion) {
    for api in ["process_message", "handle_datagram"] {
        let mut group = c.benchmark_group(api);
        for n in SIZES {
            for case in Case::ALL {
                let mut chitchat = ours_state_machine(n);
                let mut generator = Generator::new(case, chitchat.compute_digest());
                let mut encoder = Encoder::new();
                let mut reply = Vec::with_capacity(65_536);
                group.bench_function(BenchmarkId::new(case.name(), n), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        let mut left = iters;
                        while left > 0 {
                            let count = left.min(case.chunk());
                            left -= count;
                            let messages: Vec<ChitchatEnvelope> =
                                (0..count).map(|_| generator.next()).collect();
                            if api == "process_message" {
                                let start = Instant::now();
                                for envelope in messages {
                                    if case == Case::SynEmptyChanged {
                                        change_own_key(&mut chitchat);
                                    }
                                    std::hint::black_box(chitchat.process_envelope(envelope));
                                }
                                total += start.elapsed();
                            } else {
                                let datagrams: Vec<Vec<u8>> = messages
                                    .iter()
                                    .map(|m| {
                                        let mut out = Vec::new();
                                        encoder.encode_envelope(m, &mut out).expect("encodes");
                                        out
                                    })
                                    .collect();
                                let start = Instant::now();
                                for datagram in &datagrams {
                                    if case == Case::SynEmptyChanged {
                                        change_own_key(&mut chitchat);
                                    }
                                    let outcome = chitchat
                                        .handle_datagram(datagram, &mut reply, None)
                                        .expect("decodes");
                                    std::hint::black_box((outcome, reply.len()));
                                }
                                total += start.elapsed();
                            }
                        }
                        total
                    })
                });
            }
        }
        group.finish();
    }
}

/// Sends `datagram` to `to` and waits for the reply of type `reply_type`, resending after 1 s.
fn round_trip(socket: &UdpSocket, to: SocketAddr, datagram: &[u8], reply_type: u8, buf: &mut [u8]) {
    for _ in 0..10 {
        socket.send_to(datagram, to).expect("send");
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match socket.recv_from(buf) {
                Ok((len, from)) if from == to && len >= 4 && buf[3] == reply_type => return,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    panic!("{to} did not reply to 10 datagrams");
}

fn bench_udp(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("udp_round_trip");
    for n in SIZES {
        for which in Impl::ALL {
            let (node, addr) = serve(which, n, &rt);
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let mut buf = vec![0u8; 65_536];
            let syn = |digest| {
                let mut config = LoadConfig::new(addr, CLUSTER_ID);
                config.digest = digest;
                loadgen::build_syn(&config).expect("the node answers a Syn")
            };
            let up_to_date = syn(DigestMode::UpToDate);
            let empty = syn(DigestMode::Empty);
            for (case, datagram) in [(Case::SynUpToDate, &up_to_date), (Case::SynEmpty, &empty)] {
                let id = format!("{}/{}", case.name(), which.slug());
                group.bench_function(BenchmarkId::new(id, n), |b| {
                    b.iter(|| round_trip(&socket, addr, datagram, 1, &mut buf))
                });
            }
            // SynAck → Ack: the node's own digest (learned above) plus one new key-value.
            let ChitchatMessage::Syn { digest, .. } =
                decode_envelope(&up_to_date).expect("decodes").message
            else {
                unreachable!("build_syn builds a Syn")
            };
            let mut generator = Generator::new(Case::SynAck, digest);
            let mut encoder = Encoder::new();
            let id = format!("{}/{}", Case::SynAck.name(), which.slug());
            group.bench_function(BenchmarkId::new(id, n), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let count = left.min(Case::SynAck.chunk());
                        left -= count;
                        let datagrams: Vec<Vec<u8>> = (0..count)
                            .map(|_| {
                                let mut out = Vec::new();
                                encoder
                                    .encode_envelope(&generator.next(), &mut out)
                                    .expect("encodes");
                                out
                            })
                            .collect();
                        let start = Instant::now();
                        for datagram in &datagrams {
                            round_trip(&socket, addr, datagram, 2, &mut buf);
                        }
                        total += start.elapsed();
                    }
                    total
                })
            });
            node.shutdown(&rt);
        }
    }
    group.finish();
}

/// The per-datagram metrics work of the server's `handle_batch`, with `histogram` obtained the
/// way the server obtains it (at spawn).
fn bench_histogram_record(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    histogram: &metrics::Histogram,
) {
    let received_at = Instant::now();
    group.bench_function(id, |b| {
        b.iter(|| {
            let now = Instant::now();
            histogram.record(std::hint::black_box(now.duration_since(received_at)).as_secs_f64());
        })
    });
}

fn bench_metrics(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_hot_path");
    let received_at = Instant::now();
    group.bench_function("clock_read_only", |b| {
        b.iter(|| std::hint::black_box(Instant::now().duration_since(received_at)))
    });
    let noop = metrics::histogram!("chitchat_message_handling_seconds");
    bench_histogram_record(&mut group, "histogram_record/no_recorder", &noop);
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the Prometheus recorder installs");
    let recorded = metrics::histogram!("chitchat_message_handling_seconds");
    bench_histogram_record(&mut group, "histogram_record/prometheus", &recorded);
    group.finish();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("udp_round_trip_recorded");
    for n in SIZES {
        // Spawned after the recorder is installed: every metric of this node is recorded.
        let (node, addr) = serve(Impl::OursUring, n, &rt);
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = vec![0u8; 65_536];
        for (case, digest) in [
            (Case::SynUpToDate, DigestMode::UpToDate),
            (Case::SynEmpty, DigestMode::Empty),
        ] {
            let mut config = LoadConfig::new(addr, CLUSTER_ID);
            config.digest = digest;
            let datagram = loadgen::build_syn(&config).expect("the node answers a Syn");
            let id = format!("{}/{}", case.name(), Impl::OursUring.slug());
            group.bench_function(BenchmarkId::new(id, n), |b| {
                b.iter(|| round_trip(&socket, addr, &datagram, 1, &mut buf))
            });
        }
        node.shutdown(&rt);
    }
    group.finish();
}

/// Criterion's median estimate of one benchmark, in nanoseconds.
fn median_ns(dir: &Path, group: &str, function: &str, n: usize) -> Option<f64> {
    let path = dir
        .join(group)
        .join(function.replace('/', "_"))
        .join(n.to_string())
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["median"]["point_estimate"].as_f64()
}

fn format_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}

/// The medians as a markdown table, each also as a fraction of the handling bound.
fn summary(dir: &Path) -> String {
    let bound_ns = MESSAGE_HANDLING_BOUND.as_nanos() as f64;
    let mut out = String::from(
        "| level | case | implementation | nodes | median | fraction of the 2 s bound |\n\
         |---|---|---|---:|---:|---:|\n",
    );
    let mut row = |level: &str, case: &str, who: &str, n: usize, ns: Option<f64>| {
        let (median, fraction) = match ns {
            Some(ns) => (format_ns(ns), format!("{:.1e}", ns / bound_ns)),
            None => ("-".to_string(), "-".to_string()),
        };
        out.push_str(&format!(
            "| {level} | {case} | {who} | {n} | {median} | {fraction} |\n"
        ));
    };
    for api in ["process_message", "handle_datagram"] {
        for n in SIZES {
            for case in Case::ALL {
                let ns = median_ns(dir, api, case.name(), n);
                row(api, case.name(), "chitchat-uring", n, ns);
            }
        }
    }
    for n in SIZES {
        for case in [Case::SynUpToDate, Case::SynEmpty, Case::SynAck] {
            for which in Impl::ALL {
                let id = format!("{}/{}", case.name(), which.slug());
                let ns = median_ns(dir, "udp_round_trip", &id, n);
                row("UDP round trip", case.name(), which.name(), n, ns);
            }
        }
        for case in [Case::SynUpToDate, Case::SynEmpty] {
            let id = format!("{}/{}", case.name(), Impl::OursUring.slug());
            let ns = median_ns(dir, "udp_round_trip_recorded", &id, n);
            let who = "chitchat-uring (io_uring), Prometheus recorder";
            row("UDP round trip", case.name(), who, n, ns);
        }
    }
    for function in [
        "clock_read_only",
        "histogram_record/no_recorder",
        "histogram_record/prometheus",
    ] {
        let path = dir
            .join("metrics_hot_path")
            .join(function.replace('/', "_"))
            .join("new/estimates.json");
        let ns = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|json| json["median"]["point_estimate"].as_f64());
        let median = ns.map_or("-".to_string(), |ns| format!("{ns:.1} ns"));
        out.push_str(&format!(
            "| metrics hot path | {function} | chitchat-uring | - | {median} | - |\n"
        ));
    }
    out
}

fn main() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/criterion"));
    let mut criterion = Criterion::default()
        .output_directory(&dir)
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_state_machine(&mut criterion);
    bench_udp(&mut criterion);
    // Last: it installs a process-wide recorder.
    bench_metrics(&mut criterion);
    criterion.final_summary();
    let table = summary(&dir);
    println!(
        "\nMedians (criterion), as a fraction of MESSAGE_HANDLING_BOUND = {MESSAGE_HANDLING_BOUND:?}:\n\n{table}"
    );
    let report_dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/bench-report"
    ));
    if std::fs::create_dir_all(&report_dir).is_ok() {
        let _ = std::fs::write(report_dir.join("message_handling.md"), &table);
    }
}
