//! The fixed facts of the chitchat 0.13 format that encoders, decoders and the protocol's size
//! budgets share: the header, the message types and the size limits. A leaf: it imports nothing
//! from the crate, so every other wire file may depend on it.

/// First two bytes of every datagram (`53 B0`): lets a node drop foreign traffic cheaply.
pub const MAGIC_NUMBER: u16 = 45_139;
/// Magic number (2) + protocol version (1) + message type (1).
pub const HEADER_LEN: usize = 4;
/// Largest UDP payload over IPv4: the size budget of every message (the transport's figure).
pub const MAX_UDP_DATAGRAM_PAYLOAD_SIZE: usize = crate::transport::MAX_DATAGRAM_LEN;
/// Uncompressed size at which the block stream writers cut a block, as the reference does.
pub const BLOCK_THRESHOLD: usize = 16_384;
/// Largest decompressed size of one compressed block (the reference decompresses into a buffer
/// of this size, so larger blocks would be dropped by real nodes too).
pub const MAX_BLOCK_DECOMPRESSED_LEN: usize = 65_535;
/// Largest decompressed size of one block stream: the cap that defeats zstd bombs. Real
/// deltas are bounded by the datagram budget counted uncompressed, so they stay far below it.
pub const MAX_STREAM_DECOMPRESSED_LEN: usize = 4 << 20;
/// Longest string (node id, cluster id, key, value) the u16 length prefix can describe.
pub const MAX_STRING_LEN: usize = u16::MAX as usize;

/// The message-type byte of the header (SPEC §3.1): the one definition of these codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Opens a handshake: digest + cluster id.
    Syn = 0,
    /// Answers a Syn: digest + delta.
    SynAck = 1,
    /// Answers a SynAck: delta.
    Ack = 2,
    /// Answers a Syn of another cluster: no body.
    BadCluster = 3,
}

impl MessageType {
    /// The type of a header byte, or None for a code no chitchat node sends.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(MessageType::Syn),
            1 => Some(MessageType::SynAck),
            2 => Some(MessageType::Ack),
            3 => Some(MessageType::BadCluster),
            _ => None,
        }
    }

    /// The header byte.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Bytes a message body may take once the header and `reserved` bytes (e.g. a SynAck's digest,
/// a Syn's cluster id) are accounted for.
pub fn body_budget(reserved: usize) -> usize {
    body_budget_in(MAX_UDP_DATAGRAM_PAYLOAD_SIZE, reserved)
}

/// [`body_budget`] for datagrams of at most `datagram` bytes (less than the UDP maximum where
/// the transport adds bytes of its own: sealing, in keyed clusters).
pub fn body_budget_in(datagram: usize, reserved: usize) -> usize {
    datagram.saturating_sub(HEADER_LEN).saturating_sub(reserved)
}

/// Bytes left for a delta once the header and `reserved` bytes (e.g. a SynAck's digest) are
/// accounted for: the reference's `delta_mtu`.
pub fn delta_mtu(reserved: usize) -> usize {
    body_budget(reserved)
}

/// [`delta_mtu`] for datagrams of at most `datagram` bytes.
pub fn delta_mtu_in(datagram: usize, reserved: usize) -> usize {
    body_budget_in(datagram, reserved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_codes_round_trip() {
        for code in 0..=u8::MAX {
            match MessageType::from_code(code) {
                Some(message_type) => assert_eq!(message_type.code(), code),
                None => assert!(code > 3, "code {code} must be known"),
            }
        }
    }
}
