//! Why bytes do not decode ([`DecodeError`]) and why a message cannot be encoded
//! ([`EncodeError`]): typed, because callers count and log them by kind.

use super::format::{MAGIC_NUMBER, MAX_BLOCK_DECOMPRESSED_LEN, MAX_STREAM_DECOMPRESSED_LEN};

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
