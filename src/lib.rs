#![doc = include_str!("../README.md")]
#![warn(missing_docs, unreachable_pub)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod clock;
pub mod config;
mod control;
mod dns;
mod log_limit;
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
    Chitchat, ClusterStateSnapshot, KeyChangeEvent, KeyValueError, Limits, ListenerHandle,
    NodeState, Refusal, RefusalCounts,
};
pub use server::{
    ChitchatHandle, ChitchatRef, Command, MESSAGE_HANDLING_BOUND, ServerStats, SpawnOptions,
    WeakChitchatRef, spawn_chitchat, spawn_chitchat_with,
};
pub use transport::{ChannelTransport, Transport, TransportKind, UdpTransport};
pub use types::{ChitchatId, DeletionStatus, Heartbeat, Version, VersionedValue};
pub use wire::{Deserializable, MAX_UDP_DATAGRAM_PAYLOAD_SIZE, Serializable};

/// Installs a `tracing` subscriber that writes to the test harness's captured output (shown for
/// failing tests). Idempotent: every test of a binary may call it. chitchat 0.13 gates it behind
/// the same `testsuite` feature.
#[cfg(any(test, feature = "testsuite"))]
pub fn setup_tracing_for_tests() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        // Another subscriber may already be installed (by the application's own tests): keep it.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    });
}
