//! The sans-IO protocol core: `Chitchat` and the state it keeps. Every rule of SPEC §4 lives
//! here; time and randomness are inputs, so every rule is tested deterministically.

pub mod amplification;
mod chitchat;
#[cfg(test)]
mod chitchat_tests;
mod cluster_state;
mod delta_plan;
#[cfg(test)]
mod delta_plan_tests;
mod digest_match;
mod failure_detector;
mod fresh_delta;
#[cfg(test)]
mod fresh_delta_tests;
mod gc_history;
mod key_interner;
mod key_value_map;
pub mod limits;
#[cfg(test)]
mod limits_tests;
mod listener;
mod member_addrs;
mod node_state;
#[cfg(test)]
mod node_state_tests;
pub mod peer_selection;
mod received;
mod reply;

pub use chitchat::{Admission, Chitchat, MAX_NODE_STATES, ProtocolStats};
pub use cluster_state::ClusterStateSnapshot;
pub use failure_detector::FailureDetectorConfig;
pub use gc_history::GARBAGE_COLLECTED_NODE_HISTORY_SIZE;
pub use limits::{Limits, Refusal, RefusalCounts};
pub use listener::{KeyChangeEvent, ListenerHandle};
pub use node_state::{KeyValueError, NodeState};
pub use peer_selection::{GOSSIP_COUNT, GossipTargets, select_nodes_for_gossip};
pub use received::{DigestHint, Received, decode_received, decode_received_with};
pub use reply::{MIN_SYN_ACK_DELTA_BUDGET, ReplyOutcome};
