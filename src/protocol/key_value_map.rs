//! The key-values of one node state, by key (issue 11).
//!
//! Most nodes hold a handful of keys, and a process of many nodes holds one map per node state
//! of each node: a `BTreeMap` allocates a whole leaf (11 entries, 816 B) for the first key, so
//! 10 keys of (then) 72-byte entries took 816 B where the entries are 720. Up to
//! [`SMALL_MAX`] keys the map is a sorted vector grown to the exact count, searched by
//! bisection; above, a `BTreeMap`, whose inserts stay logarithmic however many keys a node
//! has. It serializes as a map, like the `BTreeMap` it replaces.

use std::collections::BTreeMap;
use std::collections::btree_map;
use std::fmt;
use std::ops::Bound;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::protocol::key_interner::{Key, head_word};
use crate::types::VersionedValue;

/// Largest map kept as a sorted vector. An insert moves at most this many 64-byte entries.
pub(crate) const SMALL_MAX: usize = 32;

type Entry = (Key, VersionedValue);

/// Key → value, in key order.
#[derive(Clone)]
pub(crate) enum KeyValueMap {
    /// Sorted by key, no duplicate, at most `SMALL_MAX` entries.
    Small(Vec<Entry>),
    Large(BTreeMap<Key, VersionedValue>),
}

impl Default for KeyValueMap {
    fn default() -> Self {
        KeyValueMap::Small(Vec::new())
    }
}

/// Equal entries, whichever representation holds them.
impl PartialEq for KeyValueMap {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for KeyValueMap {}

impl fmt::Debug for KeyValueMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl KeyValueMap {
    pub(crate) fn len(&self) -> usize {
        match self {
            KeyValueMap::Small(entries) => entries.len(),
            KeyValueMap::Large(map) => map.len(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&VersionedValue> {
        match self {
            KeyValueMap::Small(entries) => {
                let i = search(entries, key).ok()?;
                entries.get(i).map(|(_, value)| value)
            }
            KeyValueMap::Large(map) => map.get(key),
        }
    }

    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut VersionedValue> {
        match self {
            KeyValueMap::Small(entries) => {
                let i = search(entries, key).ok()?;
                entries.get_mut(i).map(|(_, value)| value)
            }
            KeyValueMap::Large(map) => map.get_mut(key),
        }
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`, returning the value it replaces.
    pub(crate) fn insert(&mut self, key: Key, value: VersionedValue) -> Option<VersionedValue> {
        match self {
            KeyValueMap::Small(entries) => match search(entries, &key) {
                Ok(i) => entries
                    .get_mut(i)
                    .map(|(_, old)| std::mem::replace(old, value)),
                Err(i) if entries.len() < SMALL_MAX => {
                    // Exact growth: a vector doubling to 16 for 10 keys would outgrow the leaf
                    // it replaces. At most `SMALL_MAX` reallocations per map.
                    entries.reserve_exact(1);
                    entries.insert(i, (key, value));
                    None
                }
                Err(_) => {
                    let mut map: BTreeMap<Key, VersionedValue> =
                        std::mem::take(entries).into_iter().collect();
                    map.insert(key, value);
                    *self = KeyValueMap::Large(map);
                    None
                }
            },
            KeyValueMap::Large(map) => map.insert(key, value),
        }
    }

    pub(crate) fn remove(&mut self, key: &str) -> Option<VersionedValue> {
        match self {
            KeyValueMap::Small(entries) => {
                let i = search(entries, key).ok()?;
                Some(entries.remove(i).1)
            }
            KeyValueMap::Large(map) => map.remove(key),
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = KeyValueMap::default();
    }

    /// Keeps the entries for which `keep` is true (in key order).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Key, &mut VersionedValue) -> bool) {
        match self {
            KeyValueMap::Small(entries) => entries.retain_mut(|(key, value)| keep(key, value)),
            KeyValueMap::Large(map) => map.retain(|key, value| keep(key, value)),
        }
    }

    /// Every entry in key order.
    pub(crate) fn iter(&self) -> Iter<'_> {
        match self {
            KeyValueMap::Small(entries) => Iter::Small(entries.iter()),
            KeyValueMap::Large(map) => Iter::Large(map.iter()),
        }
    }

    /// The entries from the first key at least `from`, in key order.
    pub(crate) fn iter_from<'a>(&'a self, from: &str) -> Iter<'a> {
        match self {
            KeyValueMap::Small(entries) => {
                let start = search(entries, from).unwrap_or_else(|i| i);
                Iter::Small(entries.get(start..).unwrap_or_default().iter())
            }
            KeyValueMap::Large(map) => {
                Iter::Range(map.range::<str, _>((Bound::Included(from), Bound::Unbounded)))
            }
        }
    }

    /// Every entry in key order, values mutable.
    pub(crate) fn iter_mut(&mut self) -> IterMut<'_> {
        match self {
            KeyValueMap::Small(entries) => IterMut::Small(entries.iter_mut()),
            KeyValueMap::Large(map) => IterMut::Large(map.iter_mut()),
        }
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &VersionedValue> {
        self.iter().map(|(_, value)| value)
    }

    /// Gives a small map back the room it no longer uses; rebuilds a large one from its sorted
    /// entries, which packs its leaves full, or makes it small again if removals shrank it.
    pub(crate) fn compact(&mut self) {
        match self {
            KeyValueMap::Small(entries) => entries.shrink_to_fit(),
            KeyValueMap::Large(map) => *self = std::mem::take(map).into_iter().collect(),
        }
    }
}

fn search(entries: &[Entry], key: &str) -> Result<usize, usize> {
    // Keys of one node usually differ in their first eight bytes: most probes then compare one
    // word each and call no `memcmp`.
    let head = head_word(key);
    entries.binary_search_by(|(probe, _)| probe.cmp_name(head, key))
}

/// Iterator over a [`KeyValueMap`] in key order.
pub(crate) enum Iter<'a> {
    Small(std::slice::Iter<'a, Entry>),
    Large(btree_map::Iter<'a, Key, VersionedValue>),
    Range(btree_map::Range<'a, Key, VersionedValue>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a Key, &'a VersionedValue);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Small(entries) => entries.next().map(|(key, value)| (key, value)),
            Iter::Large(entries) => entries.next(),
            Iter::Range(entries) => entries.next(),
        }
    }
}

/// Mutable iterator over a [`KeyValueMap`] in key order.
pub(crate) enum IterMut<'a> {
    Small(std::slice::IterMut<'a, Entry>),
    Large(btree_map::IterMut<'a, Key, VersionedValue>),
}

impl<'a> Iterator for IterMut<'a> {
    type Item = (&'a Key, &'a mut VersionedValue);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            IterMut::Small(entries) => entries.next().map(|(key, value)| (&*key, value)),
            IterMut::Large(entries) => entries.next(),
        }
    }
}

impl FromIterator<(Key, VersionedValue)> for KeyValueMap {
    fn from_iter<I: IntoIterator<Item = (Key, VersionedValue)>>(iter: I) -> Self {
        let map: BTreeMap<Key, VersionedValue> = iter.into_iter().collect();
        if map.len() <= SMALL_MAX {
            KeyValueMap::Small(map.into_iter().collect())
        } else {
            KeyValueMap::Large(map)
        }
    }
}

impl Serialize for KeyValueMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for KeyValueMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<Key, VersionedValue>::deserialize(deserializer)?;
        Ok(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::protocol::key_interner::intern;

    fn value(version: u64) -> VersionedValue {
        VersionedValue::new(format!("v{version}"), version, false)
    }

    /// `map` holds `model`'s entries, as a vector exactly when small (built from entries or
    /// compacted).
    fn assert_same(map: &KeyValueMap, model: &BTreeMap<Key, VersionedValue>, step: usize) {
        assert_eq!(map.len(), model.len(), "step {step}");
        assert!(map.iter().eq(model.iter()), "step {step}");
        let small = matches!(map, KeyValueMap::Small(_));
        assert_eq!(small, model.len() <= SMALL_MAX, "step {step}");
    }

    /// Random inserts, removals, updates, retains and compactions, over few enough keys that
    /// maps cross `SMALL_MAX` both ways: the map answers like a `BTreeMap` at every step.
    #[test]
    fn behaves_like_a_btree_map() {
        let mut rng = SmallRng::seed_from_u64(5);
        for run in 0..20 {
            let mut map = KeyValueMap::default();
            let mut model = BTreeMap::new();
            let keys = rng.random_range(1..3 * SMALL_MAX);
            for step in 0..600 {
                // Short keys, and long ones that agree on their first eight bytes or not.
                let key: Key = intern(&match run % 3 {
                    0 => format!("k{:03}", rng.random_range(0..keys)),
                    1 => format!("key-{:05}", rng.random_range(0..keys)),
                    _ => format!("prefix--{:03}", rng.random_range(0..keys)),
                });
                let version = (run * 1_000 + step) as u64;
                match rng.random_range(0..10) {
                    0..=4 => {
                        let got = map.insert(key.clone(), value(version));
                        let want = model.insert(key.clone(), value(version));
                        assert_eq!(got, want, "step {step}");
                    }
                    5 | 6 => assert_eq!(map.remove(&key), model.remove(&key), "step {step}"),
                    7 => {
                        if let Some(v) = map.get_mut(&key) {
                            v.version += 1;
                        }
                        if let Some(v) = model.get_mut(&key) {
                            v.version += 1;
                        }
                    }
                    8 => {
                        let cut = rng.random_range(0..keys) as u64;
                        map.retain(|_, v| v.version % (cut + 2) != 0);
                        model.retain(|_, v| v.version % (cut + 2) != 0);
                    }
                    _ => {
                        map.compact();
                        assert_same(&map, &model, step);
                    }
                }
                assert_eq!(map.get(&key), model.get(&key), "step {step}");
                assert_eq!(
                    map.contains_key(&key),
                    model.contains_key(&key),
                    "step {step}"
                );
                let from = format!("k{:02}", rng.random_range(0..keys / 10 + 1));
                assert!(
                    map.iter_from(&from)
                        .eq(model
                            .range::<str, _>((Bound::Included(from.as_str()), Bound::Unbounded))),
                    "step {step}"
                );
                assert_eq!(map.len(), model.len(), "step {step}");
                assert!(map.iter().eq(model.iter()), "step {step}");
            }
            assert!(
                map.iter_mut()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .eq(model.clone())
            );
        }
    }

    #[test]
    fn small_maps_take_their_exact_size() {
        let mut map = KeyValueMap::default();
        for i in 0..10u64 {
            map.insert(intern(&format!("key-{i:02}")), value(i));
        }
        let KeyValueMap::Small(entries) = &map else {
            panic!("10 keys are a small map");
        };
        assert_eq!(entries.capacity(), 10);
        let mut model = BTreeMap::new();
        for i in 0..=SMALL_MAX as u64 {
            model.insert(intern(&format!("key-{i:02}")), value(i));
            map.insert(intern(&format!("key-{i:02}")), value(i));
        }
        assert!(matches!(map, KeyValueMap::Large(_)));
        assert!(map.iter().eq(model.iter()));
        assert_same(&model.clone().into_iter().collect(), &model, 0);
    }

    /// A key-value of a small map is one 64-byte cache line (72 B with an `Arc<str>` key).
    #[test]
    fn an_entry_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
    }

    #[test]
    fn serializes_as_a_map() {
        let mut map = KeyValueMap::default();
        let mut model = BTreeMap::new();
        for i in [3u64, 1, 2] {
            map.insert(intern(&format!("k{i}")), value(i));
            model.insert(intern(&format!("k{i}")), value(i));
        }
        let json = serde_json::to_string(&map).unwrap();
        assert_eq!(json, serde_json::to_string(&model).unwrap());
        let back: KeyValueMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back, map);
    }
}
