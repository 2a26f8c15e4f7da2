//! The block stream ("compressed stream") that carries V1 digests and all deltas: blocks of
//! type `01` (one zstd frame) or `02` (raw), each with a u16 LE length, ended by `00`.
//!
//! Items are written into a pending buffer that is cut into blocks of exactly the threshold, so
//! items straddle blocks; the reader concatenates all payloads before parsing items.

use zstd::zstd_safe;

use super::error::DecodeError;
use super::format::{MAX_BLOCK_DECOMPRESSED_LEN, MAX_STREAM_DECOMPRESSED_LEN};
use super::primitives::{Reader, put_u8, put_u16};

const NO_MORE_BLOCKS: u8 = 0;
const COMPRESSED: u8 = 1;
const UNCOMPRESSED: u8 = 2;
/// Block type + u16 length.
const BLOCK_META_LEN: usize = 3;

/// Appends a block stream to `out`, compressing blocks when that makes them smaller.
///
/// Keeps the reference's size accounting (`upper_bound_after`) so that MTU truncation
/// decisions are the same as a real node's.
pub(crate) struct BlockStreamWriter<'a> {
    out: &'a mut Vec<u8>,
    /// Offset of the stream's first byte in `out`.
    start: usize,
    /// Uncompressed bytes not cut into a block yet.
    pending: &'a mut Vec<u8>,
    cctx: Option<&'a mut zstd_safe::CCtx<'static>>,
    threshold: usize,
}

impl<'a> BlockStreamWriter<'a> {
    /// `threshold` is clamped to at least 1 so that cutting blocks always makes progress.
    pub(crate) fn new(
        out: &'a mut Vec<u8>,
        pending: &'a mut Vec<u8>,
        cctx: Option<&'a mut zstd_safe::CCtx<'static>>,
        threshold: usize,
    ) -> Self {
        pending.clear();
        let start = out.len();
        BlockStreamWriter {
            out,
            start,
            pending,
            cctx,
            threshold: threshold.clamp(1, MAX_BLOCK_DECOMPRESSED_LEN),
        }
    }

    /// Upper bound of the finished stream's length if an item of `item_len` bytes were
    /// appended: pending bytes count uncompressed, plus one header per block they fill, plus
    /// the terminator.
    ///
    /// This is the reference's bound (one extra header when the item spills over the
    /// threshold) whenever the item is at most one threshold long. For longer items the
    /// reference undercounts the headers of the extra blocks, which can overshoot the mtu by a
    /// few bytes; this bound counts them.
    pub(crate) fn upper_bound_after(&self, item_len: usize) -> usize {
        let written = self.out.len() - self.start;
        let total_pending = self.pending.len().saturating_add(item_len);
        // Pending never exceeds one threshold between items, so one or two blocks is the rule:
        // the division this avoids was 3 % of an empty-digest Syn's handling.
        let num_blocks = if total_pending <= self.threshold {
            1
        } else if total_pending - self.threshold <= self.threshold {
            2
        } else {
            total_pending.div_ceil(self.threshold)
        };
        BLOCK_META_LEN
            .saturating_mul(num_blocks)
            .saturating_add(written)
            .saturating_add(total_pending)
            .saturating_add(1)
    }

    /// Where items are serialized; call [`Self::flush_full_blocks`] after each item.
    pub(crate) fn pending(&mut self) -> &mut Vec<u8> {
        self.pending
    }

    /// Cuts blocks of exactly `threshold` bytes while more than that is pending.
    pub(crate) fn flush_full_blocks(&mut self) {
        if self.pending.len() <= self.threshold {
            return;
        }
        let mut offset = 0;
        while self.pending.len() - offset > self.threshold {
            let block = &self.pending[offset..offset + self.threshold];
            write_block(self.out, self.cctx.as_deref_mut(), block);
            offset += self.threshold;
        }
        self.pending.drain(..offset);
    }

    /// Flushes what is pending and writes the terminator; returns the stream's length.
    pub(crate) fn finish(&mut self) -> usize {
        self.flush_full_blocks();
        if !self.pending.is_empty() {
            write_block(self.out, self.cctx.as_deref_mut(), self.pending);
            self.pending.clear();
        }
        put_u8(self.out, NO_MORE_BLOCKS);
        self.out.len() - self.start
    }
}

/// The most bytes of items a fresh stream with this `threshold` accepts under `mtu`, by the
/// writer's own bound ([`BlockStreamWriter::upper_bound_after`]): what an item alone may take.
pub(crate) fn max_items_len(mtu: usize, threshold: usize) -> usize {
    let threshold = threshold.clamp(1, MAX_BLOCK_DECOMPRESSED_LEN);
    // With `blocks` blocks, at most `blocks × threshold` bytes, and the headers and terminator
    // must fit too; the best block count is at most one past `mtu / threshold`.
    (1..=mtu / threshold + 1)
        .map(|blocks| {
            let room = mtu.saturating_sub(BLOCK_META_LEN.saturating_mul(blocks) + 1);
            room.min(threshold.saturating_mul(blocks))
        })
        .max()
        .unwrap_or(0)
}

/// Writes one block (at most `MAX_BLOCK_DECOMPRESSED_LEN` bytes): compressed if the zstd frame
/// fits in the block's own size, raw otherwise — exactly the reference's choice.
fn write_block(out: &mut Vec<u8>, cctx: Option<&mut zstd_safe::CCtx<'static>>, block: &[u8]) {
    let header = out.len();
    // The writer clamps the threshold, so this never truncates.
    let raw_len = u16::try_from(block.len()).unwrap_or(u16::MAX);
    let block = &block[..raw_len as usize];
    if let Some(cctx) = cctx {
        let payload = header + BLOCK_META_LEN;
        out.resize(payload + block.len(), 0);
        if let Ok(compressed_len) = cctx.compress2(&mut out[payload..], block)
            && let Ok(compressed_len_u16) = u16::try_from(compressed_len)
        {
            out[header] = COMPRESSED;
            out[header + 1..payload].copy_from_slice(&compressed_len_u16.to_le_bytes());
            out.truncate(payload + compressed_len);
            return;
        }
        out.truncate(header);
    }
    put_u8(out, UNCOMPRESSED);
    put_u16(out, raw_len);
    out.extend_from_slice(block);
}

/// Reads a block stream and returns its concatenated payload.
///
/// A stream made of a single raw block is returned as a slice of the input (no copy); any
/// other stream is assembled in `stream`, whose size is capped at
/// `MAX_STREAM_DECOMPRESSED_LEN` (zstd bombs get `StreamTooLarge`).
pub(crate) fn read_block_stream<'i: 'o, 'o>(
    reader: &mut Reader<'i>,
    mut dctx: Option<&mut zstd_safe::DCtx<'static>>,
    block_buf: &mut [u8],
    stream: &'o mut Vec<u8>,
) -> Result<&'o [u8], DecodeError> {
    stream.clear();
    // The first block while it is the only one, kept as a slice of the input.
    let mut single_raw: Option<&'i [u8]> = None;
    let mut num_blocks = 0usize;
    loop {
        let block_type = reader.u8("block type")?;
        let payload: &[u8] = match block_type {
            NO_MORE_BLOCKS => break,
            COMPRESSED => {
                let len = reader.u16("compressed block length")? as usize;
                let frame = reader.bytes(len, "compressed block")?;
                let dctx = dctx.as_deref_mut().ok_or(DecodeError::ZstdUnavailable)?;
                let len = decompress_block(dctx, frame, block_buf)?;
                &block_buf[..len]
            }
            UNCOMPRESSED => {
                let len = reader.u16("uncompressed block length")? as usize;
                let raw = reader.bytes(len, "uncompressed block")?;
                if num_blocks == 0 && block_type == UNCOMPRESSED {
                    single_raw = Some(raw);
                    num_blocks += 1;
                    continue;
                }
                raw
            }
            other => return Err(DecodeError::UnknownBlockType(other)),
        };
        if let Some(first) = single_raw.take() {
            stream.extend_from_slice(first);
        }
        if stream.len() + payload.len() > MAX_STREAM_DECOMPRESSED_LEN {
            return Err(DecodeError::StreamTooLarge);
        }
        stream.extend_from_slice(payload);
        num_blocks += 1;
    }
    match single_raw {
        Some(raw) => Ok(raw),
        None => Ok(&stream[..]),
    }
}

/// Decompresses one block into `block_buf` (65 535 bytes), never trusting the frame's declared
/// size: anything larger than the buffer is `BlockTooLarge`.
fn decompress_block(
    dctx: &mut zstd_safe::DCtx<'static>,
    frame: &[u8],
    block_buf: &mut [u8],
) -> Result<usize, DecodeError> {
    let target_len = MAX_BLOCK_DECOMPRESSED_LEN.min(block_buf.len());
    let target = &mut block_buf[..target_len];
    dctx.decompress(target, frame).map_err(|code| {
        let name = zstd_safe::get_error_name(code);
        if name == DST_TOO_SMALL {
            DecodeError::BlockTooLarge
        } else {
            DecodeError::CorruptBlock(name.to_string())
        }
    })
}

/// zstd's name for `ZSTD_error_dstSize_tooSmall`.
const DST_TOO_SMALL: &str = "Destination buffer is too small";

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::codec::{Decoder, Encoder};
    use crate::wire::format::BLOCK_THRESHOLD;

    /// Writes `items` as one stream with `threshold`; returns the stream and the bound the
    /// writer predicted before the last item.
    fn write_stream(items: &[Vec<u8>], threshold: usize) -> (Vec<u8>, usize) {
        let mut encoder = Encoder::new();
        let mut out = Vec::new();
        let mut writer = BlockStreamWriter::new(
            &mut out,
            &mut encoder.pending,
            encoder.cctx.as_mut(),
            threshold,
        );
        let mut bound = writer.upper_bound_after(0);
        for item in items {
            bound = writer.upper_bound_after(item.len());
            writer.pending().extend_from_slice(item);
            writer.flush_full_blocks();
        }
        let len = writer.finish();
        assert_eq!(len, out.len());
        (out, bound)
    }

    fn read_stream(bytes: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut decoder = Decoder::new();
        let mut reader = Reader::new(bytes);
        let payload = read_block_stream(
            &mut reader,
            decoder.dctx.as_mut(),
            &mut decoder.block,
            &mut decoder.stream,
        )?;
        Ok(payload.to_vec())
    }

    #[test]
    fn empty_stream_is_one_byte() {
        let (bytes, bound) = write_stream(&[], BLOCK_THRESHOLD);
        assert_eq!(bytes, [0]);
        assert_eq!(bound, 4);
        assert_eq!(read_stream(&bytes).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn block_types() {
        assert_eq!(read_stream(&[3]), Err(DecodeError::UnknownBlockType(3)));
        assert_eq!(
            read_stream(&[0xff]),
            Err(DecodeError::UnknownBlockType(0xff))
        );
        assert_eq!(
            read_stream(&[]),
            Err(DecodeError::Truncated { what: "block type" })
        );
        assert_eq!(read_stream(&[2, 1, 0, 7, 0]).unwrap(), [7]);
        assert_eq!(
            read_stream(&[2, 1, 0, 7]),
            Err(DecodeError::Truncated { what: "block type" })
        );
        assert_eq!(
            read_stream(&[2, 2, 0, 7]),
            Err(DecodeError::Truncated {
                what: "uncompressed block"
            })
        );
        assert_eq!(read_stream(&[2, 1, 0, 7, 2, 1, 0, 8, 0]).unwrap(), [7, 8]);
        assert!(matches!(
            read_stream(&[1, 2, 0, 1, 2, 0]),
            Err(DecodeError::CorruptBlock(_))
        ));
    }

    #[test]
    fn compresses_text_and_keeps_random_data_raw() {
        let sentence = b"the quick brown fox jumps over the lazy dog, again and again. ".to_vec();
        let items: Vec<Vec<u8>> = (0..100).map(|_| sentence.clone()).collect();
        let (bytes, _) = write_stream(&items, 1_000);
        assert!(bytes.len() * 3 < items.len() * sentence.len());
        assert_eq!(read_stream(&bytes).unwrap(), items.concat());

        // Incompressible data: every block raw, so the bound is exact.
        let mut rng_state = 0x1234_5678_u64;
        let random: Vec<Vec<u8>> = (0..50)
            .map(|_| {
                (0..37)
                    .map(|_| {
                        rng_state ^= rng_state << 13;
                        rng_state ^= rng_state >> 7;
                        rng_state ^= rng_state << 17;
                        rng_state as u8
                    })
                    .collect()
            })
            .collect();
        let (bytes, bound) = write_stream(&random, 200);
        assert_eq!(bytes.len(), bound);
        assert!(bytes.chunks(203).all(|c| c[0] == UNCOMPRESSED || c == [0]));
        assert_eq!(read_stream(&bytes).unwrap(), random.concat());
    }

    #[test]
    fn compressed_block_is_the_reference_zstd_frame() {
        let data = b"abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabc".repeat(4);
        let (bytes, _) = write_stream(std::slice::from_ref(&data), BLOCK_THRESHOLD);
        let frame = zstd::bulk::compress(&data, 0).unwrap();
        assert_eq!(bytes[0], COMPRESSED);
        assert_eq!(
            u16::from_le_bytes([bytes[1], bytes[2]]) as usize,
            frame.len()
        );
        assert_eq!(&bytes[3..bytes.len() - 1], &frame[..]);
        assert_eq!(&frame[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    }

    #[test]
    fn zstd_bomb_in_one_block_is_rejected() {
        let zeros = vec![0u8; 10 << 20];
        let frame = zstd::bulk::compress(&zeros, 19).unwrap();
        assert!(frame.len() < u16::MAX as usize);
        let mut bytes = vec![COMPRESSED];
        bytes.extend_from_slice(&(frame.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&frame);
        bytes.push(0);
        assert_eq!(read_stream(&bytes), Err(DecodeError::BlockTooLarge));

        // One byte over the per-block limit.
        let frame = zstd::bulk::compress(&vec![1u8; MAX_BLOCK_DECOMPRESSED_LEN + 1], 3).unwrap();
        let mut bytes = vec![COMPRESSED];
        bytes.extend_from_slice(&(frame.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&frame);
        bytes.push(0);
        assert_eq!(read_stream(&bytes), Err(DecodeError::BlockTooLarge));
    }

    #[test]
    fn zstd_bomb_across_blocks_is_rejected_with_bounded_memory() {
        let frame = zstd::bulk::compress(&vec![0u8; MAX_BLOCK_DECOMPRESSED_LEN], 19).unwrap();
        assert!(frame.len() < 64, "frame is {} bytes", frame.len());
        let mut bytes = Vec::new();
        // Fits a datagram, but would decompress to about 100 MiB.
        while bytes.len() + frame.len() + 4 < 65_507 {
            bytes.push(COMPRESSED);
            bytes.extend_from_slice(&(frame.len() as u16).to_le_bytes());
            bytes.extend_from_slice(&frame);
        }
        bytes.push(0);
        let mut decoder = Decoder::new();
        let mut reader = Reader::new(&bytes);
        let result = read_block_stream(
            &mut reader,
            decoder.dctx.as_mut(),
            &mut decoder.block,
            &mut decoder.stream,
        );
        assert_eq!(result, Err(DecodeError::StreamTooLarge));
        assert!(
            decoder.stream.capacity()
                <= 2 * (MAX_STREAM_DECOMPRESSED_LEN + MAX_BLOCK_DECOMPRESSED_LEN)
        );

        // Exactly at the cap is fine.
        let blocks = MAX_STREAM_DECOMPRESSED_LEN / MAX_BLOCK_DECOMPRESSED_LEN;
        let mut bytes = Vec::new();
        for _ in 0..blocks {
            bytes.push(COMPRESSED);
            bytes.extend_from_slice(&(frame.len() as u16).to_le_bytes());
            bytes.extend_from_slice(&frame);
        }
        bytes.push(0);
        assert_eq!(
            read_stream(&bytes).unwrap().len(),
            blocks * MAX_BLOCK_DECOMPRESSED_LEN
        );
    }

    proptest! {
        #[test]
        fn round_trip_and_bound(
            items in proptest::collection::vec(
                prop_oneof![
                    "[a-c ]{0,300}".prop_map(String::into_bytes),
                    proptest::collection::vec(any::<u8>(), 0..300),
                ],
                0..60,
            ),
            threshold in prop_oneof![Just(1usize), 2..500usize, Just(BLOCK_THRESHOLD)],
        ) {
            let (bytes, bound) = write_stream(&items, threshold);
            prop_assert!(bytes.len() <= bound);
            prop_assert_eq!(read_stream(&bytes).unwrap(), items.concat());
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = read_stream(&bytes);
        }
    }
}
