//! The datagram: magic `53 B0`, version byte, message-type byte, then the body
//! (Syn = digest + cluster id, SynAck = digest + delta, Ack = delta, BadCluster = nothing).

use super::codec::{Decoder, Encoder};
use super::delta::decode_delta_with;
use super::delta_view::DeltaView;
use super::digest::{DigestView, KnownIds, NoKnownIds, decode_digest_view};
use super::error::{DecodeError, EncodeError};
use super::format::{MAGIC_NUMBER, MAX_STRING_LEN, MessageType, body_budget_in};
use super::primitives::{Reader, put_str, put_u8, put_u16, str_len};
use crate::message::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};

impl MessageType {
    /// The type byte an owned message is sent with.
    pub fn of(message: &ChitchatMessage) -> Self {
        match message {
            ChitchatMessage::Syn { .. } => MessageType::Syn,
            ChitchatMessage::SynAck { .. } => MessageType::SynAck,
            ChitchatMessage::Ack { .. } => MessageType::Ack,
            ChitchatMessage::BadCluster => MessageType::BadCluster,
        }
    }
}

/// Bytes a Syn's digest may take: the datagram minus the header and the cluster id after it.
pub(crate) fn syn_digest_budget(datagram: usize, cluster_id: &str) -> usize {
    body_budget_in(datagram, str_len(cluster_id))
}

/// Appends a Syn's trailing cluster id. The config validation bounds cluster ids to what the u16
/// length carries; a longer one (never valid) would be cut rather than corrupt the datagram.
pub(crate) fn put_cluster_id(out: &mut Vec<u8>, cluster_id: &str) {
    let len = cluster_id.len().min(MAX_STRING_LEN);
    // `len` ≤ u16::MAX by the line above.
    put_u16(out, len as u16);
    out.extend_from_slice(&cluster_id.as_bytes()[..len]);
}

/// Decodes one datagram with a fresh [`Decoder`]; prefer a long-lived `Decoder` on hot paths.
pub fn decode_envelope(bytes: &[u8]) -> Result<ChitchatEnvelope, DecodeError> {
    Decoder::new().decode_envelope(bytes)
}

/// Encodes one envelope with a fresh [`Encoder`]; prefer a long-lived `Encoder` on hot paths.
pub fn encode_envelope(envelope: &ChitchatEnvelope) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    Encoder::new().encode_envelope(envelope, &mut out)?;
    Ok(out)
}

impl Encoder {
    /// Appends magic, version byte, message-type byte: how every datagram starts.
    pub fn write_header(out: &mut Vec<u8>, version: ProtocolVersion, message_type: MessageType) {
        put_u16(out, MAGIC_NUMBER);
        put_u8(out, version.to_code());
        put_u8(out, message_type.code());
    }

    /// Appends the whole datagram (header + body) to `out`; deltas are not truncated. On error
    /// `out` is left as it was.
    pub fn encode_envelope(
        &mut self,
        envelope: &ChitchatEnvelope,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let start = out.len();
        let result = self.encode_envelope_inner(envelope, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_envelope_inner(
        &mut self,
        envelope: &ChitchatEnvelope,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let version = envelope.version;
        Encoder::write_header(out, version, MessageType::of(&envelope.message));
        match &envelope.message {
            ChitchatMessage::Syn { cluster_id, digest } => {
                self.encode_owned_digest(version, digest, out)?;
                put_str(out, cluster_id, "cluster id")?;
            }
            ChitchatMessage::SynAck { digest, delta } => {
                self.encode_owned_digest(version, digest, out)?;
                self.encode_delta(delta, usize::MAX, out)?;
            }
            ChitchatMessage::Ack { delta } => {
                self.encode_delta(delta, usize::MAX, out)?;
            }
            ChitchatMessage::BadCluster => {}
        }
        Ok(())
    }
}

/// A decoded datagram borrowing its node ids, keys and values (the server's hot path): what
/// is stored is copied when it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeView<'a> {
    /// The version the datagram was encoded in (a reply echoes it).
    pub version: ProtocolVersion,
    /// The message.
    pub message: MessageView<'a>,
}

/// [`ChitchatMessage`] with borrowed digests and deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageView<'a> {
    /// Opens a handshake.
    Syn {
        /// The sender's cluster: another cluster's Syn gets BadCluster.
        cluster_id: &'a str,
        /// What the sender knows.
        digest: DigestView<'a>,
    },
    /// Answers a Syn.
    SynAck {
        /// What the sender knows.
        digest: DigestView<'a>,
        /// What the sender found the Syn's author missing.
        delta: DeltaView<'a>,
    },
    /// Answers a SynAck.
    Ack {
        /// What the sender found the SynAck's author missing.
        delta: DeltaView<'a>,
    },
    /// Answers a Syn of another cluster.
    BadCluster,
}

impl EnvelopeView<'_> {
    /// An owned copy (allocates the digest's ids and the delta's strings).
    pub fn to_envelope(&self) -> ChitchatEnvelope {
        let message = match &self.message {
            MessageView::Syn { cluster_id, digest } => ChitchatMessage::Syn {
                cluster_id: cluster_id.to_string(),
                digest: digest.to_digest(),
            },
            MessageView::SynAck { digest, delta } => ChitchatMessage::SynAck {
                digest: digest.to_digest(),
                delta: delta.to_delta(),
            },
            MessageView::Ack { delta } => ChitchatMessage::Ack {
                delta: delta.to_delta(),
            },
            MessageView::BadCluster => ChitchatMessage::BadCluster,
        };
        ChitchatEnvelope {
            version: self.version,
            message,
        }
    }
}

impl<'a> MessageView<'a> {
    /// A view of an owned message (copies no string).
    pub fn of(message: &'a ChitchatMessage) -> Self {
        match message {
            ChitchatMessage::Syn { cluster_id, digest } => MessageView::Syn {
                cluster_id,
                digest: DigestView::from_digest(digest),
            },
            ChitchatMessage::SynAck { digest, delta } => MessageView::SynAck {
                digest: DigestView::from_digest(digest),
                delta: DeltaView::of(delta),
            },
            ChitchatMessage::Ack { delta } => MessageView::Ack {
                delta: DeltaView::of(delta),
            },
            ChitchatMessage::BadCluster => MessageView::BadCluster,
        }
    }
}

/// Reads and checks magic, version and message type.
fn read_header(reader: &mut Reader<'_>) -> Result<(ProtocolVersion, MessageType), DecodeError> {
    let magic = reader.u16("magic number")?;
    if magic != MAGIC_NUMBER {
        return Err(DecodeError::BadMagic(magic));
    }
    let version_code = reader.u8("protocol version")?;
    let version = ProtocolVersion::from_code(version_code)
        .ok_or(DecodeError::UnknownVersion(version_code))?;
    let code = reader.u8("message type")?;
    let message_type = MessageType::from_code(code).ok_or(DecodeError::UnknownMessageType(code))?;
    Ok((version, message_type))
}

/// Whether `bytes` open like a Syn or a SynAck, the messages with a digest (for which a
/// receiver prepares the ids it holds, [`KnownIds`]); says nothing of the rest.
pub(crate) fn carries_digest(bytes: &[u8]) -> bool {
    matches!(
        read_header(&mut Reader::new(bytes)),
        Ok((_, MessageType::Syn | MessageType::SynAck))
    )
}

/// Whether `bytes` open like a V0 Syn, whose digest is a plain scan (no decompression): its
/// cluster id is then read after decoding it once rather than before, by a second walk.
pub(crate) fn is_v0_syn(bytes: &[u8]) -> bool {
    matches!(
        read_header(&mut Reader::new(bytes)),
        Ok((ProtocolVersion::V0, MessageType::Syn))
    )
}

/// Walks over a digest without decoding it: V0 entries by their lengths, V1 by its block
/// framing (no decompression). What a Syn's cluster id check costs.
fn skip_digest(version: ProtocolVersion, reader: &mut Reader<'_>) -> Result<(), DecodeError> {
    match version {
        ProtocolVersion::V0 => {
            let count = reader.u16("digest entry count")?;
            for _ in 0..count {
                // The same checks and errors as decoding the id, without building it (an
                // ASCII name skips the UTF-8 validation).
                reader.skip_chitchat_id()?;
                reader.bytes(24, "node digest")?;
            }
        }
        ProtocolVersion::V1 => loop {
            // Block types: 0 ends the stream, 1 compressed, 2 uncompressed (block_stream.rs).
            match reader.u8("block type")? {
                0 => break,
                1 | 2 => {
                    let len = usize::from(reader.u16("block length")?);
                    reader.bytes(len, "block")?;
                }
                other => return Err(DecodeError::UnknownBlockType(other)),
            }
        },
    }
    Ok(())
}

/// If `bytes` is a Syn, its version and cluster id, read without decoding its digest, so that a
/// Syn of another cluster can be answered BadCluster at the cost of a walk over its framing.
/// `Ok(None)` for the other message types.
pub fn syn_cluster_id(bytes: &[u8]) -> Result<Option<(ProtocolVersion, &str)>, DecodeError> {
    let mut reader = Reader::new(bytes);
    let (version, message_type) = read_header(&mut reader)?;
    if message_type != MessageType::Syn {
        return Ok(None);
    }
    skip_digest(version, &mut reader)?;
    let cluster_id = reader.str("cluster id")?;
    Ok(Some((version, cluster_id)))
}

impl Decoder {
    /// Decodes one datagram, its digest borrowing from `bytes` or from this decoder. Accepts
    /// and rejects exactly what `decode_envelope` does.
    pub fn decode_view<'a>(&'a mut self, bytes: &'a [u8]) -> Result<EnvelopeView<'a>, DecodeError> {
        self.decode_view_known(bytes, None::<&NoKnownIds>)
    }

    /// [`Decoder::decode_view`], the digest scanned with the receiver's `known` ids (see
    /// [`KnownIds`]).
    pub(crate) fn decode_view_known<'a, K: KnownIds + ?Sized>(
        &'a mut self,
        bytes: &'a [u8],
        known: Option<&K>,
    ) -> Result<EnvelopeView<'a>, DecodeError> {
        let Decoder {
            dctx,
            block,
            stream,
            digest_stream,
        } = self;
        let mut reader = Reader::new(bytes);
        let (version, message_type) = read_header(&mut reader)?;
        let message = match message_type {
            MessageType::Syn => {
                let digest = decode_digest_view(
                    version,
                    &mut reader,
                    dctx.as_mut(),
                    block,
                    digest_stream,
                    known,
                )?;
                let cluster_id = reader.str("cluster id")?;
                MessageView::Syn { cluster_id, digest }
            }
            MessageType::SynAck => {
                let digest = decode_digest_view(
                    version,
                    &mut reader,
                    dctx.as_mut(),
                    block,
                    digest_stream,
                    known,
                )?;
                let delta = decode_delta_with(&mut reader, dctx.as_mut(), block, stream)?;
                MessageView::SynAck { digest, delta }
            }
            MessageType::Ack => {
                let delta = decode_delta_with(&mut reader, dctx.as_mut(), block, stream)?;
                MessageView::Ack { delta }
            }
            MessageType::BadCluster => MessageView::BadCluster,
        };
        Ok(EnvelopeView { version, message })
    }

    /// Decodes one datagram. Bytes after the body are ignored, as real UDP nodes do.
    pub fn decode_envelope(&mut self, bytes: &[u8]) -> Result<ChitchatEnvelope, DecodeError> {
        let mut reader = Reader::new(bytes);
        let (version, message_type) = read_header(&mut reader)?;
        let message = match message_type {
            MessageType::Syn => {
                let digest = self.decode_digest(version, &mut reader)?;
                let cluster_id = reader.str("cluster id")?.to_string();
                ChitchatMessage::Syn { cluster_id, digest }
            }
            MessageType::SynAck => {
                let digest = self.decode_digest(version, &mut reader)?;
                let delta = self.decode_delta(&mut reader)?;
                ChitchatMessage::SynAck { digest, delta }
            }
            MessageType::Ack => {
                let delta = self.decode_delta(&mut reader)?;
                ChitchatMessage::Ack { delta }
            }
            MessageType::BadCluster => ChitchatMessage::BadCluster,
        };
        Ok(ChitchatEnvelope { version, message })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::message::{Delta, Digest, KeyValueUpdate, NodeDelta, NodeDigest};
    use crate::types::{ChitchatId, DeletionStatusMutation, Heartbeat};
    use crate::wire::format::{HEADER_LEN, MAX_UDP_DATAGRAM_PAYLOAD_SIZE, delta_mtu};
    use crate::wire::testing::arb_envelope;

    /// Parses a spaced hex dump; `|` separators are ignored.
    fn hex(dump: &str) -> Vec<u8> {
        dump.split_whitespace()
            .filter(|token| *token != "|")
            .map(|token| u8::from_str_radix(token, 16).unwrap())
            .collect()
    }

    fn envelope(version: ProtocolVersion, message: ChitchatMessage) -> ChitchatEnvelope {
        ChitchatEnvelope { version, message }
    }

    /// Decodes `bytes` to `expected` and re-encodes it to exactly `bytes`.
    #[track_caller]
    fn assert_golden(bytes: &[u8], expected: &ChitchatEnvelope) {
        assert_eq!(&decode_envelope(bytes).unwrap(), expected);
        assert_eq!(encode_envelope(expected).unwrap(), bytes);
    }

    const NODE_10001: &str =
        "0a 00 6e 6f 64 65 2d 31 30 30 30 31 | 00 00 00 00 00 00 00 00 | 04 7f 00 00 01 | 11 27";
    const NODE_DIGEST_5_0_3: &str =
        "05 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 03 00 00 00 00 00 00 00";
    const CLUSTER_A: &str = "09 00 63 6c 75 73 74 65 72 2d 61";

    fn digest_one_node() -> Digest {
        let mut digest = Digest::default();
        digest.add_node(
            ChitchatId::for_local_test(10_001),
            NodeDigest::new(Heartbeat::from(5), 0, 3),
        );
        digest
    }

    fn syn(version: ProtocolVersion, cluster_id: &str, digest: Digest) -> ChitchatEnvelope {
        envelope(
            version,
            ChitchatMessage::Syn {
                cluster_id: cluster_id.to_string(),
                digest,
            },
        )
    }

    fn one_kv_delta(status: DeletionStatusMutation) -> Delta {
        Delta {
            node_deltas: vec![NodeDelta {
                chitchat_id: ChitchatId::for_local_test(10_001),
                from_version_excluded: 0,
                last_gc_version: 0,
                max_version: 1,
                key_values: vec![KeyValueUpdate {
                    key: "key".to_string(),
                    value: "value".to_string(),
                    version: 1,
                    status,
                }],
            }],
        }
    }

    #[test]
    fn golden_syn_v0_68_bytes() {
        let bytes = hex(&format!(
            "53 b0 | 00 | 00 | 01 00 | {NODE_10001} | {NODE_DIGEST_5_0_3} | {CLUSTER_A}"
        ));
        assert_eq!(bytes.len(), 68);
        assert_golden(
            &bytes,
            &syn(ProtocolVersion::V0, "cluster-a", digest_one_node()),
        );
    }

    #[test]
    fn golden_syn_v1_70_bytes() {
        let bytes = hex(&format!(
            "53 b0 01 00 | 02 33 00 {NODE_10001} {NODE_DIGEST_5_0_3} 00 | {CLUSTER_A}"
        ));
        assert_eq!(bytes.len(), 70);
        assert_golden(
            &bytes,
            &syn(ProtocolVersion::V1, "cluster-a", digest_one_node()),
        );
    }

    #[test]
    fn golden_empty_digests() {
        let empty = Digest::default();
        assert_golden(
            &hex("53 b0 00 00 00 00 | 01 00 63"),
            &syn(ProtocolVersion::V0, "c", empty.clone()),
        );
        assert_golden(
            &hex("53 b0 01 00 00 | 01 00 63"),
            &syn(ProtocolVersion::V1, "c", empty),
        );
    }

    #[test]
    fn golden_ack_74_bytes() {
        let bytes = hex(&format!(
            "53 b0 00 02 | 02 42 00 | 00 {NODE_10001} 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 \
             | 01 03 00 6b 65 79 05 00 76 61 6c 75 65 01 00 00 00 00 00 00 00 00 | 00"
        ));
        assert_eq!(bytes.len(), 74);
        let ack = envelope(
            ProtocolVersion::V0,
            ChitchatMessage::Ack {
                delta: one_kv_delta(DeletionStatusMutation::Set),
            },
        );
        assert_golden(&bytes, &ack);
    }

    #[test]
    fn golden_set_max_version_ack() {
        let bytes = hex(&format!(
            "53 b0 00 02 | 02 35 00 | 00 {NODE_10001} 07 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00 \
             | 02 0c 00 00 00 00 00 00 00 | 00"
        ));
        assert_eq!(bytes.len(), HEADER_LEN + 57);
        let delta = Delta {
            node_deltas: vec![NodeDelta {
                chitchat_id: ChitchatId::for_local_test(10_001),
                from_version_excluded: 9,
                last_gc_version: 7,
                max_version: 12,
                key_values: Vec::new(),
            }],
        };
        assert_golden(
            &bytes,
            &envelope(ProtocolVersion::V0, ChitchatMessage::Ack { delta }),
        );
    }

    #[test]
    fn golden_empty_syn_ack_and_bad_cluster() {
        let empty_syn_ack = ChitchatMessage::SynAck {
            digest: Digest::default(),
            delta: Delta::default(),
        };
        assert_golden(
            &hex("53 b0 00 01 00 00 00"),
            &envelope(ProtocolVersion::V0, empty_syn_ack.clone()),
        );
        assert_golden(
            &hex("53 b0 01 01 00 00"),
            &envelope(ProtocolVersion::V1, empty_syn_ack),
        );
        assert_golden(
            &hex("53 b0 00 03"),
            &envelope(ProtocolVersion::V0, ChitchatMessage::BadCluster),
        );
        assert_golden(
            &hex("53 b0 01 03"),
            &envelope(ProtocolVersion::V1, ChitchatMessage::BadCluster),
        );
    }

    #[test]
    fn thirty_nine_kvs_compress_into_one_block() {
        let mut node_delta = one_kv_delta(DeletionStatusMutation::Set)
            .node_deltas
            .remove(0);
        node_delta.key_values = (1..=39u64)
            .map(|version| KeyValueUpdate {
                key: format!("key{version:02}"),
                value: format!("value{version:02}"),
                version,
                status: DeletionStatusMutation::Set,
            })
            .collect();
        node_delta.max_version = 39;
        let ack = envelope(
            ProtocolVersion::V0,
            ChitchatMessage::Ack {
                delta: Delta {
                    node_deltas: vec![node_delta],
                },
            },
        );
        let bytes = encode_envelope(&ack).unwrap();
        assert_eq!(&bytes[..5], &hex("53 b0 00 02 01"));
        let block_len = u16::from_le_bytes([bytes[5], bytes[6]]) as usize;
        assert_eq!(&bytes[7..11], &hex("28 b5 2f fd"));
        assert_eq!(bytes.len(), 7 + block_len + 1);
        assert!(block_len < 44 + 39 * 26);
        assert_eq!(decode_envelope(&bytes).unwrap(), ack);
    }

    #[test]
    fn message_sizes() {
        let len = |envelope: &ChitchatEnvelope| encode_envelope(envelope).unwrap().len();
        assert_eq!(
            len(&syn(ProtocolVersion::V0, "cluster-a", Digest::default())),
            17
        );
        let mut digest = Digest::default();
        digest.add_node(ChitchatId::for_local_test(10_001), NodeDigest::default());
        assert_eq!(
            len(&syn(ProtocolVersion::V0, "cluster-a", digest.clone())),
            68
        );
        let syn_ack = |digest: Digest, delta: Delta| {
            envelope(
                ProtocolVersion::V0,
                ChitchatMessage::SynAck { digest, delta },
            )
        };
        assert_eq!(len(&syn_ack(Digest::default(), Delta::default())), 7);
        let delta = one_kv_delta(DeletionStatusMutation::Delete);
        assert_eq!(len(&syn_ack(digest, delta.clone())), 4 + 53 + 70);
        let ack = |delta: Delta| envelope(ProtocolVersion::V0, ChitchatMessage::Ack { delta });
        assert_eq!(len(&ack(Delta::default())), 5);
        assert_eq!(len(&ack(delta)), 4 + 70);
        assert_eq!(
            len(&envelope(ProtocolVersion::V0, ChitchatMessage::BadCluster)),
            4
        );
    }

    #[test]
    fn v1_syn_of_100_nodes_round_trips_and_is_smaller() {
        let mut digest = Digest::default();
        for i in 0..100u16 {
            digest.add_node(
                ChitchatId::for_local_test(10_000 + i),
                NodeDigest::new(Heartbeat::from(u64::from(i)), 0, u64::from(i)),
            );
        }
        let v0 = syn(ProtocolVersion::V0, "cluster-a", digest.clone());
        let v1 = syn(ProtocolVersion::V1, "cluster-a", digest);
        let v0_bytes = encode_envelope(&v0).unwrap();
        let v1_bytes = encode_envelope(&v1).unwrap();
        assert!(v1_bytes.len() * 3 < v0_bytes.len());
        assert_eq!(decode_envelope(&v0_bytes).unwrap(), v0);
        assert_eq!(decode_envelope(&v1_bytes).unwrap(), v1);
    }

    #[test]
    fn header_errors() {
        let cases: [(&[u8], DecodeError); 7] = [
            (
                &[],
                DecodeError::Truncated {
                    what: "magic number",
                },
            ),
            (
                &[0x53],
                DecodeError::Truncated {
                    what: "magic number",
                },
            ),
            (
                &[0x53, 0xb0],
                DecodeError::Truncated {
                    what: "protocol version",
                },
            ),
            (
                &[0x53, 0xb0, 0],
                DecodeError::Truncated {
                    what: "message type",
                },
            ),
            (&[0xb0, 0x53, 0, 3], DecodeError::BadMagic(0x53b0)),
            (&[0x53, 0xb0, 2, 3], DecodeError::UnknownVersion(2)),
            (
                &[0x53, 0xb0, 0, 0xff],
                DecodeError::UnknownMessageType(0xff),
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(decode_envelope(bytes), Err(expected));
        }
        assert_eq!(
            decode_envelope(&hex("53 b0 00 00 00 00 02 00 63")),
            Err(DecodeError::Truncated { what: "cluster id" })
        );
        assert_eq!(
            decode_envelope(&hex("53 b0 00 00 00 00 01 00 ff")),
            Err(DecodeError::InvalidUtf8 { what: "cluster id" })
        );
        assert_eq!(DecodeError::BadMagic(0x53b0).kind(), "bad-magic");
        assert_eq!(
            DecodeError::BadMagic(0x53b0).to_string(),
            "bad magic number 0x53b0 (expected 0xb053)"
        );
    }

    #[test]
    fn message_type_constants_match_the_messages() {
        let digest = Digest::default;
        let delta = Delta::default;
        let messages = [
            (0, syn(ProtocolVersion::V0, "c", digest()).message),
            (
                1,
                ChitchatMessage::SynAck {
                    digest: digest(),
                    delta: delta(),
                },
            ),
            (2, ChitchatMessage::Ack { delta: delta() }),
            (3, ChitchatMessage::BadCluster),
        ];
        for (code, message) in messages {
            assert_eq!(MessageType::of(&message).code(), code);
            assert_eq!(
                MessageType::from_code(code),
                Some(MessageType::of(&message))
            );
            // And the byte the encoder writes.
            assert_eq!(
                encode_envelope(&envelope(ProtocolVersion::V0, message)).unwrap()[3],
                code
            );
        }
    }

    #[test]
    fn zstd_bomb_in_an_ack_is_rejected() {
        let frame = zstd::bulk::compress(&[0u8; 65_535], 19).unwrap();
        let mut bytes = hex("53 b0 00 02");
        while bytes.len() + frame.len() + 4 < MAX_UDP_DATAGRAM_PAYLOAD_SIZE {
            bytes.push(1);
            bytes.extend_from_slice(&(frame.len() as u16).to_le_bytes());
            bytes.extend_from_slice(&frame);
        }
        bytes.push(0);
        let error = decode_envelope(&bytes).unwrap_err();
        assert_eq!(error, DecodeError::StreamTooLarge);
        assert_eq!(error.kind(), "stream-too-large");
        // Same in a V1 digest.
        bytes[2] = 1;
        bytes[3] = 0;
        assert_eq!(decode_envelope(&bytes), Err(DecodeError::StreamTooLarge));
    }

    #[test]
    fn syn_cluster_id_skips_the_digest_undecoded() {
        let mut digest = Digest::default();
        for i in 0..50u16 {
            digest.add_node(ChitchatId::for_local_test(i), NodeDigest::default());
        }
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            let bytes = encode_envelope(&syn(version, "cluster-a", digest.clone())).unwrap();
            assert_eq!(syn_cluster_id(&bytes), Ok(Some((version, "cluster-a"))));
        }
        // A corrupt compressed block: the framing is intact, so the cluster id is found.
        let junk = hex("53 b0 01 00 | 01 03 00 aa bb cc | 00 | 01 00 63");
        assert!(decode_envelope(&junk).is_err());
        assert_eq!(syn_cluster_id(&junk), Ok(Some((ProtocolVersion::V1, "c"))));
        assert_eq!(syn_cluster_id(&hex("53 b0 00 03")), Ok(None));
        assert!(syn_cluster_id(&hex("53 b0 01 00 | 07")).is_err());
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut bytes = hex("53 b0 00 03");
        bytes.extend_from_slice(b"junk");
        assert_eq!(
            decode_envelope(&bytes).unwrap().message,
            ChitchatMessage::BadCluster
        );
    }

    #[test]
    fn unencodable_messages_are_errors_and_leave_the_buffer_alone() {
        let long = "c".repeat(70_000);
        let mut out = vec![1, 2, 3];
        let mut encoder = Encoder::new();
        assert_eq!(
            encoder.encode_envelope(
                &syn(ProtocolVersion::V0, &long, Digest::default()),
                &mut out
            ),
            Err(EncodeError::StringTooLong {
                what: "cluster id",
                len: 70_000
            })
        );
        assert_eq!(out, [1, 2, 3]);
        let mut delta = one_kv_delta(DeletionStatusMutation::Set);
        delta.node_deltas[0].key_values[0].value = long;
        let ack = envelope(ProtocolVersion::V1, ChitchatMessage::Ack { delta });
        assert!(matches!(
            encoder.encode_envelope(&ack, &mut out),
            Err(EncodeError::StringTooLong { what: "value", .. })
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn delta_mtu_accounts_for_header_and_reserved_bytes() {
        assert_eq!(delta_mtu(0), MAX_UDP_DATAGRAM_PAYLOAD_SIZE - HEADER_LEN);
        assert_eq!(delta_mtu(53), 65_503 - 53);
        assert_eq!(delta_mtu(usize::MAX), 0);
        // A SynAck built with that budget fits the datagram exactly at most.
        let mut digest = Digest::default();
        for i in 0..300u16 {
            digest.add_node(ChitchatId::for_local_test(i), NodeDigest::default());
        }
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            let mut encoder = Encoder::new();
            let mut out = Vec::new();
            Encoder::write_header(&mut out, version, MessageType::SynAck);
            let entries = digest.node_digests.iter().map(|(id, nd)| (id, *nd));
            let digest_len = encoder
                .encode_digest(version, entries, usize::MAX, &mut out)
                .len;
            let mut writer = encoder.delta_writer(&mut out, delta_mtu(digest_len));
            let value = "v".repeat(1_000);
            let mut n = 0u16;
            let mut version_counter = 0;
            'outer: loop {
                n += 1;
                if !writer.try_add_node(&ChitchatId::for_local_test(n), 0, 0) {
                    break;
                }
                for _ in 0..10 {
                    version_counter += 1;
                    // Defeat compression a little: distinct keys, repetitive values.
                    let key = format!("key-{version_counter}-{}", version_counter * 7_919);
                    if !writer.try_add_kv(
                        &key,
                        &value,
                        version_counter,
                        DeletionStatusMutation::Set,
                    ) {
                        break 'outer;
                    }
                }
            }
            writer.finish();
            assert!(out.len() <= MAX_UDP_DATAGRAM_PAYLOAD_SIZE);
            let decoded = decode_envelope(&out).unwrap();
            let ChitchatMessage::SynAck { digest: got, .. } = decoded.message else {
                panic!("not a SynAck");
            };
            assert_eq!(got, digest);
        }
    }

    /// Re-encoding what decodes gives a message that decodes to the same thing.
    #[track_caller]
    fn check_stable(bytes: &[u8]) {
        let mut decoder = Decoder::new();
        // The borrowed decoding accepts and rejects exactly the same datagrams, identically.
        let viewed = decoder.decode_view(bytes).map(|view| view.to_envelope());
        assert_eq!(viewed, decoder.decode_envelope(bytes));
        if let Ok(message) = decoder.decode_envelope(bytes) {
            let again = encode_envelope(&message).expect("a decoded message is encodable");
            assert_eq!(decoder.decode_envelope(&again).unwrap(), message);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn round_trip(envelope in arb_envelope(), trailing in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut encoder = Encoder::new();
            let mut bytes = Vec::new();
            encoder.encode_envelope(&envelope, &mut bytes).unwrap();
            let mut decoder = Decoder::new();
            prop_assert_eq!(&decoder.decode_envelope(&bytes).unwrap(), &envelope);
            prop_assert_eq!(&decoder.decode_view(&bytes).unwrap().to_envelope(), &envelope);
            bytes.extend_from_slice(&trailing);
            prop_assert_eq!(&decoder.decode_envelope(&bytes).unwrap(), &envelope);
            // Encoding again with the same (reused) encoder gives the same bytes.
            let mut again = Vec::new();
            encoder.encode_envelope(&envelope, &mut again).unwrap();
            prop_assert_eq!(&again[..], &bytes[..bytes.len() - trailing.len()]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            header in prop_oneof![
                Just(Vec::new()),
                (0u8..2, 0u8..4).prop_map(|(v, t)| vec![0x53, 0xb0, v, t]),
            ],
            body in proptest::collection::vec(any::<u8>(), 0..1_500),
        ) {
            let bytes = [header, body].concat();
            check_stable(&bytes);
        }

        #[test]
        fn mutated_encodings_never_panic(
            envelope in arb_envelope(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = encode_envelope(&envelope).unwrap();
            for (index, bit) in flips {
                let i = index.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            check_stable(&bytes);
            if truncate {
                let cut = cut.index(bytes.len());
                bytes.truncate(cut);
                check_stable(&bytes);
            }
        }
    }

    /// Fuzz finding (decode_envelope, 2026-12-02, `fuzz/regressions/`): a SetMaxVersion below
    /// the node's last KV was accepted, so the delta did not re-encode to itself; and a
    /// SetMaxVersion above the last KV was dropped on re-encoding.
    #[test]
    fn fuzz_finding_set_max_version_after_key_values_round_trips_or_is_refused() {
        let bytes =
            include_bytes!("../../fuzz/regressions/decode_envelope-max-version-round-trip.bin");
        let error = decode_envelope(bytes).unwrap_err();
        assert!(
            matches!(
                error,
                DecodeError::NonIncreasingVersion {
                    previous: 1,
                    version: 0
                }
            ),
            "{error:?}"
        );
        let id = ChitchatId::new("n", 1, std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
        let delta = Delta {
            node_deltas: vec![NodeDelta {
                chitchat_id: id,
                from_version_excluded: 0,
                last_gc_version: 0,
                max_version: 9,
                key_values: vec![KeyValueUpdate {
                    key: "k".to_string(),
                    value: "v".to_string(),
                    version: 3,
                    status: DeletionStatusMutation::Set,
                }],
            }],
        };
        let envelope = ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Ack { delta },
        };
        let encoded = encode_envelope(&envelope).unwrap();
        assert_eq!(decode_envelope(&encoded).unwrap(), envelope);
    }
}
