//! The attacker's toolbox: well-formed datagrams carrying absurd or forged values, built with the
//! crate's public codec, and a plain UDP socket to send them from.
//!
//! Everything here is what any host on the network can send: chitchat 0.13 has no
//! authentication, so these datagrams decode and would be believed by a naive node.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use chitchat_uring::message::{Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest};
use chitchat_uring::types::DeletionStatusMutation;
use chitchat_uring::wire::{decode_envelope, encode_envelope};
use chitchat_uring::{ChitchatEnvelope, ChitchatId, ChitchatMessage, Heartbeat, ProtocolVersion};

/// The absolute ceiling of DESIGN-13 §1: no real node's counter gets above it.
pub const MAX_PLAUSIBLE_COUNTER: u64 = 1 << 53;

/// A forged node id gossiping at `addr` (always a loopback address: the attacker's own socket).
pub fn forged_id(name: impl Into<String>, addr: SocketAddr) -> ChitchatId {
    assert!(addr.ip().is_loopback(), "hostile tests stay on loopback");
    ChitchatId::new(name.into(), 1, addr)
}

/// A digest from `(id, heartbeat, last_gc_version, max_version)` entries.
pub fn digest<'a>(entries: impl IntoIterator<Item = (&'a ChitchatId, u64, u64, u64)>) -> Digest {
    let mut digest = Digest::default();
    for (id, heartbeat, last_gc_version, max_version) in entries {
        digest.add_node(
            id.clone(),
            NodeDigest::new(Heartbeat::from(heartbeat), last_gc_version, max_version),
        );
    }
    digest
}

/// A node delta carrying `key_values` as `(key, value, version)` (all `Set`), in the given
/// order; `max_version` is the last version (the encoder writes no SetMaxVersion then).
pub fn kv_delta(
    id: &ChitchatId,
    from_version_excluded: u64,
    last_gc_version: u64,
    key_values: &[(&str, &str, u64)],
) -> NodeDelta {
    NodeDelta {
        chitchat_id: id.clone(),
        from_version_excluded,
        last_gc_version,
        max_version: key_values.last().map_or(0, |kv| kv.2),
        key_values: key_values
            .iter()
            .map(|(key, value, version)| KeyValueUpdate {
                key: key.to_string(),
                value: value.to_string(),
                version: *version,
                status: DeletionStatusMutation::Set,
            })
            .collect(),
    }
}

/// A forged reset of `id`: `from_version_excluded` 0 and the given `last_gc_version`, replacing
/// the receiver's copy with `key_values` (SPEC §4.5 ApplyAfterReset).
pub fn reset_delta(
    id: &ChitchatId,
    last_gc_version: u64,
    key_values: &[(&str, &str, u64)],
) -> NodeDelta {
    kv_delta(id, 0, last_gc_version, key_values)
}

/// A node delta with no key-value and one SetMaxVersion op of `max_version`.
pub fn set_max_version_delta(
    id: &ChitchatId,
    from_version_excluded: u64,
    last_gc_version: u64,
    max_version: u64,
) -> NodeDelta {
    NodeDelta {
        chitchat_id: id.clone(),
        from_version_excluded,
        last_gc_version,
        max_version,
        key_values: Vec::new(),
    }
}

pub fn delta(node_deltas: Vec<NodeDelta>) -> Delta {
    Delta { node_deltas }
}

fn encode(version: ProtocolVersion, message: ChitchatMessage) -> Vec<u8> {
    encode_envelope(&ChitchatEnvelope { version, message }).expect("attack datagrams encode")
}

pub fn syn(version: ProtocolVersion, cluster_id: &str, digest: Digest) -> Vec<u8> {
    encode(
        version,
        ChitchatMessage::Syn {
            cluster_id: cluster_id.to_string(),
            digest,
        },
    )
}

pub fn syn_ack(version: ProtocolVersion, digest: Digest, delta: Delta) -> Vec<u8> {
    encode(version, ChitchatMessage::SynAck { digest, delta })
}

pub fn ack(version: ProtocolVersion, delta: Delta) -> Vec<u8> {
    encode(version, ChitchatMessage::Ack { delta })
}

/// The 7-byte V0 SynAck with an empty digest and an empty delta: `53 B0 00 01 | 00 00 | 00`.
pub fn empty_syn_ack_v0() -> Vec<u8> {
    let bytes = syn_ack(ProtocolVersion::V0, Digest::default(), Delta::default());
    assert_eq!(bytes, [0x53, 0xB0, 0, 1, 0, 0, 0]);
    bytes
}

/// The V0 Syn with an empty digest: 12 bytes for a 4-byte cluster id.
pub fn empty_syn_v0(cluster_id: &str) -> Vec<u8> {
    let bytes = syn(ProtocolVersion::V0, cluster_id, Digest::default());
    assert_eq!(bytes.len(), 8 + cluster_id.len());
    bytes
}

/// A V1 Syn whose digest is one compressed block of junk (not a zstd frame), followed by a
/// well-formed `cluster_id`. The block stream can be skipped by its length prefixes, so the
/// cluster id is readable without decoding the digest; decoding the digest fails.
pub fn syn_with_garbage_digest_v1(cluster_id: &str, junk_len: u16) -> Vec<u8> {
    let mut bytes = vec![0x53, 0xB0, 1, 0];
    bytes.push(1); // compressed block
    bytes.extend_from_slice(&junk_len.to_le_bytes());
    // Never the zstd magic (28 B5 2F FD): a corrupt block for any decoder.
    bytes.extend((0..junk_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)));
    bytes.push(0); // end of the block stream
    bytes.extend_from_slice(&(cluster_id.len() as u16).to_le_bytes());
    bytes.extend_from_slice(cluster_id.as_bytes());
    assert!(
        decode_envelope(&bytes).is_err(),
        "the junk digest must not decode"
    );
    bytes
}

/// `count` forged ids named `{prefix}-{i:05}`, all gossiping at `addr`.
pub fn forged_ids(prefix: &str, count: usize, addr: SocketAddr) -> Vec<ChitchatId> {
    (0..count)
        .map(|i| forged_id(format!("{prefix}-{i:05}"), addr))
        .collect()
}

/// A string of exactly `len` bytes, distinct per `seed`, that zstd compresses well (so a flood
/// of them is cheap to send while each costs the receiver `len` bytes of memory).
pub fn compressible_value(seed: usize, len: usize) -> String {
    let head = format!("{seed:010}-");
    let mut value = String::with_capacity(len);
    value.push_str(&head);
    while value.len() < len {
        value.push(char::from(b'a' + (value.len() % 23) as u8));
    }
    value.truncate(len);
    value
}

/// The attacker: a plain UDP socket on 127.0.0.1.
pub struct Attacker {
    pub socket: UdpSocket,
}

impl Attacker {
    pub fn bind() -> Attacker {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the attacker socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Attacker { socket }
    }

    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    pub fn send(&self, to: SocketAddr, bytes: &[u8]) {
        self.socket
            .send_to(bytes, to)
            .expect("send an attack datagram");
    }

    /// Receives until a datagram from `from` decodes and satisfies `pred`, within `timeout`.
    pub fn recv_matching(
        &self,
        from: SocketAddr,
        timeout: Duration,
        pred: impl Fn(&ChitchatMessage) -> bool,
    ) -> Option<(ChitchatEnvelope, usize)> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        while Instant::now() < deadline {
            if let Ok((len, sender)) = self.socket.recv_from(&mut buf)
                && sender == from
                && let Ok(envelope) = decode_envelope(&buf[..len])
                && pred(&envelope.message)
            {
                return Some((envelope, len));
            }
        }
        None
    }

    /// Waits for a Syn from `victim`: after it, a SynAck from this socket answers a Syn the
    /// victim sent (the recent-Syn table of DESIGN-13 §4 lets it through), so what the
    /// SynAck carries is judged on its content, not dropped as unsolicited.
    pub fn await_syn_from(&self, victim: SocketAddr, timeout: Duration) -> bool {
        self.recv_matching(victim, timeout, |m| {
            matches!(m, ChitchatMessage::Syn { .. })
        })
        .is_some()
    }

    /// Reads and discards whatever is queued; returns (datagrams, bytes).
    pub fn drain(&self, for_at_most: Duration) -> (u64, u64) {
        let deadline = Instant::now() + for_at_most;
        let mut buf = vec![0u8; 65_536];
        let (mut n, mut bytes) = (0, 0);
        while Instant::now() < deadline {
            match self.socket.recv_from(&mut buf) {
                Ok((len, _)) => {
                    n += 1;
                    bytes += len as u64;
                }
                Err(_) => break,
            }
        }
        (n, bytes)
    }
}
