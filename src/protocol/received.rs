//! A received datagram decoded without the node's state, so that the server can decode it
//! before taking the node lock (issue 13, "cost under flood"): the lock then covers only the
//! matching against the state and the reply, never the parsing, decompression and UTF-8
//! validation of up to 4 MiB of digest.

use std::cell::RefCell;
use std::sync::Arc;

use crate::message::{ChitchatEnvelope, ProtocolVersion};
use crate::protocol::digest_match::IdTable;
use crate::wire::{self, DecodeError, Decoder, EnvelopeView, MessageView};

thread_local! {
    /// zstd context and scratch buffers, one per thread that decodes. Apart from the encoder
    /// (`reply.rs`), so that a reply can be encoded while the message it answers is still
    /// borrowed from here.
    static DECODER: RefCell<Decoder> = RefCell::new(Decoder::new());
}

/// A decoded datagram, borrowing from the datagram and from this thread's decoder.
#[derive(Debug)]
pub enum Received<'a> {
    /// A Syn of another cluster: a V1 digest was only walked over (not decompressed), a V0
    /// one scanned once.
    OtherClusterSyn {
        /// The Syn's version, which the BadCluster reply echoes.
        version: ProtocolVersion,
        /// The cluster the sender belongs to.
        cluster_id: &'a str,
    },
    /// Any other message, fully decoded.
    Message(EnvelopeView<'a>),
}

/// The ids a node holds, as their wire encodings in id order, taken from the node (under its
/// lock) with [`Chitchat::digest_hint_for`](crate::Chitchat::digest_hint_for) and used by
/// [`decode_received_with`] outside it: a received digest is then matched while it is
/// scanned, by comparing each entry's bytes with the id expected next, instead of being
/// parsed and matched after. If the node's membership changed in between, the hint is stale
/// and the node matches the digest the general way: same result, more work.
#[derive(Debug, Clone)]
pub struct DigestHint(pub(crate) Arc<IdTable>);

/// Decodes `payload` for a node of `cluster_id` and hands it to `f`. Needs no node state and
/// no lock; a V1 Syn's cluster id is read before its digest is decompressed.
pub fn decode_received<T>(
    cluster_id: &str,
    payload: &[u8],
    f: impl FnOnce(Received<'_>) -> T,
) -> Result<T, DecodeError> {
    decode_received_with(None, cluster_id, payload, f)
}

/// [`decode_received`], the digest scanned with the receiving node's ids (see
/// [`DigestHint`]). Accepts and rejects exactly the same datagrams.
pub fn decode_received_with<T>(
    hint: Option<&DigestHint>,
    cluster_id: &str,
    payload: &[u8],
    f: impl FnOnce(Received<'_>) -> T,
) -> Result<T, DecodeError> {
    let known = hint.map(|hint| &*hint.0);
    if wire::is_v0_syn(payload) {
        // A V0 digest costs a scan whether walked or decoded, with the same checks and
        // errors: decoded once, its cluster id read after (walking it first as well was 2 % of
        // a 500-node process). A Syn of another cluster costs that one scan, as before.
        return with_view(payload, known, |view| match view.message {
            MessageView::Syn {
                cluster_id: theirs, ..
            } if theirs != cluster_id => f(Received::OtherClusterSyn {
                version: view.version,
                cluster_id: theirs,
            }),
            _ => f(Received::Message(view)),
        });
    }
    if let Some((version, theirs)) = wire::syn_cluster_id(payload)?
        && theirs != cluster_id
    {
        return Ok(f(Received::OtherClusterSyn {
            version,
            cluster_id: theirs,
        }));
    }
    with_view(payload, known, |view| f(Received::Message(view)))
}

/// Decodes an owned envelope with this thread's decoder.
pub(crate) fn decode(bytes: &[u8]) -> Result<ChitchatEnvelope, DecodeError> {
    DECODER.with(|decoder| decoder.borrow_mut().decode_envelope(bytes))
}

/// Decodes a borrowed view of `bytes` with this thread's decoder (its digest scanned with
/// `known`, if given) and hands it to `f`.
pub(crate) fn with_view<T>(
    bytes: &[u8],
    known: Option<&IdTable>,
    f: impl FnOnce(EnvelopeView<'_>) -> T,
) -> Result<T, DecodeError> {
    DECODER.with(|decoder| {
        let mut decoder = decoder.borrow_mut();
        let view = decoder.decode_view_known(bytes, known)?;
        Ok(f(view))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ChitchatMessage, Digest, NodeDigest};
    use crate::types::{ChitchatId, Heartbeat};

    fn syn(version: ProtocolVersion, cluster_id: &str) -> Vec<u8> {
        let mut digest = Digest::default();
        for port in 0..20 {
            digest.add_node(
                ChitchatId::for_local_test(port),
                NodeDigest::new(Heartbeat(3), 0, 5),
            );
        }
        let message = ChitchatMessage::Syn {
            cluster_id: cluster_id.to_string(),
            digest,
        };
        wire::encode_envelope(&ChitchatEnvelope { version, message }).unwrap()
    }

    /// V0 Syns are decoded once and their cluster id read after; V1 Syns are walked first.
    /// Either way a Syn of another cluster is told apart, one of ours decoded, and every cut
    /// of one fails as the walk of its framing does.
    #[test]
    fn syns_of_either_version_are_sorted_by_cluster_and_cuts_fail_alike() {
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            let theirs = syn(version, "theirs");
            let other = decode_received(
                "ours",
                &theirs,
                |received| matches!(received, Received::OtherClusterSyn { cluster_id: "theirs", version: v } if v == version),
            );
            assert_eq!(other, Ok(true), "{version:?}");
            let ours = syn(version, "ours");
            let decoded = decode_received("ours", &ours, |received| match received {
                Received::Message(view) => matches!(view.message, MessageView::Syn { .. }),
                Received::OtherClusterSyn { .. } => false,
            });
            assert_eq!(decoded, Ok(true), "{version:?}");
            if version == ProtocolVersion::V0 {
                for cut in 0..theirs.len() {
                    let walked = wire::syn_cluster_id(&theirs[..cut]).map(|_| ());
                    let got = decode_received("ours", &theirs[..cut], |_| ());
                    assert_eq!(
                        got.map_err(|e| e.kind()),
                        walked.map_err(|e| e.kind()),
                        "cut at {cut}"
                    );
                }
            }
        }
    }
}
