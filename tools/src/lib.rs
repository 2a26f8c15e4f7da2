//! What the `chitchat-uring` command-line tool and the benchmarks against chitchat 0.13 share:
//! the local-cluster measurement ([`bench_support`]) and the Syn load generator ([`loadgen`]).
//!
//! It is a crate of its own, next to the library, so that the library's embedders compile none
//! of it (nor clap, tracing-subscriber, serde_json or plotters), while the tool and the
//! benchmarks still measure with one piece of code.

pub mod bench_support;
pub mod loadgen;
