//! `ChitchatConfig` and `FailureDetectorConfig`, with the fields and defaults of chitchat 0.13,
//! plus the validation `spawn_chitchat` applies before anything starts.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::message::ProtocolVersion;
pub use crate::protocol::FailureDetectorConfig;
use crate::protocol::NodeState;
use crate::types::ChitchatId;

/// Called (under the state lock) when a received delta forced a reset of a node state: the
/// application may then fetch full states by other means (`reset_node_state_if_update`).
pub type CatchupCallback = Box<dyn Fn() + Send>;

/// Extra condition for a live node to appear in the live-nodes watcher.
pub type ExtraLivenessPredicate = Box<dyn Fn(&NodeState) -> bool + Send>;

/// Largest string the wire can carry (u16 length prefix).
pub use crate::wire::MAX_STRING_LEN as MAX_WIRE_STRING_LEN;

/// Everything a node needs to start, with chitchat 0.13's fields (so that existing configs port
/// unchanged); [`ChitchatConfig::validate`] rejects what cannot work before anything binds.
pub struct ChitchatConfig {
    /// This node's identity; its advertise address is what peers gossip to.
    pub chitchat_id: ChitchatId,
    /// Syns from another cluster id are answered with BadCluster.
    pub cluster_id: String,
    /// Period of gossip rounds (the first round starts immediately).
    pub gossip_interval: Duration,
    /// Address the transport binds.
    pub listen_addr: SocketAddr,
    /// `ip:port` or `host:port`; hostnames are re-resolved every 60 s.
    pub seed_nodes: Vec<String>,
    /// When a peer is considered dead, and when a dead one is forgotten.
    pub failure_detector_config: FailureDetectorConfig,
    /// How long tombstones and TTL'd values are kept before garbage collection.
    pub marked_for_deletion_grace_period: Duration,
    /// See [`CatchupCallback`]; `None`: resets go unnoticed by the application.
    pub catchup_callback: Option<CatchupCallback>,
    /// See [`ExtraLivenessPredicate`]; `None`: every live node is reported.
    pub extra_liveness_predicate: Option<ExtraLivenessPredicate>,
    /// Version of the Syns this node initiates; replies echo the version received.
    /// Keep V0 until every node of the cluster decodes V1.
    pub protocol_version: ProtocolVersion,
}

impl fmt::Debug for ChitchatConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChitchatConfig")
            .field("chitchat_id", &self.chitchat_id)
            .field("cluster_id", &self.cluster_id)
            .field("gossip_interval", &self.gossip_interval)
            .field("listen_addr", &self.listen_addr)
            .field("seed_nodes", &self.seed_nodes)
            .field("failure_detector_config", &self.failure_detector_config)
            .field(
                "marked_for_deletion_grace_period",
                &self.marked_for_deletion_grace_period,
            )
            .field("catchup_callback", &self.catchup_callback.is_some())
            .field(
                "extra_liveness_predicate",
                &self.extra_liveness_predicate.is_some(),
            )
            .field("protocol_version", &self.protocol_version)
            .finish()
    }
}

impl ChitchatConfig {
    /// The configuration chitchat's own tests use: `node-{port}` on 127.0.0.1, 50 ms gossip.
    pub fn for_test(port: u16) -> Self {
        let chitchat_id = ChitchatId::for_local_test(port);
        ChitchatConfig {
            listen_addr: chitchat_id.gossip_advertise_addr,
            chitchat_id,
            cluster_id: "default-cluster".to_string(),
            gossip_interval: Duration::from_millis(50),
            seed_nodes: Vec::new(),
            failure_detector_config: FailureDetectorConfig::default(),
            marked_for_deletion_grace_period: Duration::from_secs(10_000),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        }
    }

    /// Checks every field; the error names the first one that makes no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id = &self.chitchat_id;
        if id.node_id.is_empty() {
            return Err(ConfigError::new("chitchat_id.node_id", "must not be empty"));
        }
        if id.node_id.len() > MAX_WIRE_STRING_LEN {
            return Err(ConfigError::new(
                "chitchat_id.node_id",
                format!(
                    "is {} bytes long; the wire carries at most {MAX_WIRE_STRING_LEN}",
                    id.node_id.len()
                ),
            ));
        }
        let advertise = id.gossip_advertise_addr;
        if advertise.ip().is_unspecified() || advertise.port() == 0 {
            return Err(ConfigError::new(
                "chitchat_id.gossip_advertise_addr",
                format!("{advertise} is not an address peers can reach (unspecified ip or port 0)"),
            ));
        }
        if self.cluster_id.is_empty() {
            return Err(ConfigError::new("cluster_id", "must not be empty"));
        }
        if self.cluster_id.len() > MAX_WIRE_STRING_LEN {
            return Err(ConfigError::new(
                "cluster_id",
                format!(
                    "is {} bytes long; the wire carries at most {MAX_WIRE_STRING_LEN}",
                    self.cluster_id.len()
                ),
            ));
        }
        if self.gossip_interval.is_zero() {
            return Err(ConfigError::new(
                "gossip_interval",
                "must be greater than zero",
            ));
        }
        for (i, seed) in self.seed_nodes.iter().enumerate() {
            if let Err(reason) = check_seed(seed) {
                return Err(ConfigError::new(format!("seed_nodes[{i}]"), reason));
            }
        }
        self.failure_detector_config.validate()?;
        if self.marked_for_deletion_grace_period < self.gossip_interval {
            return Err(ConfigError::new(
                "marked_for_deletion_grace_period",
                format!(
                    "{:?} is shorter than gossip_interval ({:?}): tombstones would be collected \
                     before they can be gossiped",
                    self.marked_for_deletion_grace_period, self.gossip_interval
                ),
            ));
        }
        if self.failure_detector_config.dead_node_grace_period < self.gossip_interval {
            return Err(ConfigError::new(
                "failure_detector_config.dead_node_grace_period",
                format!(
                    "{:?} is shorter than gossip_interval ({:?}): dead nodes would be forgotten \
                     before anyone could learn they died",
                    self.failure_detector_config.dead_node_grace_period, self.gossip_interval
                ),
            ));
        }
        Ok(())
    }
}

/// A seed is `ip:port` or `host:port` with a numeric port.
fn check_seed(seed: &str) -> Result<(), String> {
    if seed.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = seed.rsplit_once(':') else {
        return Err(format!("{seed:?} is not `host:port`"));
    };
    if host.is_empty() {
        return Err(format!("{seed:?} has an empty host"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{seed:?} has no valid port (1-65535)")),
        Ok(_) => Ok(()),
    }
}

/// A configuration field that makes no sense, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chitchat config: `{field}` {reason}")]
pub struct ConfigError {
    /// The offending field's path, e.g. `failure_detector_config.phi_threshold`, so that a
    /// front end can point at its own flag or key.
    pub field: String,
    /// What is wrong with its value.
    pub reason: String,
}

impl ConfigError {
    /// An error for `field` (its path in the config) because of `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

// `FailureDetectorConfig` lives with the detector (a leaf module); its validation lives here,
// next to the other fields' rules.
impl FailureDetectorConfig {
    /// The first parameter the detector cannot work with (a threshold that is not a positive
    /// number, an empty window, a zero duration), as an error naming it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let field = |name: &str| format!("failure_detector_config.{name}");
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return Err(ConfigError::new(
                field("phi_threshold"),
                format!("must be a finite number > 0, got {}", self.phi_threshold),
            ));
        }
        if self.sampling_window_size == 0 {
            return Err(ConfigError::new(
                field("sampling_window_size"),
                "must be at least 1",
            ));
        }
        if self.max_interval.is_zero() {
            return Err(ConfigError::new(
                field("max_interval"),
                "must be greater than zero",
            ));
        }
        if self.initial_interval.is_zero() {
            return Err(ConfigError::new(
                field("initial_interval"),
                "must be greater than zero",
            ));
        }
        if self.dead_node_grace_period.is_zero() {
            return Err(ConfigError::new(
                field("dead_node_grace_period"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: &ChitchatConfig) -> String {
        config.validate().unwrap_err().field
    }

    #[test]
    fn for_test_config_is_valid() {
        ChitchatConfig::for_test(10_000).validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut c = ChitchatConfig::for_test(1);
        c.cluster_id.clear();
        assert_eq!(field_of(&c), "cluster_id");

        let mut c = ChitchatConfig::for_test(1);
        c.gossip_interval = Duration::ZERO;
        assert_eq!(field_of(&c), "gossip_interval");

        let mut c = ChitchatConfig::for_test(1);
        c.failure_detector_config.phi_threshold = 0.0;
        assert_eq!(field_of(&c), "failure_detector_config.phi_threshold");
        c.failure_detector_config.phi_threshold = f64::NAN;
        assert_eq!(field_of(&c), "failure_detector_config.phi_threshold");

        let mut c = ChitchatConfig::for_test(1);
        c.failure_detector_config.sampling_window_size = 0;
        assert_eq!(field_of(&c), "failure_detector_config.sampling_window_size");

        let mut c = ChitchatConfig::for_test(1);
        c.failure_detector_config.initial_interval = Duration::ZERO;
        assert_eq!(field_of(&c), "failure_detector_config.initial_interval");

        let mut c = ChitchatConfig::for_test(1);
        c.failure_detector_config.max_interval = Duration::ZERO;
        assert_eq!(field_of(&c), "failure_detector_config.max_interval");

        let mut c = ChitchatConfig::for_test(1);
        c.failure_detector_config.dead_node_grace_period = Duration::from_millis(10);
        assert_eq!(
            field_of(&c),
            "failure_detector_config.dead_node_grace_period"
        );

        let mut c = ChitchatConfig::for_test(1);
        c.marked_for_deletion_grace_period = Duration::ZERO;
        assert_eq!(field_of(&c), "marked_for_deletion_grace_period");

        let mut c = ChitchatConfig::for_test(1);
        c.seed_nodes = vec!["127.0.0.1:1".into(), "no-port".into()];
        assert_eq!(field_of(&c), "seed_nodes[1]");
        c.seed_nodes = vec!["host:0".into()];
        assert_eq!(field_of(&c), "seed_nodes[0]");
        c.seed_nodes = vec!["localhost:7000".into(), "[::1]:7000".into()];
        c.validate().unwrap();

        let mut c = ChitchatConfig::for_test(1);
        c.chitchat_id.gossip_advertise_addr = "0.0.0.0:7000".parse().unwrap();
        assert_eq!(field_of(&c), "chitchat_id.gossip_advertise_addr");

        let mut c = ChitchatConfig::for_test(1);
        c.chitchat_id.node_id = "".into();
        assert_eq!(field_of(&c), "chitchat_id.node_id");
    }

    #[test]
    fn error_message_names_the_field() {
        let mut c = ChitchatConfig::for_test(1);
        c.gossip_interval = Duration::ZERO;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("`gossip_interval`"), "{msg}");
    }
}
