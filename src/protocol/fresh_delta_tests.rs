//! The cached delta for peers that know nothing: reused only while it is what a fresh write
//! would carry, never past its room, and a partial one only a bounded number of times.

use std::collections::HashSet;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::clock::{Clock, ManualClock};
use crate::message::{ChitchatMessage, Delta, Digest, NodeDigest, ProtocolVersion};
use crate::protocol::cluster_state::ClusterState;
use crate::protocol::delta_plan::{DeltaSummary, write_delta};
use crate::protocol::digest_match::PeerDigest;
use crate::protocol::fresh_delta::{FreshDeltaCache, MAX_REUSES_OF_A_PARTIAL_DELTA};
use crate::protocol::listener::Listeners;
use crate::protocol::reply::write_ack;
use crate::types::{ChitchatId, Heartbeat};
use crate::wire::{DigestView, Encoder, decode_envelope};

fn id(port: u16) -> ChitchatId {
    ChitchatId::for_local_test(port)
}

/// `nodes` node states of `keys` keys each (distinct, poorly compressible values).
fn cluster(clock: &ManualClock, nodes: u16, keys: usize) -> ClusterState {
    let mut cs = ClusterState::new(Listeners::default(), Clock::from(clock.clone()));
    cs.set_self_id(id(10_000));
    for port in 0..nodes {
        let state = cs.node_state_or_create(&id(10_000 + port));
        for k in 0..keys {
            state.set(
                format!("key-{k:02}"),
                format!("{port:05}-{k:02}-{:016x}", port as usize * 7919 + k),
            );
        }
    }
    cs
}

fn matched(cs: &ClusterState, digest: &Digest) -> PeerDigest {
    let mut peer = PeerDigest::default();
    cs.match_digest(&DigestView::from_digest(digest), &mut peer);
    peer
}

/// A delta written the general way, as bytes.
fn written(cs: &ClusterState, peer: &PeerDigest, mtu: usize) -> (Vec<u8>, DeltaSummary) {
    let scheduled: HashSet<&ChitchatId> = HashSet::new();
    let mut encoder = Encoder::new();
    let mut out = Vec::new();
    let mut writer = encoder.delta_writer(&mut out, mtu);
    let summary = write_delta(
        cs,
        peer,
        &scheduled,
        &mut SmallRng::seed_from_u64(3),
        &mut writer,
        None,
    );
    writer.finish();
    (out, summary)
}

/// Looks the cache up for `peer` (which must be fresh) in room `mtu`.
fn lookup(
    cache: &mut FreshDeltaCache,
    cs: &ClusterState,
    peer: &PeerDigest,
    mtu: usize,
) -> Option<Vec<u8>> {
    let scheduled: HashSet<&ChitchatId> = HashSet::new();
    assert!(cache.peer_is_fresh(cs, peer, &scheduled));
    let mut out = Vec::new();
    cache.lookup(cs, mtu, &mut out).map(|_| out)
}

fn store(cache: &mut FreshDeltaCache, cs: &ClusterState, peer: &PeerDigest, mtu: usize) -> Vec<u8> {
    let scheduled: HashSet<&ChitchatId> = HashSet::new();
    assert!(cache.peer_is_fresh(cs, peer, &scheduled));
    let (bytes, summary) = written(cs, peer, mtu);
    cache.store(cs, mtu, &bytes, summary);
    bytes
}

fn empty() -> Digest {
    Digest::default()
}

#[test]
fn a_fresh_peer_gets_the_stored_delta_until_a_key_changes() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock, 20, 5);
    let peer = matched(&cs, &empty());
    let mut cache = FreshDeltaCache::default();
    assert_eq!(
        lookup(&mut cache, &cs, &peer, 60_000),
        None,
        "nothing stored yet"
    );
    let bytes = store(&mut cache, &cs, &peer, 60_000);
    for _ in 0..3 {
        assert_eq!(
            lookup(&mut cache, &cs, &peer, 60_000).as_deref(),
            Some(&bytes[..])
        );
    }
    // Any key written changes its node's max version: the delta must be written again.
    cs.node_state_or_create(&id(10_003)).set("key-00", "new");
    let peer = matched(&cs, &empty());
    assert_eq!(lookup(&mut cache, &cs, &peer, 60_000), None);
    // A key deleted too (its tombstone has a new version).
    let _ = store(&mut cache, &cs, &peer, 60_000);
    cs.node_state_or_create(&id(10_004)).delete("key-01");
    let peer = matched(&cs, &empty());
    assert_eq!(lookup(&mut cache, &cs, &peer, 60_000), None);
}

#[test]
fn a_node_added_scheduled_or_in_another_cluster_state_misses() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock, 10, 3);
    let peer = matched(&cs, &empty());
    let mut cache = FreshDeltaCache::default();
    let _ = store(&mut cache, &cs, &peer, 60_000);

    // The same content in another cluster state (another instance of the process).
    let twin = cluster(&clock, 10, 3);
    let twin_peer = matched(&twin, &empty());
    assert_eq!(lookup(&mut cache, &twin, &twin_peer, 60_000), None);

    // A node scheduled for deletion leaves the delta.
    let scheduled_id = id(10_002);
    let scheduled: HashSet<&ChitchatId> = [&scheduled_id].into_iter().collect();
    assert!(cache.peer_is_fresh(&cs, &peer, &scheduled));
    assert!(cache.lookup(&cs, 60_000, &mut Vec::new()).is_none());

    // A node added (even with no key yet) changes the membership.
    cs.node_state_or_create(&id(20_000));
    let peer = matched(&cs, &empty());
    assert_eq!(lookup(&mut cache, &cs, &peer, 60_000), None);
}

#[test]
fn a_peer_that_knows_any_version_is_not_fresh() {
    let clock = ManualClock::new();
    let cs = cluster(&clock, 10, 3);
    let scheduled: HashSet<&ChitchatId> = HashSet::new();
    let mut cache = FreshDeltaCache::default();
    // Its own (unknown) id with a version, and known ids at version 0: still fresh.
    let mut digest = empty();
    digest.add_node(id(30_000), NodeDigest::new(Heartbeat(5), 0, 9));
    digest.add_node(id(10_001), NodeDigest::new(Heartbeat(5), 0, 0));
    assert!(cache.peer_is_fresh(&cs, &matched(&cs, &digest), &scheduled));
    // One known node at any version: not fresh.
    digest.add_node(id(10_007), NodeDigest::new(Heartbeat(5), 0, 1));
    assert!(!cache.peer_is_fresh(&cs, &matched(&cs, &digest), &scheduled));
}

#[test]
fn the_stored_delta_never_exceeds_the_room_and_a_partial_one_is_reused_a_bounded_number_of_times() {
    let clock = ManualClock::new();
    let cs = cluster(&clock, 200, 10);
    let peer = matched(&cs, &empty());
    let mut cache = FreshDeltaCache::default();
    let mtu = 4_000;
    let (_, summary) = written(&cs, &peer, mtu);
    assert!(
        summary.truncated,
        "200 nodes × 10 keys must not fit {mtu} bytes"
    );
    let bytes = store(&mut cache, &cs, &peer, mtu);
    assert!(bytes.len() <= mtu);
    // Less room than the delta takes: written again.
    assert_eq!(lookup(&mut cache, &cs, &peer, bytes.len() - 1), None);
    // Much more room: a fresh delta would carry more.
    assert_eq!(lookup(&mut cache, &cs, &peer, 60_000), None);
    for _ in 0..MAX_REUSES_OF_A_PARTIAL_DELTA {
        assert_eq!(
            lookup(&mut cache, &cs, &peer, mtu).as_deref(),
            Some(&bytes[..])
        );
    }
    assert_eq!(
        lookup(&mut cache, &cs, &peer, mtu),
        None,
        "reuses are bounded"
    );
}

#[test]
fn a_delta_cut_by_the_deadline_is_not_stored() {
    let clock = ManualClock::new();
    let cs = cluster(&clock, 10, 3);
    let peer = matched(&cs, &empty());
    let scheduled: HashSet<&ChitchatId> = HashSet::new();
    let mut cache = FreshDeltaCache::default();
    assert!(cache.peer_is_fresh(&cs, &peer, &scheduled));
    let (bytes, mut summary) = written(&cs, &peer, 60_000);
    summary.truncated = true;
    summary.deadline_hit = true;
    cache.store(&cs, 60_000, &bytes, summary);
    assert_eq!(lookup(&mut cache, &cs, &peer, 60_000), None);
}

fn decode_ack(bytes: &[u8]) -> Delta {
    match decode_envelope(bytes).unwrap().message {
        ChitchatMessage::Ack { delta } => delta,
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// Through the reply path (the thread's cache): replies to fresh peers carry what the state
/// holds now, and a repeated one is the same datagram.
#[test]
fn acks_to_fresh_peers_carry_the_current_state() {
    let clock = ManualClock::new();
    let mut cs = cluster(&clock, 30, 4);
    let scheduled: HashSet<&ChitchatId> = HashSet::new();
    let ack = |cs: &ClusterState, digest: &Digest| {
        let mut out = Vec::new();
        let peer = matched(cs, digest);
        let mut rng = SmallRng::seed_from_u64(1);
        write_ack(
            cs,
            &scheduled,
            ProtocolVersion::V0,
            &peer,
            &mut rng,
            &mut out,
            None,
            usize::MAX,
        );
        out
    };
    let first = ack(&cs, &empty());
    let second = ack(&cs, &empty());
    assert_eq!(first, second);
    let nodes = decode_ack(&first).node_deltas.len();
    assert_eq!(nodes, 30, "every node state, self (port 10000) included");

    cs.node_state_or_create(&id(10_011))
        .set("key-00", "changed");
    let after = decode_ack(&ack(&cs, &empty()));
    let node = after
        .node_deltas
        .iter()
        .find(|d| d.chitchat_id == id(10_011))
        .expect("the changed node is in the delta");
    assert!(
        node.key_values
            .iter()
            .any(|kv| kv.key == "key-00" && kv.value == "changed"),
        "the new value, not the cached one: {node:?}"
    );
    // A peer that knows something is answered the general way, whatever is cached.
    let mut partial = empty();
    partial.add_node(id(10_011), NodeDigest::new(Heartbeat(1), 0, 4));
    let partial_delta = decode_ack(&ack(&cs, &partial));
    let node = partial_delta
        .node_deltas
        .iter()
        .find(|d| d.chitchat_id == id(10_011))
        .unwrap();
    assert_eq!(node.from_version_excluded, 4);
}
