//! Delta priority and truncation (SPEC §4.4). Unlike the reference's four truncation tests
//! (whose MTU loop never ran), every MTU here really truncates.

use std::collections::HashSet;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::clock::{Clock, ManualClock};
use crate::message::{ChitchatMessage, Delta, Digest, NodeDigest, ProtocolVersion};
use crate::protocol::cluster_state::ClusterState;
use crate::protocol::delta_plan::{DeltaSink, write_delta};
use crate::protocol::digest_match::PeerDigest;
use crate::protocol::listener::Listeners;
use crate::types::{ChitchatId, Heartbeat, Version, VersionedValue};
use crate::wire::{DigestView, Encoder, MessageType, decode_envelope};

/// Records the node order and accepts everything.
#[derive(Default)]
struct Recorder {
    nodes: Vec<(u16, Version)>,
    kvs: usize,
}

impl DeltaSink for Recorder {
    fn try_add_node(&mut self, id: &ChitchatId, _: Version, from: Version) -> bool {
        self.nodes.push((id.advertise_port(), from));
        true
    }
    fn try_add_kv(&mut self, _: &str, _: &VersionedValue) -> bool {
        self.kvs += 1;
        true
    }
    fn try_set_max_version(&mut self, _: Version) -> bool {
        true
    }
}

fn id(port: u16) -> ChitchatId {
    ChitchatId::for_local_test(port)
}

fn cluster(clock: &ManualClock) -> ClusterState {
    ClusterState::new(Listeners::default(), Clock::from(clock.clone()))
}

/// Sets `n` keys with random (incompressible) values, so compressed and raw sizes agree and
/// the MTU bound is tight.
fn set_n(cs: &mut ClusterState, port: u16, n: usize) {
    let mut rng = SmallRng::seed_from_u64(u64::from(port));
    let state = cs.node_state_or_create(&id(port));
    for i in 0..n {
        let value: String = (0..24)
            .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
            .collect();
        state.set(format!("key-{i:02}"), value);
    }
}

fn digest(entries: &[(u16, Version, Version)]) -> Digest {
    let mut digest = Digest::default();
    for &(port, gc, max) in entries {
        digest.add_node(id(port), NodeDigest::new(Heartbeat(1), gc, max));
    }
    digest
}

/// `digest` matched against the node states of `cs`.
fn matched(cs: &ClusterState, digest: &DigestView<'_>) -> PeerDigest {
    let mut peer = PeerDigest::default();
    cs.match_digest(digest, &mut peer);
    peer
}

/// Writes an Ack with a delta bounded by `mtu`, checks its size, and decodes it back.
fn bounded_delta(
    cs: &ClusterState,
    peer: &Digest,
    scheduled: &HashSet<&ChitchatId>,
    mtu: usize,
) -> Delta {
    let mut encoder = Encoder::new();
    let mut out = Vec::new();
    Encoder::write_header(&mut out, ProtocolVersion::V0, MessageType::Ack);
    let mut writer = encoder.delta_writer(&mut out, mtu);
    let mut rng = SmallRng::seed_from_u64(9);
    write_delta(
        cs,
        &matched(cs, &DigestView::from_digest(peer)),
        scheduled,
        &mut rng,
        &mut writer,
        None,
    );
    let len = writer.finish();
    assert!(len <= mtu.max(1), "delta of {len} bytes for mtu {mtu}");
    assert_eq!(out.len(), 4 + len);
    match decode_envelope(&out).unwrap().message {
        ChitchatMessage::Ack { delta } => delta,
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// The smallest MTU at which nothing is truncated (the bound counts pending bytes
/// uncompressed, so this is above the compressed size of the full delta).
fn full_len(cs: &ClusterState, peer: &Digest, scheduled: &HashSet<&ChitchatId>) -> usize {
    let truncated_at = |mtu: usize| {
        let mut encoder = Encoder::new();
        let mut out = Vec::new();
        let mut writer = encoder.delta_writer(&mut out, mtu);
        let mut rng = SmallRng::seed_from_u64(9);
        let summary = write_delta(
            cs,
            &matched(cs, &DigestView::from_digest(peer)),
            scheduled,
            &mut rng,
            &mut writer,
            None,
        );
        writer.finish();
        summary.truncated
    };
    assert!(!truncated_at(65_503));
    let (mut lo, mut hi) = (1, 65_503);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if truncated_at(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Each node delta holds the versions following `from`, in order, without gaps.
fn assert_prefix_of_versions(cs: &ClusterState, delta: &Delta) {
    for node_delta in &delta.node_deltas {
        let state = cs.node_state(&node_delta.chitchat_id).unwrap();
        let expected: Vec<Version> = state
            .stale_key_values(node_delta.from_version_excluded)
            .iter()
            .map(|(_, v)| v.version)
            .take(node_delta.key_values.len())
            .collect();
        let got: Vec<Version> = node_delta.key_values.iter().map(|kv| kv.version).collect();
        assert_eq!(got, expected, "{:?}", node_delta.chitchat_id);
    }
}

#[test]
fn unknown_nodes_first_smallest_first_then_most_stale() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    set_n(&mut cs, 10_001, 4); // known at 1: 3 stale
    set_n(&mut cs, 10_002, 2); // known at 1: 1 stale
    set_n(&mut cs, 10_003, 2); // up to date
    set_n(&mut cs, 10_004, 2); // unknown, max 2
    set_n(&mut cs, 10_006, 1); // unknown, max 1
    let peer = digest(&[(10_001, 0, 1), (10_002, 0, 1), (10_003, 0, 2)]);
    let mut recorder = Recorder::default();
    let mut rng = SmallRng::seed_from_u64(1);
    write_delta(
        &cs,
        &matched(&cs, &DigestView::from_digest(&peer)),
        &HashSet::new(),
        &mut rng,
        &mut recorder,
        None,
    );
    assert_eq!(
        recorder.nodes,
        vec![(10_006, 0), (10_004, 0), (10_001, 1), (10_002, 1)]
    );
    assert_eq!(recorder.kvs, 1 + 2 + 3 + 1);
}

#[test]
fn ties_are_broken_by_the_rng() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    for port in 1..=8 {
        set_n(&mut cs, port, 1);
    }
    let orders: HashSet<Vec<(u16, Version)>> = (0..20)
        .map(|seed| {
            let mut recorder = Recorder::default();
            let mut rng = SmallRng::seed_from_u64(seed);
            write_delta(
                &cs,
                &matched(&cs, &DigestView::default()),
                &HashSet::new(),
                &mut rng,
                &mut recorder,
                None,
            );
            recorder.nodes
        })
        .collect();
    assert!(orders.len() > 1, "equal nodes are shuffled");
}

#[test]
fn depth_first_single_node_truncates_to_a_prefix() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    set_n(&mut cs, 10_001, 20);
    let peer = digest(&[(10_001, 0, 5)]);
    let none = HashSet::new();
    let full = full_len(&cs, &peer, &none);
    assert!(full > 300, "{full}");
    let mut sizes = HashSet::new();
    for mtu in (60..full).step_by(7) {
        let delta = bounded_delta(&cs, &peer, &none, mtu);
        assert_prefix_of_versions(&cs, &delta);
        let kvs = delta.num_key_values();
        assert!(kvs < 15, "mtu {mtu} < {full} must truncate");
        sizes.insert(kvs);
    }
    assert!(sizes.len() > 8, "many truncation points: {sizes:?}");
    let delta = bounded_delta(&cs, &peer, &none, full);
    assert_eq!(delta.num_key_values(), 15);
}

#[test]
fn depth_first_across_nodes_only_the_last_node_is_partial() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    for port in 10_001..=10_004 {
        set_n(&mut cs, port, 6);
    }
    let peer = digest(&[
        (10_001, 0, 2),
        (10_002, 0, 1),
        (10_003, 0, 4),
        (10_004, 0, 3),
    ]);
    let none = HashSet::new();
    let full = full_len(&cs, &peer, &none);
    let mut truncations = 0;
    for mtu in (80..full).step_by(5) {
        let delta = bounded_delta(&cs, &peer, &none, mtu);
        assert_prefix_of_versions(&cs, &delta);
        let n = delta.node_deltas.len();
        // Priority: most stale first (10002: 5, 10001: 4, 10004: 3, 10003: 2).
        let ports: Vec<u16> = delta
            .node_deltas
            .iter()
            .map(|nd| nd.chitchat_id.advertise_port())
            .collect();
        assert_eq!(ports, [10_002, 10_001, 10_004, 10_003][..n].to_vec());
        for node_delta in delta.node_deltas.iter().take(n.saturating_sub(1)) {
            let state = cs.node_state(&node_delta.chitchat_id).unwrap();
            assert_eq!(node_delta.max_version, state.max_version(), "complete");
        }
        if delta.num_key_values() < 14 {
            truncations += 1;
        }
    }
    assert!(truncations > 10);
}

#[test]
fn a_node_missing_from_the_digest_is_sent_from_scratch() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    set_n(&mut cs, 10_001, 5);
    set_n(&mut cs, 10_002, 5);
    let peer = digest(&[(10_001, 0, 5)]);
    let none = HashSet::new();
    let full = full_len(&cs, &peer, &none);
    let delta = bounded_delta(&cs, &peer, &none, full);
    assert_eq!(delta.node_deltas.len(), 1);
    assert_eq!(delta.node_deltas[0].chitchat_id, id(10_002));
    assert_eq!(delta.node_deltas[0].from_version_excluded, 0);
    assert_eq!(delta.num_key_values(), 5);
    for mtu in (60..full).step_by(3) {
        let delta = bounded_delta(&cs, &peer, &none, mtu);
        assert!(delta.num_key_values() < 5);
        assert_prefix_of_versions(&cs, &delta);
    }
}

#[test]
fn nodes_scheduled_for_deletion_are_left_out() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    set_n(&mut cs, 10_001, 3);
    set_n(&mut cs, 10_002, 3);
    let dead = id(10_001);
    let scheduled: HashSet<&ChitchatId> = [&dead].into_iter().collect();
    for mtu in [60, 90, 200, 65_503] {
        let delta = bounded_delta(&cs, &Digest::default(), &scheduled, mtu);
        assert!(delta.node_deltas.iter().all(|nd| nd.chitchat_id != dead));
    }
    let delta = bounded_delta(&cs, &Digest::default(), &scheduled, 65_503);
    assert_eq!(delta.node_deltas.len(), 1);
}

#[test]
fn a_peer_behind_our_last_gc_gets_a_reset_with_tombstones() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    {
        let state = cs.node_state_or_create(&id(10_001));
        state.set("a", "1");
        state.set("b", "2");
        state.set("c", "3");
        state.delete("a"); // 4
        state.delete("b"); // 5
    }
    clock.advance(Duration::from_secs(1));
    cs.gc_keys_marked_for_deletion(Duration::from_secs(1), clock.now());
    cs.node_state_or_create(&id(10_001)).delete("c"); // 6, tombstone kept
    assert_eq!(cs.node_state(&id(10_001)).unwrap().last_gc_version(), 5);
    let peer = digest(&[(10_001, 0, 3)]);
    let delta = bounded_delta(&cs, &peer, &HashSet::new(), 65_503);
    let node_delta = &delta.node_deltas[0];
    assert_eq!(node_delta.from_version_excluded, 0, "reset");
    assert_eq!(node_delta.last_gc_version, 5);
    assert_eq!(node_delta.key_values.len(), 1);
    assert_eq!(node_delta.key_values[0].key, "c");
    // A peer past our last GC gets a plain delta.
    let peer = digest(&[(10_001, 0, 5)]);
    let delta = bounded_delta(&cs, &peer, &HashSet::new(), 65_503);
    assert_eq!(delta.node_deltas[0].from_version_excluded, 5);
}

#[test]
fn only_gc_tombstones_newer_gives_a_set_max_version() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    {
        let state = cs.node_state_or_create(&id(10_001));
        state.set("a", "1");
        state.set("b", "2");
        state.delete("b"); // 3
    }
    clock.advance(Duration::from_secs(1));
    cs.gc_keys_marked_for_deletion(Duration::from_secs(1), clock.now());
    // The peer is at 2 with gc 0: 2 < last_gc 3 and 0 < 3 → reset with "a" only.
    // A peer at (gc 3, max 2) is compatible: nothing but the GC'd tombstone is newer.
    let peer = digest(&[(10_001, 3, 2)]);
    let delta = bounded_delta(&cs, &peer, &HashSet::new(), 65_503);
    let node_delta = &delta.node_deltas[0];
    assert!(node_delta.key_values.is_empty());
    assert_eq!(node_delta.max_version, 3);
}

#[test]
fn keys_chitchat_peers_crash_on_are_never_relayed() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock);
    {
        let state = cs.node_state_or_create(&id(10_001));
        state.set_versioned_value("éclair", VersionedValue::for_test("x", 1));
        state.set_versioned_value("ok", VersionedValue::for_test("y", 2));
        state.set_versioned_value("ü", VersionedValue::for_test("z", 3));
    }
    let delta = bounded_delta(&cs, &Digest::default(), &HashSet::new(), 65_503);
    let keys: Vec<&str> = delta.node_deltas[0]
        .key_values
        .iter()
        .map(|kv| kv.key.as_str())
        .collect();
    assert_eq!(keys, vec!["ok"]);
    assert_eq!(delta.node_deltas[0].max_version, 2);
    // The next round moves the peer past the skipped tail with a SetMaxVersion.
    let peer = digest(&[(10_001, 0, 2)]);
    let delta = bounded_delta(&cs, &peer, &HashSet::new(), 65_503);
    assert!(delta.node_deltas[0].key_values.is_empty());
    assert_eq!(delta.node_deltas[0].max_version, 3);
}
