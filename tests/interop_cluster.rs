//! Mixed clusters of our nodes and real chitchat 0.13 nodes over real UDP on 127.0.0.1:
//! membership, key-value replication (set, delete, TTL), listeners, failure detection both
//! ways, restarts with a new generation, protocol-version negotiation, and keys that would
//! crash a real node.
//!
//! Every test also checks that no real chitchat node logged a decode error or a fatal receive
//! error (captured from its tracing output) and that none of them stopped.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chitchat_uring::message::{Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest};
use chitchat_uring::types::DeletionStatusMutation;
use chitchat_uring::wire::{decode_envelope, encode_envelope};
use chitchat_uring::{
    ChitchatEnvelope, ChitchatId, ChitchatMessage, Heartbeat, KeyValueError, ProtocolVersion,
};
use common::capture::reference_log;
use common::mixed::{
    EventLog, Node, NodeSpec, Side, View, eventually, wait_all_live, wait_all_see,
};
use common::{FakePeer, free_port};
use parking_lot::Mutex;

const FORM: Duration = Duration::from_secs(30);
const SPREAD: Duration = Duration::from_secs(20);
/// Grace period of tombstones and TTL'd values in these tests.
const TTL_GRACE: Duration = Duration::from_secs(2);

/// Specs for `ours + theirs` nodes, the first one (the seed of all) on `seed_side`, the others
/// alternating sides.
fn cluster_specs(ours: usize, theirs: usize, seed_side: Side) -> Vec<NodeSpec> {
    let mut left = BTreeMap::from([(0u8, ours), (1u8, theirs)]);
    let code = |side: Side| if side == Side::Ours { 0u8 } else { 1u8 };
    let mut sides = Vec::new();
    let mut next = code(seed_side);
    while left.values().any(|&n| n > 0) {
        if left[&next] > 0 {
            *left.get_mut(&next).unwrap() -= 1;
            sides.push(if next == 0 { Side::Ours } else { Side::Theirs });
        }
        next = 1 - next;
    }
    let mut specs: Vec<NodeSpec> = sides
        .into_iter()
        .map(|side| NodeSpec::new(side, free_port()))
        .collect();
    let seed = specs[0].addr();
    for spec in &mut specs {
        spec.seeds = vec![seed];
        spec.marked_for_deletion_grace_period = TTL_GRACE;
    }
    specs
}

async fn spawn_all(specs: &[NodeSpec]) -> Vec<Node> {
    let mut nodes = Vec::new();
    for spec in specs {
        nodes.push(spec.spawn(&[("initial", &spec.id())]).await);
    }
    nodes
}

fn ids(specs: &[NodeSpec]) -> BTreeSet<String> {
    specs.iter().map(NodeSpec::id).collect()
}

/// No real node logged a decode/fatal error and every node is still running.
async fn assert_healthy(nodes: &[Node]) {
    let failures = reference_log().reference_failures();
    assert!(
        failures.is_empty(),
        "a chitchat node failed to decode: {failures:?}"
    );
    for node in nodes {
        assert!(node.is_running().await, "{} stopped", node.id());
    }
}

async fn shutdown_all(nodes: Vec<Node>) {
    for node in nodes {
        node.shutdown().await;
    }
}

/// The full replication scenario on a mixed cluster: formation, initial key-values, set,
/// delete, set-with-TTL from every node, listeners of our nodes firing for their writes.
async fn mixed_cluster_converges(ours: usize, theirs: usize, seed_side: Side) {
    mixed_cluster_converges_with(ours, theirs, seed_side, false).await;
}

/// `mixed_versions`: every other node is configured for V1, the rest keep V0.
async fn mixed_cluster_converges_with(
    ours: usize,
    theirs: usize,
    seed_side: Side,
    mixed_versions: bool,
) {
    reference_log();
    let mut specs = cluster_specs(ours, theirs, seed_side);
    if mixed_versions {
        for spec in specs.iter_mut().step_by(2) {
            spec.v1 = true;
        }
    }
    let label = format!("{ours}+{theirs}, seed {seed_side:?}, mixed versions {mixed_versions}");
    let nodes = spawn_all(&specs).await;
    let logs: Vec<(String, EventLog)> = nodes
        .iter()
        .filter(|n| n.side() == Side::Ours)
        .map(|n| {
            let log = EventLog::default();
            log.subscribe(n.ours(), "shared/");
            (n.id(), log)
        })
        .collect();
    let started = Instant::now();
    wait_all_live(&nodes, &ids(&specs), FORM).await;
    eprintln!(
        "[{label}] all {} nodes live after {:?}",
        nodes.len(),
        started.elapsed()
    );
    for spec in &specs {
        wait_all_see(&nodes, &spec.id(), "initial", Some(&spec.id()), SPREAD).await;
    }

    // Set on every node; every node sees every key.
    for node in &nodes {
        node.set(&format!("shared/from-{}", node.id()), "hello")
            .await;
    }
    for spec in &specs {
        let key = format!("shared/from-{}", spec.id());
        wait_all_see(&nodes, &spec.id(), &key, Some("hello"), SPREAD).await;
    }
    // Our listeners fired for keys written on their nodes (prefix stripped).
    for (listener, log) in &logs {
        for spec in &specs {
            let key = format!("from-{}", spec.id());
            if &spec.id() == listener {
                continue;
            }
            assert!(
                log.contains(&spec.id(), &key, "hello"),
                "[{label}] {listener} missed {key} of {:?}",
                spec.side
            );
        }
    }

    // Delete on every node; the tombstones reach everyone.
    for node in &nodes {
        node.delete(&format!("shared/from-{}", node.id())).await;
    }
    for spec in &specs {
        let key = format!("shared/from-{}", spec.id());
        wait_all_see(&nodes, &spec.id(), &key, None, SPREAD).await;
    }

    // Set with TTL: visible everywhere, then gone everywhere after the grace period.
    let ttl_set = Instant::now();
    for node in &nodes {
        node.set_with_ttl("ttl", "short-lived").await;
    }
    for spec in &specs {
        wait_all_see(&nodes, &spec.id(), "ttl", Some("short-lived"), SPREAD).await;
    }
    for spec in &specs {
        wait_all_see(&nodes, &spec.id(), "ttl", None, SPREAD).await;
    }
    let gone_after = ttl_set.elapsed();
    assert!(
        gone_after >= TTL_GRACE,
        "[{label}] TTL'd keys vanished before the grace period: {gone_after:?}"
    );
    eprintln!("[{label}] TTL'd keys gone everywhere {gone_after:?} after being set");

    // Every node ends with the same view of everyone's visible key-values.
    let views: Vec<View> = futures_views(&nodes).await;
    assert!(
        views.windows(2).all(|w| w[0] == w[1]),
        "[{label}] {views:#?}"
    );
    assert_healthy(&nodes).await;
    shutdown_all(nodes).await;
}

async fn futures_views(nodes: &[Node]) -> Vec<View> {
    let mut views = Vec::new();
    for node in nodes {
        views.push(node.view().await);
    }
    views
}

/// One of ours and one chitchat node, with the seed on either side, converge on set, delete
/// and TTL'd key-values; our listener fires for the chitchat node's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_plus_one_converges_with_the_seed_on_either_side() {
    for seed_side in [Side::Ours, Side::Theirs] {
        mixed_cluster_converges(1, 1, seed_side).await;
    }
}

/// Nodes configured for different protocol versions (V1 on every other node, of both
/// implementations) form one cluster and replicate: replies echo the initiator's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_configured_for_different_versions_converge() {
    mixed_cluster_converges_with(2, 2, Side::Theirs, true).await;
}

/// Three of ours and three chitchat nodes, with the seed on either side: same checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_plus_three_converges_with_the_seed_on_either_side() {
    for seed_side in [Side::Ours, Side::Theirs] {
        mixed_cluster_converges(3, 3, seed_side).await;
    }
}

async fn wait_seen_dead(nodes: &[Node], id: &str) {
    let seen = eventually(FORM, || async {
        for node in nodes {
            if !node.dead().await.contains(id) || node.live().await.contains(id) {
                return false;
            }
        }
        true
    })
    .await;
    if !seen {
        let mut report = String::new();
        for node in nodes {
            report.push_str(&format!(
                "\n  {} live {:?} dead {:?}",
                node.id(),
                node.live().await,
                node.dead().await
            ));
        }
        panic!("{id} was not seen dead:{report}");
    }
}

/// Failure detection across implementations: a stopped node of ours is seen dead by the
/// chitchat nodes (and ours), then a stopped chitchat node is seen dead by ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_nodes_are_seen_dead_across_implementations() {
    reference_log();
    let specs = cluster_specs(3, 3, Side::Ours);
    let mut nodes = spawn_all(&specs).await;
    wait_all_live(&nodes, &ids(&specs), FORM).await;

    for side in [Side::Ours, Side::Theirs] {
        let index = nodes.iter().rposition(|n| n.side() == side).unwrap();
        let stopped = nodes.remove(index);
        let id = stopped.id();
        let at = Instant::now();
        stopped.shutdown().await;
        wait_seen_dead(&nodes, &id).await;
        eprintln!(
            "{side:?} node {id} seen dead by all after {:?}",
            at.elapsed()
        );
    }
    let live: BTreeSet<String> = nodes.iter().map(Node::id).collect();
    wait_all_live(&nodes, &live, FORM).await;
    assert_healthy(&nodes).await;
    shutdown_all(nodes).await;
}

/// A node restarted on the same address with a new generation id is accepted by both
/// implementations, and its old incarnation is garbage-collected everywhere once the (short)
/// dead-node grace period has passed. Done for a restarted node of ours and of theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_replaces_its_old_incarnation_everywhere() {
    reference_log();
    for side in [Side::Ours, Side::Theirs] {
        let mut specs = cluster_specs(2, 2, Side::Ours);
        for spec in &mut specs {
            spec.dead_node_grace_period = Duration::from_secs(3);
        }
        let mut nodes = spawn_all(&specs).await;
        wait_all_live(&nodes, &ids(&specs), FORM).await;

        let index = nodes.iter().rposition(|n| n.side() == side).unwrap();
        let old_id = specs[index].id();
        nodes.remove(index).shutdown().await;
        specs[index].generation = 2;
        let new_id = specs[index].id();
        nodes.insert(
            index,
            specs[index].spawn(&[("initial", "second life")]).await,
        );
        let restarted = Instant::now();
        wait_all_live(&nodes, &ids(&specs), FORM).await;
        wait_all_see(&nodes, &new_id, "initial", Some("second life"), SPREAD).await;
        let collected = eventually(FORM, || async {
            for node in &nodes {
                if node.known().await.contains(&old_id) {
                    return false;
                }
            }
            true
        })
        .await;
        let mut report = String::new();
        for node in &nodes {
            report.push_str(&format!("\n  {} knows {:?}", node.id(), node.known().await));
        }
        assert!(collected, "{old_id} still known:{report}");
        eprintln!(
            "{side:?} restart: {old_id} collected everywhere {:?} after {new_id} started",
            restarted.elapsed()
        );
        assert_healthy(&nodes).await;
        shutdown_all(nodes).await;
    }
}

/// A seed that is no node: it records the version and type bytes of every datagram it gets,
/// and answers each Syn with a SynAck (same version, empty delta) whose digest lists every node
/// it heard of, so the nodes find each other through it. Every node keeps gossiping to it
/// (a seed that is never live is picked with probability 1/(live+dead) per round).
struct Introducer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(SocketAddr, u8, u8)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Introducer {
    fn start() -> Introducer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (thread_stop, thread_seen) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut members: BTreeMap<ChitchatId, NodeDigest> = BTreeMap::new();
            let mut buf = vec![0u8; 65_536];
            while !thread_stop.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let bytes = &buf[..len];
                if len >= 4 {
                    thread_seen.lock().push((from, bytes[2], bytes[3]));
                }
                let Ok(envelope) = decode_envelope(bytes) else {
                    continue;
                };
                if let ChitchatMessage::Syn { digest, .. } = envelope.message {
                    for (id, entry) in digest.node_digests {
                        let known = members.entry(id).or_insert(entry);
                        if entry.heartbeat > known.heartbeat {
                            *known = entry;
                        }
                    }
                    let reply = ChitchatEnvelope {
                        version: envelope.version,
                        message: ChitchatMessage::SynAck {
                            digest: Digest {
                                node_digests: members.clone(),
                            },
                            delta: Delta::default(),
                        },
                    };
                    let _ = socket.send_to(&encode_envelope(&reply).unwrap(), from);
                }
            }
        });
        Introducer {
            addr,
            stop,
            seen,
            thread: Some(thread),
        }
    }
}

impl Drop for Introducer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Protocol versions in mixed clusters: with default configs (ours untouched, theirs V0)
/// every node initiates V0; when every node is configured for V1 every Syn is V1, and the
/// Acks answering the introducer's SynAcks echo it. The clusters form and replicate either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_gossip_v0_by_default_and_v1_when_every_node_is_configured_for_it() {
    reference_log();
    for v1 in [false, true] {
        let expected = if v1 { 1u8 } else { 0u8 };
        let introducer = Introducer::start();
        let mut specs = cluster_specs(2, 2, Side::Theirs);
        for spec in &mut specs {
            spec.seeds = vec![introducer.addr];
            spec.v1 = v1;
        }
        let nodes = spawn_all(&specs).await;
        wait_all_live(&nodes, &ids(&specs), FORM).await;
        nodes[0].set("written-by-theirs", "yes").await;
        nodes[1].set("written-by-ours", "yes").await;
        wait_all_see(
            &nodes,
            &specs[0].id(),
            "written-by-theirs",
            Some("yes"),
            SPREAD,
        )
        .await;
        wait_all_see(
            &nodes,
            &specs[1].id(),
            "written-by-ours",
            Some("yes"),
            SPREAD,
        )
        .await;

        // Every node keeps gossiping to the introducer: wait until each sent a few Syns.
        let each_sent_syns = eventually(SPREAD, || async {
            let seen = introducer.seen.lock();
            specs.iter().all(|spec| {
                seen.iter()
                    .filter(|(from, _, kind)| *from == spec.addr() && *kind == 0)
                    .count()
                    >= 3
            })
        })
        .await;
        assert!(each_sent_syns, "{:?}", introducer.seen.lock());
        let seen = introducer.seen.lock().clone();
        let versions: BTreeSet<u8> = seen.iter().map(|(_, version, _)| *version).collect();
        assert_eq!(versions, BTreeSet::from([expected]), "v1={v1}: {seen:?}");
        let acks = seen.iter().filter(|(_, _, kind)| *kind == 2).count();
        assert!(acks > 0, "the nodes answer the introducer's SynAcks");
        eprintln!(
            "v1={v1}: {} datagrams to the introducer ({acks} acks), all version {expected}",
            seen.len()
        );
        assert_healthy(&nodes).await;
        shutdown_all(nodes).await;
    }
}

/// Keys whose first character is multi-byte crash real chitchat nodes (SPEC §4.11). Our
/// `try_set` refuses them with `NonAsciiFirstChar`, `set` refuses them with a warning, and
/// when a non-conforming peer injects one into our node, our node keeps it to itself but still
/// relays that peer's other keys. The chitchat nodes never stop, log no decode error, and the
/// cluster keeps converging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_crash_chitchat_are_never_sent_to_it() {
    reference_log();
    let specs = cluster_specs(2, 2, Side::Ours);
    let nodes = spawn_all(&specs).await;
    wait_all_live(&nodes, &ids(&specs), FORM).await;

    let ours = nodes[0].ours();
    {
        let chitchat = ours.chitchat();
        let mut chitchat = chitchat.lock();
        let state = chitchat.self_node_state();
        for key in ["épée", "ñandu", "日本", "\u{1F600}"] {
            assert_eq!(
                state.try_set(key, "x"),
                Err(KeyValueError::NonAsciiFirstChar {
                    key: key.to_string()
                })
            );
            assert!(matches!(
                state.try_set_with_ttl(key, "x"),
                Err(KeyValueError::NonAsciiFirstChar { .. })
            ));
            state.set(key, "refused");
            state.set_with_ttl(key, "refused");
            assert_eq!(state.get(key), None);
        }
        // Non-ASCII after the first character is fine.
        state.try_set("café", "ok").unwrap();
    }

    // A non-conforming peer announces itself to our node and sends it a crashing key between
    // two good ones.
    let peer = FakePeer::bind();
    let rogue = ChitchatId::new("rogue-peer", 1, peer.addr());
    let mut digest = Digest::default();
    digest.add_node(rogue.clone(), NodeDigest::new(Heartbeat::from(4), 0, 3));
    let kv = |key: &str, version| KeyValueUpdate {
        key: key.to_string(),
        value: "v".to_string(),
        version,
        status: DeletionStatusMutation::Set,
    };
    let delta = Delta {
        node_deltas: vec![NodeDelta {
            chitchat_id: rogue.clone(),
            from_version_excluded: 0,
            last_gc_version: 0,
            max_version: 3,
            key_values: vec![kv("good-1", 1), kv("éclair", 2), kv("good-3", 3)],
        }],
    };
    // Our node only accepts a SynAck that answers a Syn it sent (issue 13): it gossips with the
    // rogue peer first, which answers that Syn.
    ours.gossip(peer.addr()).unwrap();
    assert!(
        peer.recv_matching(Duration::from_secs(5), |envelope| matches!(
            envelope.message,
            ChitchatMessage::Syn { .. }
        ))
        .is_some(),
        "our node sent the rogue peer no Syn"
    );
    peer.send(
        specs[0].addr(),
        &ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::SynAck { digest, delta },
        },
    );
    let rogue_id = format!("{}:{}", rogue.node_id, rogue.generation_id);
    wait_all_see(&nodes, &specs[0].id(), "café", Some("ok"), SPREAD).await;
    wait_all_see(&nodes, &rogue_id, "good-3", Some("v"), SPREAD).await;
    wait_all_see(&nodes, &rogue_id, "good-1", Some("v"), SPREAD).await;
    for node in &nodes[1..] {
        assert_eq!(node.get(&rogue_id, "éclair").await, None, "{}", node.id());
    }

    // The cluster keeps converging.
    nodes[1].set("after", "still-gossiping").await;
    nodes[2].set("after", "still-gossiping").await;
    wait_all_see(
        &nodes,
        &specs[1].id(),
        "after",
        Some("still-gossiping"),
        SPREAD,
    )
    .await;
    wait_all_see(
        &nodes,
        &specs[2].id(),
        "after",
        Some("still-gossiping"),
        SPREAD,
    )
    .await;
    let live: BTreeSet<String> = ids(&specs);
    wait_all_live(&nodes, &live, FORM).await;
    assert_healthy(&nodes).await;
    shutdown_all(nodes).await;
}

/// SPEC §4.7 across implementations, both ways, on a one-way-cut 1+1 cluster: our node's
/// `Partition` drops everything it sends to the chitchat node, so only digests (the chitchat
/// node's Syns) cross, never a delta. The writer deletes keys and garbage-collects the
/// tombstones; after healing, the isolated node gets a reset delta built by the *other*
/// implementation, applies it (ends with exactly the writer's key-values) and its catch-up
/// callback fires; the writer's never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_cross_implementations_after_a_partition() {
    use std::sync::atomic::AtomicUsize;

    use chitchat_uring::transport::Partition;
    reference_log();
    for isolated_side in [Side::Theirs, Side::Ours] {
        let partition = Partition::new();
        let mut ours = NodeSpec::new(Side::Ours, free_port());
        let mut theirs = NodeSpec::new(Side::Theirs, free_port());
        let seed = ours.addr();
        ours.partition = Some(partition.clone());
        for spec in [&mut ours, &mut theirs] {
            spec.seeds = vec![seed];
            spec.marked_for_deletion_grace_period = TTL_GRACE;
            spec.catchups = Some(Arc::new(AtomicUsize::new(0)));
        }
        let nodes = vec![ours.spawn(&[]).await, theirs.spawn(&[]).await];
        let both = BTreeSet::from([ours.id(), theirs.id()]);
        wait_all_live(&nodes, &both, FORM).await;
        let (writer, isolated) = match isolated_side {
            Side::Theirs => (0, 1),
            Side::Ours => (1, 0),
        };
        let specs = [&ours, &theirs];
        let (writer_id, label) = (specs[writer].id(), format!("{isolated_side:?} isolated"));
        for (key, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
            nodes[writer].set(key, value).await;
        }
        wait_all_see(&nodes, &writer_id, "c", Some("3"), SPREAD).await;

        partition.block(theirs.addr());
        let cut = eventually(FORM, || async {
            !nodes[1].live().await.contains(&ours.id())
        })
        .await;
        assert!(cut, "[{label}] the chitchat node still hears from ours");
        nodes[writer].delete("a").await;
        nodes[writer].set("e", "5").await;
        nodes[writer].delete("e").await;
        let collected = eventually(FORM, || async {
            nodes[writer]
                .last_gc_version_of(&writer_id)
                .await
                .is_some_and(|gc| gc >= 6)
        })
        .await;
        assert!(
            collected,
            "[{label}] the writer did not collect its tombstones"
        );
        assert_eq!(
            nodes[isolated].get(&writer_id, "a").await.as_deref(),
            Some("1"),
            "[{label}] the isolated node must not have heard of the deletion"
        );

        partition.heal();
        wait_all_live(&nodes, &both, FORM).await;
        let healed = eventually(SPREAD, || async {
            let expected = nodes[writer].view().await.get(&writer_id).cloned();
            nodes[isolated].view().await.get(&writer_id).cloned() == expected
        })
        .await;
        assert!(healed, "[{label}] {:?}", nodes[isolated].view().await);
        let kvs = nodes[isolated].view().await[&writer_id].clone();
        assert_eq!(
            kvs.keys().collect::<Vec<_>>(),
            ["b", "c"],
            "[{label}] the deleted keys are gone"
        );
        let catchups = |i: usize| specs[i].catchups.as_ref().unwrap().load(Ordering::SeqCst);
        assert!(
            catchups(isolated) >= 1,
            "[{label}] no catch-up on the isolated node"
        );
        assert_eq!(catchups(writer), 0, "[{label}] the writer was reset");
        eprintln!(
            "[{label}] reset by the {:?} writer; catch-up called {} time(s)",
            specs[writer].side,
            catchups(isolated)
        );
        assert_healthy(&nodes).await;
        shutdown_all(nodes).await;
    }
}

/// States far larger than a datagram (4 nodes × 1 500 key-values of ~200 random bytes) stream
/// between the implementations in MTU-bounded, truncated deltas, in V0 and V1: every node ends
/// with every owner's exact key-values, then again after half of them are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_states_stream_across_many_datagrams_both_ways() {
    use rand::distr::{Alphanumeric, SampleString};
    use rand::{SeedableRng, rngs::SmallRng};
    reference_log();
    const KEYS: usize = 1_500;
    for v1 in [false, true] {
        let mut specs = cluster_specs(2, 2, Side::Ours);
        for spec in &mut specs {
            spec.v1 = v1;
        }
        let mut nodes = Vec::new();
        for (n, spec) in specs.iter().enumerate() {
            let mut rng = SmallRng::seed_from_u64(n as u64);
            let kvs = (0..KEYS)
                .map(|i| {
                    (
                        format!("bulk/{i:05}"),
                        Alphanumeric.sample_string(&mut rng, 200),
                    )
                })
                .collect();
            nodes.push(spec.spawn_with(kvs).await);
        }
        let started = Instant::now();
        wait_all_live(&nodes, &ids(&specs), FORM).await;
        let converged = |expected: usize| {
            let nodes = &nodes;
            async move {
                let views = futures_views(nodes).await;
                views.windows(2).all(|w| w[0] == w[1])
                    && views[0].len() == nodes.len()
                    && views[0].values().all(|kvs| kvs.len() == expected)
            }
        };
        let synced = eventually(Duration::from_secs(60), || converged(KEYS)).await;
        assert!(synced, "v1={v1}: states did not converge");
        let first = started.elapsed();
        for node in &nodes {
            for i in (0..KEYS).step_by(2) {
                node.delete(&format!("bulk/{i:05}")).await;
            }
        }
        let deleted = Instant::now();
        let synced = eventually(Duration::from_secs(60), || converged(KEYS / 2)).await;
        assert!(synced, "v1={v1}: deletions did not converge");
        eprintln!(
            "v1={v1}: 4 × {KEYS} key-values replicated in {first:?}, {} deletions each in {:?}",
            KEYS / 2,
            deleted.elapsed()
        );
        assert_healthy(&nodes).await;
        shutdown_all(nodes).await;
    }
}

/// Rolling upgrade, the path a chitchat user takes: a cluster of three chitchat nodes has its
/// nodes replaced one at a time by nodes of ours, on the same address with the same node id and
/// a new generation. After each step every node sees the current incarnations live and every
/// node's key-values; at the end the three old incarnations are garbage-collected everywhere.
/// Then one node is downgraded back to chitchat the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_from_chitchat_to_ours_and_back() {
    reference_log();
    let mut specs = cluster_specs(0, 3, Side::Theirs);
    for spec in &mut specs {
        spec.dead_node_grace_period = Duration::from_secs(3);
    }
    let mut nodes = Vec::new();
    for spec in &specs {
        nodes.push(spec.spawn(&[("service", &spec.node_id)]).await);
    }
    wait_all_live(&nodes, &ids(&specs), FORM).await;
    let mut retired = Vec::new();
    let steps = [
        (0, Side::Ours),
        (1, Side::Ours),
        (2, Side::Ours),
        (1, Side::Theirs),
    ];
    for (step, (index, side)) in steps.into_iter().enumerate() {
        retired.push(specs[index].id());
        nodes.remove(index).shutdown().await;
        specs[index].side = side;
        specs[index].generation += 1;
        let spec = &specs[index];
        nodes.insert(index, spec.spawn(&[("service", &spec.node_id)]).await);
        wait_all_live(&nodes, &ids(&specs), FORM).await;
        for spec in &specs {
            wait_all_see(&nodes, &spec.id(), "service", Some(&spec.node_id), SPREAD).await;
        }
        eprintln!("upgrade step {step}: {} is now {side:?}", spec.id());
    }
    let collected = eventually(FORM, || async {
        for node in &nodes {
            let known = node.known().await;
            if retired.iter().any(|id| known.contains(id)) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(collected, "old incarnations still known: {retired:?}");
    for node in &nodes {
        assert_eq!(node.known().await, ids(&specs), "{}", node.id());
    }
    assert_healthy(&nodes).await;
    shutdown_all(nodes).await;
}
