//! The chitchat 0.13 wire codec: envelopes, digests (V0 plain, V1 zstd block stream) and deltas
//! (op streams inside a zstd block stream), byte-compatible with the reference crate.
//!
//! Decoding is total and bounded: any byte string yields a message or a [`DecodeError`], and the
//! memory it takes is capped whatever the input (zstd bombs included). Encoding never panics:
//! what cannot be represented is refused ([`EncodeError`], or `false` from [`DeltaWriter`]).
//!
//! The only place that knows bytes: the protocol asks it for sizes and budgets instead of
//! counting them. Public, though chitchat 0.13 keeps its codec private, as a deliberate
//! extension point: test peers, load generators, fuzz targets and benchmarks build and parse
//! datagrams with it.

mod block_stream;
mod codec;
mod delta;
mod delta_view;
mod digest;
mod envelope;
mod error;
mod format;
mod primitives;
#[cfg(test)]
mod reference_interop;
mod serializable;
#[cfg(test)]
mod testing;

// This file only re-exports: the files below import each other directly, never through here, so
// no wire file imports one that imports it back.
pub use codec::{Decoder, Encoder};
pub use delta::DeltaWriter;
pub(crate) use delta::{max_key_value_len, max_key_value_len_in};
pub use delta_view::{DeltaView, KeyValueRef, NodeDeltaRef};
pub(crate) use digest::KnownIds;
pub(crate) use digest::sort_and_dedup;
pub use digest::{DigestEncoding, DigestEntry, DigestView};
pub(crate) use digest::{V0_DIGEST_COUNT_LEN, digest_entry_len};
pub use envelope::{EnvelopeView, MessageView, decode_envelope, encode_envelope, syn_cluster_id};
pub(crate) use envelope::{carries_digest, is_v0_syn};
pub(crate) use envelope::{put_cluster_id, syn_digest_budget};
pub use error::{DecodeError, EncodeError};
pub use format::{
    BLOCK_THRESHOLD, HEADER_LEN, MAGIC_NUMBER, MAX_BLOCK_DECOMPRESSED_LEN,
    MAX_STREAM_DECOMPRESSED_LEN, MAX_STRING_LEN, MAX_UDP_DATAGRAM_PAYLOAD_SIZE, MessageType,
    body_budget, body_budget_in, delta_mtu, delta_mtu_in,
};
pub(crate) use primitives::put_chitchat_id;
pub use primitives::{ChitchatIdRef, chitchat_id_len};
pub use serializable::{Deserializable, Serializable};
