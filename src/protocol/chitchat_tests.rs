//! Whole-node behaviour, driven message by message on virtual time (SPEC §4, §6.11).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{Clock, ManualClock};
use crate::config::{ChitchatConfig, FailureDetectorConfig};
use crate::message::{ChitchatEnvelope, ChitchatMessage, Digest, NodeDigest, ProtocolVersion};
use crate::protocol::{Chitchat, MAX_NODE_STATES};
use crate::types::{ChitchatId, Heartbeat, VersionedValue};
use crate::wire::{self, MAX_UDP_DATAGRAM_PAYLOAD_SIZE};

fn config(port: u16) -> ChitchatConfig {
    let mut config = ChitchatConfig::for_test(port);
    config.cluster_id = "test-cluster".to_string();
    config.gossip_interval = Duration::from_millis(100);
    config.failure_detector_config = FailureDetectorConfig {
        phi_threshold: 5.0,
        initial_interval: Duration::from_millis(100),
        dead_node_grace_period: Duration::from_secs(20),
        ..FailureDetectorConfig::default()
    };
    config.marked_for_deletion_grace_period = Duration::from_secs(3_600);
    config
}

fn no_seeds() -> watch::Receiver<HashSet<SocketAddr>> {
    watch::channel(HashSet::new()).1
}

fn node(port: u16, clock: &ManualClock) -> Chitchat {
    node_with(config(port), clock, Vec::new())
}

fn node_with(config: ChitchatConfig, clock: &ManualClock, kvs: Vec<(&str, &str)>) -> Chitchat {
    let kvs = kvs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Chitchat::with_clock(
        config,
        no_seeds(),
        kvs,
        Clock::from(clock.clone()),
        u64::from(7u16),
    )
}

/// One full Syn → SynAck → Ack exchange, through the byte codec.
fn handshake(initiator: &mut Chitchat, receiver: &mut Chitchat) {
    let syn = initiator.create_syn_message();
    let syn_ack = receiver.process_message(syn).expect("a syn gets a syn-ack");
    assert!(matches!(syn_ack, ChitchatMessage::SynAck { .. }));
    let ack = initiator
        .process_message(syn_ack)
        .expect("a syn-ack gets an ack");
    assert!(matches!(ack, ChitchatMessage::Ack { .. }));
    assert!(receiver.process_message(ack).is_none());
}

fn visible(chitchat: &Chitchat, id: &ChitchatId) -> BTreeMap<String, String> {
    chitchat
        .node_state(id)
        .map(|state| {
            state
                .key_values()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_same_view(a: &Chitchat, b: &Chitchat) {
    for id in [a.self_chitchat_id(), b.self_chitchat_id()] {
        assert_eq!(visible(a, id), visible(b, id), "views of {id:?} differ");
    }
}

#[test]
fn constructor_sets_heartbeat_and_initial_key_values() {
    let clock = ManualClock::new();
    let chitchat = node_with(config(1), &clock, vec![("a", "1"), ("b", "2"), ("a", "1")]);
    let own = chitchat.node_state(chitchat.self_chitchat_id()).unwrap();
    assert_eq!(own.heartbeat(), Heartbeat(1));
    assert_eq!(own.max_version(), 2);
    assert_eq!(own.get("b"), Some("2"));
}

#[test]
fn handshakes_synchronise_both_nodes() {
    let clock = ManualClock::new();
    let mut n1 = node_with(config(10_001), &clock, vec![("key_a", "1"), ("key_b", "2")]);
    let mut n2 = node_with(config(10_002), &clock, vec![("key_c", "3")]);
    handshake(&mut n1, &mut n2);
    assert_same_view(&n1, &n2);

    n1.self_node_state().set("key_a", "updated");
    n1.self_node_state().delete("key_b");
    n2.self_node_state().set("key_d", "4");
    handshake(&mut n2, &mut n1);
    assert_same_view(&n1, &n2);
    assert_eq!(
        visible(&n2, n1.self_chitchat_id()).get("key_a").unwrap(),
        "updated"
    );
    assert!(!visible(&n2, n1.self_chitchat_id()).contains_key("key_b"));

    n2.self_node_state().set_with_ttl("ttl", "t");
    handshake(&mut n1, &mut n2);
    assert_same_view(&n1, &n2);
}

#[test]
fn syn_of_another_cluster_gets_bad_cluster() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let mut other = config(2);
    other.cluster_id = "another".to_string();
    let mut n2 = node_with(other, &clock, vec![]);
    let syn = n2.create_syn_message();
    assert_eq!(n1.process_message(syn), Some(ChitchatMessage::BadCluster));
    assert_eq!(n1.stats().bad_cluster_sent, 1);
    assert!(
        n1.node_state(n2.self_chitchat_id()).is_none(),
        "no membership leak"
    );
    assert!(n2.process_message(ChitchatMessage::BadCluster).is_none());
}

#[test]
fn every_received_message_bumps_the_own_heartbeat() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let mut n2 = node(2, &clock);
    handshake(&mut n1, &mut n2);
    // n1: 1 + SynAck; n2: 1 + Syn + Ack.
    assert_eq!(
        n1.node_state(n1.self_chitchat_id()).unwrap().heartbeat(),
        Heartbeat(2)
    );
    assert_eq!(
        n2.node_state(n2.self_chitchat_id()).unwrap().heartbeat(),
        Heartbeat(3)
    );
    assert_eq!(
        n1.node_state(n2.self_chitchat_id()).unwrap().heartbeat(),
        Heartbeat(2),
        "heartbeats travel in digests"
    );
}

/// The bump rides the digest pass when the own state is within the digest's reach and falls
/// back to a lookup otherwise; every kind of message bumps exactly once.
#[test]
fn each_message_kind_bumps_the_own_heartbeat_exactly_once() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let n2 = node(2, &clock);
    let own = n1.self_chitchat_id().clone();
    let mut knowing_us = Digest::default();
    knowing_us.add_node(own.clone(), NodeDigest::new(Heartbeat(1), 0, 0));
    knowing_us.add_node(
        n2.self_chitchat_id().clone(),
        NodeDigest::new(Heartbeat(1), 0, 0),
    );
    let cluster_id = n1.config().cluster_id.clone();
    let messages = [
        ChitchatMessage::Syn {
            cluster_id: cluster_id.clone(),
            digest: Digest::default(),
        },
        ChitchatMessage::Syn {
            cluster_id: cluster_id.clone(),
            digest: knowing_us.clone(),
        },
        ChitchatMessage::Syn {
            cluster_id: "another".to_string(),
            digest: knowing_us.clone(),
        },
        ChitchatMessage::SynAck {
            digest: knowing_us,
            delta: Default::default(),
        },
        ChitchatMessage::SynAck {
            digest: Digest::default(),
            delta: Default::default(),
        },
        ChitchatMessage::Ack {
            delta: Default::default(),
        },
        ChitchatMessage::BadCluster,
    ];
    for message in messages {
        let what = format!("{message:?}");
        let before = n1.node_state(&own).unwrap().heartbeat();
        n1.process_message(message);
        let after = n1.node_state(&own).unwrap().heartbeat();
        assert_eq!(after.0, before.0 + 1, "{what}");
    }
}

#[test]
fn replies_echo_the_version_received() {
    let clock = ManualClock::new();
    let mut v1_config = config(1);
    v1_config.protocol_version = ProtocolVersion::V1;
    let mut n1 = node_with(v1_config, &clock, vec![("k", "v")]);
    let n2 = node(2, &clock);
    for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
        let syn = ChitchatEnvelope {
            version,
            message: n2.create_syn_message(),
        };
        let reply = n1.process_envelope(syn).unwrap();
        assert_eq!(reply.version, version);
        let mut bytes = Vec::new();
        let outcome = n1.process_envelope_into(
            ChitchatEnvelope {
                version,
                message: n2.create_syn_message(),
            },
            &mut bytes,
            None,
        );
        assert!(outcome.replied);
        assert_eq!(bytes[2], version.to_code(), "version byte on the wire");
    }
}

#[test]
fn three_increasing_heartbeats_make_a_node_live_and_silence_makes_it_dead() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let peer = ChitchatId::for_local_test(2);
    for hb in 1..=3 {
        clock.advance(Duration::from_millis(100));
        n1.report_heartbeat(&peer, Heartbeat(hb));
        n1.update_nodes_liveness();
        let live: Vec<_> = n1.live_nodes().cloned().collect();
        assert_eq!(live.contains(&peer), hb == 3, "after heartbeat {hb}");
    }
    assert_eq!(n1.dead_nodes().count(), 0);
    clock.advance(Duration::from_secs(5));
    n1.update_nodes_liveness();
    assert_eq!(n1.live_nodes().count(), 1, "only self");
    assert_eq!(n1.dead_nodes().cloned().collect::<Vec<_>>(), vec![peer]);
}

#[test]
fn equal_heartbeats_do_not_keep_a_node_alive() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let peer = ChitchatId::for_local_test(2);
    for hb in 1..=3 {
        clock.advance(Duration::from_millis(100));
        n1.report_heartbeat(&peer, Heartbeat(hb));
    }
    n1.update_nodes_liveness();
    assert!(n1.live_nodes().any(|id| *id == peer));
    for _ in 0..20 {
        clock.advance(Duration::from_millis(100));
        n1.report_heartbeat(&peer, Heartbeat(3));
        n1.update_nodes_liveness();
    }
    assert!(!n1.live_nodes().any(|id| *id == peer));
}

#[test]
fn failure_detection_timeout_is_exposed() {
    let clock = ManualClock::new();
    let mut cfg = config(1);
    cfg.failure_detector_config.phi_threshold = 2.0;
    cfg.failure_detector_config.initial_interval = Duration::from_secs(1);
    let mut n1 = node_with(cfg, &clock, vec![]);
    let peer = ChitchatId::for_local_test(2);
    assert_eq!(n1.failure_detection_timeout(&peer), None);
    n1.report_heartbeat(&peer, Heartbeat(1));
    clock.advance(Duration::from_secs(1));
    n1.report_heartbeat(&peer, Heartbeat(2));
    clock.advance(Duration::from_secs(1));
    n1.report_heartbeat(&peer, Heartbeat(3));
    assert_eq!(
        n1.failure_detection_timeout(&peer),
        Some(Duration::from_secs(2))
    );
    assert_eq!(n1.failure_detection_timeout(n1.self_chitchat_id()), None);
}

#[test]
fn dead_nodes_are_hidden_after_half_grace_and_collected_after_grace() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let peer = ChitchatId::for_local_test(2);
    for hb in 1..=3 {
        clock.advance(Duration::from_millis(100));
        n1.report_heartbeat(&peer, Heartbeat(hb));
    }
    n1.update_nodes_liveness();
    clock.advance(Duration::from_secs(2));
    n1.update_nodes_liveness();
    assert_eq!(n1.dead_nodes().count(), 1);
    assert!(n1.compute_digest().node_digests.contains_key(&peer));
    clock.advance(Duration::from_secs(10) + Duration::from_millis(1));
    assert_eq!(n1.scheduled_for_deletion_nodes().count(), 1);
    assert!(!n1.compute_digest().node_digests.contains_key(&peer));
    clock.advance(Duration::from_secs(10));
    n1.update_nodes_liveness();
    assert!(n1.node_state(&peer).is_none(), "garbage-collected");
    assert_eq!(n1.dead_nodes().count(), 0);

    // Stale copies do not bring it back; a newer heartbeat does.
    n1.report_heartbeat(&peer, Heartbeat(3));
    assert!(n1.node_state(&peer).is_none());
    n1.report_heartbeat(&peer, Heartbeat(4));
    assert!(n1.node_state(&peer).is_some());
}

/// Nobody watches while the live set changes (so no map is built); a watcher subscribing
/// afterwards still sees the current live nodes, and later changes reach it.
#[test]
fn live_nodes_changed_while_unwatched_are_published_on_subscription() {
    let clock = ManualClock::new();
    let mut n1 = node_with(config(1), &clock, vec![]);
    let mut n2 = node_with(config(2), &clock, vec![]);
    n1.update_nodes_liveness();
    for _ in 0..3 {
        clock.advance(Duration::from_millis(100));
        n2.update_self_heartbeat();
        handshake(&mut n2, &mut n1);
    }
    n1.update_nodes_liveness();
    assert_eq!(n1.live_nodes().count(), 2);
    let watcher = n1.live_nodes_watcher();
    assert_eq!(
        watcher.borrow().keys().cloned().collect::<Vec<_>>(),
        vec![n1.self_chitchat_id().clone(), n2.self_chitchat_id().clone()]
    );
    // n2 falls silent: the watched node publishes its death at the next evaluation.
    clock.advance(Duration::from_secs(60));
    n1.update_nodes_liveness();
    assert_eq!(watcher.borrow().len(), 1, "only self is live");
}

#[test]
fn live_nodes_watcher_publishes_changes_with_the_extra_predicate() {
    let clock = ManualClock::new();
    let mut cfg = config(1);
    cfg.extra_liveness_predicate = Some(Box::new(|state| state.get("READY") == Some("true")));
    let mut n1 = node_with(cfg, &clock, vec![("READY", "true")]);
    let mut n2 = node_with(config(2), &clock, vec![("READY", "false")]);
    let watcher = n1.live_nodes_watcher();
    assert!(
        watcher.borrow().is_empty(),
        "nothing before the first round"
    );
    n1.update_nodes_liveness();
    assert_eq!(
        watcher.borrow().keys().cloned().collect::<Vec<_>>(),
        vec![n1.self_chitchat_id().clone()]
    );
    for _ in 0..3 {
        clock.advance(Duration::from_millis(100));
        n2.update_self_heartbeat();
        handshake(&mut n2, &mut n1);
    }
    n1.update_nodes_liveness();
    assert_eq!(n1.live_nodes().count(), 2);
    assert_eq!(watcher.borrow().len(), 1, "n2 is live but not READY");
    n2.self_node_state().set("READY", "true");
    clock.advance(Duration::from_millis(100));
    handshake(&mut n2, &mut n1);
    n1.update_nodes_liveness();
    assert_eq!(watcher.borrow().len(), 2);
    assert_eq!(
        watcher.borrow()[n2.self_chitchat_id()].get("READY"),
        Some("true")
    );
    n2.self_node_state().delete("READY");
    clock.advance(Duration::from_millis(100));
    handshake(&mut n2, &mut n1);
    n1.update_nodes_liveness();
    assert_eq!(watcher.borrow().len(), 1);
}

#[test]
fn listeners_fire_for_keys_received_from_peers() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let mut n2 = node(2, &clock);
    let seen: Arc<parking_lot::Mutex<Vec<(String, String, ChitchatId)>>> = Default::default();
    let seen_clone = seen.clone();
    let _handle = n1.subscribe_event("service:", move |event| {
        seen_clone.lock().push((
            event.key.to_string(),
            event.value.to_string(),
            event.node.clone(),
        ));
    });
    n2.self_node_state().set("service:search", "up");
    n2.self_node_state().set("other", "x");
    handshake(&mut n1, &mut n2);
    assert_eq!(
        *seen.lock(),
        vec![(
            "search".to_string(),
            "up".to_string(),
            n2.self_chitchat_id().clone()
        )]
    );
}

#[test]
fn a_reset_delta_calls_the_catchup_callback_once() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let calls_clone = calls.clone();
    let mut cfg = config(1);
    cfg.catchup_callback = Some(Box::new(move || {
        calls_clone.fetch_add(1, Ordering::SeqCst);
    }));
    let mut n1 = node_with(cfg, &clock, vec![]);
    let mut n2_cfg = config(2);
    n2_cfg.marked_for_deletion_grace_period = Duration::from_secs(10);
    let mut n2 = node_with(n2_cfg, &clock, vec![("a", "1"), ("b", "2")]);
    handshake(&mut n1, &mut n2);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // n2 deletes and garbage-collects while n1 does not hear from it.
    n2.self_node_state().delete("a");
    n2.self_node_state().set("c", "3");
    clock.advance(Duration::from_secs(11));
    n2.gc_keys_marked_for_deletion();
    let n2_id = n2.self_chitchat_id().clone();
    assert_eq!(n2.node_state(&n2_id).unwrap().last_gc_version(), 3);
    handshake(&mut n1, &mut n2);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(visible(&n1, &n2_id), visible(&n2, &n2_id));
    handshake(&mut n1, &mut n2);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no reset when up to date");
}

#[test]
fn no_reset_needed_when_the_peer_already_has_a_higher_last_gc() {
    let clock = ManualClock::new();
    let mut cfg = config(1);
    cfg.marked_for_deletion_grace_period = Duration::from_secs(10);
    let mut n1 = node_with(cfg, &clock, vec![]);
    let mut n2 = node(2, &clock);
    for i in 0..20_000 {
        n1.self_node_state().set(format!("k{i}"), "v");
    }
    for i in 0..10_000 {
        n1.self_node_state().delete(&format!("k{i}"));
    }
    clock.advance(Duration::from_secs(11));
    n1.gc_keys_marked_for_deletion();
    let n1_id = n1.self_chitchat_id().clone();
    let mut rounds = 0;
    while visible(&n2, &n1_id) != visible(&n1, &n1_id) {
        handshake(&mut n2, &mut n1);
        rounds += 1;
        assert!(rounds < 50, "did not converge");
    }
    assert_eq!(visible(&n2, &n1_id).len(), 10_000);
    assert_eq!(
        n2.stats().node_deltas_reset,
        1,
        "only the first delta resets"
    );
}

#[test]
fn reset_node_state_if_update_replaces_older_states_only() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let peer = ChitchatId::for_local_test(2);
    n1.reset_node_state_if_update(
        &peer,
        vec![
            ("k1".to_string(), VersionedValue::for_test("v1", 1)),
            ("k2".to_string(), VersionedValue::for_test("v2", 2)),
        ]
        .into_iter(),
        5,
        0,
    );
    let state = n1.node_state(&peer).unwrap();
    assert_eq!(
        state.max_version(),
        5,
        "max_version adopted from the snapshot (#194)"
    );
    assert_eq!(state.get("k2"), Some("v2"));
    assert!(
        !n1.live_nodes().any(|id| *id == peer),
        "reset nodes are not alive"
    );

    // An obsolete snapshot is refused, even with a smaller last_gc_version (#194).
    n1.reset_node_state_if_update(
        &peer,
        vec![("old".to_string(), VersionedValue::for_test("x", 4))].into_iter(),
        4,
        0,
    );
    assert!(n1.node_state(&peer).unwrap().get("old").is_none());

    // A newer one replaces: missing keys go without tombstones, last_gc never regresses.
    n1.reset_node_state_if_update(
        &peer,
        vec![("k3".to_string(), VersionedValue::for_test("v3", 9))].into_iter(),
        9,
        6,
    );
    let state = n1.node_state(&peer).unwrap();
    assert_eq!(state.key_values_including_deleted().count(), 1);
    assert_eq!(state.monotonic_property(), (6, 9));
    n1.reset_node_state_if_update(&peer, std::iter::empty(), 10, 5);
    assert_eq!(n1.node_state(&peer).unwrap().monotonic_property(), (6, 9));
}

#[test]
fn reset_does_not_resurrect_a_garbage_collected_node() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let peer = ChitchatId::for_local_test(2);
    n1.report_heartbeat(&peer, Heartbeat(1));
    n1.update_nodes_liveness();
    clock.advance(Duration::from_secs(21));
    n1.update_nodes_liveness();
    assert!(n1.node_state(&peer).is_none());
    n1.reset_node_state_if_update(
        &peer,
        vec![("k".to_string(), VersionedValue::for_test("v", 1))].into_iter(),
        1,
        0,
    );
    assert!(n1.node_state(&peer).is_none());
}

#[test]
fn deltas_for_unknown_nodes_are_ignored() {
    let clock = ManualClock::new();
    let n1 = node(1, &clock);
    let mut n2 = node_with(config(2), &clock, vec![("k", "v")]);
    // n2 learns n1 exists from a Syn, then sends it an Ack about n2, which n1 never saw.
    let syn = n1.create_syn_message();
    let ChitchatMessage::SynAck { delta, .. } = n2.process_message(syn).unwrap() else {
        panic!("expected a syn-ack");
    };
    let mut n3 = node(3, &clock);
    n3.process_message(ChitchatMessage::Ack { delta });
    assert!(n3.node_state(n2.self_chitchat_id()).is_none());
}

#[test]
fn own_state_is_never_overwritten_and_a_stale_incarnation_is_outgrown() {
    let clock = ManualClock::new();
    let mut old = node_with(config(1), &clock, vec![("a", "1"), ("b", "2"), ("c", "3")]);
    let mut peer = node(2, &clock);
    for _ in 0..5 {
        old.update_self_heartbeat();
    }
    handshake(&mut peer, &mut old);
    // Restart with the same id (same generation): the peer holds a newer copy of "us".
    let mut restarted = node_with(config(1), &clock, vec![("a", "new")]);
    let id = restarted.self_chitchat_id().clone();
    for _ in 0..3 {
        handshake(&mut restarted, &mut peer);
    }
    let own = restarted.node_state(&id).unwrap();
    assert_eq!(own.get("a"), Some("new"));
    assert_eq!(own.get("b"), None);
    assert!(own.heartbeat() > old.node_state(&id).unwrap().heartbeat());
    assert_eq!(visible(&peer, &id), visible(&restarted, &id));
    assert_eq!(visible(&peer, &id).get("a").unwrap(), "new");
}

/// A node holding many node states with long ids and values: every datagram it writes stays
/// within 65 507 bytes (quickwit-oss/chitchat#170 overflowed; a large own digest panicked).
#[test]
fn replies_fit_in_a_datagram_whatever_the_state_size() {
    let clock = ManualClock::new();
    for (num_nodes, id_len) in [(55, 1_000), (3_000, 20)] {
        let mut n1 = node(1, &clock);
        for i in 0..num_nodes {
            let id = ChitchatId::new(
                format!("{i:0id_len$}"),
                0,
                SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 7000)),
            );
            n1.report_heartbeat(&id, Heartbeat(1));
            n1.reset_node_state_if_update(
                &id,
                vec![(
                    "k".to_string(),
                    VersionedValue::for_test(&"v".repeat(1_000), 1),
                )]
                .into_iter(),
                1,
                0,
            );
        }
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            let mut syn = Vec::new();
            n1.write_syn(version, &mut syn);
            assert!(
                syn.len() <= MAX_UDP_DATAGRAM_PAYLOAD_SIZE,
                "syn {}",
                syn.len()
            );
            wire::decode_envelope(&syn).unwrap();

            let empty_syn = ChitchatEnvelope {
                version,
                message: ChitchatMessage::Syn {
                    cluster_id: "test-cluster".to_string(),
                    digest: Digest::default(),
                },
            };
            let mut reply = Vec::new();
            let outcome = n1.process_envelope_into(empty_syn, &mut reply, None);
            assert!(outcome.replied);
            assert!(
                reply.len() <= MAX_UDP_DATAGRAM_PAYLOAD_SIZE,
                "{num_nodes} nodes, {version:?}: syn-ack of {} bytes",
                reply.len()
            );
            let ChitchatMessage::SynAck { digest, delta } =
                wire::decode_envelope(&reply).unwrap().message
            else {
                panic!("expected a syn-ack");
            };
            assert!(digest.node_digests.contains_key(n1.self_chitchat_id()));
            assert!(!delta.node_deltas.is_empty(), "the delta keeps some room");
            if !outcome.delta_truncated {
                assert_eq!(delta.node_deltas.len(), num_nodes, "untruncated = complete");
            }
            if num_nodes == 3_000 && version == ProtocolVersion::V0 {
                assert!(outcome.digest_truncated && outcome.delta_truncated);
            }
        }
    }
}

#[test]
fn a_v1_node_answering_a_v0_syn_budgets_in_v0() {
    // SPEC §9.13: the reference reserved the V1 digest length and wrote a V0 digest.
    let clock = ManualClock::new();
    let mut cfg = config(1);
    cfg.protocol_version = ProtocolVersion::V1;
    let mut n1 = node_with(cfg, &clock, vec![]);
    for i in 0..1_000u32 {
        let id = ChitchatId::new(
            format!("node-with-a-rather-long-name-{i:05}"),
            0,
            SocketAddr::from(([10, 1, (i / 256) as u8, (i % 256) as u8], 7000)),
        );
        n1.report_heartbeat(&id, Heartbeat(1));
        n1.reset_node_state_if_update(
            &id,
            vec![(
                "key".to_string(),
                VersionedValue::for_test("value-value", 1),
            )]
            .into_iter(),
            1,
            0,
        );
    }
    let syn = ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn {
            cluster_id: "test-cluster".to_string(),
            digest: Digest::default(),
        },
    };
    let mut reply = Vec::new();
    n1.process_envelope_into(syn, &mut reply, None);
    assert_eq!(reply[2], 0, "answered in V0");
    assert!(
        reply.len() <= MAX_UDP_DATAGRAM_PAYLOAD_SIZE,
        "{}",
        reply.len()
    );
}

#[test]
fn digest_heartbeats_create_node_states_up_to_a_cap() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let mut digest = Digest::default();
    for i in 0..10u16 {
        digest.add_node(
            ChitchatId::for_local_test(1_000 + i),
            NodeDigest::new(Heartbeat(1), 0, 0),
        );
    }
    n1.process_message(ChitchatMessage::Syn {
        cluster_id: "test-cluster".to_string(),
        digest,
    });
    assert_eq!(n1.node_states().len(), 11);

    // Forged digests cannot grow the state past the cap; known nodes keep being updated.
    let fill = MAX_NODE_STATES - n1.node_states().len();
    for i in 0..fill + 5 {
        let id = ChitchatId::new(
            format!("forged-{i}"),
            0,
            SocketAddr::from(([10, 9, 0, 1], 1)),
        );
        n1.report_heartbeat(&id, Heartbeat(1));
    }
    assert_eq!(n1.node_states().len(), MAX_NODE_STATES);
    assert_eq!(n1.stats().nodes_refused, 5);
    let known = ChitchatId::for_local_test(1_000);
    n1.report_heartbeat(&known, Heartbeat(2));
    assert_eq!(n1.node_state(&known).unwrap().heartbeat(), Heartbeat(2));
    assert_eq!(n1.stats().nodes_refused, 5);
}

#[test]
fn same_inputs_same_outputs() {
    let run = || {
        let clock = ManualClock::new();
        let mut nodes: Vec<Chitchat> = (0..4)
            .map(|i| node_with(config(i), &clock, vec![("k", "v")]))
            .collect();
        let mut log = Vec::new();
        for round in 0..6 {
            clock.advance(Duration::from_millis(100));
            let (a, b) = (round % 4, (round + 1) % 4);
            let (left, right) = nodes.split_at_mut(b.max(a));
            let (x, y) = if a < b {
                (&mut left[a], &mut right[0])
            } else {
                (&mut right[0], &mut left[b])
            };
            let syn = x.create_syn_message();
            let mut bytes = Vec::new();
            y.process_envelope_into(
                ChitchatEnvelope {
                    version: ProtocolVersion::V0,
                    message: syn,
                },
                &mut bytes,
                None,
            );
            log.push(bytes);
        }
        log
    };
    assert_eq!(run(), run());
}

#[test]
fn snapshot_json_has_chitchats_shape() {
    let clock = ManualClock::new();
    let chitchat = node_with(config(7280), &clock, vec![("k1", "v1")]);
    let json = serde_json::to_value(chitchat.state_snapshot()).unwrap();
    let node_states = json["node_states"].as_array().unwrap();
    assert_eq!(node_states.len(), 1);
    let state = &node_states[0];
    assert_eq!(
        state["chitchat_id"],
        serde_json::json!({"node_id": "node-7280", "generation_id": 0, "gossip_advertise_addr": "127.0.0.1:7280"})
    );
    assert_eq!(state["heartbeat"], 1);
    assert_eq!(
        state["key_values"]["k1"],
        serde_json::json!({"value": "v1", "version": 1, "status": "Set"})
    );
    assert_eq!(state["max_version"], 1);
    assert_eq!(state["last_gc_version"], 0);
    assert_eq!(json["seed_addrs"], serde_json::json!([]));
    let back: crate::protocol::ClusterStateSnapshot = serde_json::from_value(json).unwrap();
    assert_eq!(
        back.node_states[0],
        chitchat.state_snapshot().node_states[0]
    );
}

/// The gossip round of the protocol core (SPEC §4.2): a seed while nobody is live, the heartbeat
/// bumped, one Syn in the config's version carrying the own digest, and liveness evaluated at
/// the end (a peer heard three times becomes live, and a live peer is then a target).
#[test]
fn gossip_round_picks_targets_bumps_heartbeat_and_writes_one_syn() {
    let clock = ManualClock::new();
    let seed: SocketAddr = ([127, 0, 0, 1], 20_002).into();
    let mut config = config(20_001);
    config.protocol_version = ProtocolVersion::V1;
    let seeds = watch::channel([seed, config.chitchat_id.gossip_advertise_addr].into()).1;
    let mut n1 = Chitchat::with_clock(config, seeds, Vec::new(), Clock::from(clock.clone()), 3);
    let self_id = n1.self_chitchat_id().clone();

    let mut syn = vec![0xAA; 3];
    let heartbeat = n1.node_state(&self_id).unwrap().heartbeat();
    let targets = n1.begin_gossip_round(&mut syn);
    assert!(targets.nodes.is_empty(), "no known peer");
    assert_eq!(
        targets.seed_node,
        Some(seed),
        "a seed always while none is live, never self"
    );
    assert_eq!(targets.dead_node, None);
    assert_eq!(
        n1.node_state(&self_id).unwrap().heartbeat(),
        Heartbeat(heartbeat.0 + 1)
    );
    let envelope = wire::decode_envelope(&syn).expect("the round's Syn decodes (buffer cleared)");
    assert_eq!(envelope.version, ProtocolVersion::V1);
    assert_eq!(envelope.message, n1.create_syn_message());
    n1.end_gossip_round();

    let peer = ChitchatId::for_local_test(20_003);
    for hb in 1..=3 {
        clock.advance(Duration::from_millis(100));
        n1.report_heartbeat(&peer, Heartbeat(hb));
    }
    let before = n1.live_nodes_watcher().borrow().len();
    n1.begin_gossip_round(&mut syn);
    assert!(
        !n1.live_nodes().any(|id| *id == peer),
        "liveness waits for the round's end"
    );
    n1.end_gossip_round();
    assert!(n1.live_nodes().any(|id| *id == peer));
    assert_eq!(n1.live_nodes_watcher().borrow().len(), before + 1);
    let targets = n1.begin_gossip_round(&mut syn);
    assert_eq!(targets.nodes, vec![peer.gossip_advertise_addr]);
}

/// The server's three steps (admit under the lock, decode without it, handle under it) do
/// exactly what `handle_datagram_from` does: same replies, same refusals, same state.
#[test]
fn admit_decode_handle_equals_handle_datagram_from() {
    use crate::protocol::{Received, decode_received};

    let clock = ManualClock::new();
    let twin = || node_with(config(7001), &clock, vec![("a", "1"), ("b", "2")]);
    let (mut whole, mut split, mut answerer) = (twin(), twin(), twin());
    let peer = node(7002, &clock);
    let mut other_cluster = config(7003);
    other_cluster.cluster_id = "another".to_string();
    let outsider = node_with(other_cluster, &clock, Vec::new());
    let stranger = SocketAddr::from(([127, 0, 0, 1], 7999));
    let peer_addr = peer.self_chitchat_id().gossip_advertise_addr;
    let encode = |message: ChitchatMessage| {
        wire::encode_envelope(&ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message,
        })
        .expect("encodes")
    };
    let unsolicited_syn_ack = answerer
        .process_message(peer.create_syn_message())
        .expect("a syn-ack");
    let datagrams = [
        (peer_addr, encode(peer.create_syn_message()), false),
        (stranger, encode(outsider.create_syn_message()), true),
        (stranger, encode(unsolicited_syn_ack), false),
        (stranger, vec![0xFF, 0x00, 0x13], false),
        (peer_addr, Vec::new(), false),
    ];
    for (from, payload, other_cluster) in &datagrams {
        let mut reply_whole = Vec::new();
        let mut reply_split = Vec::new();
        let expected = whole.handle_datagram_from(*from, payload, &mut reply_whole, None);
        let admission = split
            .admit_datagram(*from, payload.len())
            .expect("within the allowance");
        let cluster_id = split.config().cluster_id.clone();
        let got = decode_received(&cluster_id, payload, |received| {
            assert_eq!(
                matches!(received, Received::OtherClusterSyn { .. }),
                *other_cluster
            );
            split.handle_received(*from, admission, received, &mut reply_split, None)
        });
        match (expected, got) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "outcome of {payload:?}"),
            (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind()),
            (a, b) => panic!("diverged on {payload:?}: {a:?} vs {b:?}"),
        }
        assert_eq!(reply_whole, reply_split);
    }
    assert_eq!(whole.stats(), split.stats());
    assert_eq!(whole.stats().unsolicited_syn_ack, 1);
    assert_eq!(whole.stats().bad_cluster_sent, 1);
    assert_eq!(
        whole.state_snapshot().node_states,
        split.state_snapshot().node_states
    );
}

/// `AmplificationLimits::off()`: a flooding non-member is answered in full and an unsolicited
/// SynAck applied, as chitchat does; the default limits drop both.
#[test]
fn amplification_limits_off_treats_every_source_as_a_member() {
    use crate::protocol::amplification::AmplificationLimits;

    let clock = ManualClock::new();
    let stranger = SocketAddr::from(([127, 0, 0, 1], 7999));
    // Incompressible values (deltas are zstd-compressed): a little LCG's letters.
    let mut seed = 0x2545_f491_u32;
    let mut letter = move || {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        char::from(b'a' + (seed >> 16) as u8 % 26)
    };
    let state: Vec<(String, String)> = (0..200)
        .map(|i| (format!("key-{i:03}"), (0..200).map(|_| letter()).collect()))
        .collect();
    let run = |limits: AmplificationLimits| {
        let kvs = state
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut node = node_with(config(7001), &clock, kvs);
        node.set_amplification_limits(limits);
        let mut answerer = node_with(config(7002), &clock, vec![("x", "1")]);
        let empty_syn = wire::encode_envelope(&ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: "test-cluster".to_string(),
                digest: Digest::default(),
            },
        })
        .expect("encodes");
        let mut reply = Vec::new();
        let mut replied_bytes = 0;
        for _ in 0..1_000 {
            let outcome = node
                .handle_datagram_from(stranger, &empty_syn, &mut reply, None)
                .expect("decodes");
            if outcome.replied {
                replied_bytes += reply.len();
            }
        }
        let syn_ack = answerer
            .process_message(node.create_syn_message())
            .expect("a syn-ack");
        let syn_ack = wire::encode_envelope(&ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: syn_ack,
        })
        .expect("encodes");
        node.handle_datagram_from(stranger, &syn_ack, &mut reply, None)
            .expect("decodes");
        (replied_bytes, node.stats().unsolicited_syn_ack)
    };
    let (limited_bytes, limited_unsolicited) = run(AmplificationLimits::default());
    let (off_bytes, off_unsolicited) = run(AmplificationLimits::off());
    assert_eq!(limited_unsolicited, 1);
    assert_eq!(off_unsolicited, 0);
    // 1,000 empty 12-byte Syns: the default budget is 3× 12 kB plus the 256 KiB allowance.
    assert!(
        limited_bytes <= 3 * 12 * 1_000 + 256 * 1024,
        "{limited_bytes}"
    );
    assert!(
        off_bytes > 10 * limited_bytes,
        "{off_bytes} vs {limited_bytes}"
    );
}

/// A growing node-state map is repacked each round that finds a quarter of it new, without
/// waiting for membership to settle (issue 11: the half-full leaves of a map filled in id order
/// made a large cluster's peak), and the states stay what they were.
#[test]
fn a_growing_node_state_map_is_repacked_before_it_settles() {
    let clock = ManualClock::new();
    let mut n1 = node(10_001, &clock);
    let own = n1.self_chitchat_id().clone();
    let remote = |n: &Chitchat| -> Vec<(ChitchatId, String)> {
        n.node_states()
            .iter()
            .filter(|(id, _)| **id != own)
            .map(|(id, state)| (id.clone(), format!("{state:?}")))
            .collect()
    };
    let mut syn = Vec::new();
    let mut round = |n: &mut Chitchat| {
        clock.advance(Duration::from_millis(100));
        n.begin_gossip_round(&mut syn);
        n.end_gossip_round();
    };
    let mut port = 20_000u16;
    let mut add = |n: &mut Chitchat, count: u16| {
        // In id order, as one peer's deltas deliver them.
        for _ in 0..count {
            let id = ChitchatId::new(format!("node-{port}"), 1, ([127, 0, 0, 1], port).into());
            let kvs = (0..3u64).map(|k| {
                let value = VersionedValue::new(format!("value-{k}"), k + 1, false);
                (format!("key-{k}"), value)
            });
            n.reset_node_state_if_update(&id, kvs, 3, 0);
            port += 1;
        }
    };
    // Batches of a quarter of the map or more: each round after one repacks.
    for batch in [100, 64, 70, 90] {
        // The own state counts in the first.
        let pending = n1.node_states_inserted_since_pack();
        add(&mut n1, batch);
        assert_eq!(
            n1.node_states_inserted_since_pack(),
            pending + usize::from(batch)
        );
        let before = remote(&n1);
        round(&mut n1);
        assert_eq!(n1.node_states_inserted_since_pack(), 0, "batch of {batch}");
        assert!(before == remote(&n1), "the states changed when repacked");
        assert!(
            !n1.node_states_compacted(),
            "the membership has not settled"
        );
    }
    // 325 states: 64 more are under a quarter, so they wait for the settled repack.
    add(&mut n1, 64);
    round(&mut n1);
    assert_eq!(n1.node_states_inserted_since_pack(), 64);
    // Fewer than the minimum never trigger it either, even in a small map.
    let mut small = node(10_002, &clock);
    add(&mut small, 40);
    round(&mut small);
    assert_eq!(
        small.node_states_inserted_since_pack(),
        41,
        "own state and 40"
    );
    for _ in 0..12 {
        round(&mut n1);
    }
    assert!(n1.node_states_compacted());
    assert_eq!(n1.node_states_inserted_since_pack(), 0);
    assert_eq!(remote(&n1).len(), 388);
}

/// The node-state map is repacked once membership settles (issue 11): the states, their order
/// and what a peer is sent stay the same, states of many keys included.
#[test]
fn node_states_repacked_after_settling_keep_their_content() {
    let clock = ManualClock::new();
    let mut n1 = node(10_001, &clock);
    // Ids created in a scrambled order, as gossip discovers them.
    for i in 0..120u16 {
        let port = 20_000 + (i * 37) % 120;
        let id = ChitchatId::new(format!("node-{port}"), 1, ([127, 0, 0, 1], port).into());
        let keys = if i % 10 == 0 { 50 } else { 3 };
        let kvs = (0..keys).map(|k| {
            let value = VersionedValue::new(format!("value-{k}"), k + 1, false);
            (format!("key-{k:02}"), value)
        });
        n1.reset_node_state_if_update(&id, kvs, keys, 0);
    }
    // Remote states only: the own heartbeat rises every round.
    let own = n1.self_chitchat_id().clone();
    let remote = |n: &Chitchat| -> Vec<(ChitchatId, String)> {
        n.node_states()
            .iter()
            .filter(|(id, _)| **id != own)
            .map(|(id, state)| (id.clone(), format!("{state:?}")))
            .collect()
    };
    let before = remote(&n1);
    assert_eq!(before.len(), 120);
    assert!(!n1.node_states_compacted());
    let mut syn = Vec::new();
    for _ in 0..12 {
        clock.advance(Duration::from_millis(100));
        n1.begin_gossip_round(&mut syn);
        n1.end_gossip_round();
    }
    assert!(
        n1.node_states_compacted(),
        "12 settled rounds repack the map"
    );
    let after = remote(&n1);
    assert!(before == after, "the states changed when repacked");
    // A newcomer learns every state from the repacked node.
    let mut n2 = node(10_002, &clock);
    for _ in 0..40 {
        handshake(&mut n2, &mut n1);
    }
    for (id, _) in &before {
        assert_eq!(visible(&n1, id), visible(&n2, id), "{id:?}");
    }
    assert_eq!(n2.node_states().len(), n1.node_states().len());
}

/// 100 ms later: a heartbeat from each of `peers`, then `node`'s round (its targets).
fn round_hearing_from(
    clock: &ManualClock,
    node: &mut Chitchat,
    peers: &[(&ChitchatId, u64)],
) -> crate::protocol::GossipTargets {
    clock.advance(Duration::from_millis(100));
    for (peer, heartbeat) in peers {
        node.report_heartbeat(peer, Heartbeat(*heartbeat));
    }
    let mut syn = Vec::new();
    let targets = node.begin_gossip_round(&mut syn);
    node.end_gossip_round();
    targets
}

/// While no state is added or removed, no node changes liveness and no tombstone can be due,
/// a round walks no node state; a tombstone (own or received) is still collected in the first
/// round after its grace period, by a round that walks them.
#[test]
fn rounds_that_walk_no_state_still_collect_tombstones_when_due() {
    let clock = ManualClock::new();
    let grace = Duration::from_secs(10);
    let mut cfg1 = config(1);
    cfg1.marked_for_deletion_grace_period = grace;
    let mut n1 = node_with(cfg1, &clock, vec![("mine", "1")]);
    let mut cfg2 = config(2);
    cfg2.marked_for_deletion_grace_period = grace;
    let mut n2 = node_with(cfg2, &clock, vec![("theirs", "2")]);
    let id1 = n1.self_chitchat_id().clone();
    let id2 = n2.self_chitchat_id().clone();
    let mut syn = Vec::new();
    for _ in 0..10 {
        clock.advance(Duration::from_millis(100));
        handshake(&mut n1, &mut n2);
        n1.begin_gossip_round(&mut syn);
        n1.end_gossip_round();
    }
    assert!(n1.live_nodes().any(|id| *id == id2), "n2 is live at n1");

    n1.self_node_state().delete("mine");
    n2.self_node_state().delete("theirs");
    handshake(&mut n2, &mut n1);
    let tombstone = |n: &Chitchat, id: &ChitchatId, key: &str| {
        n.node_state(id)
            .and_then(|state| state.get_versioned(key))
            .is_some_and(VersionedValue::is_deleted)
    };
    assert!(tombstone(&n1, &id1, "mine") && tombstone(&n1, &id2, "theirs"));
    let deleted_at = clock.now();
    let walked = n1.rounds_walked;
    let mut rounds = 0;
    while clock.now() + Duration::from_millis(100) < deleted_at + grace {
        clock.advance(Duration::from_millis(100));
        handshake(&mut n1, &mut n2);
        n1.begin_gossip_round(&mut syn);
        n1.end_gossip_round();
        rounds += 1;
    }
    assert!(rounds > 90, "{rounds} rounds within the grace period");
    assert_eq!(n1.rounds_walked, walked, "no round walked the states");
    assert!(tombstone(&n1, &id1, "mine") && tombstone(&n1, &id2, "theirs"));

    clock.advance(Duration::from_millis(200));
    n1.begin_gossip_round(&mut syn);
    n1.end_gossip_round();
    assert_eq!(n1.rounds_walked, walked + 1, "the due round walked them");
    let gone = |n: &Chitchat, id: &ChitchatId, key: &str| {
        n.node_state(id)
            .is_some_and(|state| state.get_versioned(key).is_none())
    };
    assert!(gone(&n1, &id1, "mine"), "own tombstone collected");
    assert!(gone(&n1, &id2, "theirs"), "received tombstone collected");
    // Nothing left to collect: the next rounds walk nothing again.
    round_hearing_from(&clock, &mut n1, &[]);
    assert_eq!(n1.rounds_walked, walked + 1);
}

/// Rounds that walk no state draw from the live and dead sets of the last evaluation: a node
/// that died is never a live target after, and is the round's dead target now and then.
#[test]
fn rounds_that_walk_no_state_follow_liveness() {
    let clock = ManualClock::new();
    let mut n1 = node(1, &clock);
    let alive = ChitchatId::for_local_test(2);
    let dying = ChitchatId::for_local_test(3);
    for hb in 1..=5 {
        round_hearing_from(&clock, &mut n1, &[(&alive, hb), (&dying, hb)]);
    }
    let walked = n1.rounds_walked;
    let both = [alive.gossip_advertise_addr, dying.gossip_advertise_addr];
    for hb in 6..=20 {
        let targets = round_hearing_from(&clock, &mut n1, &[(&alive, hb), (&dying, hb)]);
        let mut nodes = targets.nodes.clone();
        nodes.sort();
        assert_eq!(nodes, both.to_vec(), "both live nodes, each once");
        assert_eq!(targets.dead_node, None);
    }
    assert_eq!(n1.rounds_walked, walked, "steady rounds walk nothing");

    let mut hb = 21;
    while !n1.dead_nodes().any(|id| *id == dying) {
        assert!(hb < 200, "the silent node never died");
        round_hearing_from(&clock, &mut n1, &[(&alive, hb)]);
        hb += 1;
    }
    let mut dead_picks = 0;
    for _ in 0..40 {
        let targets = round_hearing_from(&clock, &mut n1, &[(&alive, hb)]);
        hb += 1;
        assert_eq!(targets.nodes, vec![alive.gossip_advertise_addr]);
        if targets.dead_node == Some(dying.gossip_advertise_addr) {
            dead_picks += 1;
        }
    }
    assert!(
        dead_picks > 0,
        "the dead node is gossiped with now and then"
    );
    assert_eq!(n1.rounds_walked, walked, "a liveness change needs no walk");
}
