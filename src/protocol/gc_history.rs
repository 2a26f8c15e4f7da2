//! The bounded memory of garbage-collected nodes, so late peers cannot resurrect them.

use std::collections::{BTreeMap, HashMap};

use crate::types::{ChitchatId, Heartbeat};

/// How many garbage-collected nodes are remembered (chitchat 0.13's value).
pub const GARBAGE_COLLECTED_NODE_HISTORY_SIZE: usize = 5_000;

/// A least-recently-inserted cache `ChitchatId → last heartbeat`, evicting the oldest entry
/// beyond its capacity.
pub(crate) struct GcHistory {
    entries: HashMap<ChitchatId, (Heartbeat, u64)>,
    order: BTreeMap<u64, ChitchatId>,
    next_tick: u64,
    capacity: usize,
}

impl GcHistory {
    pub(crate) fn new(capacity: usize) -> Self {
        GcHistory {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_tick: 0,
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn insert(&mut self, chitchat_id: ChitchatId, heartbeat: Heartbeat) {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some((_, old_tick)) = self.entries.insert(chitchat_id.clone(), (heartbeat, tick)) {
            self.order.remove(&old_tick);
        }
        self.order.insert(tick, chitchat_id);
        while self.entries.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }

    pub(crate) fn get(&self, chitchat_id: &ChitchatId) -> Option<Heartbeat> {
        self.entries
            .get(chitchat_id)
            .map(|(heartbeat, _)| *heartbeat)
    }

    pub(crate) fn contains(&self, chitchat_id: &ChitchatId) -> bool {
        self.entries.contains_key(chitchat_id)
    }

    pub(crate) fn remove(&mut self, chitchat_id: &ChitchatId) {
        if let Some((_, tick)) = self.entries.remove(chitchat_id) {
            self.order.remove(&tick);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_beyond_capacity() {
        let mut history = GcHistory::new(2);
        let (a, b, c) = (
            ChitchatId::for_local_test(1),
            ChitchatId::for_local_test(2),
            ChitchatId::for_local_test(3),
        );
        history.insert(a.clone(), Heartbeat(1));
        history.insert(b.clone(), Heartbeat(2));
        history.insert(a.clone(), Heartbeat(5)); // refreshes a
        history.insert(c.clone(), Heartbeat(3)); // evicts b
        assert_eq!(history.len(), 2);
        assert_eq!(history.get(&a), Some(Heartbeat(5)));
        assert!(!history.contains(&b));
        assert_eq!(history.get(&c), Some(Heartbeat(3)));
        history.remove(&a);
        assert_eq!(history.len(), 1);
        assert!(!history.contains(&a));
    }
}
