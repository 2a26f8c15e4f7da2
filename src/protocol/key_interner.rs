//! Key names shared by every node state of the process (issue 11).
//!
//! The nodes of a cluster use the same few key names, and a process hosting many nodes holds
//! each name once per node state of each node: 1,000 nodes of a 1,000-node cluster with 10 keys
//! each held 10 million copies of 10 names. Node states keep their keys as `Arc<str>` from this
//! table instead: one allocation per distinct name, 16 bytes per key-value.
//!
//! Names no node state holds any more are swept out when the table has doubled since the last
//! sweep, so the table stays within twice the distinct names alive (which the byte budgets of
//! `limits` bound).

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

struct Table {
    names: HashSet<Arc<str>>,
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
pub(crate) fn intern(key: &str) -> Arc<str> {
    let mut table = TABLE.lock();
    if let Some(name) = table.names.get(key) {
        return Arc::clone(name);
    }
    if table.names.len() >= MIN_SWEEP_LEN.max(table.swept_len.saturating_mul(2)) {
        // Only the table holds a name whose count is 1: no node state can lose it.
        table.names.retain(|name| Arc::strong_count(name) > 1);
        table.swept_len = table.names.len();
    }
    let name: Arc<str> = Arc::from(key);
    table.names.insert(Arc::clone(&name));
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_names_share_one_allocation() {
        let a = intern("key-interner-test-a");
        let b = intern(&String::from("key-interner-test-a"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "key-interner-test-a");
        assert!(!Arc::ptr_eq(&a, &intern("key-interner-test-b")));
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
        assert!(Arc::ptr_eq(&kept, &intern("key-interner-sweep-kept")));
    }
}
