//! Fixed-width little-endian integers, u16-prefixed strings, IP/socket addresses and
//! `ChitchatId` (owned, or borrowed as [`ChitchatIdRef`]): a bounds-checked reader over `&[u8]`
//! and the matching writers and lengths.

use std::cmp::Ordering;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::error::{DecodeError, EncodeError};
use crate::types::ChitchatId;

const IP_V4_TAG: u8 = 4;
const IP_V6_TAG: u8 = 6;

/// A node id borrowed from a datagram (or from an owned id), so decoding a digest allocates no
/// id per entry. Its order is `ChitchatId`'s: name bytes, then generation, then address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChitchatIdRef<'a> {
    /// The node's name.
    pub node_id: &'a str,
    /// Tells incarnations of one name apart (chitchat uses the start time).
    pub generation_id: u64,
    /// Where the node receives gossip.
    pub gossip_advertise_addr: SocketAddr,
}

impl<'a> From<&'a ChitchatId> for ChitchatIdRef<'a> {
    fn from(id: &'a ChitchatId) -> Self {
        ChitchatIdRef {
            node_id: &id.node_id,
            generation_id: id.generation_id,
            gossip_advertise_addr: id.gossip_advertise_addr,
        }
    }
}

impl ChitchatIdRef<'_> {
    /// An owned copy, for the node states a digest makes us create.
    pub fn to_owned_id(&self) -> ChitchatId {
        ChitchatId::new(self.node_id, self.generation_id, self.gossip_advertise_addr)
    }

    /// Compares with an owned id, in `ChitchatId` order.
    pub fn cmp_id(&self, id: &ChitchatId) -> Ordering {
        self.cmp(&ChitchatIdRef::from(id))
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked and names what was missing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes left to read.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        let Some((head, tail)) = self.buf.split_at_checked(len) else {
            return Err(DecodeError::Truncated { what });
        };
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let Some((head, tail)) = self.buf.split_first_chunk::<N>() else {
            return Err(DecodeError::Truncated { what });
        };
        self.buf = tail;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[byte]| byte)
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_le_bytes)
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u16-length-prefixed UTF-8 string, borrowed from the input.
    pub(crate) fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let len = self.u16(what)? as usize;
        let bytes = self.bytes(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    pub(crate) fn ip_addr(&mut self) -> Result<IpAddr, DecodeError> {
        match self.u8("IP address tag")? {
            IP_V4_TAG => Ok(Ipv4Addr::from(self.array::<4>("IPv4 address")?).into()),
            IP_V6_TAG => Ok(Ipv6Addr::from(self.array::<16>("IPv6 address")?).into()),
            tag => Err(DecodeError::BadIpTag(tag)),
        }
    }

    pub(crate) fn socket_addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = self.ip_addr()?;
        let port = self.u16("port")?;
        Ok(SocketAddr::new(ip, port))
    }

    /// A node id borrowing its name from the input.
    pub(crate) fn chitchat_id_ref(&mut self) -> Result<ChitchatIdRef<'a>, DecodeError> {
        let node_id = self.str("node id")?;
        let generation_id = self.u64("generation id")?;
        let gossip_advertise_addr = self.socket_addr()?;
        Ok(ChitchatIdRef {
            node_id,
            generation_id,
            gossip_advertise_addr,
        })
    }

    /// The bytes not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Checks and skips a node id without building it: the same checks, in the same order and
    /// with the same errors, as [`Reader::chitchat_id_ref`]. A well-formed id with an ASCII
    /// name (the usual case) takes a short path without the full UTF-8 validation.
    #[inline]
    pub(crate) fn skip_chitchat_id(&mut self) -> Result<(), DecodeError> {
        if let Some(rest) = self.well_formed_ascii_id_rest() {
            self.buf = rest;
            return Ok(());
        }
        self.skip_chitchat_id_checked()
    }

    /// [`Reader::skip_chitchat_id`] field by field, for the error naming what is wrong (and
    /// for non-ASCII names).
    #[cold]
    fn skip_chitchat_id_checked(&mut self) -> Result<(), DecodeError> {
        let len = self.u16("node id")? as usize;
        let name = self.bytes(len, "node id")?;
        if !name.is_ascii() && std::str::from_utf8(name).is_err() {
            return Err(DecodeError::InvalidUtf8 { what: "node id" });
        }
        self.array::<8>("generation id")?;
        match self.u8("IP address tag")? {
            IP_V4_TAG => {
                self.array::<4>("IPv4 address")?;
            }
            IP_V6_TAG => {
                self.array::<16>("IPv6 address")?;
            }
            tag => return Err(DecodeError::BadIpTag(tag)),
        }
        self.array::<2>("port")?;
        Ok(())
    }

    /// What follows a complete node id with an ASCII name at the cursor, if there is one.
    #[inline]
    fn well_formed_ascii_id_rest(&self) -> Option<&'a [u8]> {
        let (len, rest) = self.buf.split_first_chunk::<2>()?;
        let (name, rest) = rest.split_at_checked(usize::from(u16::from_le_bytes(*len)))?;
        if !name.is_ascii() {
            return None;
        }
        // Generation (8 bytes), then the address tag.
        let tag = *rest.get(8)?;
        let ip_len = match tag {
            IP_V4_TAG => 4,
            IP_V6_TAG => 16,
            _ => return None,
        };
        // Tag, address and port.
        rest.get(8 + 1 + ip_len + 2..)
    }
}

pub(crate) fn put_u8(out: &mut Vec<u8>, value: u8) {
    out.push(value);
}

pub(crate) fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// Checks that `s` fits the u16 length prefix; the reference would silently corrupt it.
pub(crate) fn check_str(s: &str, what: &'static str) -> Result<u16, EncodeError> {
    u16::try_from(s.len()).map_err(|_| EncodeError::StringTooLong { what, len: s.len() })
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), EncodeError> {
    let len = check_str(s, what)?;
    put_u16(out, len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Encoded length of a u16-prefixed string.
pub(crate) fn str_len(s: &str) -> usize {
    2 + s.len()
}

pub(crate) fn put_ip_addr(out: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(IP_V4_TAG);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(IP_V6_TAG);
            out.extend_from_slice(&v6.octets());
        }
    }
}

pub(crate) fn ip_addr_len(ip: &IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 5,
        IpAddr::V6(_) => 17,
    }
}

/// IPv6 flow info and scope id are not transmitted, as in the reference.
pub(crate) fn put_socket_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    put_ip_addr(out, &addr.ip());
    put_u16(out, addr.port());
}

pub(crate) fn socket_addr_len(addr: &SocketAddr) -> usize {
    ip_addr_len(&addr.ip()) + 2
}

pub(crate) fn put_chitchat_id(out: &mut Vec<u8>, id: &ChitchatId) -> Result<(), EncodeError> {
    put_str(out, &id.node_id, "node id")?;
    put_u64(out, id.generation_id);
    put_socket_addr(out, &id.gossip_advertise_addr);
    Ok(())
}

/// Encoded length of a `ChitchatId` (27 bytes for `node-10001` on IPv4).
pub fn chitchat_id_len(id: &ChitchatId) -> usize {
    str_len(&id.node_id) + 8 + socket_addr_len(&id.gossip_advertise_addr)
}

#[cfg(test)]
mod tests {
    use chitchat::{Deserializable as _, Serializable as _};
    use proptest::prelude::*;

    use super::*;
    use crate::wire::format::MAX_STRING_LEN;
    use crate::wire::testing::arb_socket_addr;

    fn encode_id(id: &ChitchatId) -> Vec<u8> {
        let mut out = Vec::new();
        put_chitchat_id(&mut out, id).unwrap();
        assert_eq!(out.len(), chitchat_id_len(id));
        out
    }

    #[test]
    fn chitchat_id_v6_bytes_match_spec() {
        let id = ChitchatId::new("n", 1, "[::1]:7280".parse().unwrap());
        let mut expected = vec![0x01, 0x00, 0x6e, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x06];
        expected.extend_from_slice(&[0; 15]);
        expected.extend_from_slice(&[0x01, 0x70, 0x1c]);
        assert_eq!(encode_id(&id), expected);
        let mut reader = Reader::new(&expected);
        assert_eq!(reader.chitchat_id_ref().unwrap().to_owned_id(), id);
        assert!(reader.is_empty());
    }

    #[test]
    fn chitchat_id_sizes() {
        assert_eq!(encode_id(&ChitchatId::for_local_test(10_001)).len(), 27);
        let id = ChitchatId::new("node-id", 1, "127.0.0.1:7280".parse().unwrap());
        assert_eq!(encode_id(&id).len(), 24);
    }

    #[test]
    fn ip_sizes_and_port_endianness() {
        let mut out = Vec::new();
        put_socket_addr(&mut out, &"127.0.0.1:10001".parse().unwrap());
        assert_eq!(out, [4, 127, 0, 0, 1, 0x11, 0x27]);
        let mut out = Vec::new();
        put_ip_addr(&mut out, &"::1".parse().unwrap());
        assert_eq!(out.len(), 17);
    }

    #[test]
    fn reader_errors() {
        assert_eq!(Reader::new(&[5]).ip_addr(), Err(DecodeError::BadIpTag(5)));
        assert_eq!(
            Reader::new(&[4, 1, 2]).ip_addr(),
            Err(DecodeError::Truncated {
                what: "IPv4 address"
            })
        );
        assert_eq!(
            Reader::new(&[2, 0, 0xff, 0xfe]).str("key"),
            Err(DecodeError::InvalidUtf8 { what: "key" })
        );
        assert_eq!(
            Reader::new(&[3, 0, b'a']).str("key"),
            Err(DecodeError::Truncated { what: "key" })
        );
        assert_eq!(
            Reader::new(&[0xff, 0xff]).str("key"),
            Err(DecodeError::Truncated { what: "key" })
        );
    }

    #[test]
    fn too_long_string_is_refused_not_truncated() {
        let long = "x".repeat(MAX_STRING_LEN + 1);
        let mut out = Vec::new();
        assert_eq!(
            put_str(&mut out, &long, "value"),
            Err(EncodeError::StringTooLong {
                what: "value",
                len: MAX_STRING_LEN + 1
            })
        );
        assert!(out.is_empty());
        put_str(&mut out, &long[1..], "value").unwrap();
        assert_eq!(out.len(), 2 + MAX_STRING_LEN);
        assert_eq!(Reader::new(&out).str("value").unwrap(), &long[1..]);
    }

    fn to_reference(id: &ChitchatId) -> chitchat::ChitchatId {
        chitchat::ChitchatId::new(
            id.node_id.to_string(),
            id.generation_id,
            id.gossip_advertise_addr,
        )
    }

    proptest! {
        #[test]
        fn chitchat_id_matches_reference(
            node_id in "\\PC{0,40}",
            generation_id in any::<u64>(),
            addr in arb_socket_addr(),
        ) {
            let id = ChitchatId::new(node_id, generation_id, addr);
            let ours = encode_id(&id);
            let theirs = to_reference(&id).serialize_to_vec();
            prop_assert_eq!(&ours, &theirs);
            let mut theirs_slice = &theirs[..];
            let decoded_by_them = chitchat::ChitchatId::deserialize(&mut theirs_slice).unwrap();
            prop_assert_eq!(decoded_by_them, to_reference(&id));
            let mut reader = Reader::new(&ours);
            prop_assert_eq!(reader.chitchat_id_ref().unwrap().to_owned_id(), id);
            prop_assert!(reader.is_empty());
        }

        #[test]
        fn socket_addr_and_ip_match_reference(addr in arb_socket_addr()) {
            let mut ours = Vec::new();
            put_socket_addr(&mut ours, &addr);
            prop_assert_eq!(&ours, &addr.serialize_to_vec());
            prop_assert_eq!(ours.len(), socket_addr_len(&addr));
            prop_assert_eq!(Reader::new(&ours).socket_addr().unwrap(), addr);
            let mut ours_ip = Vec::new();
            put_ip_addr(&mut ours_ip, &addr.ip());
            prop_assert_eq!(&ours_ip, &addr.ip().serialize_to_vec());
        }

        #[test]
        fn integers_and_strings_match_reference(a in any::<u16>(), b in any::<u64>(), s in "\\PC{0,60}") {
            let mut ours = Vec::new();
            put_u16(&mut ours, a);
            put_u64(&mut ours, b);
            put_str(&mut ours, &s, "s").unwrap();
            let mut theirs = Vec::new();
            a.serialize(&mut theirs);
            b.serialize(&mut theirs);
            s.serialize(&mut theirs);
            prop_assert_eq!(&ours, &theirs);
            let mut reader = Reader::new(&ours);
            prop_assert_eq!(reader.u16("a").unwrap(), a);
            prop_assert_eq!(reader.u64("b").unwrap(), b);
            prop_assert_eq!(reader.str("s").unwrap(), s.as_str());
        }

        #[test]
        fn skip_chitchat_id_checks_what_chitchat_id_ref_reads(
            bytes in proptest::collection::vec(any::<u8>(), 0..48),
            node_id in "\\PC{0,12}",
            generation_id in any::<u64>(),
            addr in arb_socket_addr(),
            cut in 0usize..64,
        ) {
            let mut valid = encode_id(&ChitchatId::new(node_id, generation_id, addr));
            valid.truncate(cut);
            for input in [&bytes[..], &valid[..]] {
                let mut parsed = Reader::new(input);
                let mut skipped = Reader::new(input);
                let parsed_result = parsed.chitchat_id_ref().map(|_| ());
                prop_assert_eq!(skipped.skip_chitchat_id(), parsed_result.clone());
                if parsed_result.is_ok() {
                    prop_assert_eq!(parsed.len(), skipped.len());
                }
            }
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut reader = Reader::new(&bytes);
            let _ = reader.chitchat_id_ref();
            let mut reader = Reader::new(&bytes);
            let _ = reader.str("s");
            let _ = reader.u64("u");
        }
    }
}
