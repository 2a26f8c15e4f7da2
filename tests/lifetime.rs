//! How long a node lives (issue 9), chitchat 0.13's way: dropping the `ChitchatHandle` stops the
//! node (gossip loop, DNS refresh, sockets) even while the application still holds strong
//! `ChitchatRef`s; those keep the stopped node's state readable, and once the last one is gone a
//! background task holding a `WeakChitchatRef` sees `upgrade()` fail and ends. Nothing of the
//! node outlives that: the port is free and every thread it started has exited.
//!
//! One test in this binary on purpose: it counts the process's threads, which tests running
//! next to it would change.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chitchat_uring::{ChitchatConfig, ChitchatId, UdpTransport, WeakChitchatRef, spawn_chitchat};
use test_support::{free_port, wait_until};
use tokio::task::JoinHandle;

/// Bound of every wait here; each normally takes milliseconds.
const BOUND: Duration = Duration::from_secs(10);

fn config(port: u16, seeds: Vec<String>) -> ChitchatConfig {
    let mut config = ChitchatConfig::for_test(port);
    config.chitchat_id = ChitchatId::for_local_test(port);
    config.cluster_id = "lifetime".to_string();
    config.gossip_interval = Duration::from_millis(20);
    config.seed_nodes = seeds;
    config
}

/// Threads of this process right now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task is readable")
        .count()
}

fn port_is_free(port: u16) -> bool {
    UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
}

/// A background task written the way chitchat users write them: it holds only a weak
/// reference, reads the state every few milliseconds, and ends once `upgrade()` fails. Counts
/// its successful reads.
fn spawn_watcher(weak: WeakChitchatRef) -> (JoinHandle<()>, Arc<AtomicU64>) {
    let reads = Arc::new(AtomicU64::new(0));
    let counted = reads.clone();
    let task = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(5));
        loop {
            interval.tick().await;
            let Some(chitchat) = weak.upgrade() else {
                return;
            };
            let _ = chitchat.lock().live_nodes().count();
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    (task, reads)
}

/// The handle goes first while the application keeps a strong reference (with a hostname seed,
/// so a DNS refresh loop runs): the node stops as in chitchat, its state stays readable, and the
/// last strong reference lets the weak watcher end.
async fn handle_dropped_while_the_application_holds_the_state() {
    let port = free_port();
    let seed = format!("localhost:{}", free_port());
    let node = spawn_chitchat(
        config(port, vec![seed]),
        vec![("key".to_string(), "value".to_string())],
        &UdpTransport::default(),
    )
    .await
    .unwrap();
    let app_ref = node.chitchat();
    let weak = app_ref.downgrade();
    let (watcher, reads) = spawn_watcher(app_ref.downgrade());
    assert!(
        wait_until(BOUND, || reads.load(Ordering::Relaxed) > 0).await,
        "the watcher reads while the node runs"
    );

    let stopped = node.termination_watcher();
    drop(node);
    tokio::time::timeout(BOUND, stopped)
        .await
        .expect("the node stops within the bound once its handle is dropped")
        .expect("a dropped handle is a graceful stop");
    // The sockets are closed before the termination is published.
    assert!(port_is_free(port), "port {port} still bound after the stop");

    // The state outlives the node while the application holds it: readable, frozen.
    let heartbeat = app_ref.lock().self_node_state().heartbeat();
    let reads_at_stop = reads.load(Ordering::Relaxed);
    // Ten watcher reads (50 ms) span two gossip intervals: a running node would have beaten.
    assert!(
        wait_until(BOUND, || reads.load(Ordering::Relaxed)
            >= reads_at_stop + 10)
        .await,
        "the watcher still upgrades while a strong reference exists"
    );
    assert!(!watcher.is_finished());
    {
        let mut state = app_ref.lock();
        assert_eq!(state.self_node_state().get("key"), Some("value"));
        assert_eq!(
            state.self_node_state().heartbeat(),
            heartbeat,
            "no gossip round after the handle was dropped"
        );
    }

    drop(app_ref);
    tokio::time::timeout(BOUND, watcher)
        .await
        .expect("the watcher ends once the last strong reference is gone")
        .unwrap();
    assert!(weak.upgrade().is_none());
}

/// The handle and every strong reference go at once, without `shutdown`: the weak watcher ends
/// and the port comes free, each within the bound.
async fn handle_and_every_strong_reference_dropped() {
    let port = free_port();
    let node = spawn_chitchat(
        config(port, Vec::new()),
        Vec::new(),
        &UdpTransport::default(),
    )
    .await
    .unwrap();
    let weak = node.chitchat().downgrade();
    let (watcher, reads) = spawn_watcher(weak.clone());
    assert!(wait_until(BOUND, || reads.load(Ordering::Relaxed) > 0).await);
    assert!(!port_is_free(port), "the node holds its port");

    drop(node);
    tokio::time::timeout(BOUND, watcher)
        .await
        .expect("the watcher's upgrade fails within the bound")
        .unwrap();
    assert!(weak.upgrade().is_none());
    assert!(
        wait_until(BOUND, || port_is_free(port)).await,
        "port {port} still bound {BOUND:?} after the last reference was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_and_the_last_strong_reference_ends_the_node() {
    // The runtime's workers exist already; the node's control thread and I/O workers do not.
    let baseline = threads();

    handle_dropped_while_the_application_holds_the_state().await;
    assert!(
        wait_until(BOUND, || threads() <= baseline).await,
        "threads: {} after the first node, {baseline} before",
        threads()
    );

    handle_and_every_strong_reference_dropped().await;
    assert!(
        wait_until(BOUND, || threads() <= baseline).await,
        "threads: {} after the second node, {baseline} before",
        threads()
    );
}
