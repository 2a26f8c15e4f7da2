//! Why bytes do not decode ([`DecodeError`]) and why a message cannot be encoded
//! ([`EncodeError`]): typed, because callers count and log them by kind.

use super::format::{MAGIC_NUMBER, MAX_BLOCK_DECOMPRESSED_LEN, MAX_STREAM_DECOMPRESSED_LEN};

/// Why a datagram was rejected. A real chitchat node drops such datagrams whole, and so do we.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The datagram ends inside a field.
    #[error("truncated message: missing bytes for the {what}")]
    Truncated {
        /// The field that is cut.
        what: &'static str,
    },
    /// Not a chitchat datagram.
    #[error("bad magic number {0:#06x} (expected {MAGIC_NUMBER:#06x})")]
    BadMagic(u16),
    /// A protocol version this node does not speak (newer than V1).
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    /// A message-type byte outside [`MessageType`](super::MessageType).
    #[error("unknown message type {0}")]
    UnknownMessageType(u8),
    /// An address that is neither IPv4 nor IPv6.
    #[error("bad IP address tag {0} (expected 4 or 6)")]
    BadIpTag(u8),
    /// A string field that is not UTF-8.
    #[error("invalid UTF-8 in the {what}")]
    InvalidUtf8 {
        /// The field.
        what: &'static str,
    },
    /// A block stream block that is neither compressed, raw nor the terminator.
    #[error("unknown block type {0}")]
    UnknownBlockType(u8),
    /// A compressed block zstd refuses (its error name).
    #[error("corrupt compressed block: {0}")]
    CorruptBlock(String),
    /// A block larger than the reference's block buffer.
    #[error("compressed block decompresses to more than {MAX_BLOCK_DECOMPRESSED_LEN} bytes")]
    BlockTooLarge,
    /// A block stream over the decompression cap (a zstd bomb).
    #[error("block stream decompresses to more than {MAX_STREAM_DECOMPRESSED_LEN} bytes")]
    StreamTooLarge,
    /// A delta op other than Node, KeyValue and SetMaxVersion.
    #[error("unknown delta op tag {0}")]
    UnknownOpTag(u8),
    /// A key-value status byte the reference does not define.
    #[error("unknown key-value status {0}")]
    UnknownStatus(u8),
    /// A delta op with no node to apply to.
    #[error("delta has a key-value or max-version op before any node op")]
    OpBeforeNode,
    /// Two Node ops for one id (the reference rejects the delta).
    #[error("delta has two node ops for {0}")]
    DuplicateNode(String),
    /// Key-value versions of a node must strictly increase (the reference asserts it).
    #[error(
        "delta key-value version {version} is not above the node's previous version {previous}"
    )]
    NonIncreasingVersion {
        /// The node's version before this op.
        previous: u64,
        /// The op's version.
        version: u64,
    },
    /// zstd could not allocate: compressed blocks cannot be read.
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
    /// A string over what its u16 length prefix carries.
    #[error("the {what} is {len} bytes long; the wire carries at most 65535")]
    StringTooLong {
        /// The field.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A V0 digest counts its entries in a u16.
    #[error("a V0 digest holds at most 65535 entries, got {count}")]
    TooManyDigestEntries {
        /// The entries of the digest.
        count: usize,
    },
    /// Two node deltas for one id: a real node would reject the delta.
    #[error("delta has two node deltas for {0}")]
    DuplicateNode(String),
    /// Key-value versions of a node must strictly increase: a real node would panic.
    #[error(
        "delta key-value version {version} of {node} is not above the previous version {previous}"
    )]
    NonIncreasingVersion {
        /// The node, as `Debug` prints it.
        node: String,
        /// The version before the key-value.
        previous: u64,
        /// The key-value's version.
        version: u64,
    },
}
