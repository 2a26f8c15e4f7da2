//! The handling path under hostile input: a node holding a state (own keys, remote nodes with
//! keys and tombstones) handles fuzzed datagrams with `handle_datagram`, its own id among the
//! ids the inputs reference, with overflow checks on (fuzz/Cargo.toml). Afterwards the node
//! must still work: its replies decode, a gossip round and a local `set` run.
//!
//! Input layout: byte 0 selects the mode.
//! - even: the rest is one raw datagram.
//! - odd: the rest drives a small reader that builds well-formed messages (Syn, SynAck, Ack)
//!   whose digest entries and node deltas pick ids among {own, 3 remote nodes, a new node} and
//!   counters among {0, 1, small, 2^53, 2^64 - 2, 2^64 - 1, raw}: the prefix about the own id
//!   that raw mutation would rarely find. Up to 4 messages, the clock advancing between them.

#![no_main]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use chitchat_uring::message::{Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest};
use chitchat_uring::types::DeletionStatusMutation;
use chitchat_uring::wire::{DecodeError, Decoder, Encoder, EncodeError};
use chitchat_uring::{
    Chitchat, ChitchatConfig, ChitchatEnvelope, ChitchatId, ChitchatMessage, Clock, DeletionStatus,
    Heartbeat, ManualClock, ProtocolVersion, VersionedValue,
};
use libfuzzer_sys::fuzz_target;

const CLUSTER: &str = "fuzz-cluster";

fn own_id() -> ChitchatId {
    ChitchatId::new("node-own", 1, SocketAddr::from(([127, 0, 0, 1], 7280)))
}

fn remote_id(i: u16) -> ChitchatId {
    ChitchatId::new(
        format!("node-{i}"),
        1,
        SocketAddr::from(([127, 0, 0, 1], 7300 + i)),
    )
}

/// A node with 6 own keys (one deleted), 3 remote nodes (keys, a tombstone, a gc'd version).
/// Built per input so every input runs on the same state.
fn node(clock: &ManualClock) -> Chitchat {
    let mut config = ChitchatConfig::for_test(7280);
    config.chitchat_id = own_id();
    config.listen_addr = own_id().gossip_advertise_addr;
    config.cluster_id = CLUSTER.to_string();
    config.marked_for_deletion_grace_period = Duration::from_secs(10);
    let (_seed_tx, seed_rx) = tokio::sync::watch::channel(HashSet::new());
    let initial = (0..6)
        .map(|i| (format!("own-{i}"), format!("value-{i}")))
        .collect();
    let mut chitchat =
        Chitchat::with_clock(config, seed_rx, initial, Clock::Manual(clock.clone()), 7);
    chitchat.self_node_state().delete("own-5");
    let now = chitchat.now();
    for r in 0..3u16 {
        let id = remote_id(r);
        let gc = u64::from(r) * 2;
        let kvs: Vec<(String, VersionedValue)> = (1..=5u64)
            .map(|v| {
                let status = if v == 4 {
                    DeletionStatus::Deleted(now.into())
                } else {
                    DeletionStatus::Set
                };
                let value = VersionedValue {
                    value: format!("r{r}-{v}"),
                    version: gc + v,
                    status,
                };
                (format!("key-{v}"), value)
            })
            .collect();
        chitchat.reset_node_state_if_update(&id, kvs.into_iter(), gc + 5, gc);
    }
    // Heartbeats arrive the public way: three rounds of one Syn about all three remotes,
    // encoded once per process (the set-up is most of an execution's cost).
    let mut reply = Vec::new();
    for syn in setup_syns() {
        let _ = chitchat.handle_datagram(syn, &mut reply, None);
        clock.advance(Duration::from_millis(100));
    }
    chitchat.end_gossip_round();
    chitchat
}

thread_local! {
    /// One codec per process: creating zstd contexts per call was a fifth of an execution.
    static CODEC: std::cell::RefCell<(Encoder, Decoder)> =
        std::cell::RefCell::new((Encoder::new(), Decoder::new()));
}

fn decode_envelope(bytes: &[u8]) -> Result<ChitchatEnvelope, DecodeError> {
    CODEC.with(|codec| codec.borrow_mut().1.decode_envelope(bytes))
}

fn encode_envelope(envelope: &ChitchatEnvelope) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    CODEC.with(|codec| codec.borrow_mut().0.encode_envelope(envelope, &mut out))?;
    Ok(out)
}

/// The Syns that bring the remotes' heartbeats to 10, 20, 30.
fn setup_syns() -> &'static [Vec<u8>] {
    static SYNS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SYNS.get_or_init(|| {
        (1..=3u64)
            .map(|hb| {
                let mut digest = Digest::default();
                for r in 0..3u16 {
                    let gc = u64::from(r) * 2;
                    digest.add_node(
                        remote_id(r),
                        NodeDigest::new(Heartbeat::from(hb * 10), gc, gc + 5),
                    );
                }
                let envelope = ChitchatEnvelope {
                    version: ProtocolVersion::V0,
                    message: ChitchatMessage::Syn {
                        cluster_id: CLUSTER.to_string(),
                        digest,
                    },
                };
                encode_envelope(&envelope).expect("the set-up Syn encodes")
            })
            .collect()
    })
}

/// Reads the structured mode's choices from the input; past its end, everything is 0.
struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((first, rest)) => {
                self.data = rest;
                *first
            }
            None => 0,
        }
    }

    fn raw_u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        for b in &mut bytes {
            *b = self.u8();
        }
        u64::from_le_bytes(bytes)
    }

    /// A counter, biased towards the values that break arithmetic.
    fn counter(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => 0,
            1 => 1,
            2 => u64::from(self.u8()),
            3 => 1 << 53,
            4 => u64::MAX - 1,
            5 => u64::MAX,
            6 => u64::from(self.u8()) << 40,
            _ => self.raw_u64(),
        }
    }

    fn id(&mut self) -> ChitchatId {
        match self.u8() % 5 {
            0 | 4 if self.data.first().is_some_and(|b| b % 2 == 0) => {
                self.u8();
                ChitchatId::new("node-new", 1, SocketAddr::from(([127, 0, 0, 1], 7400)))
            }
            0 | 4 => {
                self.u8();
                own_id()
            }
            r => remote_id(u16::from(r - 1)),
        }
    }

    fn digest(&mut self) -> Digest {
        let mut digest = Digest::default();
        for _ in 0..self.u8() % 6 {
            let id = self.id();
            let entry = NodeDigest::new(
                Heartbeat::from(self.counter()),
                self.counter(),
                self.counter(),
            );
            digest.add_node(id, entry);
        }
        digest
    }

    fn delta(&mut self) -> Delta {
        let mut node_deltas: Vec<NodeDelta> = Vec::new();
        for _ in 0..self.u8() % 4 {
            let chitchat_id = self.id();
            if node_deltas.iter().any(|nd| nd.chitchat_id == chitchat_id) {
                continue;
            }
            let from_version_excluded = self.counter();
            let last_gc_version = self.counter();
            let mut key_values = Vec::new();
            let mut version = self.counter();
            for _ in 0..self.u8() % 4 {
                let status = match self.u8() % 3 {
                    0 => DeletionStatusMutation::Set,
                    1 => DeletionStatusMutation::Delete,
                    _ => DeletionStatusMutation::DeleteAfterTtl,
                };
                let key = match self.u8() % 3 {
                    0 => "own-0".to_string(),
                    1 => "key-1".to_string(),
                    k => format!("fresh-{k}"),
                };
                key_values.push(KeyValueUpdate {
                    key,
                    value: "x".repeat(usize::from(self.u8() % 8)),
                    version,
                    status,
                });
                // Strictly increasing, as the wire demands; stop rather than wrap.
                let Some(next) = version.checked_add(1 + u64::from(self.u8() % 3)) else {
                    break;
                };
                version = next;
            }
            let max_version = match key_values.last() {
                Some(kv) => kv.version,
                None => self.counter(),
            };
            node_deltas.push(NodeDelta {
                chitchat_id,
                from_version_excluded,
                last_gc_version,
                max_version,
                key_values,
            });
        }
        Delta { node_deltas }
    }

    fn envelope(&mut self) -> ChitchatEnvelope {
        let control = self.u8();
        let version = if control & 0x10 == 0 {
            ProtocolVersion::V0
        } else {
            ProtocolVersion::V1
        };
        let message = match control % 4 {
            0 => ChitchatMessage::Syn {
                cluster_id: if control & 0x20 == 0 {
                    CLUSTER
                } else {
                    "other"
                }
                .to_string(),
                digest: self.digest(),
            },
            1 => ChitchatMessage::SynAck {
                digest: self.digest(),
                delta: self.delta(),
            },
            2 => ChitchatMessage::Ack {
                delta: self.delta(),
            },
            _ => ChitchatMessage::BadCluster,
        };
        ChitchatEnvelope { version, message }
    }
}

/// Set `HANDLE_DATAGRAM_SKIP_KNOWN=1` to skip datagrams that hit the finding already known
/// (issue 13 row 3: a delta about the own id with a version above the own max_version makes
/// `supersede_stale_self_copy` overflow), so a run can look for other findings until it is
/// fixed. Off by default: the target reports it.
fn skip_known(datagram: &[u8], chitchat: &Chitchat) -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*SKIP.get_or_init(|| std::env::var_os("HANDLE_DATAGRAM_SKIP_KNOWN").is_some()) {
        return false;
    }
    let own_max = chitchat
        .node_state(chitchat.self_chitchat_id())
        .map_or(0, |s| s.max_version());
    let Ok(envelope) = decode_envelope(datagram) else {
        return false;
    };
    let delta = match &envelope.message {
        ChitchatMessage::SynAck { delta, .. } | ChitchatMessage::Ack { delta } => delta,
        _ => return false,
    };
    delta.node_deltas.iter().any(|nd| {
        &nd.chitchat_id == chitchat.self_chitchat_id()
            && nd
                .key_values
                .iter()
                .map(|kv| kv.version)
                .chain([nd.max_version])
                .any(|v| v > own_max)
    })
}

/// Handles one datagram; a reply, if any, must be a datagram real nodes decode.
fn handle(chitchat: &mut Chitchat, datagram: &[u8], reply: &mut Vec<u8>) {
    if skip_known(datagram, chitchat) {
        return;
    }
    if let Ok(outcome) = chitchat.handle_datagram(datagram, reply, None)
        && outcome.replied
    {
        assert!(reply.len() <= chitchat_uring::MAX_UDP_DATAGRAM_PAYLOAD_SIZE);
        if let Err(error) = decode_envelope(reply) {
            panic!("a reply does not decode: {error}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let clock = ManualClock::new();
    let mut chitchat = node(&clock);
    let mut reply = Vec::new();
    if mode % 2 == 0 {
        handle(&mut chitchat, rest, &mut reply);
    } else {
        let mut reader = Reader { data: rest };
        for _ in 0..=mode / 2 % 4 {
            let envelope = reader.envelope();
            // Owned messages the codec refuses (e.g. strings over 65 535 bytes) cannot be sent.
            if let Ok(bytes) = encode_envelope(&envelope) {
                handle(&mut chitchat, &bytes, &mut reply);
            }
            clock.advance(Duration::from_millis(u64::from(reader.u8()) * 40));
        }
    }
    // The node still works after whatever it was sent: a gossip round, tombstone GC and local
    // writes (each `+ 1` on a received counter panics here if unchecked).
    chitchat.end_gossip_round();
    clock.advance(Duration::from_secs(11));
    let mut syn = Vec::new();
    // Bumps the own heartbeat, collects due tombstones and writes the round's Syn.
    let _ = chitchat.begin_gossip_round(&mut syn);
    chitchat.end_gossip_round();
    chitchat.write_syn(ProtocolVersion::V0, &mut syn);
    assert!(decode_envelope(&syn).is_ok(), "the own Syn does not decode");
    let own = chitchat.self_node_state();
    own.set("own-0", "after");
    own.delete("own-1");
    own.delete_after_ttl("own-2");
    let _ = chitchat.begin_gossip_round(&mut syn);
});
