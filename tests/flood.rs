//! Flood: one node of ours receives junk as fast as one sender thread can send it for 10 s
//! (random bytes, truncated envelopes, valid headers announcing absurd lengths, zstd bombs)
//! while it gossips with 4 other nodes. Proves that its peers never see it dead, that its
//! memory stays bounded, and that every junk datagram it receives is counted as malformed and
//! dropped: the junk is built so that none of it can decode and the peers send nothing
//! malformed, so `malformed == datagrams_received - datagrams_handled` exactly, all of it junk.
//! Run on io_uring and on epoll.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chitchat_uring::message::{Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest};
use chitchat_uring::transport::UdpMode;
use chitchat_uring::types::DeletionStatusMutation;
use chitchat_uring::wire::{decode_envelope, encode_envelope};
use chitchat_uring::{
    ChitchatEnvelope, ChitchatHandle, ChitchatId, ChitchatMessage, Heartbeat, ProtocolVersion,
    UdpTransport, spawn_chitchat,
};
use common::{free_port, node_config, uring_or_skip, wait_until};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The flood tests measure memory and liveness under full load: one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const FLOOD: Duration = Duration::from_secs(10);
const GOSSIP_MS: u64 = 100;
const MAX_RSS_GROWTH: u64 = 256 << 20;

/// A zstd frame that declares a content size of 2^62 bytes but holds 10 raw bytes.
fn lying_zstd_frame() -> Vec<u8> {
    let mut frame = vec![0x28, 0xB5, 0x2F, 0xFD];
    // Frame header descriptor: 8-byte content size, single segment, no checksum, no dict.
    frame.push(0b1110_0000);
    frame.extend_from_slice(&(1u64 << 62).to_le_bytes());
    // One last raw block of 10 bytes: header = size << 3 | type 0 << 1 | last.
    let header = (10u32 << 3) | 1;
    frame.extend_from_slice(&header.to_le_bytes()[..3]);
    frame.extend_from_slice(&[7u8; 10]);
    frame
}

fn header(version: u8, kind: u8) -> Vec<u8> {
    vec![0x53, 0xB0, version, kind]
}

fn compressed_block(out: &mut Vec<u8>, frame: &[u8]) {
    out.push(1);
    out.extend_from_slice(&(frame.len() as u16).to_le_bytes());
    out.extend_from_slice(frame);
}

/// A valid SynAck (V1 digest of 30 nodes, delta with 40 key-values) to cut short.
fn valid_syn_ack() -> Vec<u8> {
    let mut digest = Digest::default();
    for i in 0..30u16 {
        let id = ChitchatId::new(
            format!("n{i}"),
            1,
            SocketAddr::from(([127, 0, 0, 1], i + 1)),
        );
        digest.add_node(id, NodeDigest::new(Heartbeat::from(9), 0, 40));
    }
    let owner = ChitchatId::new("n0", 1, SocketAddr::from(([127, 0, 0, 1], 1)));
    let key_values = (1..=40)
        .map(|v| KeyValueUpdate {
            key: format!("key-{v}"),
            value: "value".repeat(v as usize % 7),
            version: v,
            status: DeletionStatusMutation::Set,
        })
        .collect();
    let delta = Delta {
        node_deltas: vec![NodeDelta {
            chitchat_id: owner,
            from_version_excluded: 0,
            last_gc_version: 0,
            max_version: 40,
            key_values,
        }],
    };
    encode_envelope(&ChitchatEnvelope {
        version: ProtocolVersion::V1,
        message: ChitchatMessage::SynAck { digest, delta },
    })
    .unwrap()
}

/// Junk datagrams of every kind; none of them decodes.
struct Junk {
    rng: SmallRng,
    valid: Vec<u8>,
    zeros_1mib: Vec<u8>,
    zeros_64k: Vec<u8>,
    lying: Vec<u8>,
    many_blocks: Vec<u8>,
}

impl Junk {
    fn new() -> Junk {
        let zeros_64k = zstd::bulk::compress(&vec![0u8; 65_535], 3).unwrap();
        // Many blocks, each decompressing to 64 KiB: a 45 KB datagram announcing ~130 MB.
        let mut many_blocks = header(0, 2);
        while many_blocks.len() + zeros_64k.len() + 4 < 45_000 {
            compressed_block(&mut many_blocks, &zeros_64k);
        }
        many_blocks.push(0);
        Junk {
            rng: SmallRng::seed_from_u64(0x1234),
            valid: valid_syn_ack(),
            zeros_1mib: zstd::bulk::compress(&vec![0u8; 1 << 20], 19).unwrap(),
            zeros_64k,
            lying: lying_zstd_frame(),
            many_blocks,
        }
    }

    fn next(&mut self, i: u64) -> Vec<u8> {
        let rng = &mut self.rng;
        match i % 10 {
            // Random bytes; never the magic number's first byte.
            0 | 1 => {
                let len = rng.random_range(1..1_500);
                let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                if bytes[0] == 0x53 {
                    bytes[0] = 0;
                }
                bytes
            }
            // A valid SynAck cut short.
            2 | 3 => {
                let len = rng.random_range(0..self.valid.len());
                self.valid[..len].to_vec()
            }
            // Valid header, V0 digest announcing 65 535 nodes.
            4 => {
                let mut bytes = header(0, 0);
                bytes.extend_from_slice(&[0xFF, 0xFF, 1, 2, 3]);
                bytes
            }
            // Valid header, a block announcing 65 535 bytes and holding 100.
            5 => {
                let mut bytes = header(rng.random_range(0..2), 2);
                bytes.extend_from_slice(&[2, 0xFF, 0xFF]);
                bytes.extend_from_slice(&[0u8; 100]);
                bytes
            }
            // A compressed block decompressing to 1 MiB.
            6 => {
                let mut bytes = header(0, 2);
                compressed_block(&mut bytes, &self.zeros_1mib);
                bytes.push(0);
                bytes
            }
            // A zstd frame declaring 2^62 bytes.
            7 => {
                let mut bytes = header(1, 1);
                compressed_block(&mut bytes, &self.lying);
                bytes.push(0);
                bytes
            }
            // Hundreds of 64 KiB blocks.
            8 => self.many_blocks.clone(),
            // A full 64 KiB block of zeros, then a Syn cluster id of absurd length.
            _ => {
                let mut bytes = header(1, 0);
                compressed_block(&mut bytes, &self.zeros_64k);
                bytes.push(0);
                bytes.extend_from_slice(&[0xFF, 0xFF, b'x']);
                bytes
            }
        }
    }
}

/// `VmRSS` or `VmHWM` of this process, in bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn live_ids(node: &ChitchatHandle) -> BTreeSet<ChitchatId> {
    node.chitchat().lock().live_nodes().cloned().collect()
}

async fn flood(mode: UdpMode) {
    let _heavy = HEAVY.lock().await;
    let label = format!("{mode:?}");
    // Every junk kind fails to decode: the exact accounting below relies on it.
    let mut junk = Junk::new();
    for i in 0..1_000 {
        assert!(
            decode_envelope(&junk.next(i)).is_err(),
            "junk kind {} decodes",
            i % 10
        );
    }

    let target_port = free_port();
    let target_addr = SocketAddr::from(([127, 0, 0, 1], target_port));
    let target_transport = UdpTransport {
        mode,
        workers: Some(2),
        ..UdpTransport::DEFAULT
    };
    // The peers run on their own workers (a distinct runtime config), as on other machines.
    let peer_transport = UdpTransport {
        mode: UdpMode::Epoll,
        workers: Some(1),
        send_slots: 200,
        ..UdpTransport::DEFAULT
    };
    let target = spawn_chitchat(
        node_config(target_port, GOSSIP_MS, &[]),
        vec![("role".to_string(), "flooded".to_string())],
        &target_transport,
    )
    .await
    .unwrap();
    let mut peers = Vec::new();
    for _ in 0..4 {
        let config = node_config(free_port(), GOSSIP_MS, &[target_addr]);
        peers.push(
            spawn_chitchat(config, Vec::new(), &peer_transport)
                .await
                .unwrap(),
        );
    }
    let target_id = target.chitchat_id().clone();
    let converged = wait_until(Duration::from_secs(30), || {
        live_ids(&target).len() == 5 && peers.iter().all(|p| live_ids(p).len() == 5)
    })
    .await;
    assert!(converged, "{label}: the cluster did not form");
    // Let the failure detectors learn the steady-state interval before the flood.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let baseline_rss = proc_status_bytes("VmRSS");
    // Reset the peak-RSS counter so VmHWM reports the peak during the flood.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let bytes = junk.next(i);
                i += 1;
                if socket.send_to(&bytes, target_addr).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let started = Instant::now();
    let mut peak_rss = baseline_rss;
    let mut samples = 0;
    let mut lost: Option<String> = None;
    while started.elapsed() < FLOOD {
        peak_rss = peak_rss.max(proc_status_bytes("VmRSS"));
        for (i, peer) in peers.iter().enumerate() {
            if lost.is_none() && !live_ids(peer).contains(&target_id) {
                lost = Some(format!(
                    "peer {i} lost the flooded node {:?} into the flood",
                    started.elapsed()
                ));
            }
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let peak_hwm = proc_status_bytes("VmHWM");
    let junk_sent = sent.load(Ordering::Relaxed);

    // Still serving: a key set now reaches every peer.
    target
        .with_chitchat(|c| c.self_node_state().set("after-flood", "ok"))
        .await;
    let spread = wait_until(Duration::from_secs(20), || {
        peers.iter().all(|p| {
            p.chitchat()
                .lock()
                .node_state(&target_id)
                .and_then(|s| s.get("after-flood").map(String::from))
                .as_deref()
                == Some("ok")
        })
    })
    .await;
    let known = target.chitchat().lock().node_states().len();

    target.initiate_shutdown().unwrap();
    target.termination_watcher().await.unwrap();
    let (server, endpoint) = (target.server_stats(), target.endpoint_stats());
    let junk_received = endpoint.datagrams_received - server.datagrams_handled;
    let growth = peak_rss.saturating_sub(baseline_rss);
    eprintln!(
        "[flood {label}] {junk_sent} junk datagrams sent in {:.0} s, {} received by the node: \
         {} malformed, {} handled, {} abandoned; RSS baseline {} MiB, peak VmRSS +{} MiB, \
         VmHWM during flood {} MiB; {samples} liveness samples",
        FLOOD.as_secs_f64(),
        endpoint.datagrams_received,
        server.malformed,
        server.datagrams_handled,
        server.abandoned,
        baseline_rss >> 20,
        growth >> 20,
        peak_hwm >> 20,
    );
    if let Some(lost) = lost {
        panic!("{label}: {lost}");
    }
    assert!(spread, "{label}: the flooded node no longer gossips");
    assert_eq!(known, 5, "{label}: junk created node states");
    assert_eq!(server.abandoned, 0, "{label}: {server:?}");
    assert_eq!(
        server.malformed, junk_received,
        "{label}: every junk datagram received is counted as malformed: {server:?} {endpoint:?}"
    );
    assert!(server.malformed <= junk_sent, "{label}");
    assert!(
        server.malformed > 1_000,
        "{label}: the flood reached the node"
    );
    assert!(server.datagrams_handled > 0, "{label}");
    assert!(
        growth < MAX_RSS_GROWTH,
        "{label}: RSS grew by {} MiB",
        growth >> 20
    );
    for peer in peers {
        peer.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_junk_on_io_uring_is_counted_dropped_and_harmless() {
    if !uring_or_skip("flood_of_junk_on_io_uring_is_counted_dropped_and_harmless") {
        return;
    }
    flood(UdpMode::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_junk_on_epoll_is_counted_dropped_and_harmless() {
    flood(UdpMode::Epoll).await;
}

/// The decode-error detector the interop tests rely on (`common::capture`) is not vacuous: a
/// real chitchat node fed junk logs "invalid-chitchat-payload", and we capture it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_sent_to_a_reference_node_is_seen_by_the_decode_error_detector() {
    use common::mixed::{NodeSpec, Side, eventually};
    let log = common::capture::reference_log();
    let spec = NodeSpec::new(Side::Theirs, free_port());
    let node = spec.spawn(&[]).await;
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = socket.local_addr().unwrap().to_string();
    socket
        .send_to(b"\x53\xb0\x00\x02\x02\xff\xff", spec.addr())
        .unwrap();
    let seen = eventually(Duration::from_secs(10), || async {
        log.reference_failures()
            .iter()
            .any(|e| e.text.contains(&from))
    })
    .await;
    assert!(seen, "{:?}", log.matching(""));
    assert!(
        node.is_running().await,
        "junk does not stop a chitchat node"
    );
    node.shutdown().await;
}
