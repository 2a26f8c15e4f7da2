//! chitchat's "phi" failure detector: `phi = elapsed since last heartbeat / smoothed mean
//! interval`, with the mean smoothed by a prior of `initial_interval` weighted 5 samples.
//!
//! This is not the classic normal-distribution phi-accrual: it is what chitchat 0.13 computes,
//! and mixed clusters must agree on who is alive.

//!
//! A leaf of the protocol: it knows intervals and instants, not node states (which hold its
//! per-node data, [`NodeLiveness`]).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Parameters of the failure detector (chitchat's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureDetectorConfig {
    /// A node is alive iff its phi is at most this.
    pub phi_threshold: f64,
    /// How many inter-heartbeat intervals are remembered per node.
    pub sampling_window_size: usize,
    /// Intervals longer than this are discarded.
    pub max_interval: Duration,
    /// Prior mean interval (weight 5) used to smooth the first samples.
    pub initial_interval: Duration,
    /// A dead node is forgotten after this; its state stops being shared after half of it.
    pub dead_node_grace_period: Duration,
}

impl FailureDetectorConfig {
    /// All five parameters, in chitchat's order.
    pub fn new(
        phi_threshold: f64,
        sampling_window_size: usize,
        max_interval: Duration,
        initial_interval: Duration,
        dead_node_grace_period: Duration,
    ) -> Self {
        FailureDetectorConfig {
            phi_threshold,
            sampling_window_size,
            max_interval,
            initial_interval,
            dead_node_grace_period,
        }
    }
}

impl Default for FailureDetectorConfig {
    fn default() -> Self {
        FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 1_000,
            max_interval: Duration::from_secs(10),
            initial_interval: Duration::from_secs(5),
            dead_node_grace_period: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// Weight, in samples, of the prior mean interval.
const PRIOR_WEIGHT: f64 = 5.0;

/// What the failure detector knows of one node. It lives in the node's `NodeState`, so that
/// reporting a heartbeat or evaluating liveness costs no lookup: both walk the node states.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct NodeLiveness {
    status: Status,
    window: Option<SamplingWindow>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Not evaluated yet: neither live nor dead.
    #[default]
    Unknown,
    Live,
    /// Dead since this local instant (the first evaluation that found it dead).
    Dead(Instant),
}

impl NodeLiveness {
    pub(crate) fn is_live(&self) -> bool {
        self.status == Status::Live
    }

    pub(crate) fn is_dead(&self) -> bool {
        matches!(self.status, Status::Dead(_))
    }

    fn time_of_death(&self) -> Option<Instant> {
        match self.status {
            Status::Dead(since) => Some(since),
            _ => None,
        }
    }
}

/// The failure detector's parameters and rules; the per-node data is in `NodeLiveness`.
pub(crate) struct FailureDetector {
    config: FailureDetectorConfig,
    shape: WindowShape,
}

impl FailureDetector {
    pub(crate) fn new(config: FailureDetectorConfig) -> Self {
        let shape = WindowShape::new(
            config.sampling_window_size,
            config.max_interval,
            config.initial_interval,
        );
        FailureDetector { config, shape }
    }

    /// Records a (strictly increasing) heartbeat observed at `now`.
    pub(crate) fn report_heartbeat(&self, node: &mut NodeLiveness, now: Instant) {
        node.window
            .get_or_insert_with(SamplingWindow::default)
            .report_heartbeat(&self.shape, now);
    }

    /// Makes sure a window exists without recording a heartbeat (a reset node must not look
    /// alive).
    pub(crate) fn ensure_window(&self, node: &mut NodeLiveness) {
        node.window.get_or_insert_with(SamplingWindow::default);
    }

    /// Re-evaluates one node. A dead node's samples are cleared on every evaluation, so a revived
    /// node has to prove itself with fresh intervals; its time of death is the first detection.
    /// Returns whether the node became live or stopped being live.
    pub(crate) fn update_node_liveness(&self, node: &mut NodeLiveness, now: Instant) -> bool {
        let was_live = node.is_live();
        let alive = node
            .window
            .as_ref()
            .and_then(|window| window.phi(&self.shape, now))
            .is_some_and(|phi| phi <= self.config.phi_threshold);
        if alive {
            node.status = Status::Live;
            return !was_live;
        }
        if !node.is_dead() {
            node.status = Status::Dead(now);
        }
        if let Some(window) = node.window.as_mut() {
            window.reset();
        }
        was_live
    }

    /// Dead for at least `dead_node_grace_period`: to be forgotten.
    pub(crate) fn is_garbage_collectable(&self, node: &NodeLiveness, now: Instant) -> bool {
        node.time_of_death()
            .is_some_and(|since| now >= since + self.config.dead_node_grace_period)
    }

    /// The rule for "scheduled for deletion" at `now`.
    pub(crate) fn deletion_schedule(&self, now: Instant) -> DeletionSchedule {
        DeletionSchedule {
            now,
            half_grace: self.config.dead_node_grace_period / 2,
        }
    }

    /// `smoothed mean interval × phi_threshold`: how long a silence makes the node dead.
    pub(crate) fn failure_detection_timeout(&self, node: &NodeLiveness) -> Option<Duration> {
        let mean = node.window.as_ref()?.mean_interval_secs(&self.shape)?;
        Duration::try_from_secs_f64(mean * self.config.phi_threshold).ok()
    }
}

/// Dead for strictly more than half the dead-node grace period: no longer shared with peers
/// (left out of digests and deltas).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeletionSchedule {
    now: Instant,
    half_grace: Duration,
}

impl DeletionSchedule {
    pub(crate) fn is_scheduled(&self, node: &NodeLiveness) -> bool {
        node.time_of_death()
            .is_some_and(|since| since + self.half_grace < self.now)
    }
}

/// How the windows of one detector keep their intervals (the same for every node, so it is
/// held once by the detector rather than by each of the N windows of a node).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WindowShape {
    /// At most this many intervals count (`sampling_window_size`).
    capacity: usize,
    /// Intervals summed per stored block: 1 (exact) up to `BLOCKS` intervals, more above.
    block_len: u32,
    max_interval: Duration,
    prior_interval_secs: f64,
}

/// Blocks a window keeps at most. chitchat keeps every interval (a ring of 1,000 `f64`, 8 KB
/// per peer: 8 GB for a process of 1,000 nodes of a 1,000-node cluster); only the mean of the
/// intervals is ever used, so sums of `capacity / BLOCKS` consecutive intervals give the same
/// mean over the last `capacity - block_len + 1 ..= capacity` intervals (938 to 1,000 of
/// chitchat's default 1,000) in 64 B held inline. A growable queue of 32 blocks reached a
/// 144-B heap chunk after about 1,000 heartbeats of a peer, 110 MB more for a process of
/// 1,000 nodes of a 1,000-node cluster after a quarter of an hour at 1-s gossip (issue 11).
const BLOCKS: usize = 16;

impl WindowShape {
    pub(crate) fn new(capacity: usize, max_interval: Duration, prior_interval: Duration) -> Self {
        let capacity = capacity.max(1);
        let block_len = u32::try_from(capacity.div_ceil(BLOCKS)).unwrap_or(u32::MAX);
        WindowShape {
            capacity,
            block_len,
            max_interval,
            prior_interval_secs: prior_interval.as_secs_f64(),
        }
    }
}

/// The recent inter-heartbeat intervals of one node.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct SamplingWindow {
    last_heartbeat: Option<Instant>,
    intervals: BlockedIntervals,
}

impl SamplingWindow {
    pub(crate) fn report_heartbeat(&mut self, shape: &WindowShape, now: Instant) {
        if let Some(last) = self.last_heartbeat {
            let interval = now.saturating_duration_since(last);
            if interval <= shape.max_interval {
                self.intervals.push(shape, interval.as_secs_f64());
            }
        }
        self.last_heartbeat = Some(now);
    }

    /// Forgets the intervals but keeps the time of the last heartbeat.
    pub(crate) fn reset(&mut self) {
        self.intervals.clear();
    }

    fn mean_interval_secs(&self, shape: &WindowShape) -> Option<f64> {
        let n = self.intervals.len(shape);
        if n == 0 {
            return None;
        }
        let prior = PRIOR_WEIGHT * shape.prior_interval_secs;
        Some((self.intervals.sum() + prior) / (n as f64 + PRIOR_WEIGHT))
    }

    pub(crate) fn phi(&self, shape: &WindowShape, now: Instant) -> Option<f64> {
        let mean = self.mean_interval_secs(shape)?;
        let last = self.last_heartbeat?;
        let elapsed = now.saturating_duration_since(last).as_secs_f64();
        Some(elapsed / mean)
    }
}

/// The last intervals (seconds) as sums of `block_len` consecutive ones, with a running sum.
/// Blocks are kept as `f32` (a relative precision of 6e-8, far below what a heartbeat's timing
/// carries); the running sum is the `f64` sum of the values kept, so dropping a block is exact.
#[derive(Debug, Default)]
#[repr(C)]
struct BlockedIntervals {
    /// Sum of `blocks`.
    blocks_sum: f64,
    /// The block being filled, and how many intervals it holds (< `block_len`).
    partial: f64,
    partial_len: u32,
    /// Full blocks, oldest first (touched once per block).
    blocks: BlockRing,
}

impl BlockedIntervals {
    fn push(&mut self, shape: &WindowShape, value: f64) {
        self.partial += value;
        self.partial_len += 1;
        if self.partial_len >= shape.block_len {
            // Intervals are at most `max_interval`: far inside f32's range.
            let kept = self.partial as f32;
            if let Some(evicted) = self.blocks.push_back(kept) {
                self.blocks_sum -= f64::from(evicted);
            }
            self.blocks_sum += f64::from(kept);
            self.partial = 0.0;
            self.partial_len = 0;
        }
        while self.len(shape) > shape.capacity
            && let Some(oldest) = self.blocks.pop_front()
        {
            self.blocks_sum -= f64::from(oldest);
        }
    }

    fn clear(&mut self) {
        *self = BlockedIntervals::default();
    }

    /// Intervals counted.
    fn len(&self, shape: &WindowShape) -> usize {
        self.blocks.len() * shape.block_len as usize + self.partial_len as usize
    }

    /// Never negative, whatever floating-point drift the running sum accumulated.
    fn sum(&self) -> f64 {
        (self.blocks_sum + self.partial).max(0.0)
    }
}

/// At most `BLOCKS` values in insertion order, in place: a window costs no allocation.
#[derive(Debug, Default, Clone, Copy)]
struct BlockRing {
    values: [f32; BLOCKS],
    /// Index of the oldest value.
    head: u8,
    len: u8,
}

impl BlockRing {
    fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Appends `value`; when the ring is full, the oldest value makes room and is returned.
    /// Dropping it loses nothing a window needs: `block_len` is `ceil(capacity / BLOCKS)`,
    /// so `BLOCKS + 1` full blocks exceed the capacity (any capacity up to `BLOCKS` ×
    /// `u32::MAX`) and the oldest would be dropped anyway.
    fn push_back(&mut self, value: f32) -> Option<f32> {
        let len = self.len();
        if len < BLOCKS {
            self.values[(usize::from(self.head) + len) % BLOCKS] = value;
            self.len += 1;
            None
        } else {
            let head = usize::from(self.head);
            let evicted = std::mem::replace(&mut self.values[head], value);
            self.head = ((head + 1) % BLOCKS) as u8;
            Some(evicted)
        }
    }

    fn pop_front(&mut self) -> Option<f32> {
        if self.len == 0 {
            return None;
        }
        let head = usize::from(self.head);
        self.head = ((head + 1) % BLOCKS) as u8;
        self.len -= 1;
        Some(self.values[head])
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use std::collections::BTreeMap;

    use super::*;
    use crate::types::ChitchatId;

    fn config() -> FailureDetectorConfig {
        FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 10_000,
            max_interval: Duration::from_secs(10),
            initial_interval: Duration::from_secs(5),
            dead_node_grace_period: Duration::from_secs(24 * 3600),
        }
    }

    fn id(port: u16) -> ChitchatId {
        ChitchatId::for_local_test(port)
    }

    /// The detector with its per-node data kept by id, as the node states keep it.
    struct Fd {
        detector: FailureDetector,
        nodes: BTreeMap<ChitchatId, NodeLiveness>,
    }

    impl Fd {
        fn new(config: FailureDetectorConfig) -> Self {
            Fd {
                detector: FailureDetector::new(config),
                nodes: BTreeMap::new(),
            }
        }

        fn node(&mut self, id: &ChitchatId) -> &mut NodeLiveness {
            self.nodes.entry(id.clone()).or_default()
        }

        fn report_heartbeat(&mut self, id: &ChitchatId, now: Instant) {
            let node = self.nodes.entry(id.clone()).or_default();
            self.detector.report_heartbeat(node, now);
        }

        fn update_node_liveness(&mut self, id: &ChitchatId, now: Instant) {
            let node = self.nodes.entry(id.clone()).or_default();
            self.detector.update_node_liveness(node, now);
        }

        fn is_live(&mut self, id: &ChitchatId) -> bool {
            self.node(id).is_live()
        }

        fn live_nodes(&self) -> impl Iterator<Item = &ChitchatId> {
            self.nodes
                .iter()
                .filter(|(_, n)| n.is_live())
                .map(|(id, _)| id)
        }

        fn dead_nodes(&self) -> impl Iterator<Item = &ChitchatId> {
            self.nodes
                .iter()
                .filter(|(_, n)| n.is_dead())
                .map(|(id, _)| id)
        }

        fn scheduled_for_deletion_nodes(&self, now: Instant) -> impl Iterator<Item = &ChitchatId> {
            let schedule = self.detector.deletion_schedule(now);
            self.nodes
                .iter()
                .filter(move |(_, n)| schedule.is_scheduled(n))
                .map(|(id, _)| id)
        }

        fn garbage_collect(&mut self, now: Instant) -> Vec<ChitchatId> {
            let due: Vec<ChitchatId> = self
                .nodes
                .iter()
                .filter(|(_, n)| self.detector.is_garbage_collectable(n, now))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &due {
                self.nodes.remove(id);
            }
            due
        }

        fn failure_detection_timeout(&mut self, id: &ChitchatId) -> Option<Duration> {
            let node = self.nodes.entry(id.clone()).or_default();
            self.detector.failure_detection_timeout(node)
        }
    }

    #[test]
    fn a_single_heartbeat_is_not_enough_to_be_alive() {
        let mut fd = Fd::new(config());
        let t0 = Instant::now();
        fd.report_heartbeat(&id(1), t0);
        fd.update_node_liveness(&id(1), t0);
        assert_eq!(fd.live_nodes().count(), 0);
        assert_eq!(fd.dead_nodes().collect::<Vec<_>>(), vec![&id(1)]);
    }

    #[test]
    fn live_then_dead_then_garbage_collected() {
        let mut fd = Fd::new(config());
        let mut rng = SmallRng::seed_from_u64(1);
        let mut now = Instant::now();
        let nodes = [id(1), id(2), id(3)];
        for _ in 0..2001 {
            now += Duration::from_millis(rng.random_range(1000..2000));
            for node in &nodes {
                fd.report_heartbeat(node, now);
            }
        }
        for node in &nodes {
            fd.update_node_liveness(node, now);
        }
        assert_eq!(fd.live_nodes().count(), 3);
        now += Duration::from_secs(50);
        for node in &nodes {
            fd.update_node_liveness(node, now);
        }
        assert_eq!(fd.live_nodes().count(), 0);
        assert_eq!(fd.dead_nodes().count(), 3);
        assert!(fd.garbage_collect(now).is_empty());
        now += Duration::from_secs(25 * 3600);
        let mut collected = fd.garbage_collect(now);
        collected.sort();
        assert_eq!(collected, nodes.to_vec());
        assert_eq!(fd.dead_nodes().count(), 0);
    }

    #[test]
    fn node_goes_from_live_to_dead_to_live() {
        let mut fd = Fd::new(config());
        let mut now = Instant::now();
        let node = id(1);
        for _ in 0..20 {
            now += Duration::from_secs(1);
            fd.report_heartbeat(&node, now);
        }
        fd.update_node_liveness(&node, now);
        assert!(fd.is_live(&node));
        now += Duration::from_secs(20);
        fd.update_node_liveness(&node, now);
        assert!(!fd.is_live(&node));
        for _ in 0..500 {
            now += Duration::from_secs(1);
            fd.report_heartbeat(&node, now);
        }
        fd.update_node_liveness(&node, now);
        assert!(fd.is_live(&node));
        assert_eq!(fd.dead_nodes().count(), 0);
    }

    #[test]
    fn prior_dominates_at_first_and_fades_off() {
        // Five 1-s intervals: mean = (5 + 25) / 10 = 3 s, so 6 s of silence is phi 2: alive.
        let mut fd = Fd::new(config());
        let node = id(1);
        let mut now = Instant::now();
        for _ in 0..6 {
            fd.report_heartbeat(&node, now);
            now += Duration::from_secs(1);
        }
        now += Duration::from_secs(5);
        fd.update_node_liveness(&node, now);
        assert!(fd.is_live(&node));
        now += Duration::from_secs(40);
        fd.update_node_liveness(&node, now);
        assert!(!fd.is_live(&node));

        // A thousand 200-ms intervals: the prior is negligible, 6 s of silence is phi ≈ 26: dead.
        let mut fd = Fd::new(config());
        let mut now = Instant::now();
        for _ in 0..1001 {
            fd.report_heartbeat(&node, now);
            now += Duration::from_millis(200);
        }
        now += Duration::from_secs(6);
        fd.update_node_liveness(&node, now);
        assert!(!fd.is_live(&node));
    }

    #[test]
    fn sampling_window_exact_phi() {
        let max_interval = Duration::from_secs(10);
        let shape = WindowShape::new(10, max_interval, Duration::from_secs(2));
        let mut window = SamplingWindow::default();
        let t0 = Instant::now();
        window.report_heartbeat(&shape, t0);
        assert_eq!(window.phi(&shape, t0), None, "no interval yet");
        window.report_heartbeat(&shape, t0 + Duration::from_secs(3));
        // mean = (3 + 5 × 2) / 6 = 13/6; elapsed 1 s → phi = 6/13.
        let phi = window.phi(&shape, t0 + Duration::from_secs(4)).unwrap();
        assert!((phi - 6.0 / 13.0).abs() < 1e-9, "{phi}");
        // An interval longer than max_interval is ignored (but moves the last heartbeat).
        window.report_heartbeat(&shape, t0 + Duration::from_secs(20));
        let phi = window.phi(&shape, t0 + Duration::from_secs(21)).unwrap();
        assert!((phi - 6.0 / 13.0).abs() < 1e-9, "{phi}");
        // After a reset, two new heartbeats are needed for a phi.
        window.reset();
        assert_eq!(window.phi(&shape, t0 + Duration::from_secs(21)), None);
        window.report_heartbeat(&shape, t0 + Duration::from_secs(22));
        // mean = (2 + 10) / 6 = 2 → elapsed 2 s gives phi 1.
        let phi = window.phi(&shape, t0 + Duration::from_secs(24)).unwrap();
        assert!((phi - 1.0).abs() < 1e-9, "{phi}");
    }

    #[test]
    fn small_windows_keep_every_interval() {
        let shape = WindowShape::new(3, Duration::from_secs(10), Duration::from_secs(1));
        let mut ring = BlockedIntervals::default();
        for v in [1.0, 2.0, 3.0, 4.0] {
            ring.push(&shape, v);
        }
        assert_eq!(ring.len(&shape), 3);
        assert!((ring.sum() - 9.0).abs() < 1e-12);
        ring.clear();
        assert_eq!(ring.len(&shape), 0);
        assert_eq!(ring.sum(), 0.0);
    }

    /// Keeps `ring` fed with random intervals and checks, after each, that it counts the
    /// last `capacity - block_len + 1 ..= capacity` intervals and sums exactly those.
    fn check_block_sums(capacity: usize, pushes: usize, seed: u64) {
        let shape = WindowShape::new(capacity, Duration::from_secs(10), Duration::from_secs(1));
        let block_len = shape.block_len as usize;
        let mut ring = BlockedIntervals::default();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut all = Vec::new();
        for _ in 0..pushes {
            let value: f64 = rng.random_range(0.05..2.0);
            all.push(value);
            ring.push(&shape, value);
            let n = ring.len(&shape);
            assert!(n <= capacity, "{n}");
            if all.len() >= capacity {
                assert!(n > capacity - block_len, "{n} of {capacity}");
            } else {
                assert_eq!(n, all.len());
            }
            assert!(ring.blocks.len() <= BLOCKS);
            let exact: f64 = all[all.len() - n..].iter().sum();
            assert!(
                (ring.sum() - exact).abs() < 1e-4 * exact,
                "{} {exact}",
                ring.sum()
            );
        }
    }

    /// chitchat's default window of 1,000 intervals is kept in at most 16 blocks of 63, and
    /// its mean is the exact mean of the last 938 to 1,000 intervals.
    #[test]
    fn large_windows_keep_block_sums_of_the_last_intervals() {
        assert_eq!(
            WindowShape::new(1_000, Duration::from_secs(10), Duration::from_secs(1)).block_len,
            63
        );
        check_block_sums(1_000, 5_000, 11);
        // A capacity that 16 blocks fill exactly, so the ring is full and wraps.
        check_block_sums(1_024, 5_000, 12);
        // Capacities just above and below a block multiple, and a small one kept exactly.
        check_block_sums(17, 500, 13);
        check_block_sums(31, 500, 14);
        check_block_sums(5, 100, 15);
    }

    #[test]
    fn the_block_ring_keeps_insertion_order_and_evicts_the_oldest_when_full() {
        let mut ring = BlockRing::default();
        assert_eq!(ring.pop_front(), None);
        for i in 0..BLOCKS {
            assert_eq!(ring.push_back(i as f32), None);
        }
        assert_eq!(ring.len(), BLOCKS);
        // Full: each push returns the oldest value.
        for i in BLOCKS..BLOCKS + 5 {
            assert_eq!(ring.push_back(i as f32), Some((i - BLOCKS) as f32));
        }
        assert_eq!(ring.len(), BLOCKS);
        for i in 5..BLOCKS + 5 {
            assert_eq!(ring.pop_front(), Some(i as f32));
        }
        assert_eq!(ring.pop_front(), None);
        assert_eq!(ring.len(), 0);
    }

    /// A window is a fixed-size value with nothing on the heap, however long it runs: it owns
    /// nothing to free (a `Vec` or `VecDeque` of blocks would need dropping).
    #[test]
    fn a_window_holds_its_blocks_in_place() {
        assert!(std::mem::size_of::<SamplingWindow>() <= 104);
        assert!(!std::mem::needs_drop::<SamplingWindow>());
    }

    #[test]
    fn detection_timeout_is_mean_times_threshold() {
        let mut fd = Fd::new(FailureDetectorConfig {
            phi_threshold: 2.0,
            initial_interval: Duration::from_secs(1),
            ..config()
        });
        let node = id(1);
        let t0 = Instant::now();
        assert_eq!(fd.failure_detection_timeout(&node), None);
        fd.report_heartbeat(&node, t0);
        assert_eq!(fd.failure_detection_timeout(&node), None);
        fd.report_heartbeat(&node, t0 + Duration::from_secs(1));
        assert_eq!(
            fd.failure_detection_timeout(&node),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn scheduled_for_deletion_after_half_grace() {
        let mut fd = Fd::new(FailureDetectorConfig {
            dead_node_grace_period: Duration::from_secs(10),
            ..config()
        });
        let node = id(1);
        let t0 = Instant::now();
        fd.update_node_liveness(&node, t0);
        assert_eq!(fd.dead_nodes().count(), 1);
        assert_eq!(
            fd.scheduled_for_deletion_nodes(t0 + Duration::from_secs(5))
                .count(),
            0
        );
        let later = t0 + Duration::from_secs(5) + Duration::from_millis(1);
        assert_eq!(fd.scheduled_for_deletion_nodes(later).count(), 1);
        // The time of death is the first detection, not the last evaluation.
        fd.update_node_liveness(&node, later);
        assert_eq!(fd.garbage_collect(t0 + Duration::from_secs(10)), vec![node]);
    }
}
