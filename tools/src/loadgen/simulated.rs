//! A simulated cluster around one real node: the node under test receives gossip at the rate a
//! real cluster of N nodes would send to one of its hosts, and its own gossip rounds are
//! answered as real peers would answer them.
//!
//! Each simulated peer has its own UDP socket on its own loopback address (127.10.x.y, one port
//! for all, like a real cluster's hosts), so the node's peer selection sees N distinct peers.
//! All peers share one view of the cluster (a converged cluster): every peer's heartbeat rises
//! once per gossip interval (each at its own phase), a share of the peers changes one key per
//! interval, and the node under test is known with the heartbeat and versions of its latest
//! digest.
//!
//! Rate (SPEC §4.2): every node gossips to 3 peers per interval, picked uniformly, so a host
//! receives on average 3 Syns per interval; it also starts 3 handshakes of its own. Per interval
//! a host therefore receives 3 Syns + 3 SynAcks + 3 Acks and sends 3 SynAcks + 3 Syns + 3 Acks.
//! The simulator sends the 3 Syns per interval, evenly spaced, each from a random peer, answers
//! the node's Syns with SynAcks and the node's SynAcks with Acks.
//!
//! One thread drives every socket through one epoll set, so the simulator costs the host little
//! besides what it measures, and none of it is charged to the node (another process).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

use chitchat_uring::message::{ChitchatMessage, Digest, NodeDigest, ProtocolVersion};
use chitchat_uring::types::{ChitchatId, DeletionStatusMutation};
use chitchat_uring::wire::{
    Decoder, Encoder, MAX_UDP_DATAGRAM_PAYLOAD_SIZE, MessageType, delta_mtu,
};

/// Peers each node gossips to per round (SPEC §4.2, `GOSSIP_COUNT`).
pub const GOSSIP_FANOUT: usize = 3;

/// What the simulated cluster looks like.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The node under test.
    pub target: SocketAddr,
    /// Simulated peers (the cluster has `peers + 1` nodes with the node under test).
    pub peers: usize,
    /// Keys per peer (32-byte values).
    pub keys_per_peer: usize,
    pub gossip_interval: Duration,
    /// Version of the Syns the peers start (a peer answers in the version it received).
    pub protocol: ProtocolVersion,
    pub cluster_id: String,
    /// Share of the peers that change one key per gossip interval (0.01: 1 %).
    pub update_share: f64,
    /// Syns per second while seeding the node's state (not a protocol rate: seeding only).
    pub seed_rate: f64,
}

impl SimConfig {
    pub fn new(target: SocketAddr, peers: usize, cluster_id: impl Into<String>) -> Self {
        SimConfig {
            target,
            peers,
            keys_per_peer: 10,
            gossip_interval: Duration::from_secs(1),
            protocol: ProtocolVersion::V0,
            cluster_id: cluster_id.into(),
            update_share: 0.01,
            seed_rate: 20.0,
        }
    }

    /// Syns the node receives per second in a real cluster of this size (3 per interval).
    pub fn syns_per_sec(&self) -> f64 {
        GOSSIP_FANOUT as f64 / self.gossip_interval.as_secs_f64()
    }
}

/// What one phase of a simulation exchanged with the node. "to node" / "from node" are UDP
/// payload bytes (no IP/UDP headers), as seen by the simulated peers.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimTraffic {
    pub secs: f64,
    pub syns_sent: u64,
    pub syn_acks_received: u64,
    pub acks_sent: u64,
    pub syns_received: u64,
    pub syn_acks_sent: u64,
    pub acks_received: u64,
    pub datagrams_to_node: u64,
    pub datagrams_from_node: u64,
    pub bytes_to_node: u64,
    pub bytes_from_node: u64,
    /// Datagrams from the node that did not decode.
    pub undecodable: u64,
    /// Sends the kernel refused, and messages over one datagram that were not sent.
    pub send_errors: u64,
    pub oversized: u64,
    /// Key changes made by the peers during the phase.
    pub key_updates: u64,
    /// Fewest peers listed by one of the node's Syn digests, and SynAck digests, during the
    /// phase: below `peers`, the node leaves nodes out of its digests (e.g. to fit a datagram).
    #[serde(default)]
    pub fewest_peers_in_node_syn: Option<usize>,
    #[serde(default)]
    pub fewest_peers_in_node_syn_ack: Option<usize>,
}

impl SimTraffic {
    fn minus(&self, before: &SimTraffic) -> SimTraffic {
        SimTraffic {
            secs: self.secs - before.secs,
            syns_sent: self.syns_sent - before.syns_sent,
            syn_acks_received: self.syn_acks_received - before.syn_acks_received,
            acks_sent: self.acks_sent - before.acks_sent,
            syns_received: self.syns_received - before.syns_received,
            syn_acks_sent: self.syn_acks_sent - before.syn_acks_sent,
            acks_received: self.acks_received - before.acks_received,
            datagrams_to_node: self.datagrams_to_node - before.datagrams_to_node,
            datagrams_from_node: self.datagrams_from_node - before.datagrams_from_node,
            bytes_to_node: self.bytes_to_node - before.bytes_to_node,
            bytes_from_node: self.bytes_from_node - before.bytes_from_node,
            undecodable: self.undecodable - before.undecodable,
            send_errors: self.send_errors - before.send_errors,
            oversized: self.oversized - before.oversized,
            key_updates: self.key_updates - before.key_updates,
            // Minimums do not subtract: `run` tracks them per phase.
            fewest_peers_in_node_syn: None,
            fewest_peers_in_node_syn_ack: None,
        }
    }
}

/// What the node's latest digest says it knows of the simulated peers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKnowledge {
    /// Peers listed in the node's latest digest.
    pub peers_known: usize,
    /// Peers whose every key the node holds (its max_version equals the peer's).
    pub peers_up_to_date: usize,
}

struct Kv {
    key: String,
    value: String,
    version: u64,
}

struct Peer {
    id: ChitchatId,
    /// Heartbeat at the simulation's start; it then rises once per interval.
    heartbeat_base: u64,
    /// Where in the interval this peer's heartbeat ticks, in [0, 1).
    phase: f64,
    max_version: u64,
    kvs: Vec<Kv>,
}

/// The 32-byte value of key `key` of peer `peer` at `version`.
fn value_of(peer: usize, key: usize, version: u64) -> String {
    format!("{:0>32}", format!("p{peer}-k{key}-v{version}"))
}

/// The simulated peers, their sockets and their shared view of the cluster.
pub struct SimulatedCluster {
    config: SimConfig,
    peers: Vec<Peer>,
    index: HashMap<ChitchatId, usize>,
    sockets: Vec<UdpSocket>,
    epoll: OwnedFd,
    /// Nodes that are not simulated peers (the node under test), as its digests describe them.
    foreign: BTreeMap<ChitchatId, NodeDigest>,
    encoder: Encoder,
    decoder: Decoder,
    rng: u64,
    start: Instant,
    /// Scratch: the node's max_version of each peer, from the digest being answered.
    node_max: Vec<u64>,
    knowledge: NodeKnowledge,
    traffic: SimTraffic,
    buf: Vec<u8>,
    out: Vec<u8>,
    update_carry: f64,
}

/// The loopback address of simulated peer `i` (127.10.0.1, 127.10.0.2, …, 250 per /24).
pub fn peer_ip(i: usize) -> Ipv4Addr {
    let block = i / 250;
    Ipv4Addr::new(
        127,
        (10 + block / 250) as u8,
        (block % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

/// Most peers [`peer_ip`] can address within 127.10.0.0–127.255.255.255.
pub const MAX_PEERS: usize = 62_500 * 200;

impl SimulatedCluster {
    /// Binds one socket per peer on its own loopback address, all on one port.
    pub fn bind(config: SimConfig) -> anyhow::Result<SimulatedCluster> {
        ensure!(
            config.peers > 0,
            "a simulated cluster needs at least one peer"
        );
        ensure!(
            config.peers <= MAX_PEERS,
            "at most {MAX_PEERS} simulated peers"
        );
        ensure!(config.keys_per_peer > 0, "peers need at least one key");
        ensure!(
            !config.gossip_interval.is_zero(),
            "the gossip interval must be positive"
        );
        ensure!(
            config.target.is_ipv4() && config.target.ip().is_loopback(),
            "the node under test must listen on a 127.0.0.0/8 address"
        );
        raise_open_file_limit(config.peers + 64)?;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ config.peers as u64;
        let mut last_error = None;
        let mut sockets = Vec::new();
        for _ in 0..20 {
            let port = 20_000 + (next_rand(&mut rng) % 12_000) as u16;
            match bind_all(config.peers, port) {
                Ok(bound) => {
                    sockets = bound;
                    break;
                }
                Err(error) => last_error = Some(error),
            }
        }
        if sockets.is_empty() {
            return Err(last_error
                .map(anyhow::Error::from)
                .unwrap_or_else(|| anyhow::anyhow!("no port"))
                .context(format!("binding {} peer sockets", config.peers)));
        }
        // SAFETY: epoll_create1 has no preconditions; the result is checked below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: `raw` is a fresh epoll descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        for (i, socket) in sockets.iter().enumerate() {
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: both descriptors are open and `event` is a valid epoll_event.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    socket.as_raw_fd(),
                    &mut event,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error()).context("epoll_ctl");
            }
        }
        let n = config.peers;
        let keys = config.keys_per_peer;
        let peers: Vec<Peer> = sockets
            .iter()
            .enumerate()
            .map(|(i, socket)| {
                let addr = socket.local_addr()?;
                Ok(Peer {
                    // Generation ids are start times in real clusters: spread them.
                    id: ChitchatId::new(
                        format!("node-{i:05}"),
                        1_764_000_000 + (i as u64 * 7) % 86_400,
                        addr,
                    ),
                    heartbeat_base: 1_000 + next_rand(&mut rng) % 100_000,
                    phase: i as f64 / n as f64,
                    max_version: keys as u64,
                    kvs: (0..keys)
                        .map(|k| Kv {
                            key: format!("key-{k:04}"),
                            value: value_of(i, k, k as u64 + 1),
                            version: k as u64 + 1,
                        })
                        .collect(),
                })
            })
            .collect::<io::Result<_>>()
            .context("reading the peer sockets' addresses")?;
        let index = peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), i))
            .collect();
        Ok(SimulatedCluster {
            node_max: vec![0; n],
            config,
            peers,
            index,
            sockets,
            epoll,
            foreign: BTreeMap::new(),
            encoder: Encoder::new(),
            decoder: Decoder::new(),
            rng,
            start: Instant::now(),
            knowledge: NodeKnowledge::default(),
            traffic: SimTraffic::default(),
            buf: vec![0u8; 65_536],
            out: Vec::with_capacity(65_536),
            update_carry: 0.0,
        })
    }

    /// Points the peers at another node under test (e.g. one started after the peers were
    /// bound, with a peer as its seed).
    pub fn set_target(&mut self, target: SocketAddr) -> anyhow::Result<()> {
        ensure!(
            target.is_ipv4() && target.ip().is_loopback(),
            "the node under test must listen on a 127.0.0.0/8 address"
        );
        self.config.target = target;
        Ok(())
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The address of peer `i` (e.g. a seed for the node under test).
    pub fn peer_addr(&self, i: usize) -> Option<SocketAddr> {
        self.peers.get(i).map(|p| p.id.gossip_advertise_addr)
    }

    /// The peers' ids (the node under test should end up knowing all of them).
    pub fn peer_ids(&self) -> impl Iterator<Item = &ChitchatId> {
        self.peers.iter().map(|p| &p.id)
    }

    /// Each peer's id and current max_version (what the node should end up holding).
    pub fn peer_versions(&self) -> impl Iterator<Item = (&ChitchatId, u64)> {
        self.peers.iter().map(|p| (&p.id, p.max_version))
    }

    /// What the node's latest digest said.
    pub fn knowledge(&self) -> NodeKnowledge {
        self.knowledge
    }

    /// Totals since the simulator was bound.
    pub fn traffic(&self) -> SimTraffic {
        let mut t = self.traffic.clone();
        t.secs = self.start.elapsed().as_secs_f64();
        t
    }

    /// Bytes of the Syn a peer sends now, to check it fits one datagram before the run.
    pub fn syn_len(&mut self) -> usize {
        self.encode_syn();
        self.out.len()
    }

    /// Fails with a clear message when this cluster cannot gossip at all: its Syn does not fit
    /// one UDP datagram in this protocol version (V0 digests are not compressed).
    pub fn check_fits(&mut self) -> anyhow::Result<()> {
        let len = self.syn_len();
        if len > MAX_UDP_DATAGRAM_PAYLOAD_SIZE {
            bail!(
                "a {}-node digest takes {len} bytes in {:?}, more than one UDP datagram \
                 ({MAX_UDP_DATAGRAM_PAYLOAD_SIZE} B): a cluster this large cannot gossip in this version",
                self.config.peers + 1,
                self.config.protocol
            );
        }
        Ok(())
    }

    /// Sends Syns at the seeding rate, without key changes, until the node's digest shows every
    /// peer with all its keys; returns how long it took. Fails after `timeout`.
    pub fn seed(&mut self, timeout: Duration, stop: &AtomicBool) -> anyhow::Result<Duration> {
        self.check_fits()?;
        let started = Instant::now();
        let deadline = started + timeout;
        let period = Duration::from_secs_f64(1.0 / self.config.seed_rate.max(0.1));
        let mut next_syn = started;
        let n = self.config.peers;
        while !(self.knowledge.peers_known == n && self.knowledge.peers_up_to_date == n) {
            ensure!(!stop.load(Ordering::Relaxed), "interrupted while seeding");
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "the node did not learn the cluster in {:.0} s: its latest digest knew {} of {n} \
                     peers, {} up to date ({} Syns sent, {} SynAcks received)",
                    timeout.as_secs_f64(),
                    self.knowledge.peers_known,
                    self.knowledge.peers_up_to_date,
                    self.traffic.syns_sent,
                    self.traffic.syn_acks_received
                );
            }
            if now >= next_syn {
                self.send_syn();
                next_syn += period;
                // No catch-up burst after a stall.
                next_syn = next_syn.max(now);
            }
            self.poll_until(next_syn.min(deadline))?;
        }
        Ok(started.elapsed())
    }

    /// Plays the cluster at the protocol's rate for `duration`: 3 Syns per interval from
    /// random peers, heartbeats rising, `update_share` of the peers changing a key per
    /// interval; answers the node. Returns what was exchanged during this call.
    pub fn run(&mut self, duration: Duration, stop: &AtomicBool) -> anyhow::Result<SimTraffic> {
        let before = self.traffic();
        self.traffic.fewest_peers_in_node_syn = None;
        self.traffic.fewest_peers_in_node_syn_ack = None;
        let started = Instant::now();
        let deadline = started + duration;
        let syn_period = self.config.gossip_interval / GOSSIP_FANOUT as u32;
        let mut next_syn = started + syn_period / 2;
        let mut next_tick = started + self.config.gossip_interval;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if now >= next_syn {
                self.send_syn();
                next_syn += syn_period;
                // No catch-up burst after a stall.
                next_syn = next_syn.max(now);
            }
            if now >= next_tick {
                self.update_keys();
                next_tick += self.config.gossip_interval;
                next_tick = next_tick.max(now);
            }
            self.poll_until(next_syn.min(next_tick).min(deadline))?;
        }
        let now = self.traffic();
        let mut phase = now.minus(&before);
        phase.fewest_peers_in_node_syn = now.fewest_peers_in_node_syn;
        phase.fewest_peers_in_node_syn_ack = now.fewest_peers_in_node_syn_ack;
        Ok(phase)
    }

    /// Changes one key of `update_share` of the peers (fractions carry to the next tick).
    fn update_keys(&mut self) {
        self.update_carry += self.config.update_share * self.config.peers as f64;
        while self.update_carry >= 1.0 {
            self.update_carry -= 1.0;
            let p = (next_rand(&mut self.rng) % self.peers.len() as u64) as usize;
            let k = (next_rand(&mut self.rng) % self.config.keys_per_peer as u64) as usize;
            let peer = &mut self.peers[p];
            peer.max_version += 1;
            let version = peer.max_version;
            peer.kvs[k].version = version;
            peer.kvs[k].value = value_of(p, k, version);
            self.traffic.key_updates += 1;
        }
    }

    fn heartbeat(&self, peer: &Peer, elapsed: f64) -> u64 {
        let interval = self.config.gossip_interval.as_secs_f64();
        peer.heartbeat_base + (elapsed / interval + peer.phase) as u64
    }

    /// Encodes the peers' digest (every peer, plus the node under test as last seen) in
    /// `version` at the end of `self.out`; returns its length.
    fn put_digest(&mut self, version: ProtocolVersion) -> usize {
        let elapsed = self.start.elapsed().as_secs_f64();
        let hbs: Vec<u64> = self
            .peers
            .iter()
            .map(|p| self.heartbeat(p, elapsed))
            .collect();
        let peers = self
            .peers
            .iter()
            .zip(hbs)
            .map(|(p, hb)| (&p.id, NodeDigest::new(hb.into(), 0, p.max_version)));
        // Both lists are in id order: merge them, as a node's digest is in id order.
        let mut entries: Vec<(&ChitchatId, NodeDigest)> =
            Vec::with_capacity(self.peers.len() + self.foreign.len());
        let mut foreign = self.foreign.iter().map(|(id, nd)| (id, *nd)).peekable();
        for entry in peers {
            while let Some(f) = foreign.next_if(|f| f.0 < entry.0) {
                entries.push(f);
            }
            entries.push(entry);
        }
        entries.extend(foreign);
        self.encoder
            .encode_digest(version, entries, usize::MAX, &mut self.out)
            .len
    }

    fn encode_syn(&mut self) {
        self.out.clear();
        let version = self.config.protocol;
        Encoder::write_header(&mut self.out, version, MessageType::Syn);
        self.put_digest(version);
        let id = self.config.cluster_id.as_bytes();
        let len = id.len().min(u16::MAX as usize);
        self.out.extend_from_slice(&(len as u16).to_le_bytes());
        self.out.extend_from_slice(&id[..len]);
    }

    fn send_syn(&mut self) {
        let p = (next_rand(&mut self.rng) % self.peers.len() as u64) as usize;
        self.encode_syn();
        if self.send(p) {
            self.traffic.syns_sent += 1;
        }
    }

    /// Sends `self.out` from peer `p` to the node.
    fn send(&mut self, p: usize) -> bool {
        if self.out.len() > MAX_UDP_DATAGRAM_PAYLOAD_SIZE {
            self.traffic.oversized += 1;
            return false;
        }
        match self.sockets[p].send_to(&self.out, self.config.target) {
            Ok(len) => {
                self.traffic.datagrams_to_node += 1;
                self.traffic.bytes_to_node += len as u64;
                true
            }
            Err(_) => {
                self.traffic.send_errors += 1;
                false
            }
        }
    }

    /// Waits for datagrams until `until` and answers them.
    fn poll_until(&mut self, until: Instant) -> anyhow::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            // Round up so that a wait never ends just before its instant, spinning.
            let timeout_ms = left.as_micros().div_ceil(1_000).min(100) as libc::c_int;
            // SAFETY: `events` is a valid array of 64 epoll_event for the kernel to fill.
            let ready = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout_ms,
                )
            };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error).context("epoll_wait");
            }
            for event in &events[..ready as usize] {
                self.drain(event.u64 as usize)?;
            }
            if Instant::now() >= until || (ready == 0 && timeout_ms == 0) {
                return Ok(());
            }
        }
    }

    /// Reads every datagram waiting on peer `p`'s socket and answers it.
    fn drain(&mut self, p: usize) -> anyhow::Result<()> {
        loop {
            let (len, from) = match self.sockets[p].recv_from(&mut self.buf) {
                Ok(got) => got,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // ICMP errors and the like: nothing to read now.
                Err(_) => return Ok(()),
            };
            if from != self.config.target {
                continue;
            }
            self.traffic.datagrams_from_node += 1;
            self.traffic.bytes_from_node += len as u64;
            let envelope = match self.decoder.decode_envelope(&self.buf[..len]) {
                Ok(envelope) => envelope,
                Err(_) => {
                    self.traffic.undecodable += 1;
                    continue;
                }
            };
            let version = envelope.version;
            match envelope.message {
                ChitchatMessage::Syn { cluster_id, digest } => {
                    self.traffic.syns_received += 1;
                    self.out.clear();
                    if cluster_id != self.config.cluster_id {
                        Encoder::write_header(&mut self.out, version, MessageType::BadCluster);
                    } else {
                        self.learn(&digest);
                        let known = self.knowledge.peers_known;
                        let fewest = &mut self.traffic.fewest_peers_in_node_syn;
                        *fewest = Some(fewest.map_or(known, |f| f.min(known)));
                        Encoder::write_header(&mut self.out, version, MessageType::SynAck);
                        let digest_len = self.put_digest(version);
                        self.put_delta(delta_mtu(digest_len));
                    }
                    if self.send(p) {
                        self.traffic.syn_acks_sent += 1;
                    }
                }
                ChitchatMessage::SynAck { digest, .. } => {
                    self.traffic.syn_acks_received += 1;
                    self.learn(&digest);
                    let known = self.knowledge.peers_known;
                    let fewest = &mut self.traffic.fewest_peers_in_node_syn_ack;
                    *fewest = Some(fewest.map_or(known, |f| f.min(known)));
                    self.out.clear();
                    Encoder::write_header(&mut self.out, version, MessageType::Ack);
                    self.put_delta(delta_mtu(0));
                    if self.send(p) {
                        self.traffic.acks_sent += 1;
                    }
                }
                ChitchatMessage::Ack { .. } => self.traffic.acks_received += 1,
                ChitchatMessage::BadCluster => bail!(
                    "{} answered BadCluster: it is not in cluster {:?}",
                    self.config.target,
                    self.config.cluster_id
                ),
            }
        }
    }

    /// Takes in a digest from the node: what it knows of each peer (for the delta that answers
    /// it) and the entries of nodes that are not peers (the node itself), kept for our digests.
    fn learn(&mut self, digest: &Digest) {
        self.node_max.fill(0);
        let mut known = 0;
        for (id, nd) in &digest.node_digests {
            match self.index.get(id) {
                Some(&i) => {
                    self.node_max[i] = nd.max_version;
                    known += 1;
                }
                None => {
                    let entry = self.foreign.entry(id.clone()).or_insert(*nd);
                    // Never step a node back: datagrams may arrive out of order.
                    if u64::from(nd.heartbeat) >= u64::from(entry.heartbeat) {
                        entry.heartbeat = nd.heartbeat;
                    }
                    entry.last_gc_version = entry.last_gc_version.max(nd.last_gc_version);
                    entry.max_version = entry.max_version.max(nd.max_version);
                }
            }
        }
        let up_to_date = self
            .peers
            .iter()
            .zip(&self.node_max)
            .filter(|(p, max)| **max >= p.max_version)
            .count();
        self.knowledge = NodeKnowledge {
            peers_known: known,
            peers_up_to_date: up_to_date,
        };
    }

    /// Appends the delta a real peer would send for the digest last passed to `learn`: the
    /// peers' keys above what the node holds, unknown nodes first (fewest versions first),
    /// then the most stale, cut at `mtu` the way a node cuts it.
    fn put_delta(&mut self, mtu: usize) {
        let mut stale: Vec<(bool, u64, u64, usize)> = Vec::new();
        for (i, peer) in self.peers.iter().enumerate() {
            let from = self.node_max[i];
            if peer.max_version <= from {
                continue;
            }
            let unknown = from == 0;
            let rank = if unknown {
                peer.max_version
            } else {
                // More stale keys first: sort ascending on the complement.
                u64::MAX - peer.kvs.iter().filter(|kv| kv.version > from).count() as u64
            };
            // Equal ranks are shuffled, as real nodes do.
            stale.push((!unknown, rank, next_rand(&mut self.rng), i));
        }
        stale.sort_unstable();
        let mut writer = self.encoder.delta_writer(&mut self.out, mtu);
        let mut kvs: Vec<&Kv> = Vec::new();
        'nodes: for &(_, _, _, i) in &stale {
            let peer = &self.peers[i];
            let from = self.node_max[i];
            if !writer.try_add_node(&peer.id, 0, from) {
                break;
            }
            kvs.clear();
            kvs.extend(peer.kvs.iter().filter(|kv| kv.version > from));
            kvs.sort_unstable_by_key(|kv| kv.version);
            for kv in &kvs {
                if !writer.try_add_kv(&kv.key, &kv.value, kv.version, DeletionStatusMutation::Set) {
                    break 'nodes;
                }
            }
        }
        writer.finish();
    }
}

fn bind_all(peers: usize, port: u16) -> io::Result<Vec<UdpSocket>> {
    (0..peers)
        .map(|i| {
            let socket = UdpSocket::bind(SocketAddrV4::new(peer_ip(i), port))?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect()
}

/// Raises the soft open-file limit to at least `wanted` (up to the hard limit).
pub fn raise_open_file_limit(wanted: usize) -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit");
    }
    let wanted = wanted as libc::rlim_t;
    if limit.rlim_cur >= wanted {
        return Ok(());
    }
    ensure!(
        limit.rlim_max >= wanted,
        "{wanted} open files are needed, the hard limit is {} (raise it with ulimit -Hn)",
        limit.rlim_max
    );
    limit.rlim_cur = wanted;
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error()).context("setrlimit");
    }
    Ok(())
}

/// xorshift64*: cheap, good enough to pick peers and keys.
fn next_rand(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_are_distinct_and_off_127_0() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..200_000).chain(MAX_PEERS - 1_000..MAX_PEERS) {
            let ip = peer_ip(i);
            assert!(ip.is_loopback());
            assert!(ip.octets()[1] >= 10, "{ip}");
            assert_ne!(ip.octets()[3], 0, "{ip}");
            assert!(seen.insert(ip), "{i}: {ip} twice");
        }
    }

    fn decode_syn(sim: &mut SimulatedCluster) -> Digest {
        sim.encode_syn();
        match Decoder::new().decode_envelope(&sim.out).unwrap().message {
            ChitchatMessage::Syn { cluster_id, digest } => {
                assert_eq!(cluster_id, "c");
                digest
            }
            other => panic!("not a Syn: {other:?}"),
        }
    }

    #[test]
    fn digest_lists_every_peer_and_the_node_with_rising_heartbeats() {
        let target = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut config = SimConfig::new(target, 5, "c");
        config.gossip_interval = Duration::from_millis(10);
        let mut sim = SimulatedCluster::bind(config).unwrap();
        // The node under test, as its own digest describes it.
        let node = ChitchatId::new("host", 1, target);
        let mut from_node = Digest::default();
        from_node.add_node(node.clone(), NodeDigest::new(7.into(), 0, 3));
        sim.learn(&from_node);
        assert_eq!(sim.knowledge(), NodeKnowledge::default());

        let first = decode_syn(&mut sim);
        assert_eq!(first.len(), 6);
        assert_eq!(first.node_digests[&node], NodeDigest::new(7.into(), 0, 3));
        for (id, max) in sim.peer_versions() {
            assert_eq!(first.node_digests[id].max_version, max);
        }
        // Two intervals later every peer's heartbeat has risen.
        std::thread::sleep(Duration::from_millis(25));
        let later = decode_syn(&mut sim);
        for id in sim.peer_ids() {
            assert!(
                u64::from(later.node_digests[id].heartbeat)
                    > u64::from(first.node_digests[id].heartbeat),
                "{id:?}"
            );
        }
    }

    #[test]
    fn delta_brings_a_node_from_what_it_holds_to_the_peers_versions() {
        let target = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut config = SimConfig::new(target, 3, "c");
        config.update_share = 1.0;
        let mut sim = SimulatedCluster::bind(config).unwrap();
        sim.update_keys();
        assert_eq!(
            sim.traffic().key_updates,
            3,
            "a share of 1: every peer's worth"
        );
        let total: u64 = sim.peer_versions().map(|(_, max)| max).sum();
        assert_eq!(total, 33, "each change is a new version of its peer");
        // From here on, only peer 0 changed a key since the node last heard of it.
        for (i, peer) in sim.peers.iter_mut().enumerate() {
            peer.max_version = 10 + u64::from(i == 0);
            for (k, kv) in peer.kvs.iter_mut().enumerate() {
                kv.version = k as u64 + 1;
            }
            if i == 0 {
                peer.kvs[3].version = 11;
            }
        }
        // The node holds peer 0 up to version 10, nothing of the others.
        let ids: Vec<ChitchatId> = sim.peer_ids().cloned().collect();
        let mut from_node = Digest::default();
        from_node.add_node(ids[0].clone(), NodeDigest::new(1.into(), 0, 10));
        sim.learn(&from_node);
        assert_eq!(sim.knowledge().peers_known, 1);
        assert_eq!(sim.knowledge().peers_up_to_date, 0);
        sim.out.clear();
        sim.put_delta(delta_mtu(0));
        let mut ack = Vec::new();
        Encoder::write_header(&mut ack, ProtocolVersion::V0, MessageType::Ack);
        ack.extend_from_slice(&sim.out);
        let ChitchatMessage::Ack { delta } = Decoder::new().decode_envelope(&ack).unwrap().message
        else {
            panic!("not an Ack");
        };
        assert_eq!(delta.node_deltas.len(), 3);
        // Unknown nodes first, with every key; the known one from its version on.
        for node_delta in &delta.node_deltas {
            let i = ids
                .iter()
                .position(|id| *id == node_delta.chitchat_id)
                .unwrap();
            if i == 0 {
                assert_eq!(node_delta.from_version_excluded, 10);
                assert_eq!(node_delta.key_values.len(), 1);
                assert_eq!(node_delta.key_values[0].version, 11);
            } else {
                assert_eq!(node_delta.from_version_excluded, 0);
                assert_eq!(node_delta.key_values.len(), 10);
                assert!(
                    node_delta
                        .key_values
                        .windows(2)
                        .all(|w| w[0].version < w[1].version)
                );
            }
        }
        assert_eq!(delta.node_deltas[2].chitchat_id, ids[0]);
    }
}
