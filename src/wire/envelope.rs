//! The datagram: magic `53 B0`, version byte, message-type byte, then the body
//! (Syn = digest + cluster id, SynAck = digest + delta, Ack = delta, BadCluster = nothing).

use super::primitives::{Reader, put_str, put_u8, put_u16};
use super::{DecodeError, Decoder, EncodeError, Encoder, MAGIC_NUMBER};
use crate::message::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};

const SYN: u8 = 0;
const SYN_ACK: u8 = 1;
const ACK: u8 = 2;
const BAD_CLUSTER: u8 = 3;

impl Encoder {
    /// Appends magic, version byte, message-type byte.
    pub fn write_header(out: &mut Vec<u8>, version: ProtocolVersion, message_type: u8) {
        put_u16(out, MAGIC_NUMBER);
        put_u8(out, version.to_code());
        put_u8(out, message_type);
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
        Encoder::write_header(out, version, envelope.message.type_code());
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

impl Decoder {
    /// Decodes one datagram. Bytes after the body are ignored, as real UDP nodes do.
    pub fn decode_envelope(&mut self, bytes: &[u8]) -> Result<ChitchatEnvelope, DecodeError> {
        let mut reader = Reader::new(bytes);
        let magic = reader.u16("magic number")?;
        if magic != MAGIC_NUMBER {
            return Err(DecodeError::BadMagic(magic));
        }
        let version_code = reader.u8("protocol version")?;
        let version = ProtocolVersion::from_code(version_code)
            .ok_or(DecodeError::UnknownVersion(version_code))?;
        let message = match reader.u8("message type")? {
            SYN => {
                let digest = self.decode_digest(version, &mut reader)?;
                let cluster_id = reader.str("cluster id")?.to_string();
                ChitchatMessage::Syn { cluster_id, digest }
            }
            SYN_ACK => {
                let digest = self.decode_digest(version, &mut reader)?;
                let delta = self.decode_delta(&mut reader)?;
                ChitchatMessage::SynAck { digest, delta }
            }
            ACK => {
                let delta = self.decode_delta(&mut reader)?;
                ChitchatMessage::Ack { delta }
            }
            BAD_CLUSTER => ChitchatMessage::BadCluster,
            other => return Err(DecodeError::UnknownMessageType(other)),
        };
        Ok(ChitchatEnvelope { version, message })
    }
}
