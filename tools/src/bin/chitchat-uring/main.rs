//! `chitchat-uring`: run a local cluster and see what it costs, run one node (also next to real
//! chitchat nodes), or load a node with Syns.

mod cluster;
mod common;
mod load;
mod node;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Gossip membership and key-value replication, wire-compatible with chitchat 0.13, on io_uring.
#[derive(Debug, Parser)]
#[command(name = "chitchat-uring", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start N nodes in this process, wait until they converge, time one update, measure the
    /// steady state, and print a summary.
    Cluster(cluster::Args),
    /// Run one node: JSON status lines on stdout, commands (`set K V`, `delete K`, `quit`) on
    /// stdin.
    Node(node::Args),
    /// Fire Syns at a node from many source ports and report replies/s and latency.
    Load(load::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Node(_) => "info",
        _ => "warn",
    };
    common::init_logging(default_level);
    common::install_interrupt_handler();
    let result = match cli.command {
        Command::Cluster(args) => cluster::run(args),
        Command::Node(args) => node::run(args),
        Command::Load(args) => load::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
