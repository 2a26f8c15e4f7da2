//! Key names shared by every node state of the process (issue 11).
//!
//! The nodes of a cluster use the same few key names, and a process hosting many nodes holds
//! each name once per node state of each node: 1,000 nodes of a 1,000-node cluster with 10 keys
//! each held 10 million copies of 10 names. Node states keep their keys as [`Key`]s from this
//! table instead: one allocation per distinct name, 8 bytes per key-value (an `Arc<str>` is a
//! 16-byte fat pointer: 80 MB more for those 10 million key-values).
//!
//! Names no node state holds any more are swept out when the table has doubled since the last
//! sweep, so the table stays within twice the distinct names alive (which the byte budgets of
//! `limits` bound).

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A key name: a thin (8-byte) shared pointer to the name's one copy. It compares, orders and
/// hashes as the `str` it holds, so maps of `Key` are searched with a `&str`.
#[derive(Clone)]
pub(crate) struct Key(Arc<Name>);

/// The name, with its first eight bytes as one word next to the count: a search compares that
/// word and reaches the text (one more pointer away than an `Arc<str>`'s) only on a tie. With
/// the text alone, applying a catch-up delta of 100 nodes × 10 keys took 4–14 % longer.
struct Name {
    head: u64,
    text: Box<str>,
}

/// The first eight bytes of `name` as a big-endian word, zero-padded: words that differ order
/// as their names do (see [`Key::cmp_name`]).
pub(crate) fn head_word(name: &str) -> u64 {
    let mut word = [0u8; 8];
    let bytes = name.as_bytes();
    let n = bytes.len().min(8);
    word[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(word)
}

impl Key {
    fn new(name: &str) -> Key {
        Key(Arc::new(Name {
            head: head_word(name),
            text: Box::from(name),
        }))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0.text
    }

    /// `self.as_str().cmp(name)`, given `head == head_word(name)`. Differing words decide: at
    /// the first differing byte either both names have a byte there, or the shorter one ended
    /// and is a prefix of the other (the bytes between are zero in both words). Equal words
    /// leave the whole names to compare.
    #[inline]
    pub(crate) fn cmp_name(&self, head: u64, name: &str) -> Ordering {
        match self.0.head.cmp(&head) {
            Ordering::Equal => self.as_str().cmp(name),
            decided => decided,
        }
    }

    #[cfg(test)]
    pub(crate) fn ptr_eq(a: &Key, b: &Key) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl Deref for Key {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        // Keys from the table are equal exactly when shared; the byte comparison behind it
        // keeps `Eq` in step with `Ord` and `Borrow<str>` whatever made the key.
        Arc::ptr_eq(&self.0, &other.0) || self.as_str() == other.as_str()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> Ordering {
        self.cmp_name(other.0.head, other.as_str())
    }
}

/// As the `str`, which `Borrow<str>` requires.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(intern(&name))
    }
}

struct Table {
    names: HashSet<Key>,
    /// Size after the last sweep.
    swept_len: usize,
}

/// Sweeps never run below this many names.
const MIN_SWEEP_LEN: usize = 1_024;

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        names: HashSet::new(),
        swept_len: 0,
    })
});

/// The shared copy of `key`. Called only when a key is new to a node state, never per
/// datagram.
pub(crate) fn intern(key: &str) -> Key {
    let mut table = TABLE.lock();
    if let Some(name) = table.names.get(key) {
        return name.clone();
    }
    if table.names.len() >= MIN_SWEEP_LEN.max(table.swept_len.saturating_mul(2)) {
        // Only the table holds a name whose count is 1: no node state can lose it.
        table.names.retain(|name| Arc::strong_count(&name.0) > 1);
        table.swept_len = table.names.len();
    }
    let name = Key::new(key);
    table.names.insert(name.clone());
    name
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    proptest::proptest! {
        /// Keys order as their names, decided by the head words or not: names drawn from a
        /// small alphabet with a zero byte, so that they share prefixes of every length
        /// around the eight bytes and end where the padding is.
        #[test]
        fn keys_order_as_their_names(a in "[ab\u{0}\u{e9}]{0,12}", b in "[ab\u{0}\u{e9}]{0,12}") {
            let (ka, kb) = (Key::new(&a), Key::new(&b));
            proptest::prop_assert_eq!(ka.cmp_name(head_word(&b), &b), a.cmp(&b));
            proptest::prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            proptest::prop_assert_eq!(ka == kb, a == b);
        }
    }

    #[test]
    fn equal_names_share_one_allocation() {
        let a = intern("key-interner-test-a");
        let b = intern(&String::from("key-interner-test-a"));
        assert!(Key::ptr_eq(&a, &b));
        assert_eq!(&*a, "key-interner-test-a");
        assert!(!Key::ptr_eq(&a, &intern("key-interner-test-b")));
    }

    #[test]
    fn a_key_is_a_thin_pointer_that_acts_as_its_name() {
        assert_eq!(std::mem::size_of::<Key>(), 8);
        // Order, equality and hash are those of the names, shared or not.
        let names = ["", "a", "ab", "b", "key-interner-order-\u{e9}", "zz"];
        for x in names {
            for y in names {
                let (kx, ky) = (intern(x), Key::new(y));
                assert_eq!(kx.cmp(&ky), x.cmp(y), "{x:?} {y:?}");
                assert_eq!(kx == ky, x == y, "{x:?} {y:?}");
            }
            let hasher = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default();
            assert_eq!(hasher.hash_one(intern(x)), hasher.hash_one(x));
        }
    }

    #[test]
    fn names_nobody_holds_are_swept() {
        // Far more short-lived names than the sweep threshold: the table stays bounded.
        for i in 0..10 * MIN_SWEEP_LEN {
            drop(intern(&format!("key-interner-sweep-{i}")));
        }
        let kept = intern("key-interner-sweep-kept");
        for i in 0..10 * MIN_SWEEP_LEN {
            drop(intern(&format!("key-interner-sweep-more-{i}")));
        }
        let len = TABLE.lock().names.len();
        assert!(len <= 4 * MIN_SWEEP_LEN, "{len} names kept");
        // A name still held survives every sweep.
        assert!(Key::ptr_eq(&kept, &intern("key-interner-sweep-kept")));
    }
}
