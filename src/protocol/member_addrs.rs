//! The gossip addresses of the nodes held live, for admitting datagrams (the anti-amplification
//! budget spares members). Looked up once per datagram and rebuilt only when the live set
//! changes, so it is kept as sorted arrays: an IPv4 address and port packed in 8 bytes, against
//! about 67 B per address in a `HashSet<SocketAddr>` (67 MB in a process of 1,000 nodes of a
//! 1,000-node cluster).

use std::net::{SocketAddr, SocketAddrV4};

use crate::protocol::peer_selection::AddrPool;

/// A set of socket addresses, built once, looked up by binary search.
#[derive(Debug, Default)]
pub(crate) struct MemberAddrs {
    /// IPv4 addresses as `ip << 16 | port`, sorted and deduplicated.
    v4: Box<[u64]>,
    /// The other addresses, sorted and deduplicated.
    v6: Box<[SocketAddr]>,
}

fn pack(addr: &SocketAddrV4) -> u64 {
    (u64::from(addr.ip().to_bits()) << 16) | u64::from(addr.port())
}

fn unpack(packed: u64) -> SocketAddr {
    // `pack` put 32 bits of address above 16 of port: both truncations are exact.
    let ip = std::net::Ipv4Addr::from_bits((packed >> 16) as u32);
    SocketAddr::V4(SocketAddrV4::new(ip, packed as u16))
}

impl MemberAddrs {
    /// The set of `addrs` (duplicates allowed).
    pub(crate) fn new(addrs: impl Iterator<Item = SocketAddr>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for addr in addrs {
            match addr {
                SocketAddr::V4(addr) => v4.push(pack(&addr)),
                addr @ SocketAddr::V6(_) => v6.push(addr),
            }
        }
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        MemberAddrs {
            v4: v4.into_boxed_slice(),
            v6: v6.into_boxed_slice(),
        }
    }

    /// Whether `addr` is in the set.
    pub(crate) fn contains(&self, addr: &SocketAddr) -> bool {
        match addr {
            SocketAddr::V4(addr) => self.v4.binary_search(&pack(addr)).is_ok(),
            SocketAddr::V6(_) => self.v6.binary_search(addr).is_ok(),
        }
    }

    /// Number of addresses.
    pub(crate) fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// The members in index order (IPv4 sorted, then the others): a gossip round draws its live
/// targets from here instead of from a list it rebuilt by walking every node state.
impl AddrPool for MemberAddrs {
    fn len(&self) -> usize {
        MemberAddrs::len(self)
    }

    fn addr(&self, i: usize) -> SocketAddr {
        match self.v4.get(i) {
            Some(&packed) => unpack(packed),
            None => self.v6[i - self.v4.len()],
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Addresses from a small space, so that members and non-members collide on ip or port.
    fn random_addr(rng: &mut SmallRng) -> SocketAddr {
        let port = rng.random_range(0..4u16);
        match rng.random_range(0..3) {
            0 => SocketAddr::from((Ipv4Addr::from_bits(rng.random_range(0..4)), port)),
            1 => SocketAddr::from((
                Ipv4Addr::new(255, 255, 255, rng.random_range(254..=255)),
                u16::MAX - port,
            )),
            _ => SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from_bits(rng.random_range(0..3)),
                port,
                rng.random_range(0..2),
                rng.random_range(0..2),
            )),
        }
    }

    /// A set of up to 40 random addresses (duplicates included), and the same as a hash set.
    fn random_set(rng: &mut SmallRng) -> (MemberAddrs, HashSet<SocketAddr>) {
        let n = rng.random_range(0..40);
        let addrs: Vec<SocketAddr> = (0..n).map(|_| random_addr(rng)).collect();
        let expected: HashSet<SocketAddr> = addrs.iter().copied().collect();
        (MemberAddrs::new(addrs.into_iter()), expected)
    }

    #[test]
    fn answers_like_a_hash_set() {
        let mut rng = SmallRng::seed_from_u64(11);
        for round in 0..200 {
            let (set, expected) = random_set(&mut rng);
            assert_eq!(set.len(), expected.len(), "round {round}");
            for _ in 0..100 {
                let probe = random_addr(&mut rng);
                assert_eq!(set.contains(&probe), expected.contains(&probe), "{probe}");
            }
        }
    }

    #[test]
    fn the_pool_lists_each_member_once() {
        let mut rng = SmallRng::seed_from_u64(12);
        for round in 0..200 {
            let (set, expected) = random_set(&mut rng);
            let listed: Vec<SocketAddr> = (0..AddrPool::len(&set)).map(|i| set.addr(i)).collect();
            let unique: HashSet<SocketAddr> = listed.iter().copied().collect();
            assert_eq!(listed.len(), unique.len(), "round {round}: listed twice");
            assert_eq!(unique, expected, "round {round}");
        }
    }

    #[test]
    fn empty_set_contains_nothing() {
        let set = MemberAddrs::default();
        assert!(!set.contains(&SocketAddr::from(([127, 0, 0, 1], 7000))));
        assert_eq!(set.len(), 0);
    }
}
