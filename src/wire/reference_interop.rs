//! Byte-level interop with the real `chitchat` 0.13 crate: our datagrams go through its UDP
//! socket (its decoder), it sends them back (its encoder), and the bytes must be identical.
//! Its message (de)serialization is crate-private, so the loopback socket is the way in.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use chitchat::transport::{Socket, Transport, UdpTransport};
use proptest::prelude::*;
use tokio::runtime::Runtime;

use super::codec::{Decoder, Encoder};
use super::envelope::{decode_envelope, encode_envelope};
use super::testing::arb_envelope;
use crate::message::{ChitchatEnvelope, ChitchatMessage, Delta, Digest, ProtocolVersion};

/// A real chitchat UDP socket and a plain socket of ours talking to it over loopback.
struct ReferencePeer {
    runtime: Runtime,
    theirs: Box<dyn Socket>,
    their_addr: SocketAddr,
    ours: UdpSocket,
}

/// A BadCluster with trailing bytes: sent after each probe so that a probe the reference
/// rejects is noticed without waiting for a timeout.
fn sentinel() -> Vec<u8> {
    let mut bytes = vec![0x53, 0xb0, 0, 3];
    bytes.resize(1_001, 0xee);
    bytes
}

impl ReferencePeer {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let theirs = runtime
            .block_on(UdpTransport.open("127.0.0.1:0".parse().unwrap()))
            .unwrap();
        let their_addr = theirs.local_addr().unwrap();
        let ours = UdpSocket::bind("127.0.0.1:0").unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ReferencePeer {
            runtime,
            theirs,
            their_addr,
            ours,
        }
    }

    /// Sends `bytes` to the reference; returns what it decoded, or None if it dropped them.
    fn decode(&mut self, bytes: &[u8]) -> Option<chitchat::ChitchatEnvelope> {
        let sentinel = sentinel();
        self.ours.send_to(bytes, self.their_addr).unwrap();
        self.ours.send_to(&sentinel, self.their_addr).unwrap();
        let theirs = &mut self.theirs;
        self.runtime.block_on(async {
            let mut recv = async || {
                tokio::time::timeout(Duration::from_secs(5), theirs.recv())
                    .await
                    .expect("the reference socket answers")
                    .unwrap()
            };
            let received = recv().await;
            if received.num_bytes_received == sentinel.len() {
                return None;
            }
            assert_eq!(received.num_bytes_received, bytes.len());
            let drained = recv().await;
            assert_eq!(drained.num_bytes_received, sentinel.len());
            Some(received.envelope)
        })
    }

    /// Has the reference encode `envelope` and send it to us; returns the bytes.
    ///
    /// Only for deltas in the reference's own canonical form: it asserts that a re-encoded
    /// delta has the length it was received with.
    fn encode(&mut self, envelope: chitchat::ChitchatEnvelope) -> Vec<u8> {
        let our_addr = self.ours.local_addr().unwrap();
        let theirs = &mut self.theirs;
        self.runtime
            .block_on(theirs.send(our_addr, envelope))
            .unwrap();
        let mut buf = vec![0u8; 65_536];
        let (len, _) = self.ours.recv_from(&mut buf).unwrap();
        buf.truncate(len);
        buf
    }

    /// Decodes with the reference and re-encodes with it.
    fn reencode(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let envelope = self.decode(bytes)?;
        Some(self.encode(envelope))
    }
}

/// Our message printed the way the reference's derived `Debug` prints its own types, so that
/// decoded messages can be compared field by field.
#[allow(dead_code, reason = "the fields are only read by the derived Debug")]
mod mirror {
    use std::fmt;

    use crate::message::{self, Digest, ProtocolVersion};
    use crate::types::{ChitchatId, DeletionStatusMutation};

    #[derive(Debug)]
    struct ChitchatEnvelope {
        version: ProtocolVersion,
        message: ChitchatMessage,
    }

    #[derive(Debug)]
    enum ChitchatMessage {
        Syn { cluster_id: String, digest: Digest },
        SynAck { digest: Digest, delta: Delta },
        Ack { delta: Delta },
        BadCluster,
    }

    #[derive(Debug)]
    struct Delta {
        node_deltas: Vec<NodeDelta>,
    }

    #[derive(Debug)]
    struct NodeDelta {
        chitchat_id: ChitchatId,
        from_version_excluded: u64,
        last_gc_version: u64,
        key_values: Vec<KeyValueMutation>,
        max_version: u64,
    }

    #[derive(Debug)]
    struct KeyValueMutation {
        key: String,
        value: String,
        version: u64,
        status: DeletionStatusMutation,
    }

    fn delta(delta: &message::Delta) -> Delta {
        Delta {
            node_deltas: delta
                .node_deltas
                .iter()
                .map(|nd| NodeDelta {
                    chitchat_id: nd.chitchat_id.clone(),
                    from_version_excluded: nd.from_version_excluded,
                    last_gc_version: nd.last_gc_version,
                    key_values: nd
                        .key_values
                        .iter()
                        .map(|kv| KeyValueMutation {
                            key: kv.key.clone(),
                            value: kv.value.clone(),
                            version: kv.version,
                            status: kv.status,
                        })
                        .collect(),
                    max_version: nd.max_version,
                })
                .collect(),
        }
    }

    pub(super) fn ours(envelope: &message::ChitchatEnvelope) -> String {
        let message = match &envelope.message {
            message::ChitchatMessage::Syn { cluster_id, digest } => ChitchatMessage::Syn {
                cluster_id: cluster_id.clone(),
                digest: digest.clone(),
            },
            message::ChitchatMessage::SynAck { digest, delta: d } => ChitchatMessage::SynAck {
                digest: digest.clone(),
                delta: delta(d),
            },
            message::ChitchatMessage::Ack { delta: d } => ChitchatMessage::Ack { delta: delta(d) },
            message::ChitchatMessage::BadCluster => ChitchatMessage::BadCluster,
        };
        format!(
            "{:?}",
            ChitchatEnvelope {
                version: envelope.version,
                message
            }
        )
    }

    /// The reference's `Debug`, minus the delta's private `serialized_len` (always the
    /// delta's last field, and the delta is always the message's last field).
    pub(super) fn theirs(envelope: &impl fmt::Debug) -> String {
        let debug = format!("{envelope:?}");
        match debug.rsplit_once(", serialized_len: ") {
            Some((head, tail)) => {
                let rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
                assert_eq!(rest, " } } }");
                format!("{head}{rest}")
            }
            None => debug,
        }
    }
}

/// Loopback UDP may be unavailable in some sandboxes: skip rather than fail there.
fn peer() -> Option<ReferencePeer> {
    std::panic::catch_unwind(ReferencePeer::new).ok()
}

#[test]
fn reference_reencodes_our_golden_messages_identically() {
    let Some(mut peer) = peer() else { return };
    let messages = [
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        },
        ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::SynAck {
                digest: Digest::default(),
                delta: Delta::default(),
            },
        },
    ];
    for message in messages {
        let bytes = encode_envelope(&message).unwrap();
        assert_eq!(peer.reencode(&bytes).unwrap(), bytes);
    }
}

/// Raw op stream in one uncompressed block, as an Ack.
fn ack_of_ops(ops: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0x53, 0xb0, 0, 2, 2];
    bytes.extend_from_slice(&(ops.len() as u16).to_le_bytes());
    bytes.extend_from_slice(ops);
    bytes.push(0);
    bytes
}

#[test]
fn reference_rejects_what_we_reject() {
    let Some(mut peer) = peer() else { return };
    let mut node = vec![0u8];
    node.extend_from_slice(&[1, 0, b'n', 0, 0, 0, 0, 0, 0, 0, 0, 4, 127, 0, 0, 1, 1, 0]);
    node.extend_from_slice(&[0; 16]);
    let kv = |version: u8, status: u8| {
        let mut op = vec![1, 1, 0, b'k', 1, 0, b'v', version, 0, 0, 0, 0, 0, 0, 0];
        op.push(status);
        op
    };
    let max = |version: u8| vec![2, version, 0, 0, 0, 0, 0, 0, 0];
    let valid = [node.clone(), kv(1, 0), kv(2, 2), max(2)].concat();
    let invalid = [
        kv(1, 0),
        max(1),
        [node.clone(), node.clone()].concat(),
        [node.clone(), kv(2, 0), kv(2, 0)].concat(),
        [node.clone(), kv(0, 0)].concat(),
        [node.clone(), max(5), kv(5, 0)].concat(),
        [node.clone(), kv(1, 3)].concat(),
        [node.clone(), vec![3]].concat(),
        node[..node.len() - 1].to_vec(),
    ];
    let mut decoder = Decoder::new();
    let ours = decoder.decode_envelope(&ack_of_ops(&valid)).unwrap();
    let theirs = peer.decode(&ack_of_ops(&valid)).unwrap();
    assert_eq!(mirror::theirs(&theirs), mirror::ours(&ours));
    for ops in invalid {
        let bytes = ack_of_ops(&ops);
        assert!(decoder.decode_envelope(&bytes).is_err(), "{ops:?}");
        assert!(peer.decode(&bytes).is_none(), "{ops:?}");
    }
    // Header-level rejections.
    for bytes in [
        vec![0x53, 0xb0, 2, 3],
        vec![0x53, 0xb1, 0, 3],
        vec![0x53, 0xb0, 0, 4],
        vec![0x53, 0xb0, 1, 0, 3],
        vec![0x53, 0xb0, 0, 0, 0, 0, 1, 0, 0xff],
    ] {
        assert!(decoder.decode_envelope(&bytes).is_err());
        assert!(peer.decode(&bytes).is_none(), "{bytes:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The reference decodes every message we encode to the same message, and re-encodes it
    /// to the same bytes.
    #[test]
    fn reference_reencodes_our_messages_identically(envelope in arb_envelope()) {
        let Some(mut peer) = peer() else { return Ok(()) };
        let mut bytes = Vec::new();
        Encoder::new().encode_envelope(&envelope, &mut bytes).unwrap();
        prop_assume!(bytes.len() <= 65_507);
        let theirs = peer.decode(&bytes).expect("the reference accepts our message");
        prop_assert_eq!(mirror::theirs(&theirs), mirror::ours(&envelope));
        prop_assert_eq!(peer.encode(theirs), bytes);
    }

    /// Whatever the reference accepts we accept, with the same meaning (checked through its
    /// re-encoding); and the other way round for mutated messages.
    #[test]
    fn same_verdict_on_mutated_messages(
        envelope in arb_envelope(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4),
    ) {
        let Some(mut peer) = peer() else { return Ok(()) };
        let mut bytes = encode_envelope(&envelope).unwrap();
        prop_assume!(bytes.len() <= 65_507);
        for (index, bit) in flips {
            let i = index.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        let ours = decode_envelope(&bytes);
        let theirs = peer.decode(&bytes);
        match (ours, theirs) {
            (Ok(message), Some(their_message)) => {
                prop_assert_eq!(mirror::theirs(&their_message), mirror::ours(&message));
            }
            (Err(_), None) => {}
            (ours, theirs) => prop_assert!(false, "verdicts differ: ours {:?}, theirs {:?}", ours, theirs.is_some()),
        }
    }
}
