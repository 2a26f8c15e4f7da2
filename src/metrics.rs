//! Metrics: the node's own atomic counters, published to the [`metrics`] facade once per
//! gossip round on the control thread, and offered as a plain [`MetricsSnapshot`].
//!
//! The hot path records nothing through the facade except the handling-latency histogram,
//! through a handle obtained at spawn (a no-op handle when no recorder is installed). Install
//! the recorder before `spawn_chitchat`, or the histograms stay no-ops for that node.

use crate::protocol::Refusal;
use std::collections::BTreeMap;

use metrics::{Label, counter, gauge};

use crate::protocol::ProtocolStats;
use crate::transport::{EndpointStats, TransportKind};

/// A snapshot of a node's server counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerStats {
    /// Datagrams decoded and processed.
    pub datagrams_handled: u64,
    /// Datagrams that did not decode: counted and dropped.
    pub malformed: u64,
    /// Messages whose handling exceeded `MESSAGE_HANDLING_BOUND`: reply dropped.
    pub abandoned: u64,
    /// Replies (SynAck, Ack, BadCluster) handed to the transport.
    pub replies: u64,
    /// Syns handed to the transport, by rounds and by `ChitchatHandle::gossip`.
    pub syns_sent: u64,
    /// Syns the transport refused to send (logged, never fatal).
    pub gossip_send_errors: u64,
    /// Gossip rounds started.
    pub gossip_rounds: u64,
}

/// Messages received, by `type` (syn, synack, ack, bad_cluster).
pub const MESSAGES_RECEIVED: &str = "chitchat_messages_received_total";
/// Messages sent, by `type`.
pub const MESSAGES_SENT: &str = "chitchat_messages_sent_total";
/// Payload bytes received.
pub const BYTES_RECEIVED: &str = "chitchat_bytes_received_total";
/// Payload bytes sent.
pub const BYTES_SENT: &str = "chitchat_bytes_sent_total";
/// Datagrams dropped, by `reason`.
pub const DATAGRAMS_DROPPED: &str = "chitchat_datagrams_dropped_total";
/// Live nodes, self included.
pub const LIVE_NODES: &str = "chitchat_live_nodes";
/// Dead nodes (not yet garbage-collected).
pub const DEAD_NODES: &str = "chitchat_dead_nodes";
/// Node states held.
pub const NODE_STATES: &str = "chitchat_node_states";
/// From a batch's receipt to each message's reply queued, in seconds.
pub const MESSAGE_HANDLING_SECONDS: &str = "chitchat_message_handling_seconds";
/// Duration of one gossip round (targets, Syn sends, liveness), in seconds.
pub const GOSSIP_ROUND_SECONDS: &str = "chitchat_gossip_round_seconds";
/// Always 1; labels `transport` and `fallback_reason` say which backend serves the node.
pub const TRANSPORT_INFO: &str = "chitchat_transport_info";

/// The `malformed_*` drop reasons, one per `DecodeError::kind()`, in a fixed order so the
/// handler can count them in an array (index = position here).
pub(crate) const MALFORMED_KINDS: &[(&str, &str)] = &[
    ("truncated", "malformed_truncated"),
    ("bad-magic", "malformed_bad_magic"),
    ("unknown-version", "malformed_unknown_version"),
    ("unknown-message-type", "malformed_unknown_message_type"),
    ("bad-ip-tag", "malformed_bad_ip_tag"),
    ("invalid-utf8", "malformed_invalid_utf8"),
    ("unknown-block-type", "malformed_unknown_block_type"),
    ("corrupt-block", "malformed_corrupt_block"),
    ("block-too-large", "malformed_block_too_large"),
    ("stream-too-large", "malformed_stream_too_large"),
    ("unknown-op-tag", "malformed_unknown_op_tag"),
    ("unknown-status", "malformed_unknown_status"),
    ("op-before-node", "malformed_op_before_node"),
    ("duplicate-node", "malformed_duplicate_node"),
    ("non-increasing-version", "malformed_non_increasing_version"),
    ("zstd-unavailable", "malformed_zstd_unavailable"),
];

/// Slot for a decode-error kind not in [`MALFORMED_KINDS`] (a kind added later).
pub(crate) const MALFORMED_OTHER: usize = MALFORMED_KINDS.len();

/// Index of a `DecodeError::kind()` in the handler's malformed counters (error path only).
pub(crate) fn malformed_index(kind: &str) -> usize {
    MALFORMED_KINDS
        .iter()
        .position(|(k, _)| *k == kind)
        .unwrap_or(MALFORMED_OTHER)
}

/// Everything the figures are computed from, gathered on one thread.
pub(crate) struct Sources<'a> {
    pub(crate) server: &'a ServerStats,
    /// Per [`MALFORMED_KINDS`] index, then the "other" slot.
    pub(crate) malformed: &'a [u64],
    pub(crate) protocol: &'a ProtocolStats,
    pub(crate) endpoint: &'a EndpointStats,
}

/// How one drop reason is counted from the sources.
type DropCount = fn(&Sources<'_>) -> u64;

/// The drop reasons other than malformed: one line per reason (label, how it is counted).
/// Add a reason here and its counter appears in the snapshot and on the facade.
const DROP_REASONS: &[(&str, DropCount)] = &[
    ("wrong_cluster", |s| s.protocol.bad_cluster_sent),
    ("late", |s| s.server.abandoned),
    ("send_error", |s| s.endpoint.send_errors),
    ("recv_error", |s| s.endpoint.recv_errors),
    ("fault", |s| s.endpoint.dropped_by_faults),
    ("unsolicited_syn_ack", |s| s.protocol.unsolicited_syn_ack),
    ("amplification_limited", |s| {
        s.protocol.amplification_limited
    }),
    ("non_member_flood", |s| s.protocol.non_member_flood),
    ("implausible_heartbeat", |s| {
        s.protocol.refused.get(Refusal::ImplausibleHeartbeat)
    }),
    ("implausible_version", |s| {
        s.protocol.refused.get(Refusal::ImplausibleVersion)
    }),
    ("implausible_last_gc_version", |s| {
        s.protocol.refused.get(Refusal::ImplausibleLastGcVersion)
    }),
    ("over_budget_id_too_long", |s| {
        s.protocol.refused.get(Refusal::IdTooLong)
    }),
    ("over_budget_too_many_keys", |s| {
        s.protocol.refused.get(Refusal::TooManyKeys)
    }),
    ("over_budget_node_state_too_large", |s| {
        s.protocol.refused.get(Refusal::NodeStateTooLarge)
    }),
    ("over_budget_remote_state_full", |s| {
        s.protocol.refused.get(Refusal::RemoteStateFull)
    }),
    ("over_budget_unrelayable_key_value", |s| {
        s.protocol.refused.get(Refusal::UnrelayableKeyValue)
    }),
    ("auth_failure", |s| s.endpoint.auth_failures),
    ("plaintext_refused", |s| s.endpoint.plaintext_refused),
];

/// The figures a node publishes, for embedders without a metrics stack
/// (`ChitchatHandle::metrics()`); the same values the facade receives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Syns received (including those of another cluster).
    pub syn_received: u64,
    /// SynAcks received.
    pub syn_ack_received: u64,
    /// Acks received.
    pub ack_received: u64,
    /// BadCluster answers received.
    pub bad_cluster_received: u64,
    /// Syns sent (gossip rounds and `ChitchatHandle::gossip`).
    pub syn_sent: u64,
    /// SynAcks written in reply to Syns of our cluster.
    pub syn_ack_sent: u64,
    /// Acks written in reply to SynAcks.
    pub ack_sent: u64,
    /// BadCluster answers written to Syns of another cluster.
    pub bad_cluster_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Datagrams dropped, by reason label (`malformed_<kind>`, `wrong_cluster`, `late`, ...);
    /// every known reason is present, zero or not.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Live nodes, self included.
    pub live_nodes: u64,
    /// Dead nodes.
    pub dead_nodes: u64,
    /// Node states held.
    pub node_states: u64,
    /// The `transport` label: io_uring, epoll, portable, channel, or socket (a user transport).
    pub transport: &'static str,
    /// Why the transport is not io_uring (empty when it is, or for the in-memory channel).
    pub fallback_reason: String,
}

impl MetricsSnapshot {
    /// Computes the figures from the counters and the node counts.
    pub(crate) fn gather(
        sources: &Sources<'_>,
        (live_nodes, dead_nodes, node_states): (u64, u64, u64),
        kind: &TransportKind,
    ) -> MetricsSnapshot {
        let p = sources.protocol;
        let mut dropped = BTreeMap::new();
        for (i, (_, reason)) in MALFORMED_KINDS.iter().enumerate() {
            dropped.insert(*reason, sources.malformed.get(i).copied().unwrap_or(0));
        }
        dropped.insert(
            "malformed_other",
            sources.malformed.get(MALFORMED_OTHER).copied().unwrap_or(0),
        );
        for (reason, count) in DROP_REASONS {
            dropped.insert(*reason, count(sources));
        }
        let (transport, fallback_reason) = transport_labels(kind);
        MetricsSnapshot {
            syn_received: p.syn_received,
            syn_ack_received: p.syn_ack_received,
            ack_received: p.ack_received,
            bad_cluster_received: p.bad_cluster_received,
            syn_sent: sources.server.syns_sent,
            syn_ack_sent: p.syn_received.saturating_sub(p.bad_cluster_sent),
            ack_sent: p.syn_ack_received,
            bad_cluster_sent: p.bad_cluster_sent,
            bytes_received: sources.endpoint.bytes_received,
            bytes_sent: sources.endpoint.bytes_sent,
            dropped,
            live_nodes,
            dead_nodes,
            node_states,
            transport,
            fallback_reason,
        }
    }

    /// Sum of every drop reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// Hands the figures to the installed recorder (absolute counters, set gauges); `labels` is
    /// the `node` label or nothing. Called at the end of a gossip round, at most once a second, on the
    /// control thread.
    pub(crate) fn publish(&self, labels: &[Label]) {
        let with = |extra: (&'static str, &'static str)| {
            let mut all = labels.to_vec();
            all.push(Label::new(extra.0, extra.1));
            all
        };
        for (ty, received, sent) in [
            ("syn", self.syn_received, self.syn_sent),
            ("synack", self.syn_ack_received, self.syn_ack_sent),
            ("ack", self.ack_received, self.ack_sent),
            (
                "bad_cluster",
                self.bad_cluster_received,
                self.bad_cluster_sent,
            ),
        ] {
            counter!(MESSAGES_RECEIVED, with(("type", ty))).absolute(received);
            counter!(MESSAGES_SENT, with(("type", ty))).absolute(sent);
        }
        counter!(BYTES_RECEIVED, labels.to_vec()).absolute(self.bytes_received);
        counter!(BYTES_SENT, labels.to_vec()).absolute(self.bytes_sent);
        for (reason, count) in &self.dropped {
            counter!(DATAGRAMS_DROPPED, with(("reason", reason))).absolute(*count);
        }
        gauge!(LIVE_NODES, labels.to_vec()).set(self.live_nodes as f64);
        gauge!(DEAD_NODES, labels.to_vec()).set(self.dead_nodes as f64);
        gauge!(NODE_STATES, labels.to_vec()).set(self.node_states as f64);
        let mut info = with(("transport", self.transport));
        info.push(Label::new("fallback_reason", self.fallback_reason.clone()));
        gauge!(TRANSPORT_INFO, info).set(1.0);
    }
}

/// The `transport` and `fallback_reason` labels of a backend.
fn transport_labels(kind: &TransportKind) -> (&'static str, String) {
    match kind {
        TransportKind::Uring => ("io_uring", String::new()),
        TransportKind::Epoll { reason } => ("epoll", reason.clone()),
        TransportKind::Channel => ("channel", String::new()),
        TransportKind::Portable => ("portable", String::new()),
        TransportKind::Socket => ("socket", String::new()),
    }
}

/// The labels every family of a node carries: `node` when a label was given.
pub(crate) fn base_labels(metrics_label: Option<&str>) -> Vec<Label> {
    metrics_label
        .map(|node| vec![Label::new("node", node.to_string())])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_maps_every_counter_to_its_figure() {
        let server = ServerStats {
            abandoned: 3,
            syns_sent: 7,
            ..ServerStats::default()
        };
        let protocol = ProtocolStats {
            syn_received: 10,
            syn_ack_received: 5,
            ack_received: 4,
            bad_cluster_received: 1,
            bad_cluster_sent: 2,
            ..ProtocolStats::default()
        };
        let endpoint = EndpointStats {
            bytes_received: 1_000,
            bytes_sent: 2_000,
            send_errors: 6,
            dropped_by_faults: 9,
            ..EndpointStats::default()
        };
        let mut malformed = vec![0; MALFORMED_OTHER + 1];
        malformed[malformed_index("bad-magic")] = 11;
        malformed[malformed_index("no-such-kind")] = 1;
        let sources = Sources {
            server: &server,
            malformed: &malformed,
            protocol: &protocol,
            endpoint: &endpoint,
        };
        let kind = TransportKind::Epoll {
            reason: "forced".to_string(),
        };
        let snap = MetricsSnapshot::gather(&sources, (2, 1, 3), &kind);
        assert_eq!(snap.syn_received, 10);
        assert_eq!(snap.syn_sent, 7);
        assert_eq!(snap.syn_ack_sent, 8);
        assert_eq!(snap.ack_sent, 5);
        assert_eq!(snap.bad_cluster_sent, 2);
        assert_eq!(snap.bad_cluster_received, 1);
        assert_eq!((snap.bytes_received, snap.bytes_sent), (1_000, 2_000));
        assert_eq!(snap.dropped["malformed_bad_magic"], 11);
        assert_eq!(snap.dropped["malformed_other"], 1);
        assert_eq!(snap.dropped["malformed_truncated"], 0);
        assert_eq!(snap.dropped["wrong_cluster"], 2);
        assert_eq!(snap.dropped["late"], 3);
        assert_eq!(snap.dropped["send_error"], 6);
        assert_eq!(snap.dropped["fault"], 9);
        assert_eq!(snap.dropped_total(), 11 + 1 + 2 + 3 + 6 + 9);
        assert_eq!(
            (snap.live_nodes, snap.dead_nodes, snap.node_states),
            (2, 1, 3)
        );
        assert_eq!(snap.transport, "epoll");
        assert_eq!(snap.fallback_reason, "forced");
    }

    #[test]
    fn every_decode_error_kind_has_its_own_reason() {
        for (i, (kind, reason)) in MALFORMED_KINDS.iter().enumerate() {
            assert_eq!(malformed_index(kind), i);
            assert_eq!(*reason, format!("malformed_{}", kind.replace('-', "_")));
        }
    }
}
