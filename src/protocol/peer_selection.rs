//! Whom a gossip round talks to (SPEC §4.2): a few live nodes, sometimes a dead one (so a
//! revived node is noticed), sometimes a seed (so partitions caused by seeds heal).
//!
//! Public (chitchat keeps it private) as pure, seedable functions for tools and tests that
//! reason about rounds; nodes use them through [`Chitchat::begin_gossip_round`].
//!
//! [`Chitchat::begin_gossip_round`]: crate::Chitchat::begin_gossip_round

use std::collections::HashSet;
use std::net::SocketAddr;

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom, index};

/// Live nodes contacted per round.
pub const GOSSIP_COUNT: usize = 3;

/// The targets of one round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GossipTargets {
    /// Up to `GOSSIP_COUNT` live nodes (or any known peers while none is live).
    pub nodes: Vec<SocketAddr>,
    /// A dead node, so that a revived one is noticed.
    pub dead_node: Option<SocketAddr>,
    /// A seed, so that partitions heal.
    pub seed_node: Option<SocketAddr>,
}

impl GossipTargets {
    /// Every address to send a Syn to, in order: live nodes, the dead node, the seed.
    pub fn all(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.nodes
            .iter()
            .copied()
            .chain(self.dead_node)
            .chain(self.seed_node)
    }
}

/// Sorted, so that the choice depends only on the RNG and not on hash order.
fn sorted(set: &HashSet<SocketAddr>) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = set.iter().copied().collect();
    addrs.sort_unstable();
    addrs
}

/// Picks up to `GOSSIP_COUNT` live nodes (any known peer while none is live), a dead node with
/// probability `|dead| / (|live| + 1)`, and a seed when needed (SPEC §4.2).
pub fn select_nodes_for_gossip<R: Rng + ?Sized>(
    rng: &mut R,
    peer_nodes: &HashSet<SocketAddr>,
    live_nodes: &HashSet<SocketAddr>,
    dead_nodes: &HashSet<SocketAddr>,
    seed_nodes: &HashSet<SocketAddr>,
) -> GossipTargets {
    let pool = if live_nodes.is_empty() {
        sorted(peer_nodes)
    } else {
        sorted(live_nodes)
    };
    select_from_lists(
        rng,
        &pool,
        live_nodes.len(),
        &sorted(dead_nodes),
        &sorted(seed_nodes),
    )
}

/// [`select_nodes_for_gossip`] on lists in a fixed order: `pool` is the live nodes (or every
/// known peer while `live_count` is 0). A node's round draws from its member set, or builds the
/// lists from its node states in id order when membership or liveness changed, without hashing
/// or sorting (issue 11: hash sets of every address, rebuilt each round by every node, were a
/// third of a 500-node process's work).
pub fn select_from_lists<R: Rng + ?Sized>(
    rng: &mut R,
    pool: &[SocketAddr],
    live_count: usize,
    dead_nodes: &[SocketAddr],
    seed_nodes: &[SocketAddr],
) -> GossipTargets {
    select_from_pool(rng, pool, live_count, dead_nodes, seed_nodes)
}

/// Addresses to draw a round's live targets from, by index.
pub(crate) trait AddrPool {
    fn len(&self) -> usize;
    /// The `i`-th address, `i < len()`.
    fn addr(&self, i: usize) -> SocketAddr;
}

impl AddrPool for [SocketAddr] {
    fn len(&self) -> usize {
        <[SocketAddr]>::len(self)
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self[i]
    }
}

/// [`select_from_lists`] on any pool: the draws are the slice version's (the same indices for
/// the same RNG), so a node's rounds choose alike from a list or from its member set.
pub(crate) fn select_from_pool<R: Rng + ?Sized, P: AddrPool + ?Sized>(
    rng: &mut R,
    pool: &P,
    live_count: usize,
    dead_nodes: &[SocketAddr],
    seed_nodes: &[SocketAddr],
) -> GossipTargets {
    let dead_count = dead_nodes.len();
    let amount = GOSSIP_COUNT.min(pool.len());
    let mut nodes: Vec<SocketAddr> = index::sample(rng, pool.len(), amount)
        .into_iter()
        .map(|i| pool.addr(i))
        .collect();
    nodes.shuffle(rng);
    // Two node states may share an address (a restarted node's old generation): one Syn each.
    let mut unique = 0;
    for i in 0..nodes.len() {
        if !nodes[..unique].contains(&nodes[i]) {
            nodes.swap(unique, i);
            unique += 1;
        }
    }
    nodes.truncate(unique);
    let gossiped_with_seed = nodes.iter().any(|addr| seed_nodes.contains(addr));
    let dead_node = pick_dead(rng, dead_nodes, live_count, dead_count);
    let seed_node = if !gossiped_with_seed || live_count < seed_nodes.len() {
        pick_seed(rng, seed_nodes, live_count, dead_count)
    } else {
        None
    };
    GossipTargets {
        nodes,
        dead_node,
        seed_node,
    }
}

/// A dead node with probability `|dead| / (|live| + 1)`.
pub fn select_dead_node_to_gossip_with<R: Rng + ?Sized>(
    rng: &mut R,
    dead_nodes: &HashSet<SocketAddr>,
    live_count: usize,
    dead_count: usize,
) -> Option<SocketAddr> {
    pick_dead(rng, &sorted(dead_nodes), live_count, dead_count)
}

fn pick_dead<R: Rng + ?Sized>(
    rng: &mut R,
    dead_nodes: &[SocketAddr],
    live_count: usize,
    dead_count: usize,
) -> Option<SocketAddr> {
    let probability = dead_count as f64 / (live_count + 1) as f64;
    if probability > rng.random::<f64>() {
        return dead_nodes.choose(rng).copied();
    }
    None
}

/// A seed always while no node is live, else with probability `|seeds| / (|live| + |dead|)`.
pub fn select_seed_node_to_gossip_with<R: Rng + ?Sized>(
    rng: &mut R,
    seed_nodes: &HashSet<SocketAddr>,
    live_count: usize,
    dead_count: usize,
) -> Option<SocketAddr> {
    pick_seed(rng, &sorted(seed_nodes), live_count, dead_count)
}

fn pick_seed<R: Rng + ?Sized>(
    rng: &mut R,
    seed_nodes: &[SocketAddr],
    live_count: usize,
    dead_count: usize,
) -> Option<SocketAddr> {
    if live_count == 0 {
        return seed_nodes.choose(rng).copied();
    }
    let probability = seed_nodes.len() as f64 / (live_count + dead_count) as f64;
    if rng.random::<f64>() <= probability {
        return seed_nodes.choose(rng).copied();
    }
    None
}

#[cfg(test)]
mod tests {
    use rand::RngCore;

    use super::*;

    /// An RNG whose `random::<f64>()` returns a chosen value (its top 53 bits), so probability
    /// thresholds can be tested exactly.
    struct FixedRng(u64);

    impl RngCore for FixedRng {
        fn next_u32(&mut self) -> u32 {
            (self.0 >> 32) as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for (i, byte) in dest.iter_mut().enumerate() {
                *byte = self.0.to_le_bytes()[i % 8];
            }
        }
    }

    /// `random::<f64>()` of FixedRng::for_unit(x) is x (for x a multiple of 2^-53).
    fn for_unit(x: f64) -> FixedRng {
        FixedRng(((x * (1u64 << 53) as f64) as u64) << 11)
    }

    fn addrs(ports: impl IntoIterator<Item = u16>) -> HashSet<SocketAddr> {
        ports
            .into_iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect()
    }

    #[test]
    fn fixed_rng_yields_the_chosen_unit_value() {
        assert_eq!(for_unit(0.25).random::<f64>(), 0.25);
        assert_eq!(for_unit(0.0).random::<f64>(), 0.0);
    }

    #[test]
    fn picks_live_nodes_first_and_peers_when_none_is_live() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let peers = addrs(1..=10);
        let live = addrs([1, 2, 3, 4, 5]);
        let targets =
            select_nodes_for_gossip(&mut rng, &peers, &live, &HashSet::new(), &HashSet::new());
        assert_eq!(targets.nodes.len(), GOSSIP_COUNT);
        assert!(targets.nodes.iter().all(|a| live.contains(a)));
        assert_eq!(targets.dead_node, None, "no dead node, probability 0");
        assert_eq!(targets.seed_node, None);

        let targets = select_nodes_for_gossip(
            &mut rng,
            &peers,
            &HashSet::new(),
            &HashSet::new(),
            &HashSet::new(),
        );
        assert_eq!(targets.nodes.len(), GOSSIP_COUNT);
        assert!(targets.nodes.iter().all(|a| peers.contains(a)));
        let distinct: HashSet<_> = targets.nodes.iter().collect();
        assert_eq!(distinct.len(), GOSSIP_COUNT);
    }

    /// Two node states with one address (a restarted node's old generation) give one Syn, not
    /// two: the round's lists are not deduplicated, its targets are.
    #[test]
    fn lists_with_a_repeated_address_give_distinct_targets() {
        let a = SocketAddr::from(([127, 0, 0, 1], 1));
        let b = SocketAddr::from(([127, 0, 0, 1], 2));
        for seed in 0..50 {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let targets = select_from_lists(&mut rng, &[a, a, b], 3, &[], &[]);
            let mut nodes = targets.nodes.clone();
            nodes.sort_unstable();
            assert_eq!(nodes, vec![a, b], "seed {seed}: {:?}", targets.nodes);
        }
    }

    #[test]
    fn dead_node_probability_is_dead_over_live_plus_one() {
        let dead = addrs([20, 21]);
        // 2 dead, 3 live: p = 0.5. U = 0.49 < p → chosen; U = 0.5 → not (strict).
        assert!(select_dead_node_to_gossip_with(&mut for_unit(0.49), &dead, 3, 2).is_some());
        assert!(select_dead_node_to_gossip_with(&mut for_unit(0.5), &dead, 3, 2).is_none());
        // No dead node: never.
        assert!(
            select_dead_node_to_gossip_with(&mut for_unit(0.0), &HashSet::new(), 3, 0).is_none()
        );
    }

    #[test]
    fn seed_probability_is_seeds_over_live_plus_dead() {
        let seeds = addrs([30, 31]);
        // No live node: a seed always.
        assert!(select_seed_node_to_gossip_with(&mut for_unit(0.99), &seeds, 0, 5).is_some());
        // 2 seeds, 3 live + 1 dead: p = 0.5, inclusive.
        assert!(select_seed_node_to_gossip_with(&mut for_unit(0.5), &seeds, 3, 1).is_some());
        assert!(select_seed_node_to_gossip_with(&mut for_unit(0.51), &seeds, 3, 1).is_none());
    }

    #[test]
    fn no_seed_when_a_live_seed_was_picked_and_seeds_are_few() {
        let seeds = addrs([1]);
        let live = addrs([1]);
        let targets =
            select_nodes_for_gossip(&mut for_unit(0.0), &live, &live, &HashSet::new(), &seeds);
        assert_eq!(targets.nodes, vec![SocketAddr::from(([127, 0, 0, 1], 1))]);
        assert_eq!(targets.seed_node, None);
    }

    #[test]
    fn dead_and_seed_nodes_are_added_to_a_round() {
        let live = addrs([1, 2, 3]);
        let dead = addrs([4, 5, 6, 7]);
        let seeds = addrs([8]);
        let peers: HashSet<_> = live.union(&dead).copied().collect();
        // U = 0: dead probability 4/4 > 0, seed probability 1/7 ≥ 0.
        let targets = select_nodes_for_gossip(&mut for_unit(0.0), &peers, &live, &dead, &seeds);
        assert_eq!(targets.nodes.len(), 3);
        assert!(dead.contains(&targets.dead_node.unwrap()));
        assert_eq!(
            targets.seed_node,
            Some(SocketAddr::from(([127, 0, 0, 1], 8)))
        );
        assert_eq!(targets.all().count(), 5);
    }

    #[test]
    fn same_seed_same_choice() {
        let peers = addrs(1..=50);
        let pick = |seed| {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            select_nodes_for_gossip(&mut rng, &peers, &peers, &HashSet::new(), &HashSet::new())
        };
        assert_eq!(pick(3), pick(3));
    }

    use rand::SeedableRng;
}
