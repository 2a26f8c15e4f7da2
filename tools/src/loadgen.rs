//! A Syn load generator: many UDP source ports each keep one Syn in flight at a node and time
//! the replies. Shared by the `load` subcommand and the side-by-side benchmark, so both measure
//! the same way.
//!
//! One thread drives every socket through `poll(2)`: a generator with a thread per sender would
//! take the CPU the node under test needs on a small machine.

pub mod simulated;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::bench_support::Percentiles;
use chitchat_uring::message::{ChitchatEnvelope, ChitchatMessage, Digest, ProtocolVersion};
use chitchat_uring::wire::{
    MAGIC_NUMBER, MAX_UDP_DATAGRAM_PAYLOAD_SIZE, decode_envelope, encode_envelope,
};

/// Message-type bytes of the envelope header.
const TYPE_SYN_ACK: u8 = 1;
const TYPE_BAD_CLUSTER: u8 = 3;

/// What the Syns carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestMode {
    /// An empty digest: the node answers with as much of its state as fits (the costly case).
    Empty,
    /// The node's own digest, learned from a first SynAck: the node answers with its digest and
    /// an empty delta (the steady-state case).
    UpToDate,
}

impl std::fmt::Display for DigestMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DigestMode::Empty => "empty",
            DigestMode::UpToDate => "up-to-date",
        })
    }
}

/// What to send, where, for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// UDP sockets (source ports), one Syn in flight each.
    pub senders: usize,
    pub duration: Duration,
    pub digest: DigestMode,
    pub cluster_id: String,
    /// Most Syns per second over all senders; `None`: as fast as replies come.
    pub rate: Option<f64>,
    pub protocol: ProtocolVersion,
    /// A Syn without a reply after this long is counted lost and its sender sends again.
    pub reply_timeout: Duration,
}

impl LoadConfig {
    pub fn new(target: SocketAddr, cluster_id: impl Into<String>) -> Self {
        LoadConfig {
            target,
            senders: 16,
            duration: Duration::from_secs(5),
            digest: DigestMode::Empty,
            cluster_id: cluster_id.into(),
            rate: None,
            protocol: ProtocolVersion::V0,
            reply_timeout: Duration::from_secs(1),
        }
    }
}

/// What a load run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub target: SocketAddr,
    pub senders: usize,
    pub digest: DigestMode,
    pub duration_secs: f64,
    pub syn_bytes: usize,
    pub syns_sent: u64,
    pub replies: u64,
    pub replies_per_sec: f64,
    /// Syns without a reply within the reply timeout.
    pub lost: u64,
    /// Sends the kernel refused (e.g. full socket buffer); retried.
    pub send_errors: u64,
    pub reply_bytes_total: u64,
    pub latency: Percentiles,
}

/// The Syn the senders fire, encoded.
pub fn build_syn(config: &LoadConfig) -> anyhow::Result<Vec<u8>> {
    let digest = match config.digest {
        DigestMode::Empty => Digest::default(),
        DigestMode::UpToDate => learn_digest(config)?,
    };
    let syn = ChitchatEnvelope {
        version: config.protocol,
        message: ChitchatMessage::Syn {
            cluster_id: config.cluster_id.clone(),
            digest,
        },
    };
    let bytes = encode_envelope(&syn).map_err(|e| anyhow!("cannot encode the Syn: {e}"))?;
    if bytes.len() > MAX_UDP_DATAGRAM_PAYLOAD_SIZE {
        bail!(
            "the Syn takes {} bytes, more than one datagram carries",
            bytes.len()
        );
    }
    Ok(bytes)
}

/// Sends an empty Syn and returns the digest of the SynAck (a few tries).
fn learn_digest(config: &LoadConfig) -> anyhow::Result<Digest> {
    let probe = ChitchatEnvelope {
        version: config.protocol,
        message: ChitchatMessage::Syn {
            cluster_id: config.cluster_id.clone(),
            digest: Digest::default(),
        },
    };
    let bytes = encode_envelope(&probe).map_err(|e| anyhow!("cannot encode the Syn: {e}"))?;
    let socket = bind_for(config.target).context("binding the probe socket")?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = vec![0u8; 65_536];
    for _ in 0..6 {
        socket
            .send_to(&bytes, config.target)
            .with_context(|| format!("sending a Syn to {}", config.target))?;
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            let Ok((len, from)) = socket.recv_from(&mut buf) else {
                break;
            };
            if from != config.target {
                continue;
            }
            match decode_envelope(&buf[..len]).map(|e| e.message) {
                Ok(ChitchatMessage::SynAck { digest, .. }) => return Ok(digest),
                Ok(ChitchatMessage::BadCluster) => bail!(
                    "{} answered BadCluster: it is not in cluster {:?} (use --cluster)",
                    config.target,
                    config.cluster_id
                ),
                _ => continue,
            }
        }
    }
    bail!(
        "{} did not answer a Syn within 3 s: is a node listening there?",
        config.target
    )
}

fn bind_for(target: SocketAddr) -> io::Result<UdpSocket> {
    if target.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")
    } else {
        UdpSocket::bind("[::]:0")
    }
}

/// One source port and its Syn in flight.
struct Sender {
    socket: UdpSocket,
    in_flight_since: Option<Instant>,
}

/// Fires Syns at the target for `config.duration` (or until `stop`) and reports.
///
/// Fails before sending any load if the target does not answer (up-to-date mode) or answers
/// BadCluster; during the run, a target that answers BadCluster ends it with an error.
pub fn run(config: &LoadConfig, stop: &AtomicBool) -> anyhow::Result<LoadReport> {
    let syn = build_syn(config)?;
    run_with_syn(config, &syn, stop)
}

/// Like [`run`], with a Syn encoded by the caller.
pub fn run_with_syn(
    config: &LoadConfig,
    syn: &[u8],
    stop: &AtomicBool,
) -> anyhow::Result<LoadReport> {
    if config.senders == 0 {
        bail!("--senders must be at least 1");
    }
    let mut senders = (0..config.senders)
        .map(|_| {
            let socket = bind_for(config.target)?;
            socket.set_nonblocking(true)?;
            Ok(Sender {
                socket,
                in_flight_since: None,
            })
        })
        .collect::<io::Result<Vec<Sender>>>()
        .context("opening the sender sockets")?;
    let mut pollfds: Vec<libc::pollfd> = senders
        .iter()
        .map(|s| libc::pollfd {
            fd: s.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let interval = config
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut buf = vec![0u8; 65_536];
    let mut latencies: Vec<u64> = Vec::with_capacity(1 << 16);
    let (mut sent, mut replies, mut lost, mut send_errors, mut reply_bytes) = (0u64, 0, 0, 0, 0);
    let start = Instant::now();
    let deadline = start + config.duration;
    let mut next_send = start;

    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Expire lost Syns, then (re)fill idle senders within the rate.
        for sender in &mut senders {
            if sender
                .in_flight_since
                .is_some_and(|t| now.duration_since(t) >= config.reply_timeout)
            {
                sender.in_flight_since = None;
                lost += 1;
            }
            if sender.in_flight_since.is_some() {
                continue;
            }
            if let Some(interval) = interval {
                if now < next_send {
                    continue;
                }
                // No catch-up burst after a stall longer than a second.
                next_send += interval;
                let floor = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
                next_send = next_send.max(floor);
            }
            match sender.socket.send_to(syn, config.target) {
                Ok(_) => {
                    sender.in_flight_since = Some(Instant::now());
                    sent += 1;
                }
                Err(_) => send_errors += 1,
            }
        }
        // Sleep until a reply, the next rate slot, the next expiry or the end.
        let mut wake = deadline;
        for sender in &senders {
            if let Some(t) = sender.in_flight_since {
                wake = wake.min(t + config.reply_timeout);
            }
        }
        let idle = senders.iter().any(|s| s.in_flight_since.is_none());
        if idle {
            // With a rate: the next slot. Without: a send failed; retry soon, not in a spin.
            wake = wake.min(match interval {
                Some(_) => next_send,
                None => Instant::now() + Duration::from_millis(1),
            });
        }
        let timeout_ms = wake
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(100) as libc::c_int;
        for p in &mut pollfds {
            p.revents = 0;
        }
        // SAFETY: pollfds is a valid array of pollfd for its length.
        let ready = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if ready <= 0 {
            continue;
        }
        for (sender, pollfd) in senders.iter_mut().zip(&pollfds) {
            if pollfd.revents == 0 {
                continue;
            }
            loop {
                let (len, from) = match sender.socket.recv_from(&mut buf) {
                    Ok(got) => got,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    // ICMP errors (ECONNREFUSED) and the like: nothing to read now.
                    Err(_) => break,
                };
                if from != config.target || len < 4 {
                    continue;
                }
                if u16::from_le_bytes([buf[0], buf[1]]) != MAGIC_NUMBER {
                    continue;
                }
                match buf[3] {
                    TYPE_SYN_ACK => {
                        if let Some(since) = sender.in_flight_since.take() {
                            latencies.push(since.elapsed().as_micros() as u64);
                            replies += 1;
                            reply_bytes += len as u64;
                        }
                    }
                    TYPE_BAD_CLUSTER => bail!(
                        "{} answered BadCluster: it is not in cluster {:?} (use --cluster)",
                        config.target,
                        config.cluster_id
                    ),
                    _ => {}
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(LoadReport {
        target: config.target,
        senders: config.senders,
        digest: config.digest,
        duration_secs: elapsed,
        syn_bytes: syn.len(),
        syns_sent: sent,
        replies,
        replies_per_sec: if elapsed > 0.0 {
            replies as f64 / elapsed
        } else {
            0.0
        },
        lost,
        send_errors,
        reply_bytes_total: reply_bytes,
        latency: Percentiles::from_micros(&mut latencies),
    })
}
