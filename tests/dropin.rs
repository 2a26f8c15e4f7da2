//! The chitchat 0.13 drop-in surface (issue 9): `testsuite` helpers, `TransportExt`, async links,
//! weak references, `abort()` reported as an error.

use std::net::SocketAddr;
use std::time::Duration;

use chitchat_uring::transport::{ChannelTransport, Transport, TransportExt};
use chitchat_uring::{ChitchatConfig, ChitchatHandle, ChitchatId, spawn_chitchat};

const WAIT: Duration = Duration::from_secs(10);

fn config(port: u16, seeds: &[SocketAddr]) -> ChitchatConfig {
    let mut config = ChitchatConfig::for_test(port);
    config.chitchat_id = ChitchatId::for_local_test(port);
    config.cluster_id = "dropin".to_string();
    config.gossip_interval = Duration::from_millis(20);
    config.seed_nodes = seeds.iter().map(|s| s.to_string()).collect();
    config
}

/// Waits (bounded) until `node` sees `expected` live nodes.
async fn live_nodes_reach(node: &ChitchatHandle, expected: usize, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if node.chitchat().lock().live_nodes().count() == expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn pair(transport: &dyn Transport, base: u16) -> (ChitchatHandle, ChitchatHandle) {
    let a = ChitchatId::for_local_test(base).gossip_advertise_addr;
    let n1 = spawn_chitchat(config(base, &[]), Vec::new(), transport)
        .await
        .unwrap();
    let n2 = spawn_chitchat(config(base + 1, &[a]), Vec::new(), transport)
        .await
        .unwrap();
    (n1, n2)
}

#[test]
fn setup_tracing_for_tests_is_idempotent() {
    chitchat_uring::setup_tracing_for_tests();
    chitchat_uring::setup_tracing_for_tests();
    tracing::info!("logged through the test writer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_message_zero_still_converges_and_one_loses_everything() {
    let lossless: Box<dyn Transport> = ChannelTransport::new().drop_message(0.0);
    let (n1, n2) = pair(&*lossless, 21_000).await;
    assert!(live_nodes_reach(&n1, 2, WAIT).await);
    assert!(live_nodes_reach(&n2, 2, WAIT).await);

    let lossy: Box<dyn Transport> = ChannelTransport::new().drop_message(1.0);
    let (m1, m2) = pair(&*lossy, 21_010).await;
    // Many gossip rounds (20 ms each) pass with every datagram lost: nobody learns anybody.
    assert!(!live_nodes_reach(&m2, 2, Duration::from_millis(500)).await);
    assert_eq!(m1.chitchat().lock().live_nodes().count(), 1);
    for n in [n1, n2, m1, m2] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_links_cut_and_heal() {
    let transport = ChannelTransport::new();
    let a = ChitchatId::for_local_test(21_020).gossip_advertise_addr;
    let b = ChitchatId::for_local_test(21_021).gossip_advertise_addr;
    transport.remove_link(a, b).await;
    let (n1, n2) = pair(&transport, 21_020).await;
    assert!(!live_nodes_reach(&n2, 2, Duration::from_millis(500)).await);
    transport.add_link(a, b).await;
    assert!(live_nodes_reach(&n2, 2, WAIT).await);
    assert!(live_nodes_reach(&n1, 2, WAIT).await);
    n1.shutdown().await.unwrap();
    n2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_is_reported_as_an_error_and_shutdown_as_success() {
    let transport = ChannelTransport::new();
    let (n1, n2) = pair(&transport, 21_030).await;
    let watcher = n1.termination_watcher();
    n1.abort();
    let result = tokio::time::timeout(WAIT, watcher).await.unwrap();
    let error = result.unwrap_err();
    assert!(format!("{error:#}").contains("aborted"), "{error:#}");
    n2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_reference_upgrades_while_the_node_lives() {
    let transport = ChannelTransport::new();
    let node = spawn_chitchat(config(21_040, &[]), Vec::new(), &transport)
        .await
        .unwrap();
    let weak = node.chitchat().downgrade();
    let strong = weak.upgrade().expect("the node holds the state");
    assert_eq!(strong.lock().self_chitchat_id(), node.chitchat_id());
    drop(strong);
    node.shutdown().await.unwrap();
    // The handle and the stopped server held the last strong references.
    let deadline = std::time::Instant::now() + WAIT;
    while weak.upgrade().is_some() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(weak.upgrade().is_none(), "the state outlived its node");
}

/// Listeners run in the application's runtime context (`tokio::spawn` works in them) and a
/// panicking one is caught: the node goes on converging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_can_spawn_and_a_panicking_listener_does_not_stop_the_node() {
    let transport = ChannelTransport::new();
    let (n1, n2) = pair(&transport, 21_050).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    {
        let chitchat = n1.chitchat();
        let c = chitchat.lock();
        c.subscribe_event("spawn", move |event| {
            let tx = tx.clone();
            let value = event.value.to_string();
            // Panics without a runtime context.
            tokio::spawn(async move {
                let _ = tx.send(value);
            });
        })
        .forever();
        c.subscribe_event("boom", |_| panic!("listener exploded"))
            .forever();
    }
    n2.chitchat().lock().self_node_state().set("boom", "!");
    n2.chitchat()
        .lock()
        .self_node_state()
        .set("spawn", "spawned");
    let got = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
    assert_eq!(got.as_deref(), Some("spawned"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while n1.chitchat().lock().listener_panics() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(n1.chitchat().lock().listener_panics(), 1);
    // Still converging after the panic.
    n2.chitchat().lock().self_node_state().set("later", "yes");
    let n2_id = n2.chitchat_id().clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    let seen = |n1: &ChitchatHandle| {
        n1.chitchat()
            .lock()
            .node_state(&n2_id)
            .is_some_and(|s| s.get("later") == Some("yes"))
    };
    while !seen(&n1) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen(&n1),
        "the node stopped converging after a listener panic"
    );
    n1.shutdown().await.unwrap();
    n2.shutdown().await.unwrap();
}

/// A node cannot start on a port another socket holds, with or without SO_REUSEPORT (ours):
/// the error names the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_fails_to_start_naming_the_address() {
    let transport = chitchat_uring::UdpTransport::default();
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let error = spawn_chitchat(config(port, &[]), Vec::new(), &transport)
        .await
        .err()
        .expect("a foreign socket holds the port");
    assert!(
        format!("{error:#}").contains(&format!("127.0.0.1:{port}")),
        "{error:#}"
    );
    drop(holder);
    // Our own node on the port: a second node must not join its SO_REUSEPORT group.
    let node = spawn_chitchat(config(port, &[]), Vec::new(), &transport)
        .await
        .unwrap();
    let error = spawn_chitchat(config(port, &[]), Vec::new(), &transport)
        .await
        .err()
        .expect("our first node holds the port");
    assert!(
        format!("{error:#}").contains(&format!("127.0.0.1:{port}")),
        "{error:#}"
    );
    node.shutdown().await.unwrap();
}
