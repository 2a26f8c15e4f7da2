//! Identity, versions, heartbeats and versioned values: the vocabulary every layer shares.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

use serde::{Deserialize, Serialize};

/// Version of a key-value of one node, assigned by the owning node (`max_version + 1` per mutation).
/// 0 means "nothing yet".
pub type Version = u64;

/// Identity of one node *incarnation*: `generation_id` must grow on every restart.
///
/// Ordered by `node_id` bytes, then `generation_id`, then address, like chitchat's.
#[derive(Clone, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChitchatId {
    /// Name of the node, stable across restarts.
    pub node_id: Arc<str>,
    /// Incarnation number; bump it on every restart (e.g. startup time).
    pub generation_id: u64,
    /// Address the other nodes gossip to.
    pub gossip_advertise_addr: SocketAddr,
}

/// Equal when all three parts are, as derived, but the parts held inline are compared before
/// the name behind its pointer: the loops that skip the own state among all node states
/// compared every name, a cache miss and a `memcmp` per state (2 % of a 100-node process).
impl PartialEq for ChitchatId {
    fn eq(&self, other: &Self) -> bool {
        self.generation_id == other.generation_id
            && self.gossip_advertise_addr == other.gossip_advertise_addr
            && self.node_id == other.node_id
    }
}

/// Hashes the same parts as `eq` compares.
impl std::hash::Hash for ChitchatId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.node_id.hash(state);
        self.generation_id.hash(state);
        self.gossip_advertise_addr.hash(state);
    }
}

impl ChitchatId {
    /// An id from its three parts (chitchat's constructor).
    pub fn new(
        node_id: impl Into<Arc<str>>,
        generation_id: u64,
        gossip_advertise_addr: SocketAddr,
    ) -> Self {
        ChitchatId {
            node_id: node_id.into(),
            generation_id,
            gossip_advertise_addr,
        }
    }

    /// `node-{port}`, generation 0, on 127.0.0.1:`port`: the id tests use.
    pub fn for_local_test(port: u16) -> Self {
        ChitchatId::new(
            format!("node-{port}"),
            0,
            SocketAddr::from(([127, 0, 0, 1], port)),
        )
    }

    /// The port peers gossip to.
    pub fn advertise_port(&self) -> u16 {
        self.gossip_advertise_addr.port()
    }
}

impl fmt::Debug for ChitchatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.node_id, self.generation_id, self.gossip_advertise_addr
        )
    }
}

/// A node's heartbeat counter. Peers only care that it keeps increasing.
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Heartbeat(pub(crate) u64);

impl Heartbeat {
    /// Saturating increment: a node that reached `u64::MAX` stays there instead of panicking.
    #[allow(
        dead_code,
        reason = "used by the protocol core, not merged on this branch yet"
    )]
    pub(crate) fn inc(&mut self) {
        self.0 = self.0.saturating_add(1);
    }
}

impl From<Heartbeat> for u64 {
    fn from(heartbeat: Heartbeat) -> u64 {
        heartbeat.0
    }
}

impl From<u64> for Heartbeat {
    fn from(value: u64) -> Heartbeat {
        Heartbeat(value)
    }
}

/// Whether a value is live, deleted, or due for deletion after the grace period.
///
/// The `Instant` is the *local* time at which this node created or learned the status: every
/// replica garbage-collects on its own clock. It is `tokio::time::Instant`, as in chitchat 0.13;
/// the protocol core stamps it from its injected [`Clock`](crate::clock::Clock) (std time,
/// converted with `Instant::from_std`), so virtual time reaches it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletionStatus {
    /// A live value.
    Set,
    /// A tombstone, since the instant given; invisible to readers.
    Deleted(Instant),
    /// Still visible, collected like a tombstone once the grace period after the instant ends.
    DeleteAfterTtl(Instant),
}

impl DeletionStatus {
    /// When the grace period started (`None` for a live value): garbage collection counts from
    /// here.
    pub fn time_of_start_scheduled_for_deletion(&self) -> Option<Instant> {
        match self {
            DeletionStatus::Set => None,
            DeletionStatus::Deleted(t) | DeletionStatus::DeleteAfterTtl(t) => Some(*t),
        }
    }
}

/// The status byte of a key-value on the wire: `00` Set, `01` Delete, `02` DeleteAfterTtl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeletionStatusMutation {
    /// Becomes [`DeletionStatus::Set`].
    Set = 0,
    /// Becomes [`DeletionStatus::Deleted`].
    Delete = 1,
    /// Becomes [`DeletionStatus::DeleteAfterTtl`].
    DeleteAfterTtl = 2,
}

impl DeletionStatusMutation {
    /// The status of a wire status byte; `None` for an unknown byte (the datagram is invalid).
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(DeletionStatusMutation::Set),
            1 => Some(DeletionStatusMutation::Delete),
            2 => Some(DeletionStatusMutation::DeleteAfterTtl),
            _ => None,
        }
    }

    /// The wire status byte.
    pub fn to_code(self) -> u8 {
        self as u8
    }

    /// The local status a receiver stores, stamped with its own `now`.
    pub fn into_status(self, now: Instant) -> DeletionStatus {
        match self {
            DeletionStatusMutation::Set => DeletionStatus::Set,
            DeletionStatusMutation::Delete => DeletionStatus::Deleted(now),
            DeletionStatusMutation::DeleteAfterTtl => DeletionStatus::DeleteAfterTtl(now),
        }
    }

    /// True for the statuses that tombstone GC removes (Delete, DeleteAfterTtl).
    pub fn scheduled_for_deletion(self) -> bool {
        !matches!(self, DeletionStatusMutation::Set)
    }
}

impl From<DeletionStatus> for DeletionStatusMutation {
    fn from(status: DeletionStatus) -> Self {
        match status {
            DeletionStatus::Set => DeletionStatusMutation::Set,
            DeletionStatus::Deleted(_) => DeletionStatusMutation::Delete,
            DeletionStatus::DeleteAfterTtl(_) => DeletionStatusMutation::DeleteAfterTtl,
        }
    }
}

/// A value with its version and deletion status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    into = "VersionedValueForSerialization",
    from = "VersionedValueForSerialization"
)]
pub struct VersionedValue {
    /// The value as its owner last wrote it (`delete` leaves an empty one).
    pub value: String,
    /// The owner's version of the write that produced it.
    pub version: Version,
    /// Live, deleted, or due for deletion.
    pub status: DeletionStatus,
}

impl VersionedValue {
    /// A live (`Set`) or deleted (tombstone, stamped now) value.
    pub fn new(value: String, version: Version, is_tombstone: bool) -> VersionedValue {
        let status = if is_tombstone {
            DeletionStatus::Deleted(Instant::now())
        } else {
            DeletionStatus::Set
        };
        VersionedValue {
            value,
            version,
            status,
        }
    }

    /// True only for `Deleted`: a `DeleteAfterTtl` value is still visible.
    pub fn is_deleted(&self) -> bool {
        matches!(self.status, DeletionStatus::Deleted(_))
    }

    /// A live value at `version`: shorthand for tests.
    pub fn for_test(value: &str, version: Version) -> Self {
        VersionedValue::new(value.to_string(), version, false)
    }
}

/// JSON shape of a versioned value: `{"value", "version", "status": "Set" | "Delete" | "DeleteAfterTtl"}`.
#[derive(Serialize, Deserialize)]
struct VersionedValueForSerialization {
    value: String,
    version: Version,
    status: StatusForSerialization,
}

#[derive(Serialize, Deserialize)]
enum StatusForSerialization {
    Set,
    Delete,
    DeleteAfterTtl,
}

impl From<VersionedValue> for VersionedValueForSerialization {
    fn from(v: VersionedValue) -> Self {
        let status = match v.status {
            DeletionStatus::Set => StatusForSerialization::Set,
            DeletionStatus::Deleted(_) => StatusForSerialization::Delete,
            DeletionStatus::DeleteAfterTtl(_) => StatusForSerialization::DeleteAfterTtl,
        };
        VersionedValueForSerialization {
            value: v.value,
            version: v.version,
            status,
        }
    }
}

impl From<VersionedValueForSerialization> for VersionedValue {
    /// The deletion clock restarts at deserialization: Instants cannot travel.
    fn from(v: VersionedValueForSerialization) -> Self {
        let now = Instant::now();
        let status = match v.status {
            StatusForSerialization::Set => DeletionStatus::Set,
            StatusForSerialization::Delete => DeletionStatus::Deleted(now),
            StatusForSerialization::DeleteAfterTtl => DeletionStatus::DeleteAfterTtl(now),
        };
        VersionedValue {
            value: v.value,
            version: v.version,
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chitchat_id_debug_and_json() {
        let id = ChitchatId::new("n", 1, "[::1]:7280".parse().unwrap());
        assert_eq!(format!("{id:?}"), "n:1:[::1]:7280");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(
            json,
            r#"{"node_id":"n","generation_id":1,"gossip_advertise_addr":"[::1]:7280"}"#
        );
        let back: ChitchatId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
    }

    #[test]
    fn chitchat_id_order_is_node_then_generation_then_addr() {
        let a = ChitchatId::new("a", 9, "127.0.0.1:9".parse().unwrap());
        let b = ChitchatId::new("b", 0, "127.0.0.1:1".parse().unwrap());
        let b1 = ChitchatId::new("b", 1, "127.0.0.1:1".parse().unwrap());
        let b1v6 = ChitchatId::new("b", 1, "[::1]:1".parse().unwrap());
        assert!(a < b && b < b1 && b1 < b1v6);
    }

    #[test]
    fn deletion_status_codes_round_trip() {
        let mut count = 0;
        for code in 0..=u8::MAX {
            if let Some(status) = DeletionStatusMutation::from_code(code) {
                assert_eq!(status.to_code(), code);
                count += 1;
            }
        }
        assert_eq!(count, 3);
    }

    #[test]
    fn versioned_value_json_shape() {
        let v = VersionedValue {
            value: "v".to_string(),
            version: 4,
            status: DeletionStatus::DeleteAfterTtl(Instant::now()),
        };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            r#"{"value":"v","version":4,"status":"DeleteAfterTtl"}"#
        );
        let back: VersionedValue = serde_json::from_str(&json).unwrap();
        assert!(matches!(back.status, DeletionStatus::DeleteAfterTtl(_)));
        assert!(!back.is_deleted());
    }

    /// chitchat 0.13 code names `tokio::time::Instant` here: the same type, not a look-alike.
    #[test]
    fn deletion_status_holds_tokio_instants() {
        let since: fn(&DeletionStatus) -> Option<tokio::time::Instant> =
            DeletionStatus::time_of_start_scheduled_for_deletion;
        let at = tokio::time::Instant::now();
        assert_eq!(since(&DeletionStatus::Deleted(at)), Some(at));
        assert_eq!(since(&DeletionStatus::DeleteAfterTtl(at)), Some(at));
        assert_eq!(since(&DeletionStatus::Set), None);
        assert_eq!(
            DeletionStatusMutation::DeleteAfterTtl.into_status(at),
            DeletionStatus::DeleteAfterTtl(at)
        );
    }

    #[test]
    fn heartbeat_saturates() {
        let mut hb = Heartbeat(u64::MAX - 1);
        hb.inc();
        hb.inc();
        assert_eq!(u64::from(hb), u64::MAX);
        assert_eq!(serde_json::to_string(&hb).unwrap(), "18446744073709551615");
    }
}
