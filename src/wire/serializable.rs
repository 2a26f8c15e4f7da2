//! chitchat 0.13's public `Serializable`/`Deserializable` traits, for code that encodes ids,
//! addresses and counters the way the wire does. Same bytes as chitchat; where chitchat
//! silently writes a wrong length (a string over 65,535 bytes), this writes the longest prefix
//! that ends on a character boundary and fits, so what it writes always decodes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::types::{ChitchatId, Heartbeat};

/// Writes a value in the wire's binary format.
pub trait Serializable {
    /// Appends the encoding to `buf`.
    fn serialize(&self, buf: &mut Vec<u8>);

    /// The encoding in a new buffer.
    fn serialize_to_vec(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.serialized_len());
        self.serialize(&mut buf);
        buf
    }

    /// Bytes [`Serializable::serialize`] appends.
    fn serialized_len(&self) -> usize;
}

/// Reads a value in the wire's binary format, advancing `buf` past it.
pub trait Deserializable: Sized {
    /// Reads one value; an error leaves `buf` where the value started or further.
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self>;
}

/// Takes `n` bytes off the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize, what: &str) -> anyhow::Result<&'a [u8]> {
    if buf.len() < n {
        bail!("{what}: {n} bytes needed, {} left in the buffer", buf.len());
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

impl<const N: usize> Serializable for [u8; N] {
    fn serialize(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(self);
    }

    fn serialized_len(&self) -> usize {
        N
    }
}

impl<const N: usize> Deserializable for [u8; N] {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        let bytes = take(buf, N, "byte array")?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
}

macro_rules! little_endian {
    ($($t:ty),*) => {$(
        impl Serializable for $t {
            fn serialize(&self, buf: &mut Vec<u8>) {
                buf.extend_from_slice(&self.to_le_bytes());
            }

            fn serialized_len(&self) -> usize {
                std::mem::size_of::<$t>()
            }
        }

        impl Deserializable for $t {
            fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
                Ok(<$t>::from_le_bytes(Deserializable::deserialize(buf)?))
            }
        }
    )*};
}

little_endian!(u8, u16, u32, u64);

impl Serializable for bool {
    fn serialize(&self, buf: &mut Vec<u8>) {
        buf.push(u8::from(*self));
    }

    fn serialized_len(&self) -> usize {
        1
    }
}

impl Deserializable for bool {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        Ok(u8::deserialize(buf)? != 0)
    }
}

/// The longest prefix of `s` that a u16 length can carry, cut on a character boundary.
fn encodable_prefix(s: &str) -> &str {
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Serializable for str {
    fn serialize(&self, buf: &mut Vec<u8>) {
        let s = encodable_prefix(self);
        // At most u16::MAX by construction.
        (s.len() as u16).serialize(buf);
        buf.extend_from_slice(s.as_bytes());
    }

    fn serialized_len(&self) -> usize {
        2 + encodable_prefix(self).len()
    }
}

impl Serializable for String {
    fn serialize(&self, buf: &mut Vec<u8>) {
        self.as_str().serialize(buf);
    }

    fn serialized_len(&self) -> usize {
        self.as_str().serialized_len()
    }
}

fn deserialize_str<'a>(buf: &mut &'a [u8]) -> anyhow::Result<&'a str> {
    let len = usize::from(u16::deserialize(buf).context("string length")?);
    let bytes = take(buf, len, "string")?;
    std::str::from_utf8(bytes).context("string is not UTF-8")
}

impl Deserializable for String {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        deserialize_str(buf).map(str::to_owned)
    }
}

impl Deserializable for Arc<str> {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        deserialize_str(buf).map(Arc::from)
    }
}

impl Serializable for IpAddr {
    fn serialize(&self, buf: &mut Vec<u8>) {
        match self {
            IpAddr::V4(ip) => {
                buf.push(4);
                buf.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                buf.push(6);
                buf.extend_from_slice(&ip.octets());
            }
        }
    }

    fn serialized_len(&self) -> usize {
        match self {
            IpAddr::V4(_) => 5,
            IpAddr::V6(_) => 17,
        }
    }
}

impl Deserializable for IpAddr {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        match u8::deserialize(buf).context("IP version")? {
            4 => Ok(Ipv4Addr::from(<[u8; 4]>::deserialize(buf)?).into()),
            6 => Ok(Ipv6Addr::from(<[u8; 16]>::deserialize(buf)?).into()),
            other => bail!("IP version byte {other}: expected 4 or 6"),
        }
    }
}

impl Serializable for SocketAddr {
    fn serialize(&self, buf: &mut Vec<u8>) {
        self.ip().serialize(buf);
        self.port().serialize(buf);
    }

    fn serialized_len(&self) -> usize {
        self.ip().serialized_len() + 2
    }
}

impl Deserializable for SocketAddr {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        let ip = IpAddr::deserialize(buf)?;
        let port = u16::deserialize(buf).context("port")?;
        Ok(SocketAddr::new(ip, port))
    }
}

impl Serializable for ChitchatId {
    fn serialize(&self, buf: &mut Vec<u8>) {
        self.node_id.serialize(buf);
        self.generation_id.serialize(buf);
        self.gossip_advertise_addr.serialize(buf);
    }

    fn serialized_len(&self) -> usize {
        self.node_id.serialized_len() + 8 + self.gossip_advertise_addr.serialized_len()
    }
}

impl Deserializable for ChitchatId {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        let node_id = Arc::<str>::deserialize(buf).context("node id")?;
        let generation_id = u64::deserialize(buf).context("generation")?;
        let gossip_advertise_addr = SocketAddr::deserialize(buf).context("gossip address")?;
        Ok(ChitchatId {
            node_id,
            generation_id,
            gossip_advertise_addr,
        })
    }
}

impl Serializable for Heartbeat {
    fn serialize(&self, buf: &mut Vec<u8>) {
        u64::from(*self).serialize(buf);
    }

    fn serialized_len(&self) -> usize {
        8
    }
}

impl Deserializable for Heartbeat {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        u64::deserialize(buf).map(Heartbeat::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serializable + Deserializable + PartialEq + std::fmt::Debug>(value: T) {
        let bytes = value.serialize_to_vec();
        assert_eq!(bytes.len(), value.serialized_len());
        let mut buf = bytes.as_slice();
        assert_eq!(T::deserialize(&mut buf).unwrap(), value);
        assert!(buf.is_empty());
        // Every truncation is an error, never a panic.
        for cut in 0..bytes.len() {
            let mut short = &bytes[..cut];
            assert!(
                T::deserialize(&mut short).is_err(),
                "{value:?} cut at {cut}"
            );
        }
    }

    #[test]
    fn values_round_trip_and_truncations_are_errors() {
        round_trip(7u8);
        round_trip(0xBEEFu16);
        round_trip(u32::MAX);
        round_trip(u64::MAX - 3);
        round_trip(true);
        round_trip("naïve".to_string());
        round_trip(SocketAddr::from(([127, 0, 0, 1], 7280)));
        round_trip("[::1]:9".parse::<SocketAddr>().unwrap());
        round_trip(ChitchatId::new(
            "node-1",
            42,
            SocketAddr::from(([10, 0, 0, 1], 1)),
        ));
        round_trip(Heartbeat::from(9));
    }

    #[test]
    fn an_oversized_string_is_cut_on_a_char_boundary_and_still_decodes() {
        let long = "é".repeat(40_000); // 80,000 bytes
        let bytes = long.serialize_to_vec();
        assert_eq!(bytes.len(), long.serialized_len());
        let mut buf = bytes.as_slice();
        let back = String::deserialize(&mut buf).unwrap();
        assert!(buf.is_empty());
        assert_eq!(back.len(), 65_534);
        assert!(long.starts_with(&back));
    }

    #[test]
    fn a_bad_ip_version_is_an_error() {
        let mut buf: &[u8] = &[5, 1, 2, 3, 4, 0, 0];
        let error = SocketAddr::deserialize(&mut buf).unwrap_err();
        assert!(
            format!("{error:#}").contains("expected 4 or 6"),
            "{error:#}"
        );
    }
}
