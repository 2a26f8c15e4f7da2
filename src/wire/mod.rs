//! The chitchat 0.13 wire codec: envelopes, digests (V0 plain, V1 zstd block stream) and deltas
//! (op streams inside a zstd block stream), byte-compatible with the reference crate.
//!
//! Decoding is total and bounded: any byte string yields a message or a [`DecodeError`], and the
//! memory it takes is capped whatever the input (zstd bombs included). Encoding never panics:
//! what cannot be represented is refused ([`EncodeError`], or `false` from [`DeltaWriter`]).

mod block_stream;
mod delta;
mod digest;
mod envelope;
mod primitives;
#[cfg(test)]
mod reference_interop;
#[cfg(test)]
mod testing;

use std::collections::HashSet;

use zstd::zstd_safe;

use crate::message::ChitchatEnvelope;
use crate::types::ChitchatId;

pub use delta::DeltaWriter;
pub use digest::{ChitchatIdRef, DigestEncoding, DigestView};
pub use envelope::{EnvelopeView, MessageView};
pub use primitives::chitchat_id_len;

/// First two bytes of every datagram (`53 B0`): lets a node drop foreign traffic cheaply.
pub const MAGIC_NUMBER: u16 = 45_139;
/// Magic number (2) + protocol version (1) + message type (1).
pub const HEADER_LEN: usize = 4;
/// Largest UDP payload over IPv4: the size budget of every message.
pub const MAX_UDP_DATAGRAM_PAYLOAD_SIZE: usize = 65_507;
/// Message-type bytes of the header, for [`Encoder::write_header`].
pub const MESSAGE_TYPE_SYN: u8 = 0;
pub const MESSAGE_TYPE_SYN_ACK: u8 = 1;
pub const MESSAGE_TYPE_ACK: u8 = 2;
pub const MESSAGE_TYPE_BAD_CLUSTER: u8 = 3;
/// Uncompressed size at which the block stream writers cut a block, as the reference does.
pub const BLOCK_THRESHOLD: usize = 16_384;
/// Largest decompressed size of one compressed block (the reference decompresses into a buffer
/// of this size, so larger blocks would be dropped by real nodes too).
pub const MAX_BLOCK_DECOMPRESSED_LEN: usize = 65_535;
/// Largest decompressed size of one block stream: the cap that defeats zstd bombs. Real
/// deltas are bounded by the datagram budget counted uncompressed, so they stay far below it.
pub const MAX_STREAM_DECOMPRESSED_LEN: usize = 4 << 20;

/// The zstd level of the reference (`0`, zstd's default level, which is 3).
const ZSTD_LEVEL: i32 = 3;

/// Bytes left for a delta once the header and `reserved` bytes (e.g. a SynAck's digest) are
/// accounted for.
pub fn delta_mtu(reserved: usize) -> usize {
    MAX_UDP_DATAGRAM_PAYLOAD_SIZE
        .saturating_sub(HEADER_LEN)
        .saturating_sub(reserved)
}

/// Why a datagram was rejected. A real chitchat node drops such datagrams whole, and so do we.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated message: missing bytes for the {what}")]
    Truncated { what: &'static str },
    #[error("bad magic number {0:#06x} (expected {MAGIC_NUMBER:#06x})")]
    BadMagic(u16),
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    #[error("unknown message type {0}")]
    UnknownMessageType(u8),
    #[error("bad IP address tag {0} (expected 4 or 6)")]
    BadIpTag(u8),
    #[error("invalid UTF-8 in the {what}")]
    InvalidUtf8 { what: &'static str },
    #[error("unknown block type {0}")]
    UnknownBlockType(u8),
    #[error("corrupt compressed block: {0}")]
    CorruptBlock(String),
    #[error("compressed block decompresses to more than {MAX_BLOCK_DECOMPRESSED_LEN} bytes")]
    BlockTooLarge,
    #[error("block stream decompresses to more than {MAX_STREAM_DECOMPRESSED_LEN} bytes")]
    StreamTooLarge,
    #[error("unknown delta op tag {0}")]
    UnknownOpTag(u8),
    #[error("unknown key-value status {0}")]
    UnknownStatus(u8),
    #[error("delta has a key-value or max-version op before any node op")]
    OpBeforeNode,
    #[error("delta has two node ops for {0}")]
    DuplicateNode(String),
    #[error(
        "delta key-value version {version} is not above the node's previous version {previous}"
    )]
    NonIncreasingVersion { previous: u64, version: u64 },
    #[error("cannot allocate a zstd decompression context")]
    ZstdUnavailable,
}

impl DecodeError {
    /// A short stable label, for counters and structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::BadMagic(_) => "bad-magic",
            DecodeError::UnknownVersion(_) => "unknown-version",
            DecodeError::UnknownMessageType(_) => "unknown-message-type",
            DecodeError::BadIpTag(_) => "bad-ip-tag",
            DecodeError::InvalidUtf8 { .. } => "invalid-utf8",
            DecodeError::UnknownBlockType(_) => "unknown-block-type",
            DecodeError::CorruptBlock(_) => "corrupt-block",
            DecodeError::BlockTooLarge => "block-too-large",
            DecodeError::StreamTooLarge => "stream-too-large",
            DecodeError::UnknownOpTag(_) => "unknown-op-tag",
            DecodeError::UnknownStatus(_) => "unknown-status",
            DecodeError::OpBeforeNode => "op-before-node",
            DecodeError::DuplicateNode(_) => "duplicate-node",
            DecodeError::NonIncreasingVersion { .. } => "non-increasing-version",
            DecodeError::ZstdUnavailable => "zstd-unavailable",
        }
    }
}

/// Why an owned message cannot be put on the wire (the reference would corrupt or panic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the {what} is {len} bytes long; the wire carries at most 65535")]
    StringTooLong { what: &'static str, len: usize },
    #[error("a V0 digest holds at most 65535 entries, got {count}")]
    TooManyDigestEntries { count: usize },
    #[error("delta has two node deltas for {0}")]
    DuplicateNode(String),
    #[error(
        "delta key-value version {version} of {node} is not above the previous version {previous}"
    )]
    NonIncreasingVersion {
        node: String,
        previous: u64,
        version: u64,
    },
}

/// Reusable decoding state: a zstd decompression context and scratch buffers, so that decoding
/// allocates little beyond the decoded message itself.
///
/// Memory is bounded whatever the input: the stream scratch never grows past
/// `MAX_STREAM_DECOMPRESSED_LEN + MAX_BLOCK_DECOMPRESSED_LEN` bytes.
pub struct Decoder {
    /// Created lazily so that `new()` cannot fail; `None` only if zstd could not allocate.
    dctx: Option<zstd_safe::DCtx<'static>>,
    /// Decompression target of one compressed block.
    block: Box<[u8]>,
    /// Concatenated payload of the block stream being decoded.
    stream: Vec<u8>,
    /// Payload of a V1 digest, kept apart so that a digest view outlives the delta decoding.
    digest_stream: Vec<u8>,
    /// Node ids already seen in the delta being decoded (one Node op per id).
    seen_nodes: HashSet<ChitchatId>,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            dctx: zstd_safe::DCtx::try_create(),
            block: vec![0u8; MAX_BLOCK_DECOMPRESSED_LEN].into_boxed_slice(),
            stream: Vec::new(),
            digest_stream: Vec::new(),
            seen_nodes: HashSet::new(),
        }
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

/// Decodes one datagram with a fresh [`Decoder`]; prefer a long-lived `Decoder` on hot paths.
pub fn decode_envelope(bytes: &[u8]) -> Result<ChitchatEnvelope, DecodeError> {
    Decoder::new().decode_envelope(bytes)
}

/// Reusable encoding state: a zstd compression context (level 3, the reference's level 0) and
/// scratch buffers.
pub struct Encoder {
    /// `None` only if zstd could not allocate: blocks are then written uncompressed (still valid).
    cctx: Option<zstd_safe::CCtx<'static>>,
    /// Uncompressed bytes of the block being filled.
    pending: Vec<u8>,
    /// Node ids already written in the delta being encoded.
    written_nodes: HashSet<ChitchatId>,
}

impl Encoder {
    pub fn new() -> Self {
        let cctx = zstd_safe::CCtx::try_create().and_then(|mut cctx| {
            cctx.set_parameter(zstd_safe::CParameter::CompressionLevel(ZSTD_LEVEL))
                .ok()?;
            Some(cctx)
        });
        Encoder {
            cctx,
            pending: Vec::new(),
            written_nodes: HashSet::new(),
        }
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

/// Encodes one envelope with a fresh [`Encoder`]; prefer a long-lived `Encoder` on hot paths.
pub fn encode_envelope(envelope: &ChitchatEnvelope) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    Encoder::new().encode_envelope(envelope, &mut out)?;
    Ok(out)
}
