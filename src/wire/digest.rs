//! Digests: V0 is a u16 count followed by `(ChitchatId, NodeDigest)` entries; V1 is a block
//! stream of the same entries without a count.

use std::borrow::Cow;
use std::net::SocketAddr;

use super::block_stream::{BlockStreamWriter, read_block_stream};
use super::codec::{Decoder, Encoder};
use super::error::{DecodeError, EncodeError};
use super::format::{BLOCK_THRESHOLD, MAX_STRING_LEN};
use super::primitives::{
    ChitchatIdRef, Reader, chitchat_id_len, put_chitchat_id, put_u16, put_u64,
};
use crate::message::{Digest, NodeDigest, ProtocolVersion};
use crate::types::{ChitchatId, Heartbeat};

/// heartbeat + last_gc_version + max_version.
const NODE_DIGEST_LEN: usize = 24;
/// A V0 digest counts its entries in a u16.
const MAX_V0_ENTRIES: usize = u16::MAX as usize;
/// The u16 entry count that opens a V0 digest.
pub(crate) const V0_DIGEST_COUNT_LEN: usize = 2;

/// What [`Encoder::encode_digest`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestEncoding {
    /// Length in bytes of the encoded digest.
    pub len: usize,
    /// Entries written.
    pub written: usize,
    /// Entries left out: over the size budget, over the V0 count limit, or unencodable (node
    /// id longer than 65 535 bytes).
    pub skipped: usize,
}

/// Bytes of one digest entry (id + node digest), uncompressed: what the protocol adds up to
/// tell whether its digest may not fit a datagram.
pub(crate) fn digest_entry_len(id: &ChitchatId) -> usize {
    chitchat_id_len(id) + NODE_DIGEST_LEN
}

fn put_entry(out: &mut Vec<u8>, id: &ChitchatId, node_digest: &NodeDigest) {
    // Callers check the node id length first.
    if put_chitchat_id(out, id).is_ok() {
        put_u64(out, node_digest.heartbeat.into());
        put_u64(out, node_digest.last_gc_version);
        put_u64(out, node_digest.max_version);
    }
}

fn encodable(id: &ChitchatId) -> bool {
    id.node_id.len() <= MAX_STRING_LEN
}

impl Encoder {
    /// Appends a digest in `version` from entries given in any order (V0 keeps the given order;
    /// pass them in id order to get the reference's bytes).
    ///
    /// Entries that would make the digest longer than `max_len` bytes are skipped, so callers
    /// pass their own node first. For V1 the length is the reference's upper bound (pending
    /// bytes counted uncompressed), so the real digest is usually shorter. The empty digest is
    /// always written, even if `max_len` is smaller. V0 holds at most 65 535 entries.
    pub fn encode_digest<'a>(
        &mut self,
        version: ProtocolVersion,
        entries: impl IntoIterator<Item = (&'a ChitchatId, NodeDigest)>,
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> DigestEncoding {
        match version {
            ProtocolVersion::V0 => encode_digest_v0(entries, max_len, out),
            ProtocolVersion::V1 => self.encode_digest_v1(entries, max_len, out),
        }
    }

    fn encode_digest_v1<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (&'a ChitchatId, NodeDigest)>,
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> DigestEncoding {
        let mut writer =
            BlockStreamWriter::new(out, &mut self.pending, self.cctx.as_mut(), BLOCK_THRESHOLD);
        let mut written = 0;
        let mut skipped = 0;
        for (id, node_digest) in entries {
            if !encodable(id) || writer.upper_bound_after(digest_entry_len(id)) > max_len {
                skipped += 1;
                continue;
            }
            put_entry(writer.pending(), id, &node_digest);
            writer.flush_full_blocks();
            written += 1;
        }
        let len = writer.finish();
        DigestEncoding {
            len,
            written,
            skipped,
        }
    }

    /// Appends an owned digest in id order, as the reference does; refuses what the wire
    /// cannot carry instead of skipping it.
    pub(crate) fn encode_owned_digest(
        &mut self,
        version: ProtocolVersion,
        digest: &Digest,
        out: &mut Vec<u8>,
    ) -> Result<usize, EncodeError> {
        if version == ProtocolVersion::V0 && digest.len() > MAX_V0_ENTRIES {
            return Err(EncodeError::TooManyDigestEntries {
                count: digest.len(),
            });
        }
        if let Some(id) = digest.node_digests.keys().find(|id| !encodable(id)) {
            return Err(EncodeError::StringTooLong {
                what: "node id",
                len: id.node_id.len(),
            });
        }
        let entries = digest.node_digests.iter().map(|(id, nd)| (id, *nd));
        Ok(self.encode_digest(version, entries, usize::MAX, out).len)
    }
}

fn encode_digest_v0<'a>(
    entries: impl IntoIterator<Item = (&'a ChitchatId, NodeDigest)>,
    max_len: usize,
    out: &mut Vec<u8>,
) -> DigestEncoding {
    let start = out.len();
    put_u16(out, 0);
    let mut len = V0_DIGEST_COUNT_LEN;
    let mut written = 0;
    let mut skipped = 0;
    for (id, node_digest) in entries {
        let entry_len = digest_entry_len(id);
        if written == MAX_V0_ENTRIES || !encodable(id) || len + entry_len > max_len {
            skipped += 1;
            continue;
        }
        put_entry(out, id, &node_digest);
        len += entry_len;
        written += 1;
    }
    // `written` is at most MAX_V0_ENTRIES.
    let count = u16::try_from(written).unwrap_or(u16::MAX);
    out[start..start + 2].copy_from_slice(&count.to_le_bytes());
    DigestEncoding {
        len,
        written,
        skipped,
    }
}

/// One received entry: where its id's wire bytes are in the view, and its node digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntrySpan {
    start: u32,
    id_len: u32,
    digest: NodeDigest,
    /// Position of the id in the [`KnownIds`] the view was scanned with, [`NOT_KNOWN`] if
    /// it is none of them (or the view was scanned without).
    known: u32,
}

/// [`EntrySpan::known`] of an id the receiver does not hold.
const NOT_KNOWN: u32 = u32::MAX;

/// The ids a receiver holds, in the order its own digests list them (id order), as their wire
/// encodings. Scanning a digest with them recognises an entry by comparing its first bytes
/// with the encoding of the id expected next (a peer's digest is sorted like ours and lists
/// nearly the same ids): no field is parsed and no name checked for a known id, which is what
/// nearly every entry is. An id encoding is self-delimiting, so bytes that start with a
/// valid encoding hold exactly that id. Issue 11: at 1,000 nodes this takes the scan and the
/// match of an up-to-date digest from about 163 to about 122 instructions per entry (scan 75 →
/// 93, match 88 → 29; callgrind on `scripts/instructions.sh`'s harness).
pub(crate) trait KnownIds {
    /// Names this set of ids: a view remembers it, and positions are used only by the holder
    /// of the same token (a table is rebuilt, with a new token, when ids are added or removed).
    fn token(&self) -> u64;
    /// The number of ids.
    fn len(&self) -> usize;
    /// The wire encoding of the `position`-th id; empty if its bytes cannot identify it.
    fn encoding(&self, position: usize) -> &[u8];
    /// The position of the id encoded exactly as `id_bytes`.
    fn position_of(&self, id_bytes: &[u8]) -> Option<usize>;
}

/// No known ids: the scan parses every entry.
pub(crate) struct NoKnownIds;

impl KnownIds for NoKnownIds {
    fn token(&self) -> u64 {
        u64::MAX
    }

    fn len(&self) -> usize {
        0
    }

    fn encoding(&self, _position: usize) -> &[u8] {
        &[]
    }

    fn position_of(&self, _id_bytes: &[u8]) -> Option<usize> {
        None
    }
}

/// `a == b` for the short slices ids are (about 30 bytes), a word at a time (the last word
/// overlapping the one before), without a call into `memcmp`.
#[inline]
fn short_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len();
    if len != b.len() {
        return false;
    }
    if len < 8 {
        return a == b;
    }
    let word = |bytes: &[u8], at: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_ne_bytes(word)
    };
    let mut at = 0;
    while at + 8 < len {
        if word(a, at) != word(b, at) {
            return false;
        }
        at += 8;
    }
    word(a, len - 8) == word(b, len - 8)
}

/// A digest as received: its entries in the order they came, each with its id's wire bytes
/// (checked: a well-formed id, UTF-8 name) and its node digest. Parsing builds no id, sorts
/// nothing and needs no state: matching entries to node states is the protocol's business
/// (by wire bytes, against its own cached encodings), and only ids it does not know are read
/// into [`ChitchatIdRef`]s. Of duplicate ids, the last one received counts, as when decoding
/// into a map.
#[derive(Debug, Clone, Default)]
pub struct DigestView<'a> {
    /// The entries' bytes, borrowed from the datagram (V0) or the decompressed stream (V1),
    /// or encoded from an owned digest.
    bytes: Cow<'a, [u8]>,
    entries: Vec<EntrySpan>,
    /// The token of the [`KnownIds`] the entries were scanned with.
    known_token: Option<u64>,
}

/// One entry of a [`DigestView`], in received order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestEntry<'a> {
    /// The id as encoded on the wire (name length, name, generation, address).
    pub id_bytes: &'a [u8],
    /// Heartbeat and versions.
    pub digest: NodeDigest,
}

impl<'a> DigestEntry<'a> {
    /// The id, read from its wire bytes (checked when the view was built).
    pub fn id(&self) -> ChitchatIdRef<'a> {
        let parsed = Reader::new(self.id_bytes).chitchat_id_ref();
        debug_assert!(parsed.is_ok(), "digest view ids are checked when decoded");
        parsed.unwrap_or(ChitchatIdRef {
            node_id: "",
            generation_id: 0,
            gossip_advertise_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        })
    }
}

impl<'a> DigestView<'a> {
    /// A view of an owned digest (its ids encoded once, in id order).
    pub fn from_digest(digest: &'a Digest) -> Self {
        let mut bytes = Vec::new();
        let mut entries = Vec::with_capacity(digest.len());
        for (id, node_digest) in &digest.node_digests {
            let start = bytes.len();
            // An id the wire cannot carry (name over 65 535 bytes) could not have been received.
            if put_chitchat_id(&mut bytes, id).is_err() {
                continue;
            }
            let (Ok(start32), Ok(id_len)) =
                (u32::try_from(start), u32::try_from(bytes.len() - start))
            else {
                bytes.truncate(start);
                break;
            };
            entries.push(EntrySpan {
                start: start32,
                id_len,
                digest: *node_digest,
                known: NOT_KNOWN,
            });
        }
        DigestView {
            bytes: Cow::Owned(bytes),
            entries,
            known_token: None,
        }
    }

    /// If the view was scanned with the known ids of `token`: each entry's node digest and the
    /// position of its id among them (`None`: an id not held), in received order.
    pub(crate) fn known_positions(
        &self,
        token: u64,
    ) -> Option<impl ExactSizeIterator<Item = (Option<usize>, NodeDigest)> + '_> {
        (self.known_token == Some(token)).then(|| {
            self.entries.iter().map(|span| {
                let known = (span.known != NOT_KNOWN).then_some(span.known as usize);
                (known, span.digest)
            })
        })
    }

    /// Entries in the order received, duplicates included.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = DigestEntry<'_>> + '_ {
        let bytes: &[u8] = &self.bytes;
        self.entries.iter().map(move |span| entry(bytes, span))
    }

    /// The entry at `position` in received order.
    pub fn entry_at(&self, position: usize) -> Option<DigestEntry<'_>> {
        self.entries
            .get(position)
            .map(|span| entry(&self.bytes, span))
    }

    /// Entries received, duplicates included.
    pub fn num_received(&self) -> usize {
        self.entries.len()
    }

    /// One entry per id, in id order (of duplicates, the last received). Allocates: for tests
    /// and owned copies, not the hot path.
    pub fn sorted_entries(&self) -> Vec<(ChitchatIdRef<'_>, NodeDigest)> {
        let entries: Vec<(ChitchatIdRef<'_>, NodeDigest)> = self
            .iter()
            .map(|entry| (entry.id(), entry.digest))
            .collect();
        sort_and_dedup(entries)
    }

    /// Distinct ids in the digest.
    pub fn len(&self) -> usize {
        self.sorted_entries().len()
    }

    /// True for the empty digest (a node that knows nobody, not even itself).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `id`, if any (the last received).
    pub fn get(&self, id: &ChitchatId) -> Option<NodeDigest> {
        self.iter()
            .filter(|entry| entry.id().cmp_id(id).is_eq())
            .last()
            .map(|entry| entry.digest)
    }

    /// An owned copy (allocates an id per entry).
    pub fn to_digest(&self) -> Digest {
        Digest {
            node_digests: self
                .iter()
                .map(|entry| (entry.id().to_owned_id(), entry.digest))
                .collect(),
        }
    }
}

#[inline]
fn entry<'a>(bytes: &'a [u8], span: &EntrySpan) -> DigestEntry<'a> {
    let start = span.start as usize;
    let end = start + span.id_len as usize;
    DigestEntry {
        id_bytes: bytes.get(start..end).unwrap_or_default(),
        digest: span.digest,
    }
}

/// Views are equal when they say the same thing: the same last entry per id.
impl PartialEq for DigestView<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.sorted_entries() == other.sorted_entries()
    }
}

impl Eq for DigestView<'_> {}

/// Sorts entries by id and keeps, of equal ids, the last one (stable sort: the last received
/// stays last).
pub(crate) fn sort_and_dedup<T: Copy>(
    mut entries: Vec<(ChitchatIdRef<'_>, T)>,
) -> Vec<(ChitchatIdRef<'_>, T)> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut kept = 0;
    for i in 0..entries.len() {
        if kept > 0 && entries[kept - 1].0 == entries[i].0 {
            entries[kept - 1] = entries[i];
        } else {
            entries[kept] = entries[i];
            kept += 1;
        }
    }
    entries.truncate(kept);
    entries
}

/// The entry of `region` at `pos` and where the next one starts, if it is well formed with
/// an ASCII name: the usual case, checked with a few bounds checks and no reader.
#[inline]
fn scan_plain_entry(region: &[u8], pos: usize) -> Option<(EntrySpan, usize)> {
    let rest = region.get(pos..)?;
    let (len, after_len) = rest.split_first_chunk::<2>()?;
    let name_len = usize::from(u16::from_le_bytes(*len));
    if !after_len.get(..name_len)?.is_ascii() {
        return None;
    }
    // Name, generation (8 bytes), then the address tag.
    let ip_len = match *after_len.get(name_len + 8)? {
        4 => 4,
        6 => 16,
        _ => return None,
    };
    let id_len = 2 + name_len + 8 + 1 + ip_len + 2;
    let (fields, _) = rest.get(id_len..)?.split_first_chunk::<NODE_DIGEST_LEN>()?;
    let span = EntrySpan {
        start: u32::try_from(pos).ok()?,
        id_len: u32::try_from(id_len).ok()?,
        digest: read_node_digest(fields),
        known: NOT_KNOWN,
    };
    Some((span, pos + id_len + NODE_DIGEST_LEN))
}

#[inline]
fn read_node_digest(fields: &[u8; NODE_DIGEST_LEN]) -> NodeDigest {
    let word = |i: usize| {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&fields[i * 8..i * 8 + 8]);
        u64::from_le_bytes(bytes)
    };
    NodeDigest::new(Heartbeat::from(word(0)), word(1), word(2))
}

/// The entry of `region` at `pos`, recognised as the `expected`-th known id if it starts with
/// that id's encoding, else scanned and looked up; and where the next entry starts.
#[inline]
fn scan_entry_known<K: KnownIds + ?Sized>(
    region: &[u8],
    pos: usize,
    known: &K,
    expected: usize,
) -> Result<(EntrySpan, usize), DecodeError> {
    if expected < known.len() {
        let encoding = known.encoding(expected);
        let id_len = encoding.len();
        if id_len > 0
            && let Some(rest) = region.get(pos..)
            && let Some(id_bytes) = rest.get(..id_len)
            && let Some((fields, _)) = rest[id_len..].split_first_chunk::<NODE_DIGEST_LEN>()
            && short_eq(id_bytes, encoding)
            && let (Ok(start), Ok(id_len32), Ok(known32)) = (
                u32::try_from(pos),
                u32::try_from(id_len),
                u32::try_from(expected),
            )
        {
            let span = EntrySpan {
                start,
                id_len: id_len32,
                digest: read_node_digest(fields),
                known: known32,
            };
            return Ok((span, pos + id_len + NODE_DIGEST_LEN));
        }
    }
    let (mut span, next) = scan_entry(region, pos)?;
    let id_bytes = entry(region, &span).id_bytes;
    if let Some(position) = known.position_of(id_bytes) {
        span.known = u32::try_from(position).unwrap_or(NOT_KNOWN);
    }
    Ok((span, next))
}

/// Scans the entries of `region` into `entries`: `count` of them (V0), or until the region
/// ends (V1). Returns where the last one ends.
fn scan_entries<K: KnownIds + ?Sized>(
    region: &[u8],
    count: Option<usize>,
    known: Option<&K>,
    entries: &mut Vec<EntrySpan>,
) -> Result<usize, DecodeError> {
    let mut pos = 0;
    let mut expected = 0;
    loop {
        let more = match count {
            Some(count) => entries.len() < count,
            None => pos < region.len(),
        };
        if !more {
            return Ok(pos);
        }
        let (span, next) = match known {
            Some(known) => {
                let scanned = scan_entry_known(region, pos, known, expected)?;
                if scanned.0.known != NOT_KNOWN {
                    expected = scanned.0.known as usize + 1;
                }
                scanned
            }
            None => scan_entry(region, pos)?,
        };
        entries.push(span);
        pos = next;
    }
}

/// The entry of `region` at `pos` and where the next one starts, or the error the reference
/// reports for it.
#[inline]
fn scan_entry(region: &[u8], pos: usize) -> Result<(EntrySpan, usize), DecodeError> {
    match scan_plain_entry(region, pos) {
        Some(scanned) => Ok(scanned),
        None => scan_entry_checked(region, pos),
    }
}

/// [`scan_entry`] field by field, for the error naming what is wrong (and for non-ASCII
/// names).
#[cold]
fn scan_entry_checked(region: &[u8], pos: usize) -> Result<(EntrySpan, usize), DecodeError> {
    let mut reader = Reader::new(region.get(pos..).unwrap_or_default());
    reader.skip_chitchat_id()?;
    let id_len = region.len() - reader.len() - pos;
    let heartbeat = Heartbeat::from(reader.u64("heartbeat")?);
    let last_gc_version = reader.u64("last gc version")?;
    let max_version = reader.u64("max version")?;
    // A datagram (or a decompressed stream, capped far lower) is shorter than 4 GiB.
    let too_long = || DecodeError::Truncated { what: "digest" };
    let span = EntrySpan {
        start: u32::try_from(pos).map_err(|_| too_long())?,
        id_len: u32::try_from(id_len).map_err(|_| too_long())?,
        digest: NodeDigest::new(heartbeat, last_gc_version, max_version),
        known: NOT_KNOWN,
    };
    Ok((span, region.len() - reader.len()))
}

/// Reads a digest in `version`, borrowing its ids from the input (V0) or from `stream`, the
/// decompressed payload (V1). With `known`, each entry also gets the position of its id among
/// them (see [`KnownIds`]); what is accepted and rejected is the same either way.
pub(crate) fn decode_digest_view<'i: 'o, 'o, K: KnownIds + ?Sized>(
    version: ProtocolVersion,
    reader: &mut Reader<'i>,
    dctx: Option<&mut zstd::zstd_safe::DCtx<'static>>,
    block: &mut [u8],
    stream: &'o mut Vec<u8>,
    known: Option<&K>,
) -> Result<DigestView<'o>, DecodeError> {
    let known_token = known.map(|known| known.token());
    match version {
        ProtocolVersion::V0 => {
            let count = reader.u16("digest entry count")?;
            let region = reader.rest();
            // Bounded by what the bytes left can hold, whatever the count claims.
            let mut entries =
                Vec::with_capacity(usize::from(count).min(region.len() / NODE_DIGEST_LEN));
            let pos = scan_entries(region, Some(usize::from(count)), known, &mut entries)?;
            let (consumed, rest) = region.split_at_checked(pos).unwrap_or((region, &[]));
            *reader = Reader::new(rest);
            Ok(DigestView {
                bytes: Cow::Borrowed(consumed),
                entries,
                known_token,
            })
        }
        ProtocolVersion::V1 => {
            let payload = read_block_stream(reader, dctx, block, stream)?;
            let mut entries = Vec::with_capacity(payload.len() / (NODE_DIGEST_LEN + 17));
            scan_entries(payload, None, known, &mut entries)?;
            Ok(DigestView {
                bytes: Cow::Borrowed(payload),
                entries,
                known_token,
            })
        }
    }
}

impl Decoder {
    /// A view of the digest that `bytes` hold (in `version`), borrowing from them and from
    /// this decoder; bytes after the digest are ignored (tests).
    #[cfg(test)]
    pub(crate) fn decode_digest_bytes<'a>(
        &'a mut self,
        version: ProtocolVersion,
        bytes: &'a [u8],
    ) -> Result<DigestView<'a>, DecodeError> {
        self.decode_digest_bytes_known(version, bytes, None::<&NoKnownIds>)
    }

    /// [`Decoder::decode_digest_bytes`], scanned with `known` ids (tests).
    #[cfg(test)]
    pub(crate) fn decode_digest_bytes_known<'a, K: KnownIds + ?Sized>(
        &'a mut self,
        version: ProtocolVersion,
        bytes: &'a [u8],
        known: Option<&K>,
    ) -> Result<DigestView<'a>, DecodeError> {
        let mut reader = Reader::new(bytes);
        decode_digest_view(
            version,
            &mut reader,
            self.dctx.as_mut(),
            &mut self.block,
            &mut self.digest_stream,
            known,
        )
    }
}

impl Decoder {
    /// Reads a digest in `version`; later duplicates of an id overwrite earlier ones.
    pub(crate) fn decode_digest(
        &mut self,
        version: ProtocolVersion,
        reader: &mut Reader<'_>,
    ) -> Result<Digest, DecodeError> {
        let view = decode_digest_view(
            version,
            reader,
            self.dctx.as_mut(),
            &mut self.block,
            &mut self.stream,
            None::<&NoKnownIds>,
        )?;
        Ok(view.to_digest())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::testing::arb_digest;

    fn sample(num_nodes: u16) -> Digest {
        let mut digest = Digest::default();
        for i in 0..num_nodes {
            digest.add_node(
                ChitchatId::for_local_test(10_000 + i),
                NodeDigest::new(
                    Heartbeat::from(100 + i as u64),
                    i as u64 % 7,
                    1_000 + i as u64,
                ),
            );
        }
        digest
    }

    fn encode(version: ProtocolVersion, digest: &Digest) -> Vec<u8> {
        let mut out = Vec::new();
        let len = Encoder::new()
            .encode_owned_digest(version, digest, &mut out)
            .unwrap();
        assert_eq!(len, out.len());
        out
    }

    fn decode(version: ProtocolVersion, bytes: &[u8]) -> Result<Digest, DecodeError> {
        let mut reader = Reader::new(bytes);
        let digest = Decoder::new().decode_digest(version, &mut reader)?;
        assert!(reader.is_empty());
        Ok(digest)
    }

    #[test]
    fn node_digest_is_24_bytes() {
        let id = ChitchatId::for_local_test(10_001);
        let mut out = Vec::new();
        put_entry(&mut out, &id, &NodeDigest::new(Heartbeat::from(100), 2, 3));
        assert_eq!(out.len(), 27 + NODE_DIGEST_LEN);
        assert_eq!(&out[27..35], &100u64.to_le_bytes());
        assert_eq!(&out[35..43], &2u64.to_le_bytes());
        assert_eq!(&out[43..51], &3u64.to_le_bytes());
    }

    #[test]
    fn v0_with_a_duplicate_is_104_bytes() {
        let mut digest = Digest::default();
        digest.add_node(
            ChitchatId::for_local_test(10_001),
            NodeDigest::new(Heartbeat::from(101), 1, 11),
        );
        digest.add_node(
            ChitchatId::for_local_test(10_002),
            NodeDigest::new(Heartbeat::from(102), 20, 12),
        );
        digest.add_node(
            ChitchatId::for_local_test(10_002),
            NodeDigest::new(Heartbeat::from(103), 0, 13),
        );
        let bytes = encode(ProtocolVersion::V0, &digest);
        assert_eq!(bytes.len(), 104);
        assert_eq!(decode(ProtocolVersion::V0, &bytes).unwrap(), digest);
    }

    #[test]
    fn empty_digests() {
        assert_eq!(encode(ProtocolVersion::V0, &Digest::default()), [0, 0]);
        assert_eq!(encode(ProtocolVersion::V1, &Digest::default()), [0]);
        assert!(decode(ProtocolVersion::V0, &[0, 0]).unwrap().is_empty());
        assert!(decode(ProtocolVersion::V1, &[0]).unwrap().is_empty());
    }

    #[test]
    fn v1_one_node_is_one_raw_block() {
        let bytes = encode(ProtocolVersion::V1, &sample(1));
        assert_eq!(&bytes[..3], &[0x02, 0x33, 0x00]);
        assert_eq!(bytes.len(), 3 + 51 + 1);
        assert_eq!(bytes[54], 0);
        assert_eq!(&bytes[3..54], &encode(ProtocolVersion::V0, &sample(1))[2..]);
    }

    #[test]
    fn v1_round_trips_and_compresses() {
        for num_nodes in [0, 1, 3, 500, 1_000] {
            let digest = sample(num_nodes);
            let v1 = encode(ProtocolVersion::V1, &digest);
            assert_eq!(decode(ProtocolVersion::V1, &v1).unwrap(), digest);
            let v0 = encode(ProtocolVersion::V0, &digest);
            assert_eq!(decode(ProtocolVersion::V0, &v0).unwrap(), digest);
            if num_nodes >= 3 {
                assert!(v1.len() < v0.len());
            }
        }
    }

    #[test]
    fn v1_partial_entry_is_an_error() {
        let mut bytes = encode(ProtocolVersion::V0, &sample(1));
        bytes.truncate(bytes.len() - 1);
        let mut stream = vec![2, (bytes.len() - 2) as u8, 0];
        stream.extend_from_slice(&bytes[2..]);
        stream.push(0);
        assert_eq!(
            decode(ProtocolVersion::V1, &stream),
            Err(DecodeError::Truncated {
                what: "max version"
            })
        );
    }

    #[test]
    fn v0_count_larger_than_entries_is_an_error() {
        let mut bytes = encode(ProtocolVersion::V0, &sample(2));
        bytes[0] = 3;
        assert!(matches!(
            decode(ProtocolVersion::V0, &bytes),
            Err(DecodeError::Truncated { .. })
        ));
        // A huge count with no entries does not allocate anything.
        assert!(decode(ProtocolVersion::V0, &[0xff, 0xff]).is_err());
    }

    #[test]
    fn v0_digest_is_limited_to_65535_entries() {
        let mut digest = Digest::default();
        for i in 0..=MAX_V0_ENTRIES {
            digest.add_node(
                ChitchatId::new(i.to_string(), 0, "127.0.0.1:1".parse().unwrap()),
                NodeDigest::default(),
            );
        }
        let mut out = Vec::new();
        let mut encoder = Encoder::new();
        assert_eq!(
            encoder.encode_owned_digest(ProtocolVersion::V0, &digest, &mut out),
            Err(EncodeError::TooManyDigestEntries {
                count: MAX_V0_ENTRIES + 1
            })
        );
        let entries = digest.node_digests.iter().map(|(id, nd)| (id, *nd));
        let encoding = encoder.encode_digest(ProtocolVersion::V0, entries, usize::MAX, &mut out);
        assert_eq!(encoding.written, MAX_V0_ENTRIES);
        assert_eq!(encoding.skipped, 1);
        assert_eq!(encoding.len, out.len());
        assert_eq!(
            decode(ProtocolVersion::V0, &out).unwrap().len(),
            MAX_V0_ENTRIES
        );
    }

    #[test]
    fn budget_skips_entries_but_keeps_the_first() {
        let digest = sample(100);
        let entries: Vec<(&ChitchatId, NodeDigest)> = digest
            .node_digests
            .iter()
            .map(|(id, nd)| (id, *nd))
            .collect();
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            for max_len in [0, 1, 2, 60, 100, 1_000, 3_000, 10_000] {
                let mut out = vec![0xaa];
                let encoding = Encoder::new().encode_digest(
                    version,
                    entries.iter().copied(),
                    max_len,
                    &mut out,
                );
                assert_eq!(encoding.len, out.len() - 1);
                assert_eq!(encoding.written + encoding.skipped, 100);
                assert!(encoding.len <= max_len.max(2), "{version:?} {max_len}");
                let decoded = decode(version, &out[1..]).unwrap();
                assert_eq!(decoded.len(), encoding.written);
                if max_len >= 60 {
                    assert!(decoded.node_digests.contains_key(entries[0].0));
                }
            }
        }
    }

    #[test]
    fn unencodable_node_id_is_refused() {
        let mut digest = Digest::default();
        let long_id = ChitchatId::new("x".repeat(70_000), 0, "127.0.0.1:1".parse().unwrap());
        digest.add_node(long_id.clone(), NodeDigest::default());
        let mut out = Vec::new();
        let mut encoder = Encoder::new();
        assert!(matches!(
            encoder.encode_owned_digest(ProtocolVersion::V1, &digest, &mut out),
            Err(EncodeError::StringTooLong { .. })
        ));
        let encoding = encoder.encode_digest(
            ProtocolVersion::V1,
            [(&long_id, NodeDigest::default())],
            usize::MAX,
            &mut out,
        );
        assert_eq!((encoding.written, encoding.skipped), (0, 1));
        assert_eq!(out, [0]);
    }

    proptest! {
        #[test]
        fn round_trip(digest in arb_digest(300)) {
            for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
                let bytes = encode(version, &digest);
                prop_assert_eq!(decode(version, &bytes).unwrap(), digest.clone());
            }
        }
    }
}
