//! Deterministic simulation of whole clusters of sans-IO nodes on virtual time: random writes,
//! deletes and TTLs, lossy and reordering network, crashed nodes. Every datagram goes through
//! the byte codec. Checks: all live nodes converge to the same key-values, and
//! `(last_gc_version, max_version)` of every node state never decreases.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use chitchat_uring::{
    Chitchat, ChitchatConfig, ChitchatId, Clock, FailureDetectorConfig, ManualClock,
    ProtocolVersion, Version,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

const TICK: Duration = Duration::from_millis(10);
const GOSSIP_INTERVAL: Duration = Duration::from_millis(100);

struct InFlight {
    to: usize,
    from: SocketAddr,
    bytes: Vec<u8>,
}

struct Sim {
    clock: ManualClock,
    nodes: Vec<Chitchat>,
    alive: Vec<bool>,
    addr_to_index: HashMap<SocketAddr, usize>,
    /// (delivery time in ticks, sequence) → datagram.
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: HashMap<u64, InFlight>,
    seq: u64,
    tick: u64,
    rng: SmallRng,
    loss: f64,
    max_delay_ticks: u64,
    /// Last seen monotonic property of (observer, node).
    monotonic: HashMap<(usize, ChitchatId), (Version, Version)>,
    datagrams: u64,
}

impl Sim {
    fn new(seed: u64, num_nodes: usize, loss: f64, max_delay_ticks: u64) -> Sim {
        let clock = ManualClock::new();
        let mut nodes = Vec::new();
        let mut addr_to_index = HashMap::new();
        let seed_addr = SocketAddr::from(([127, 0, 0, 1], 20_000));
        let seeds: HashSet<SocketAddr> = [seed_addr].into_iter().collect();
        for i in 0..num_nodes {
            let port = 20_000 + i as u16;
            let chitchat_id = ChitchatId::for_local_test(port);
            let mut config = ChitchatConfig::for_test(port);
            config.chitchat_id = chitchat_id.clone();
            config.cluster_id = "sim".to_string();
            config.gossip_interval = GOSSIP_INTERVAL;
            config.marked_for_deletion_grace_period = Duration::from_secs(3);
            config.failure_detector_config = FailureDetectorConfig {
                initial_interval: GOSSIP_INTERVAL * 10,
                dead_node_grace_period: Duration::from_secs(8),
                ..FailureDetectorConfig::default()
            };
            config.protocol_version = if i % 3 == 0 {
                ProtocolVersion::V1
            } else {
                ProtocolVersion::V0
            };
            // The seed set never changes: the receiver keeps the value after the sender is gone.
            let (_, rx) = watch::channel(seeds.clone());
            let chitchat = Chitchat::with_clock(
                config,
                rx,
                vec![("initial".to_string(), format!("node-{i}"))],
                Clock::from(clock.clone()),
                seed ^ (i as u64 * 0x9E37_79B9),
            );
            addr_to_index.insert(chitchat_id.gossip_advertise_addr, i);
            nodes.push(chitchat);
        }
        Sim {
            clock,
            alive: vec![true; num_nodes],
            nodes,
            addr_to_index,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            seq: 0,
            tick: 0,
            rng: SmallRng::seed_from_u64(seed),
            loss,
            max_delay_ticks,
            monotonic: HashMap::new(),
            datagrams: 0,
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].self_chitchat_id().gossip_advertise_addr
    }

    fn send(&mut self, from: usize, to_addr: SocketAddr, bytes: Vec<u8>) {
        self.datagrams += 1;
        assert!(bytes.len() <= chitchat_uring::MAX_UDP_DATAGRAM_PAYLOAD_SIZE);
        if self.rng.random_bool(self.loss) {
            return;
        }
        let Some(&to) = self.addr_to_index.get(&to_addr) else {
            return;
        };
        let delay = self.rng.random_range(0..=self.max_delay_ticks);
        self.seq += 1;
        let from = self.addr(from);
        self.queue.push(Reverse((self.tick + delay, self.seq)));
        self.in_flight
            .insert(self.seq, InFlight { to, from, bytes });
    }

    /// One gossip round of node `i`: the protocol core's round, exactly as the server drives it
    /// (one Syn for every target), over the simulated network.
    fn gossip_round(&mut self, i: usize) {
        let mut syn = Vec::new();
        let targets = self.nodes[i].begin_gossip_round(&mut syn);
        for target in targets.all() {
            self.send(i, target, syn.clone());
        }
        self.nodes[i].end_gossip_round();
        self.check_monotonic(i);
    }

    fn deliver_due(&mut self) {
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > self.tick {
                break;
            }
            self.queue.pop();
            let InFlight { to, from, bytes } = self.in_flight.remove(&seq).unwrap();
            if !self.alive[to] {
                continue;
            }
            let mut reply = Vec::new();
            let outcome = self.nodes[to]
                .handle_datagram(&bytes, &mut reply, None)
                .expect("every datagram a node writes decodes");
            self.check_monotonic(to);
            if outcome.replied {
                self.send(to, from, reply);
            }
        }
    }

    fn check_monotonic(&mut self, observer: usize) {
        let mut present = HashSet::new();
        for (id, state) in self.nodes[observer].node_states() {
            present.insert(id.clone());
            let now = state.monotonic_property();
            let key = (observer, id.clone());
            if let Some(before) = self.monotonic.get(&key) {
                assert!(
                    now >= *before,
                    "node {observer}: {id:?} went from {before:?} to {now:?}"
                );
            }
            self.monotonic.insert(key, now);
        }
        // A garbage-collected node may come back from scratch with a new heartbeat.
        self.monotonic
            .retain(|(o, id), _| *o != observer || present.contains(id));
    }

    fn random_mutation(&mut self) {
        let i = self.rng.random_range(0..self.nodes.len());
        if !self.alive[i] {
            return;
        }
        let key = format!("key-{}", self.rng.random_range(0..12));
        let value = format!("v{}", self.rng.random_range(0..1_000));
        let op = self.rng.random_range(0..10);
        let own = self.nodes[i].self_node_state();
        match op {
            0..=5 => own.set(key, value),
            6 | 7 => own.delete(&key),
            8 => own.set_with_ttl(key, value),
            _ => own.delete_after_ttl(&key),
        }
    }

    fn step(&mut self, mutation_probability: f64) {
        self.tick += 1;
        self.clock.advance(TICK);
        let ticks_per_round = (GOSSIP_INTERVAL.as_millis() / TICK.as_millis()) as u64;
        for i in 0..self.nodes.len() {
            // Rounds are staggered: node i gossips at tick ≡ i (mod 10).
            if self.alive[i] && self.tick % ticks_per_round == i as u64 % ticks_per_round {
                self.gossip_round(i);
            }
        }
        self.deliver_due();
        if self.rng.random_bool(mutation_probability) {
            self.random_mutation();
        }
    }

    fn visible_view(
        &self,
        observer: usize,
    ) -> BTreeMap<ChitchatId, (Version, Vec<(String, String)>)> {
        let live_ids: HashSet<ChitchatId> = (0..self.nodes.len())
            .filter(|&i| self.alive[i])
            .map(|i| self.nodes[i].self_chitchat_id().clone())
            .collect();
        self.nodes[observer]
            .node_states()
            .iter()
            .filter(|(id, _)| live_ids.contains(*id))
            .map(|(id, state)| {
                let kvs = state
                    .key_values()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                (id.clone(), (state.max_version(), kvs))
            })
            .collect()
    }

    fn converged(&self) -> bool {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.alive[i]).collect();
        let reference = self.visible_view(live[0]);
        if reference.len() != live.len() {
            return false;
        }
        live.iter().all(|&i| self.visible_view(i) == reference)
    }
}

/// Runs one simulated cluster; returns the virtual seconds it took to converge after writes stop.
fn simulate(seed: u64) -> f64 {
    let mut rng = SmallRng::seed_from_u64(seed);
    let num_nodes = rng.random_range(5..=20);
    let loss = rng.random_range(0.0..0.3);
    let max_delay_ticks = rng.random_range(0..=8);
    let mut sim = Sim::new(seed, num_nodes, loss, max_delay_ticks);
    // Busy phase: 15 s of writes, with up to two crashes.
    let crash_ticks: Vec<u64> = (0..rng.random_range(0..=2))
        .map(|_| rng.random_range(100..1_500))
        .collect();
    for _ in 0..1_500 {
        if crash_ticks.contains(&sim.tick) {
            let victim = rng.random_range(1..num_nodes);
            sim.alive[victim] = false;
        }
        sim.step(0.3);
    }
    // Quiet phase: no writes; everything must converge within 60 virtual seconds.
    let quiet_start = sim.tick;
    while !sim.converged() {
        sim.step(0.0);
        assert!(
            sim.tick - quiet_start < 6_000,
            "seed {seed}: {num_nodes} nodes, loss {loss:.2}, delay ≤ {max_delay_ticks} ticks: \
             no convergence after 60 virtual seconds"
        );
    }
    let converged_after = (sim.tick - quiet_start) as f64 * TICK.as_secs_f64();
    // Crashed nodes end up dead on every live node (within 30 virtual seconds).
    let crashed: Vec<ChitchatId> = (0..num_nodes)
        .filter(|&j| !sim.alive[j])
        .map(|j| sim.nodes[j].self_chitchat_id().clone())
        .collect();
    let detection_start = sim.tick;
    loop {
        let any_seen_live = (0..num_nodes)
            .filter(|&i| sim.alive[i])
            .any(|i| sim.nodes[i].live_nodes().any(|live| crashed.contains(live)));
        if !any_seen_live {
            break;
        }
        sim.step(0.0);
        assert!(
            sim.tick - detection_start < 3_000,
            "seed {seed}: a crashed node is still seen live"
        );
    }
    assert!(sim.datagrams > 0);
    converged_after
}

#[test]
fn random_clusters_converge_and_stay_monotonic() {
    for seed in 0..8 {
        let secs = simulate(seed);
        eprintln!("seed {seed}: converged {secs:.1} s after the last write");
    }
}

#[test]
fn simulation_is_deterministic() {
    let run = |seed| {
        let mut sim = Sim::new(seed, 6, 0.2, 5);
        for _ in 0..300 {
            sim.step(0.3);
        }
        (sim.datagrams, sim.visible_view(0))
    };
    assert_eq!(run(42), run(42));
}
