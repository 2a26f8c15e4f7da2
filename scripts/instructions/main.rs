//! The harness of scripts/instructions.sh (run under callgrind): handle_datagram on a node holding 1,000
//! remote states of 10 keys, for an up-to-date Syn and an empty-digest Syn.
use std::collections::HashSet;
use std::time::Duration;
use chitchat_uring::message::Digest;
use chitchat_uring::wire::encode_envelope;
use chitchat_uring::*;
use tokio::sync::watch;

fn main() {
    let case = std::env::args().nth(1).unwrap_or("up".into());
    let iters: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(200);
    let mut config = ChitchatConfig::for_test(7000);
    config.cluster_id = "bench".into();
    let (_tx, rx) = watch::channel(HashSet::new());
    let clock = ManualClock::new();
    let mut c = Chitchat::with_clock(config, rx, vec![], Clock::Manual(clock.clone()), 7);
    for i in 0..1000u16 {
        let id = ChitchatId::new(format!("node-{i:05}"), 1, ([127, 0, 0, 2], 10000 + i).into());
        let kvs = (0..10u64).map(|k| (format!("key-{k:02}"), VersionedValue {
            value: format!("{:032}", k), version: k + 1, status: DeletionStatus::Set }));
        c.reset_node_state_if_update(&id, kvs, 10, 0);
    }
    clock.advance(Duration::from_millis(10));
    let digest = if case == "up" { c.compute_digest() } else { Digest::default() };
    let syn = encode_envelope(&ChitchatEnvelope { version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn { cluster_id: "bench".into(), digest } }).unwrap();
    let mut reply = Vec::with_capacity(65_536);
    let mut total = 0usize;
    for _ in 0..iters {
        c.handle_datagram(&syn, &mut reply, None).unwrap();
        total += reply.len();
    }
    println!("{case}: {iters} Syns of {} B, {} reply bytes", syn.len(), total);
}
