//! The sans-IO protocol core (placeholder until the state machine lands).

/// State of one node as seen locally.
pub struct NodeState {}
