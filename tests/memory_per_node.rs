//! Heap bytes a node pays per remote node state and per key-value (issue 11), counted by a
//! global allocator that tracks live bytes: 1,000 remote states of 10 keys, then 1,000 rounds
//! of rising heartbeats so that every failure-detector window fills up. One test in this
//! binary, so that nothing else allocates while it counts.
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use chitchat_uring::message::{Digest, NodeDigest};
use chitchat_uring::wire::encode_envelope;
use chitchat_uring::*;
use tokio::sync::watch;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is only
// arithmetic on the sizes the caller passes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout` (through `alloc` above).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const NODES: u16 = 1_000;
const KEYS: u64 = 10;

fn id(i: u16) -> ChitchatId {
    ChitchatId::new(
        format!("node-{i:05}"),
        1,
        ([127, 0, 0, 2], 10_000 + i).into(),
    )
}

/// A Syn whose digest gives every remote node `heartbeat`.
fn syn(heartbeat: u64) -> Vec<u8> {
    let mut digest = Digest::default();
    for i in 0..NODES {
        digest.add_node(id(i), NodeDigest::new(heartbeat.into(), 0, KEYS));
    }
    encode_envelope(&ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn {
            cluster_id: "bench".into(),
            digest,
        },
    })
    .unwrap()
}

#[test]
fn bytes_per_node_state_and_key_value() {
    let mut config = ChitchatConfig::for_test(7000);
    config.cluster_id = "bench".into();
    let (_tx, rx) = watch::channel(HashSet::new());
    let clock = ManualClock::new();
    let mut node = Chitchat::with_clock(config, rx, vec![], Clock::Manual(clock.clone()), 7);
    let mut reply = Vec::with_capacity(65_536);
    // Warm up the per-thread codec buffers before counting.
    let empty = encode_envelope(&ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn {
            cluster_id: "bench".into(),
            digest: Digest::default(),
        },
    })
    .unwrap();
    node.handle_datagram(&empty, &mut reply, None).unwrap();

    let before_states = live();
    // First without keys, then reset with them: the difference is what the key-values take.
    for i in 0..NODES {
        node.reset_node_state_if_update(&id(i), std::iter::empty(), KEYS, 0);
    }
    let bare = live() - before_states;
    for i in 0..NODES {
        let kvs = (0..KEYS).map(|k| {
            let value = VersionedValue {
                value: format!("{k:032}"),
                version: k + 1,
                status: DeletionStatus::Set,
            };
            (format!("key-{k:02}"), value)
        });
        node.reset_node_state_if_update(&id(i), kvs, 2 * KEYS, 0);
    }
    let states = live() - before_states;

    // Rising heartbeats every 100 ms: each node's failure-detector window fills with
    // `sampling_window_size` intervals.
    let window = node.config().failure_detector_config.sampling_window_size as u64;
    for heartbeat in 1..=window + 2 {
        clock.advance(Duration::from_millis(100));
        node.handle_datagram(&syn(heartbeat), &mut reply, None)
            .unwrap();
    }
    let all = live() - before_states;
    let nodes = NODES as isize;
    let per_bare_state = bare / nodes;
    let per_key_value = (states - bare) / (nodes * KEYS as isize);
    let per_state = states / nodes;
    let per_state_with_window = all / nodes;
    println!(
        "memory: {per_bare_state} B per node state without keys, {per_key_value} B per \
         key-value (6-byte key, 32-byte value), {per_state} B per node state of {KEYS} keys, \
         {per_state_with_window} B with a full failure-detector window of {window} intervals"
    );
    assert_eq!(node.node_states().len(), usize::from(NODES) + 1);
    // 6,272 B before the failure-detector window kept block sums (a full window of 1,000
    // `f32` intervals was 4 KB of it), 2,275 B after, 2,107 B with interned keys and 1,961 B
    // with exact-size key-value maps and one shared context per node.
    assert!(
        per_state_with_window < 2_200,
        "{per_state_with_window} B per node state"
    );
}
