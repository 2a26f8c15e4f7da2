//! chitchat-uring: cluster membership, phi failure detection and Scuttlebutt key-value
//! replication over UDP, wire-compatible with the `chitchat` crate 0.13, with its datagram paths
//! on io_uring.

pub mod clock;
pub mod config;
pub mod message;
pub mod protocol;
mod runtime;
pub mod transport;
pub mod types;
pub mod wire;

pub use clock::{Clock, ManualClock};
pub use config::{
    CatchupCallback, ChitchatConfig, ConfigError, ExtraLivenessPredicate, FailureDetectorConfig,
};
pub use message::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
pub use protocol::{
    Chitchat, ClusterStateSnapshot, KeyChangeEvent, KeyValueError, ListenerHandle, NodeState,
};
pub use types::{ChitchatId, DeletionStatus, Heartbeat, Version, VersionedValue};
pub use wire::MAX_UDP_DATAGRAM_PAYLOAD_SIZE;
