//! DESIGN-13 §1–3 on virtual time: forged counters about a node are superseded by its own word,
//! no arithmetic wraps, caps refuse new nodes but never updates of held ones, and an
//! unrelayable key-value is dropped without blocking the delta.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{Clock, ManualClock};
use crate::config::{ChitchatConfig, FailureDetectorConfig};
use crate::message::{ChitchatMessage, Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest};
use crate::protocol::limits::{MAX_PLAUSIBLE_COUNTER, Refusal};
use crate::protocol::{Chitchat, Limits};
use crate::types::{ChitchatId, DeletionStatusMutation, Heartbeat, VersionedValue};

const ROUND: Duration = Duration::from_millis(100);
/// The owner's word supersedes a forgery within this much virtual time.
const OWNER_WINS_WITHIN: Duration = Duration::from_secs(10);
/// Values every counter test tries.
const HOSTILE: [u64; 6] = [
    u64::MAX,
    u64::MAX - 1,
    1 << 53,
    (1 << 40) + 1,
    1 << 40,
    (1 << 40) - 1,
];

struct Net {
    clock: ManualClock,
    nodes: Vec<Chitchat>,
    addrs: HashMap<SocketAddr, usize>,
}

fn config(port: u16, seed: Option<u16>) -> ChitchatConfig {
    let mut config = ChitchatConfig::for_test(port);
    config.cluster_id = "limits".to_string();
    config.gossip_interval = ROUND;
    config.failure_detector_config = FailureDetectorConfig {
        phi_threshold: 8.0,
        initial_interval: ROUND,
        dead_node_grace_period: Duration::from_secs(60),
        ..FailureDetectorConfig::default()
    };
    config.marked_for_deletion_grace_period = Duration::from_secs(3_600);
    if let Some(seed) = seed {
        config.seed_nodes = vec![format!("127.0.0.1:{seed}")];
    }
    config
}

impl Net {
    /// `n` nodes on ports 31000.., every one seeded with the first; node 0 holds `kvs`.
    fn new(n: usize, kvs: &[(&str, &str)]) -> Net {
        let clock = ManualClock::new();
        let mut nodes = Vec::new();
        let mut addrs = HashMap::new();
        let seed: SocketAddr = ([127, 0, 0, 1], 31_000).into();
        for i in 0..n {
            let port = 31_000 + i as u16;
            let seeds: HashSet<SocketAddr> = [seed].into_iter().collect();
            let (_, rx) = watch::channel(seeds);
            let initial = if i == 0 {
                kvs.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            } else {
                Vec::new()
            };
            let node = Chitchat::with_clock(
                config(port, Some(31_000)),
                rx,
                initial,
                Clock::from(clock.clone()),
                i as u64 + 11,
            );
            addrs.insert(node.self_chitchat_id().gossip_advertise_addr, i);
            nodes.push(node);
        }
        Net {
            clock,
            nodes,
            addrs,
        }
    }

    fn id(&self, i: usize) -> ChitchatId {
        self.nodes[i].self_chitchat_id().clone()
    }

    /// One gossip round of every node, each handshake run to its end through the byte path.
    fn round(&mut self) {
        for i in 0..self.nodes.len() {
            let mut syn = Vec::new();
            let targets: Vec<SocketAddr> =
                self.nodes[i].begin_gossip_round(&mut syn).all().collect();
            for addr in targets {
                if let Some(&j) = self.addrs.get(&addr) {
                    self.exchange(i, j, syn.clone());
                }
            }
            self.nodes[i].end_gossip_round();
        }
        self.clock.advance(ROUND);
    }

    fn exchange(&mut self, mut from: usize, mut to: usize, mut bytes: Vec<u8>) {
        for _ in 0..3 {
            let mut reply = Vec::new();
            let outcome = self.nodes[to]
                .handle_datagram(&bytes, &mut reply, None)
                .expect("our own datagrams decode");
            if !outcome.replied {
                return;
            }
            std::mem::swap(&mut from, &mut to);
            bytes = reply;
        }
    }

    /// Runs rounds until `done` holds, at most `within` of virtual time; returns the time taken.
    fn run_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&Net) -> bool,
    ) -> Option<Duration> {
        let start = self.clock.elapsed();
        while self.clock.elapsed() - start <= within {
            if done(self) {
                return Some(self.clock.elapsed() - start);
            }
            self.round();
        }
        None
    }

    fn formed(&mut self) {
        let n = self.nodes.len();
        let took = self.run_until(Duration::from_secs(10), |net| {
            (0..n).all(|i| {
                (0..n).all(|j| i == j || is_live_at(net, i, &net.id(j)))
                    && (0..n).all(|j| view(net, i, &net.id(j)) == view(net, j, &net.id(j)))
            })
        });
        assert!(took.is_some(), "the cluster did not form");
    }
}

fn is_live_at(net: &Net, observer: usize, id: &ChitchatId) -> bool {
    net.nodes[observer].live_nodes().any(|live| live == id)
}

/// Visible key-values of `id` at `observer`.
fn view(net: &Net, observer: usize, id: &ChitchatId) -> Option<BTreeMap<String, String>> {
    let state = net.nodes[observer].node_state(id)?;
    Some(
        state
            .key_values()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn counters(net: &Net, observer: usize, id: &ChitchatId) -> (u64, u64, u64) {
    let s = net.nodes[observer].node_state(id).unwrap();
    (s.heartbeat().0, s.last_gc_version(), s.max_version())
}

fn kv(key: &str, value: &str, version: u64, status: DeletionStatusMutation) -> KeyValueUpdate {
    KeyValueUpdate {
        key: key.to_string(),
        value: value.to_string(),
        version,
        status,
    }
}

fn set(key: &str, value: &str, version: u64) -> KeyValueUpdate {
    kv(key, value, version, DeletionStatusMutation::Set)
}

fn ack(node_deltas: Vec<NodeDelta>) -> ChitchatMessage {
    ChitchatMessage::Ack {
        delta: Delta { node_deltas },
    }
}

fn syn_ack(
    entries: Vec<(ChitchatId, u64, u64, u64)>,
    node_deltas: Vec<NodeDelta>,
) -> ChitchatMessage {
    let mut digest = Digest::default();
    for (id, hb, gc, max) in entries {
        digest.add_node(id, NodeDigest::new(Heartbeat(hb), gc, max));
    }
    ChitchatMessage::SynAck {
        digest,
        delta: Delta { node_deltas },
    }
}

fn node_delta(
    id: &ChitchatId,
    from: u64,
    gc: u64,
    max: u64,
    kvs: Vec<KeyValueUpdate>,
) -> NodeDelta {
    NodeDelta {
        chitchat_id: id.clone(),
        from_version_excluded: from,
        last_gc_version: gc,
        max_version: max,
        key_values: kvs,
    }
}

/// After the attack on node 1 about node 0: within the bound node 1 holds node 0 live with its
/// exact key set, and a later set and delete on node 0 apply at node 1.
fn assert_owner_wins(net: &mut Net, what: &str) {
    let a = net.id(0);
    let took = net.run_until(OWNER_WINS_WITHIN, |net| {
        is_live_at(net, 1, &a) && view(net, 1, &a) == view(net, 0, &a)
    });
    assert!(
        took.is_some(),
        "[{what}] node 1 holds {:?} {:?}, node 0 is at {:?} {:?}",
        view(net, 1, &a),
        counters(net, 1, &a),
        view(net, 0, &a),
        counters(net, 0, &a)
    );
    net.nodes[0].self_node_state().delete("k1");
    net.nodes[0].self_node_state().set("later", "yes");
    let took = net.run_until(OWNER_WINS_WITHIN, |net| {
        view(net, 1, &a).is_some_and(|v| !v.contains_key("k1") && v.contains_key("later"))
            && (1..net.nodes.len())
                .all(|i| view(net, i, &a) == view(net, 0, &a) && is_live_at(net, i, &a))
    });
    assert!(
        took.is_some(),
        "[{what}] node 0's later writes did not apply at node 1: {:?} {:?}",
        view(net, 1, &a),
        counters(net, 1, &a)
    );
    for i in 0..net.nodes.len() {
        for j in 0..net.nodes.len() {
            let (hb, gc, max) = counters(net, i, &net.id(j));
            assert!(
                hb <= MAX_PLAUSIBLE_COUNTER
                    && gc <= MAX_PLAUSIBLE_COUNTER
                    && max <= MAX_PLAUSIBLE_COUNTER,
                "[{what}] node {j} at node {i}: {:?}",
                (hb, gc, max)
            );
        }
    }
}

const KVS: [(&str, &str); 3] = [("k0", "v0"), ("k1", "v1"), ("k2", "v2")];

#[test]
fn forged_heartbeat_about_a_node_is_superseded_by_its_owner() {
    for forged in HOSTILE.into_iter().chain([100_000, 1 << 24]) {
        let mut net = Net::new(3, &KVS);
        net.formed();
        let a = net.id(0);
        let (hb, gc, max) = counters(&net, 1, &a);
        let forged = forged.max(hb + 1);
        net.nodes[1].process_message(syn_ack(vec![(a.clone(), forged, gc, max)], Vec::new()));
        assert_owner_wins(&mut net, &format!("heartbeat {forged}"));
        // The heartbeat at node 1 rises again past whatever was believed.
        let before = counters(&net, 1, &a).0;
        net.round();
        net.round();
        assert!(
            counters(&net, 1, &a).0 > before,
            "[heartbeat {forged}] not rising: {before} at node 1, node 0 at {:?}, refused {:?}",
            counters(&net, 0, &a),
            net.nodes[1].stats().refused
        );
    }
}

#[test]
fn forged_versions_and_resets_about_a_node_are_superseded_by_its_owner() {
    for forged in HOSTILE.into_iter().chain([1_000, 1 << 24]) {
        for attack in [
            "set_max_version",
            "last_gc_version",
            "reset",
            "reset_plus_forged_key",
        ] {
            let mut net = Net::new(3, &KVS);
            net.formed();
            let a = net.id(0);
            let (_, gc, max) = counters(&net, 1, &a);
            let claim = if forged < 1 << 30 {
                max + forged
            } else {
                forged
            };
            let message = match attack {
                "set_max_version" => ack(vec![node_delta(&a, max, gc, claim, Vec::new())]),
                "last_gc_version" => ack(vec![node_delta(&a, max, claim, claim, Vec::new())]),
                "reset" => ack(vec![node_delta(&a, 0, claim, claim, Vec::new())]),
                _ => ack(vec![node_delta(
                    &a,
                    0,
                    claim,
                    1,
                    vec![set("forged", "evil", 1)],
                )]),
            };
            net.nodes[1].process_message(message);
            let what = format!("{attack} {claim}");
            assert_owner_wins(&mut net, &what);
            assert!(
                view(&net, 2, &a) == view(&net, 0, &a),
                "[{what}] node 2 diverged"
            );
        }
    }
}

#[test]
fn claims_about_the_own_id_neither_wrap_nor_stop_it() {
    for forged in HOSTILE.into_iter().chain([1_000, 1 << 24]) {
        let messages = |id: &ChitchatId, max: u64| {
            let claim = if forged < 1 << 30 {
                max + forged
            } else {
                forged
            };
            vec![
                ack(vec![node_delta(
                    id,
                    0,
                    0,
                    0,
                    vec![set("k0", "forged", claim)],
                )]),
                ack(vec![node_delta(id, 0, 0, claim, Vec::new())]),
                ack(vec![node_delta(id, 0, claim, claim, Vec::new())]),
                syn_ack(vec![(id.clone(), claim, 0, 0)], Vec::new()),
                syn_ack(vec![(id.clone(), 1, claim, claim)], Vec::new()),
                syn_ack(vec![(id.clone(), 1, 0, claim)], Vec::new()),
            ]
        };
        let mut net = Net::new(2, &KVS);
        net.formed();
        let a = net.id(0);
        for message in messages(&a, counters(&net, 0, &a).2) {
            let (hb, _, max) = counters(&net, 0, &a);
            net.nodes[0].process_message(message);
            let (hb_after, gc_after, max_after) = counters(&net, 0, &a);
            assert!(
                hb_after >= hb && max_after >= max,
                "[{forged}] own counters went down"
            );
            assert!(
                hb_after <= MAX_PLAUSIBLE_COUNTER
                    && max_after <= MAX_PLAUSIBLE_COUNTER
                    && gc_after <= MAX_PLAUSIBLE_COUNTER,
                "[{forged}] own counters {:?}",
                (hb_after, gc_after, max_after)
            );
            net.nodes[0]
                .self_node_state()
                .set("fresh", format!("{max_after}"));
            let version = net.nodes[0]
                .node_state(&a)
                .unwrap()
                .get_versioned("fresh")
                .unwrap()
                .version;
            assert!(
                version > max_after,
                "[{forged}] a new own write got version {version}"
            );
            assert_eq!(net.nodes[0].node_state(&a).unwrap().get("k0"), Some("v0"));
        }
        if forged > 1 << 53 {
            assert!(
                net.nodes[0].stats().refused.total() > 0,
                "[{forged}] not counted"
            );
        }
        assert_owner_wins(&mut net, &format!("own id {forged}"));
    }
}

#[test]
fn caps_refuse_new_nodes_but_never_updates_of_held_ones() {
    let mut net = Net::new(2, &KVS);
    net.formed();
    let limits = Limits::default().with_max_remote_state_bytes(4_096);
    net.nodes[1].set_limits(limits);
    assert_eq!(net.nodes[1].limits(), &limits);
    let attacker: SocketAddr = ([127, 0, 0, 1], 39_999).into();
    let mut held = 0;
    for i in 0..200 {
        let id = ChitchatId::new(format!("forged-{i}"), 1, attacker);
        let value = "x".repeat(500);
        net.nodes[1].process_message(syn_ack(
            vec![(id.clone(), 1, 0, 1)],
            vec![node_delta(&id, 0, 0, 1, vec![set("blob", &value, 1)])],
        ));
        if net.nodes[1].node_state(&id).is_some() {
            held += 1;
        }
    }
    let stats = net.nodes[1].stats();
    assert!(held < 20, "{held} forged nodes held under a 4 KiB cap");
    assert!(stats.refused.get(Refusal::RemoteStateFull) > 0);
    // Over the cap, the held member keeps receiving updates.
    let a = net.id(0);
    for i in 0..20 {
        net.nodes[0]
            .self_node_state()
            .set(format!("grow-{i}"), "y".repeat(200));
    }
    net.nodes[0].self_node_state().delete("k2");
    let took = net.run_until(OWNER_WINS_WITHIN, |net| {
        view(net, 1, &a) == view(net, 0, &a)
    });
    assert!(took.is_some(), "a held member's updates stopped at the cap");
    assert!(net.nodes[1].remote_state_bytes() > limits.max_remote_state_bytes);

    // Per-node caps cut the rest of that node's delta, counted; ids over the cap are refused.
    let mut net = Net::new(2, &KVS);
    net.formed();
    net.nodes[1].set_limits(
        Limits::default()
            .with_max_keys_per_node(5)
            .with_max_node_id_len(64),
    );
    let x = ChitchatId::new("x", 1, attacker);
    net.nodes[1].process_message(syn_ack(vec![(x.clone(), 1, 0, 0)], Vec::new()));
    let kvs = (1..=10).map(|v| set(&format!("key-{v}"), "v", v)).collect();
    net.nodes[1].process_message(ack(vec![node_delta(&x, 0, 0, 10, kvs)]));
    let state = net.nodes[1].node_state(&x).unwrap();
    assert_eq!(state.num_key_values(), 5);
    assert_eq!(state.max_version(), 5, "the ignored rest stays requested");
    assert_eq!(net.nodes[1].stats().refused.get(Refusal::TooManyKeys), 1);
    let long = ChitchatId::new("l".repeat(65), 1, attacker);
    net.nodes[1].process_message(syn_ack(vec![(long.clone(), 1, 0, 0)], Vec::new()));
    assert!(net.nodes[1].node_state(&long).is_none());
    assert_eq!(net.nodes[1].stats().refused.get(Refusal::IdTooLong), 1);
    net.nodes[1].set_limits(Limits::default().with_max_node_state_bytes(100));
    let y = ChitchatId::new("y", 1, attacker);
    net.nodes[1].process_message(syn_ack(vec![(y.clone(), 1, 0, 0)], Vec::new()));
    let kvs = (1..=5)
        .map(|v| set(&format!("k{v}"), &"z".repeat(30), v))
        .collect();
    net.nodes[1].process_message(ack(vec![node_delta(&y, 0, 0, 5, kvs)]));
    assert_eq!(net.nodes[1].node_state(&y).unwrap().num_key_values(), 3);
    assert_eq!(
        net.nodes[1].stats().refused.get(Refusal::NodeStateTooLarge),
        1
    );
}

#[test]
fn an_unrelayable_key_value_is_dropped_counted_and_blocks_nothing() {
    let mut net = Net::new(2, &KVS);
    net.formed();
    let attacker: SocketAddr = ([127, 0, 0, 1], 39_998).into();
    let x = ChitchatId::new("x", 1, attacker);
    net.nodes[1].process_message(syn_ack(vec![(x.clone(), 1, 0, 0)], Vec::new()));
    let huge = "h".repeat(crate::wire::max_key_value_len(&x) + 1 - "huge".len());
    net.nodes[1].process_message(ack(vec![node_delta(
        &x,
        0,
        0,
        3,
        vec![set("a", "1", 1), set("huge", &huge, 2), set("b", "3", 3)],
    )]));
    let state = net.nodes[1].node_state(&x).unwrap();
    assert_eq!(state.get("a"), Some("1"));
    assert_eq!(state.get("b"), Some("3"));
    assert!(state.get("huge").is_none());
    assert_eq!(state.max_version(), 3);
    assert_eq!(
        net.nodes[1]
            .stats()
            .refused
            .get(Refusal::UnrelayableKeyValue),
        1
    );

    // One held by other means (the catch-up API) does not stop a delta from carrying the
    // entries behind it.
    let z = ChitchatId::new("z", 1, attacker);
    let entries = vec![
        ("a".to_string(), VersionedValue::for_test("1", 1)),
        ("huge".to_string(), VersionedValue::for_test(&huge, 2)),
        ("b".to_string(), VersionedValue::for_test("3", 3)),
    ];
    net.nodes[0].reset_node_state_if_update(&z, entries.into_iter(), 3, 0);
    let fresh: SocketAddr = ([127, 0, 0, 1], 39_997).into();
    let syn = ChitchatMessage::Syn {
        cluster_id: "limits".to_string(),
        digest: {
            let mut d = Digest::default();
            d.add_node(
                ChitchatId::new("fresh", 1, fresh),
                NodeDigest::new(Heartbeat(1), 0, 0),
            );
            d
        },
    };
    let Some(ChitchatMessage::SynAck { delta, .. }) = net.nodes[0].process_message(syn) else {
        panic!("no SynAck");
    };
    let z_delta = delta
        .node_deltas
        .iter()
        .find(|d| d.chitchat_id == z)
        .expect("z is in the delta");
    let keys: Vec<&str> = z_delta
        .key_values
        .iter()
        .map(|kv| kv.key.as_str())
        .collect();
    assert_eq!(keys, ["a", "b"]);
    assert!(
        net.nodes[0]
            .stats()
            .refused
            .get(Refusal::UnrelayableKeyValue)
            >= 1
    );
}

/// The ceiling is computed in u64 (seconds and fraction apart) and skips the clock within the
/// base allowance: the same answers as the plain `nanos × rate / 10^9` rule.
mod ceiling {
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use crate::protocol::limits::{
        JUMP_BASE, JUMP_RATE_PER_SEC, MAX_PLAUSIBLE_COUNTER, is_plausible, jump_ceiling,
    };

    fn reference_ceiling(known: u64, elapsed: Duration) -> u64 {
        let grown = elapsed.as_nanos() * u128::from(JUMP_RATE_PER_SEC) / 1_000_000_000;
        let grown = u64::try_from(grown).unwrap_or(u64::MAX);
        known
            .saturating_add(JUMP_BASE)
            .saturating_add(grown)
            .min(MAX_PLAUSIBLE_COUNTER)
    }

    proptest! {
        #[test]
        fn ceiling_matches_the_u128_rule(
            known in prop_oneof![0..1_000_000u64, any::<u64>()],
            secs in prop_oneof![0..100_000u64, any::<u64>()],
            nanos in 0..1_000_000_000u32,
        ) {
            let elapsed = Duration::new(secs, nanos);
            prop_assert_eq!(jump_ceiling(known, elapsed), reference_ceiling(known, elapsed));
        }

        #[test]
        fn plausibility_matches_the_ceiling(
            known in 0..(1u64 << 40),
            jump in prop_oneof![0..(1u64 << 26), any::<u64>()],
            millis in 0..10_000_000u64,
        ) {
            let since = Instant::now();
            let now = since + Duration::from_millis(millis);
            let claimed = known.saturating_add(jump);
            let expected = claimed <= MAX_PLAUSIBLE_COUNTER
                && claimed <= reference_ceiling(known, now - since);
            prop_assert_eq!(is_plausible(claimed, Some((known, since)), now), expected);
        }
    }
}
