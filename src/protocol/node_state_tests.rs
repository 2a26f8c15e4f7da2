//! Rules of one node state: versions, deletions, TTLs, GC, and how deltas apply (SPEC §4.5, §4.7).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::clock::{Clock, ManualClock};
use crate::message::{KeyValueUpdate, NodeDelta};
use crate::protocol::listener::Listeners;
use crate::protocol::node_state::{DeltaStatus, KeyValueError, NodeState};
use crate::types::{ChitchatId, DeletionStatus, DeletionStatusMutation, Heartbeat, VersionedValue};
use crate::wire::DeltaView;

/// [`NodeState::delta_status`] of an owned node delta.
fn delta_status(state: &NodeState, delta: &NodeDelta) -> DeltaStatus {
    let view = DeltaView::of_node_deltas(std::slice::from_ref(delta));
    let node_delta = view.node_deltas().next().expect("one node delta");
    state.delta_status(node_delta)
}

fn state_with_clock() -> (NodeState, ManualClock) {
    let clock = ManualClock::new();
    let state = NodeState::new(
        ChitchatId::for_local_test(10_001),
        Listeners::default(),
        Clock::from(clock.clone()),
    );
    (state, clock)
}

fn kv(key: &str, value: &str, version: u64, status: DeletionStatusMutation) -> KeyValueUpdate {
    KeyValueUpdate {
        key: key.to_string(),
        value: value.to_string(),
        version,
        status,
    }
}

fn set_kv(key: &str, value: &str, version: u64) -> KeyValueUpdate {
    kv(key, value, version, DeletionStatusMutation::Set)
}

fn node_delta(from: u64, last_gc: u64, max: u64, key_values: Vec<KeyValueUpdate>) -> NodeDelta {
    NodeDelta {
        chitchat_id: ChitchatId::for_local_test(10_001),
        from_version_excluded: from,
        last_gc_version: last_gc,
        max_version: max,
        key_values,
    }
}

#[test]
fn first_version_is_one_and_each_set_bumps_it() {
    let mut state = NodeState::for_test();
    state.set("key_a", "1");
    assert_eq!(state.get_versioned("key_a").unwrap().version, 1);
    state.set("key_b", "2");
    state.set("key_a", "3");
    assert_eq!(state.get_versioned("key_a").unwrap().version, 3);
    assert_eq!(state.get_versioned("key_b").unwrap().version, 2);
    assert_eq!(state.max_version(), 3);
}

#[test]
fn setting_the_same_value_is_a_no_op() {
    let mut state = NodeState::for_test();
    state.set("k", "v");
    state.set("k", "v");
    assert_eq!(state.get_versioned("k").unwrap().version, 1);
    assert_eq!(state.max_version(), 1);
    // The same value with another status is a change.
    state.set_with_ttl("k", "v");
    assert_eq!(state.get_versioned("k").unwrap().version, 2);
    state.set_with_ttl("k", "v");
    assert_eq!(state.max_version(), 2);
}

#[test]
fn delete_leaves_a_versioned_tombstone() {
    let (mut state, clock) = state_with_clock();
    state.set("k", "v");
    state.delete("k");
    let tombstone = state.get_versioned("k").unwrap();
    assert_eq!(tombstone.value, "");
    assert_eq!(tombstone.version, 2);
    assert_eq!(
        tombstone.status,
        DeletionStatus::Deleted(clock.now().into())
    );
    assert_eq!(state.get("k"), None);
    assert!(!state.contains_key("k"));
    assert_eq!(state.num_key_values(), 0);
    // Deleting again still bumps the version; deleting an absent key does nothing.
    state.delete("k");
    assert_eq!(state.get_versioned("k").unwrap().version, 3);
    state.delete("absent");
    assert_eq!(state.max_version(), 3);
    // Setting after a delete revives the key.
    state.set("k", "back");
    assert_eq!(state.get("k"), Some("back"));
}

#[test]
fn ttl_values_stay_visible_until_collected() {
    let (mut state, clock) = state_with_clock();
    state.set_with_ttl("ttl", "v");
    state.set("plain", "p");
    state.delete_after_ttl("plain");
    assert_eq!(state.get("ttl"), Some("v"));
    assert_eq!(state.get("plain"), Some("p"));
    assert!(matches!(
        state.get_versioned("plain").unwrap().status,
        DeletionStatus::DeleteAfterTtl(_)
    ));
    assert_eq!(state.max_version(), 3);
    let grace = Duration::from_secs(10);
    clock.advance(Duration::from_secs(5));
    state.gc_keys_marked_for_deletion(grace, clock.now());
    assert_eq!(state.num_key_values(), 2);
    clock.advance(Duration::from_secs(5));
    state.gc_keys_marked_for_deletion(grace, clock.now());
    assert_eq!(state.num_key_values(), 0);
    assert_eq!(state.last_gc_version(), 3);
    assert_eq!(state.max_version(), 3, "GC never lowers max_version");
}

#[test]
fn delete_after_ttl_does_not_resurrect_a_deleted_key() {
    let mut state = NodeState::for_test();
    state.set("k", "v");
    state.delete("k");
    state.delete_after_ttl("k");
    assert_eq!(state.get("k"), None);
    assert_eq!(state.max_version(), 2);
}

#[test]
fn gc_collects_only_expired_entries_and_tracks_last_gc_version() {
    let (mut state, clock) = state_with_clock();
    state.set("a", "1");
    state.set("b", "2");
    state.delete("a"); // v3 at t0
    clock.advance(Duration::from_secs(4));
    state.delete("b"); // v4 at t0+4
    clock.advance(Duration::from_secs(6));
    state.gc_keys_marked_for_deletion(Duration::from_secs(10), clock.now());
    assert!(state.get_versioned("a").is_none());
    assert!(state.get_versioned("b").is_some());
    assert_eq!(state.last_gc_version(), 3);
}

#[test]
fn iter_prefix_returns_visible_keys_in_order() {
    let mut state = NodeState::for_test();
    state.set("Europe", "");
    state.set("Europe:", "");
    state.set("Europe:Italy", "");
    state.set("Africa:Uganda", "");
    state.set("Oceania", "");
    state.set("Europe:UK", "");
    state.delete("Europe:UK");
    let keys: Vec<&str> = state.iter_prefix("Europe:").map(|(k, _)| k).collect();
    assert_eq!(keys, vec!["Europe:", "Europe:Italy"]);
}

#[test]
fn keys_peers_cannot_take_are_refused_with_a_reason() {
    let mut state = NodeState::for_test();
    let err = state.try_set("éclair", "v").unwrap_err();
    assert!(matches!(err, KeyValueError::NonAsciiFirstChar { .. }));
    assert!(err.to_string().contains("non-ASCII"));
    // `set` logs and refuses without panicking; a multi-byte character later in the key is fine.
    state.set("🦀", "v");
    assert_eq!(state.max_version(), 0);
    state.try_set("crab-🦀", "v").unwrap();
    assert_eq!(state.get("crab-🦀"), Some("v"));

    let huge = "x".repeat(70_000);
    assert!(matches!(
        state.try_set("big", &huge).unwrap_err(),
        KeyValueError::TooLarge { .. }
    ));
    let limit = crate::wire::max_key_value_len(state.chitchat_id());
    state.try_set("k", "x".repeat(limit - 1)).unwrap();
}

#[test]
fn heartbeat_first_value_is_not_an_update() {
    let mut state = NodeState::for_test();
    assert!(!state.try_set_heartbeat(Heartbeat(5)));
    assert_eq!(state.heartbeat(), Heartbeat(5));
    assert!(!state.try_set_heartbeat(Heartbeat(5)));
    assert!(!state.try_set_heartbeat(Heartbeat(4)));
    assert_eq!(state.heartbeat(), Heartbeat(5));
    assert!(state.try_set_heartbeat(Heartbeat(6)));
}

#[test]
fn apply_delta_simple() {
    let (mut state, _clock) = state_with_clock();
    let delta = node_delta(0, 0, 2, vec![set_kv("k1", "v1", 1), set_kv("k2", "v2", 2)]);
    assert_eq!(delta_status(&state, &delta), DeltaStatus::Apply);
    state.apply_delta(&delta, _clock.now());
    assert_eq!(state.get("k1"), Some("v1"));
    assert_eq!(state.get("k2"), Some("v2"));
    assert_eq!(state.max_version(), 2);
}

#[test]
fn apply_same_value_with_a_new_version_updates_the_version() {
    let (mut state, clock) = state_with_clock();
    state.apply_delta(&node_delta(0, 0, 1, vec![set_kv("k", "v", 1)]), clock.now());
    let delta = node_delta(1, 0, 3, vec![set_kv("k", "v", 3)]);
    assert_eq!(delta_status(&state, &delta), DeltaStatus::Apply);
    state.apply_delta(&delta, clock.now());
    assert_eq!(state.get_versioned("k").unwrap().version, 3);
}

#[test]
fn delta_from_the_future_is_rejected() {
    let (mut state, clock) = state_with_clock();
    state.apply_delta(&node_delta(0, 0, 2, vec![set_kv("k", "v", 2)]), clock.now());
    let delta = node_delta(3, 0, 6, vec![set_kv("k", "later", 6)]);
    assert_eq!(delta_status(&state, &delta), DeltaStatus::Reject);
}

#[test]
fn a_higher_last_gc_below_our_max_is_compatible() {
    let (mut state, clock) = state_with_clock();
    state.apply_delta(&node_delta(0, 0, 5, vec![set_kv("k", "v", 5)]), clock.now());
    let delta = node_delta(5, 4, 7, vec![set_kv("k2", "v", 7)]);
    assert_eq!(delta_status(&state, &delta), DeltaStatus::Apply);
}

#[test]
fn delta_accepted_when_sender_gc_equals_receiver_max() {
    // quickwit-oss/chitchat#176: the boundary is inclusive.
    let (mut state, clock) = state_with_clock();
    state.apply_delta(&node_delta(0, 0, 5, vec![set_kv("k", "v", 5)]), clock.now());
    let delta = node_delta(5, 5, 6, vec![set_kv("k2", "v", 6)]);
    assert_eq!(delta_status(&state, &delta), DeltaStatus::Apply);
    let equal_gc_not_newer = node_delta(0, 5, 5, vec![]);
    assert_eq!(
        delta_status(&state, &equal_gc_not_newer),
        DeltaStatus::Reject,
        "gc == max is compatible, so no reset; nothing newer, so rejected"
    );
}

#[test]
fn reset_on_a_fresher_gc_and_not_on_an_older_one() {
    let (mut state, clock) = state_with_clock();
    state.apply_delta(
        &node_delta(0, 0, 2, vec![set_kv("old", "v", 2)]),
        clock.now(),
    );
    let incompatible_not_reset = node_delta(1, 10, 12, vec![set_kv("k", "v", 12)]);
    assert_eq!(
        delta_status(&state, &incompatible_not_reset),
        DeltaStatus::Reject
    );
    let reset = node_delta(0, 10, 12, vec![set_kv("k", "v", 12)]);
    assert_eq!(delta_status(&state, &reset), DeltaStatus::ApplyAfterReset);
    state.reset_for_delta(reset.last_gc_version);
    state.apply_delta(&reset, clock.now());
    assert_eq!(state.get("old"), None);
    assert_eq!(state.get("k"), Some("v"));
    assert_eq!(state.monotonic_property(), (10, 12));
    assert_eq!(state.heartbeat(), Heartbeat(0));
}

#[test]
fn reset_does_not_violate_the_monotonic_property() {
    // quickwit-oss/chitchat#178: (50, 70) → (120, 80) is an increase.
    let (mut state, clock) = state_with_clock();
    state.apply_delta(
        &node_delta(0, 0, 70, vec![set_kv("k", "v", 70)]),
        clock.now(),
    );
    state.set_last_gc_version(50);
    let before = state.monotonic_property();
    let reset = node_delta(0, 120, 80, vec![]);
    assert_eq!(delta_status(&state, &reset), DeltaStatus::ApplyAfterReset);
    state.reset_for_delta(reset.last_gc_version);
    state.apply_delta(&reset, clock.now());
    assert_eq!(state.monotonic_property(), (120, 80));
    assert!(state.monotonic_property() > before);
}

#[test]
fn tombstones_at_or_below_last_gc_are_skipped() {
    let (mut state, clock) = state_with_clock();
    let reset = node_delta(
        0,
        5,
        8,
        vec![
            kv("gone", "", 4, DeletionStatusMutation::Delete),
            kv("ttl", "t", 5, DeletionStatusMutation::DeleteAfterTtl),
            set_kv("kept", "k", 6),
            kv("fresh-tombstone", "", 8, DeletionStatusMutation::Delete),
        ],
    );
    state.reset_for_delta(5);
    state.apply_delta(&reset, clock.now());
    assert!(state.get_versioned("gone").is_none());
    assert!(state.get_versioned("ttl").is_none());
    assert_eq!(state.get("kept"), Some("k"));
    assert!(state.get_versioned("fresh-tombstone").unwrap().is_deleted());
    assert_eq!(state.max_version(), 8);
}

#[test]
fn received_statuses_are_stamped_with_local_time() {
    let (mut state, clock) = state_with_clock();
    clock.advance(Duration::from_secs(42));
    let delta = node_delta(
        0,
        0,
        2,
        vec![
            kv("d", "", 1, DeletionStatusMutation::Delete),
            kv("t", "x", 2, DeletionStatusMutation::DeleteAfterTtl),
        ],
    );
    state.apply_delta(&delta, clock.now());
    assert_eq!(
        state.get_versioned("d").unwrap().status,
        DeletionStatus::Deleted(clock.now().into())
    );
    assert_eq!(
        state.get_versioned("t").unwrap().status,
        DeletionStatus::DeleteAfterTtl(clock.now().into())
    );
}

#[test]
fn a_forged_lower_max_version_does_not_lower_ours() {
    let (mut state, clock) = state_with_clock();
    let delta = node_delta(0, 0, 1, vec![set_kv("a", "1", 1), set_kv("b", "2", 9)]);
    state.apply_delta(&delta, clock.now());
    assert_eq!(state.max_version(), 9);
}

#[test]
fn listeners_fire_for_sets_and_ttls_but_not_deletes() {
    let listeners = Listeners::default();
    let count = Arc::new(AtomicUsize::new(0));
    let count_clone = count.clone();
    let _handle = listeners.subscribe("", move |_| {
        count_clone.fetch_add(1, Ordering::SeqCst);
    });
    let mut state = NodeState::new(
        ChitchatId::for_local_test(1),
        listeners.clone(),
        Clock::System,
    );
    state.set("a", "1");
    state.set("a", "1");
    state.set_with_ttl("b", "2");
    state.delete("a");
    state.delete_after_ttl("b");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // Received values notify too, once, and only when newer.
    state.set_versioned_value("c", VersionedValue::for_test("3", 10));
    state.set_versioned_value("c", VersionedValue::for_test("3", 10));
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[test]
fn stale_key_values_are_sorted_by_version_above_the_floor() {
    let mut state = NodeState::for_test();
    state.set("z", "1");
    state.set("a", "2");
    state.set("m", "3");
    state.set("z", "4");
    state.delete("m");
    let stale: Vec<(&str, u64)> = state
        .stale_key_values(2)
        .into_iter()
        .map(|(k, v)| (k, v.version))
        .collect();
    assert_eq!(stale, vec![("z", 4), ("m", 5)]);
    assert_eq!(state.num_stale_key_values(0), 2, "unknown: visible keys");
    assert_eq!(
        state.num_stale_key_values(2),
        2,
        "known: newer incl. tombstones"
    );
}

#[test]
fn a_stale_copy_of_our_own_state_is_superseded() {
    let mut state = NodeState::for_test();
    state.set("current", "now");
    let stale = NodeDelta {
        chitchat_id: state.chitchat_id().clone(),
        from_version_excluded: 0,
        last_gc_version: 0,
        max_version: 40,
        key_values: vec![set_kv("current", "then", 30), set_kv("leftover", "x", 40)],
    };
    state.supersede_stale_self_copy(&stale);
    assert!(state.max_version() > 40);
    assert_eq!(state.get("current"), Some("now"));
    assert!(state.get_versioned("current").unwrap().version > 40);
    let leftover = state.get_versioned("leftover").unwrap();
    assert!(leftover.is_deleted() && leftover.version > 40);
    // A copy that is not ahead of us changes nothing.
    let max = state.max_version();
    state.supersede_stale_self_copy(&node_delta(0, 0, 3, vec![set_kv("x", "y", 3)]));
    assert_eq!(state.max_version(), max);
}

#[test]
fn json_shape_matches_chitchat() {
    let mut state = NodeState::for_test();
    state.set("k1", "v1");
    state.set_with_ttl("k2", "v2");
    state.set("k3", "v3");
    state.delete("k3");
    let json = serde_json::to_value(&state).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "chitchat_id": {"node_id": "test-node", "generation_id": 0, "gossip_advertise_addr": "127.0.0.1:7280"},
            "heartbeat": 0,
            "key_values": {
                "k1": {"value": "v1", "version": 1, "status": "Set"},
                "k2": {"value": "v2", "version": 2, "status": "DeleteAfterTtl"},
                "k3": {"value": "", "version": 4, "status": "Delete"},
            },
            "max_version": 4,
            "last_gc_version": 0,
        })
    );
    let back: NodeState = serde_json::from_value(json).unwrap();
    assert_eq!(back, state);
}

#[test]
fn gc_skips_states_with_nothing_due_and_still_collects_what_is() {
    let (mut state, clock) = state_with_clock();
    let grace = Duration::from_secs(10);
    state.set("a", "1");
    state.gc_keys_marked_for_deletion(grace, clock.now());
    assert_eq!(state.num_key_values(), 1);
    state.delete("a"); // t0
    clock.advance(Duration::from_secs(6));
    state.set_with_ttl("b", "2"); // t0 + 6
    clock.advance(Duration::from_secs(5));
    state.gc_keys_marked_for_deletion(grace, clock.now());
    assert!(state.get_versioned("a").is_none(), "due at t0 + 10");
    assert_eq!(state.get("b"), Some("2"), "not due before t0 + 16");
    clock.advance(Duration::from_secs(5));
    state.gc_keys_marked_for_deletion(grace, clock.now());
    assert!(state.get_versioned("b").is_none());
    assert_eq!(state.last_gc_version(), 3);
    // Received tombstones count too, and a deserialized state is scanned.
    let delta = node_delta(
        0,
        0,
        5,
        vec![kv("c", "", 5, DeletionStatusMutation::Delete)],
    );
    state.apply_delta(&delta, clock.now());
    let mut copy: NodeState =
        serde_json::from_value(serde_json::to_value(&state).unwrap()).unwrap();
    clock.advance(grace);
    state.gc_keys_marked_for_deletion(grace, clock.now());
    assert!(state.get_versioned("c").is_none());
    copy.gc_keys_marked_for_deletion(grace, std::time::Instant::now() + grace);
    assert!(copy.get_versioned("c").is_none());
}
