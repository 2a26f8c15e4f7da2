//! Key-change listeners, keyed by key prefix, shared by every node state of one `Chitchat`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use crate::types::ChitchatId;

/// A key of some node was set (or set with a TTL) to a newer version.
/// `key` has the subscription prefix stripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyChangeEvent<'a> {
    /// The key, without the subscription prefix.
    pub key: &'a str,
    /// The new value.
    pub value: &'a str,
    /// The node whose key it is.
    pub node: &'a ChitchatId,
}

impl<'a> KeyChangeEvent<'a> {
    fn strip_key_prefix(&self, prefix: &str) -> Option<KeyChangeEvent<'a>> {
        let key = self.key.strip_prefix(prefix)?;
        Some(KeyChangeEvent {
            key,
            value: self.value,
            node: self.node,
        })
    }
}

type BoxedListener = Box<dyn Fn(KeyChangeEvent) + Send + Sync + 'static>;

#[derive(Default)]
struct Registry {
    listeners: BTreeMap<String, HashMap<u64, BoxedListener>>,
    next_id: u64,
}

/// The registry of one `Chitchat`; clones share it.
#[derive(Clone, Default)]
pub(crate) struct Listeners {
    inner: Arc<RwLock<Registry>>,
    /// Listener calls that panicked (caught: a listener never stops the node).
    panics: Arc<AtomicU64>,
}

/// Calls one listener, catching a panic: it is logged and counted, and the other listeners and
/// the node go on.
fn call_guarded(listener: &BoxedListener, event: KeyChangeEvent<'_>, panics: &AtomicU64) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| listener(event))) {
        let total = panics.fetch_add(1, Ordering::Relaxed) + 1;
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_string());
        tracing::error!(key = event.key, %message, total, "key-change listener panicked");
    }
}

impl Listeners {
    pub(crate) fn subscribe(
        &self,
        prefix: impl ToString,
        callback: impl Fn(KeyChangeEvent) + Send + Sync + 'static,
    ) -> ListenerHandle {
        let prefix = prefix.to_string();
        let mut registry = self.inner.write();
        let id = registry.next_id;
        registry.next_id += 1;
        registry
            .listeners
            .entry(prefix.clone())
            .or_default()
            .insert(id, Box::new(callback));
        ListenerHandle {
            prefix,
            id,
            registry: Arc::downgrade(&self.inner),
        }
    }

    /// Calls the listeners of `""` with the full key, then those of every other prefix of the key
    /// with the prefix stripped. Safe for keys starting with a multi-byte character (the
    /// reference slices `key[0..1]` and panics there).
    pub(crate) fn trigger(&self, event: KeyChangeEvent) {
        let registry = self.inner.read();
        if let Some(listeners) = registry.listeners.get("") {
            for listener in listeners.values() {
                call_guarded(listener, event, &self.panics);
            }
        }
        let Some(first_char) = event.key.chars().next() else {
            return;
        };
        // Every non-empty prefix of the key sorts between its first character and the key.
        let first = &event.key[..first_char.len_utf8()];
        let range = (Bound::Included(first), Bound::Included(event.key));
        for (prefix, listeners) in registry.listeners.range::<str, _>(range) {
            if let Some(stripped) = event.strip_key_prefix(prefix) {
                for listener in listeners.values() {
                    call_guarded(listener, stripped, &self.panics);
                }
            }
        }
    }

    /// How many listener calls panicked so far.
    pub(crate) fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.read().listeners.values().map(HashMap::len).sum()
    }
}

/// Keeps a listener subscribed: dropping it unsubscribes, `forever` detaches it.
#[must_use = "dropping the handle unsubscribes the listener; call `forever()` to keep it"]
pub struct ListenerHandle {
    prefix: String,
    id: u64,
    registry: Weak<RwLock<Registry>>,
}

impl ListenerHandle {
    /// Keeps the listener for as long as the `Chitchat` lives.
    pub fn forever(mut self) {
        self.registry = Weak::new();
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut registry = registry.write();
        if let Some(listeners) = registry.listeners.get_mut(&self.prefix) {
            listeners.remove(&self.id);
            if listeners.is_empty() {
                registry.listeners.remove(&self.prefix);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn node() -> ChitchatId {
        ChitchatId::for_local_test(7000)
    }

    fn recorder(listeners: &Listeners, prefix: &str) -> (ListenerHandle, Arc<Mutex<Vec<String>>>) {
        let seen: Arc<Mutex<Vec<String>>> = Default::default();
        let seen_clone = seen.clone();
        let handle = listeners.subscribe(prefix, move |event| {
            seen_clone
                .lock()
                .unwrap()
                .push(format!("{}={}", event.key, event.value));
        });
        (handle, seen)
    }

    fn fire(listeners: &Listeners, key: &str) {
        let id = node();
        listeners.trigger(KeyChangeEvent {
            key,
            value: "v",
            node: &id,
        });
    }

    #[test]
    fn prefix_is_stripped_and_drop_unsubscribes() {
        let listeners = Listeners::default();
        let (handle, seen) = recorder(&listeners, "prefix:");
        fire(&listeners, "prefix:key");
        fire(&listeners, "other:key");
        assert_eq!(*seen.lock().unwrap(), vec!["key=v"]);
        drop(handle);
        assert_eq!(listeners.len(), 0);
        fire(&listeners, "prefix:key2");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn empty_prefix_sees_every_key() {
        let listeners = Listeners::default();
        let (_handle, seen) = recorder(&listeners, "");
        fire(&listeners, "a");
        fire(&listeners, "");
        fire(&listeners, "bcd");
        assert_eq!(*seen.lock().unwrap(), vec!["a=v", "=v", "bcd=v"]);
    }

    #[test]
    fn forever_keeps_the_listener() {
        let listeners = Listeners::default();
        let (handle, seen) = recorder(&listeners, "k");
        handle.forever();
        fire(&listeners, "key");
        assert_eq!(*seen.lock().unwrap(), vec!["ey=v"]);
        assert_eq!(listeners.len(), 1);
    }

    #[test]
    fn every_matching_prefix_fires() {
        let listeners = Listeners::default();
        let (_h0, all) = recorder(&listeners, "");
        let (_h1, b) = recorder(&listeners, "b");
        let (_h2, bb1) = recorder(&listeners, "bb");
        let (_h3, bb2) = recorder(&listeners, "bb");
        let (_h4, bc) = recorder(&listeners, "bc");
        for key in ["hello", "", "a", "b", "ba", "bb"] {
            fire(&listeners, key);
        }
        assert_eq!(all.lock().unwrap().len(), 6);
        assert_eq!(*b.lock().unwrap(), vec!["=v", "a=v", "b=v"]);
        assert_eq!(*bb1.lock().unwrap(), vec!["=v"]);
        assert_eq!(*bb2.lock().unwrap(), vec!["=v"]);
        assert!(bc.lock().unwrap().is_empty());
    }

    #[test]
    fn multi_byte_first_character_does_not_panic() {
        let listeners = Listeners::default();
        let (_h0, all) = recorder(&listeners, "");
        let (_h1, accent) = recorder(&listeners, "é");
        let (_h2, emoji) = recorder(&listeners, "🦀:");
        for key in ["é", "éclair", "🦀:rust", "ü", "a"] {
            fire(&listeners, key);
        }
        assert_eq!(all.lock().unwrap().len(), 5);
        assert_eq!(*accent.lock().unwrap(), vec!["=v", "clair=v"]);
        assert_eq!(*emoji.lock().unwrap(), vec!["rust=v"]);
    }
}
