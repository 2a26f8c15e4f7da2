//! The harness of scripts/instructions.sh (run under callgrind): handle_datagram on a node holding 1,000
//! remote states of 10 keys, for an up-to-date Syn, an empty-digest Syn and an Ack of one key.
use std::collections::HashSet;
use std::time::Duration;
use chitchat_uring::message::{Delta, Digest, KeyValueUpdate, NodeDelta};
use chitchat_uring::types::DeletionStatusMutation;
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
    // The datagrams of every run are encoded whatever `iters` is, so that the set-up counted
    // by the 0-iteration run is the same.
    let datagrams: Vec<Vec<u8>> = if case == "ack" {
        // Acks each setting node-00000's key-00 one version up.
        let writer = ChitchatId::new("node-00000".to_string(), 1, ([127, 0, 0, 2], 10000).into());
        (0..200u64).map(|i| {
            let delta = Delta { node_deltas: vec![NodeDelta {
                chitchat_id: writer.clone(), from_version_excluded: 10 + i, last_gc_version: 0,
                max_version: 11 + i,
                key_values: vec![KeyValueUpdate { key: "key-00".into(), value: format!("{i:032}"),
                    version: 11 + i, status: DeletionStatusMutation::Set }] }] };
            encode_envelope(&ChitchatEnvelope { version: ProtocolVersion::V0,
                message: ChitchatMessage::Ack { delta } }).unwrap()
        }).collect()
    } else {
        let digest = if case == "up" { c.compute_digest() } else { Digest::default() };
        let syn = encode_envelope(&ChitchatEnvelope { version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn { cluster_id: "bench".into(), digest } }).unwrap();
        vec![syn; 200]
    };
    let mut reply = Vec::with_capacity(65_536);
    let mut total = 0usize;
    for datagram in datagrams.iter().take(iters) {
        c.handle_datagram(datagram, &mut reply, None).unwrap();
        total += reply.len();
    }
    println!("{case}: {iters} datagrams of {} B, {} reply bytes", datagrams[0].len(), total);
}
