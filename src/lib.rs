#![doc = include_str!("../README.md")]
#![warn(missing_docs, unreachable_pub)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod clock;
pub mod config;
mod control;
mod dns;
pub mod message;
pub mod metrics;
pub mod protocol;
pub mod server;
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
pub use server::{
    ChitchatHandle, ChitchatRef, Command, MESSAGE_HANDLING_BOUND, ServerStats, SpawnOptions,
    spawn_chitchat, spawn_chitchat_with,
};
pub use transport::{ChannelTransport, Transport, TransportKind, UdpTransport};
pub use types::{ChitchatId, DeletionStatus, Heartbeat, Version, VersionedValue};
pub use wire::MAX_UDP_DATAGRAM_PAYLOAD_SIZE;
