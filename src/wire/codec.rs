//! The reusable codec state: [`Decoder`] and [`Encoder`] hold the zstd contexts and scratch
//! buffers, so the hot path allocates little. What they read and write is in the digest, delta
//! and envelope files, which extend them.

use std::collections::HashSet;

use zstd::zstd_safe;

use super::format::MAX_BLOCK_DECOMPRESSED_LEN;
use crate::types::ChitchatId;

/// The zstd level of the reference (`0`, zstd's default level, which is 3).
const ZSTD_LEVEL: i32 = 3;

/// Reusable decoding state: a zstd decompression context and scratch buffers, so that decoding
/// allocates little beyond the decoded message itself.
///
/// Memory is bounded whatever the input: the stream scratch never grows past
/// [`MAX_STREAM_DECOMPRESSED_LEN`](super::MAX_STREAM_DECOMPRESSED_LEN) + `MAX_BLOCK_DECOMPRESSED_LEN` bytes.
pub struct Decoder {
    /// Created lazily so that `new()` cannot fail; `None` only if zstd could not allocate.
    pub(super) dctx: Option<zstd_safe::DCtx<'static>>,
    /// Decompression target of one compressed block.
    pub(super) block: Box<[u8]>,
    /// Concatenated payload of the block stream being decoded.
    pub(super) stream: Vec<u8>,
    /// Payload of a V1 digest, kept apart so that a digest view outlives the delta decoding.
    pub(super) digest_stream: Vec<u8>,
}

impl Decoder {
    /// A decoder whose buffers are allocated once, here (one 64 KiB block buffer).
    pub fn new() -> Self {
        Decoder {
            dctx: zstd_safe::DCtx::try_create(),
            block: vec![0u8; MAX_BLOCK_DECOMPRESSED_LEN].into_boxed_slice(),
            stream: Vec::new(),
            digest_stream: Vec::new(),
        }
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

/// Reusable encoding state: a zstd compression context (level 3, the reference's level 0) and
/// scratch buffers.
pub struct Encoder {
    /// `None` only if zstd could not allocate: blocks are then written uncompressed (still valid).
    pub(super) cctx: Option<zstd_safe::CCtx<'static>>,
    /// Uncompressed bytes of the block being filled.
    pub(super) pending: Vec<u8>,
    /// Node ids already written in the delta being encoded.
    pub(super) written_nodes: HashSet<ChitchatId>,
}

impl Encoder {
    /// An encoder at the reference's compression level; never fails (without zstd it writes
    /// raw blocks).
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
