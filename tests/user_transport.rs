//! chitchat 0.13's transport API: a user-written `Transport`/`Socket` runs under
//! `spawn_chitchat` (driven by a tokio task), mixes with nodes on our fast paths, and our own
//! transports' `open` returns sockets that work as chitchat's do. Real sockets on loopback.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chitchat_uring::message::{ChitchatMessage, Digest};
use chitchat_uring::transport::{
    ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport, TransportExt, TransportKind,
    UdpMode, UdpSocket, UdpTransport,
};
use chitchat_uring::{
    ChitchatEnvelope, ChitchatHandle, ChitchatId, ProtocolVersion, spawn_chitchat,
};
use common::{free_port, node_config, udp_transports, wait_until};

const WAIT: Duration = Duration::from_secs(20);

/// Gossip bytes and messages seen by a [`CountingTransport`]'s sockets.
#[derive(Debug, Default)]
struct Counts {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
}

/// What Quickwit does: a transport of its own around chitchat's `UdpSocket` that counts the
/// gossip traffic.
#[derive(Clone, Default)]
struct CountingTransport {
    counts: Arc<Counts>,
}

#[async_trait]
impl Transport for CountingTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = UdpSocket::open(listen_addr).await?;
        Ok(Box::new(CountingSocket {
            socket,
            counts: self.counts.clone(),
        }))
    }
}

struct CountingSocket {
    socket: UdpSocket,
    counts: Arc<Counts>,
}

#[async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let outcome = self.socket.send(to, envelope).await?;
        self.counts
            .bytes_sent
            .fetch_add(outcome.num_bytes_sent as u64, Ordering::Relaxed);
        self.counts.messages_sent.fetch_add(1, Ordering::Relaxed);
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let outcome = self.socket.recv().await?;
        self.counts
            .bytes_received
            .fetch_add(outcome.num_bytes_received as u64, Ordering::Relaxed);
        self.counts
            .messages_received
            .fetch_add(1, Ordering::Relaxed);
        Ok(outcome)
    }
}

async fn start(port: u16, seeds: &[SocketAddr], transport: &dyn Transport) -> ChitchatHandle {
    spawn_chitchat(node_config(port, 50, seeds), Vec::new(), transport)
        .await
        .unwrap()
}

fn all_live(nodes: &[ChitchatHandle], n: usize) -> bool {
    nodes
        .iter()
        .all(|node| node.chitchat().lock().live_nodes().count() == n)
}

/// Whether every node sees `key = value` on `origin`.
fn spread(nodes: &[ChitchatHandle], origin: &ChitchatId, key: &str, value: &str) -> bool {
    nodes.iter().all(|node| {
        node.chitchat()
            .lock()
            .node_state(origin)
            .and_then(|state| state.get(key).map(String::from))
            .as_deref()
            == Some(value)
    })
}

fn port_is_free(port: u16) -> bool {
    std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_transport_cluster_converges_counts_and_shuts_down() {
    let transport = CountingTransport::default();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let seed = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let mut nodes = Vec::new();
    for &port in &ports {
        nodes.push(start(port, &[seed], &transport).await);
    }
    for node in &nodes {
        assert_eq!(node.transport_kind(), TransportKind::Socket);
    }
    assert!(
        wait_until(WAIT, || all_live(&nodes, 3)).await,
        "the user-transport cluster did not form"
    );
    nodes[1]
        .with_chitchat(|c| c.self_node_state().set("role", "indexer"))
        .await;
    let origin = nodes[1].chitchat_id().clone();
    assert!(
        wait_until(WAIT, || spread(&nodes, &origin, "role", "indexer")).await,
        "the key did not spread over the user transport"
    );

    // The wrapper saw the gossip, and so did the node's own counters.
    let counts = &transport.counts;
    assert!(counts.messages_sent.load(Ordering::Relaxed) > 0);
    assert!(counts.messages_received.load(Ordering::Relaxed) > 0);
    assert!(counts.bytes_sent.load(Ordering::Relaxed) > 0);
    assert!(counts.bytes_received.load(Ordering::Relaxed) > 0);
    let stats = nodes[0].endpoint_stats();
    assert!(
        stats.datagrams_received > 0 && stats.bytes_received > 0,
        "{stats:?}"
    );
    assert!(
        stats.datagrams_sent > 0 && stats.bytes_sent > 0,
        "{stats:?}"
    );
    let server = nodes[0].server_stats();
    assert!(server.syns_sent > 0 && server.replies > 0, "{server:?}");

    // Command::Gossip goes through the same socket.
    let before = nodes[2].server_stats().syns_sent;
    nodes[2].gossip(seed).unwrap();
    assert!(wait_until(WAIT, || nodes[2].server_stats().syns_sent > before).await);

    // Shutdown: Ok, and the socket is dropped (the port is free) when it returns.
    for (node, port) in nodes.into_iter().zip(ports) {
        node.shutdown().await.unwrap();
        assert!(port_is_free(port), "port {port} still bound after shutdown");
    }
}

/// On a current-thread runtime (`#[tokio::test]`'s default) the driver shares the test's only
/// thread: stopping must still complete.
#[tokio::test]
async fn user_transport_abort_is_an_error() {
    let port = free_port();
    let node = start(port, &[], &CountingTransport::default()).await;
    let watcher = node.termination_watcher();
    node.abort();
    let result = tokio::time::timeout(WAIT, watcher)
        .await
        .expect("the aborted node stops");
    assert!(result.is_err(), "abort is reported as an error");
    assert!(wait_until(WAIT, || port_is_free(port)).await);
    // And a graceful shutdown on the same runtime.
    let port = free_port();
    let node = start(port, &[], &CountingTransport::default()).await;
    tokio::time::timeout(WAIT, node.shutdown())
        .await
        .expect("shutdown completes")
        .unwrap();
    assert!(port_is_free(port));
}

/// A socket whose `recv` fails once the test says so: a broken user transport stops the node
/// with an error, as in chitchat.
#[derive(Clone, Default)]
struct BreakableTransport {
    broken: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

struct BreakableSocket {
    socket: UdpSocket,
    transport: BreakableTransport,
}

#[async_trait]
impl Transport for BreakableTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(BreakableSocket {
            socket: UdpSocket::open(listen_addr).await?,
            transport: self.clone(),
        }))
    }
}

#[async_trait]
impl Socket for BreakableSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.socket.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        if self.transport.broken.load(Ordering::Acquire) {
            anyhow::bail!("the wire is cut");
        }
        tokio::select! {
            outcome = self.socket.recv() => outcome,
            _ = self.transport.notify.notified() => anyhow::bail!("the wire is cut"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_user_socket_stops_the_node_with_its_error() {
    let transport = BreakableTransport::default();
    let node = start(free_port(), &[], &transport).await;
    let watcher = node.termination_watcher();
    transport.broken.store(true, Ordering::Release);
    transport.notify.notify_waiters();
    let result = tokio::time::timeout(WAIT, watcher)
        .await
        .expect("the node stops");
    let message = format!("{:#}", result.unwrap_err());
    assert!(message.contains("the wire is cut"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_cluster_user_transport_and_fast_paths_converge() {
    let user = CountingTransport::default();
    let fast = udp_transports();
    let ports: Vec<u16> = (0..1 + fast.len()).map(|_| free_port()).collect();
    let seed = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let mut nodes = vec![start(ports[0], &[seed], &user).await];
    let mut names = vec!["user socket"];
    for ((name, transport), &port) in fast.iter().zip(&ports[1..]) {
        nodes.push(start(port, &[seed], transport).await);
        names.push(name);
    }
    let n = nodes.len();
    assert!(
        wait_until(WAIT, || all_live(&nodes, n)).await,
        "the mixed cluster ({names:?}) did not form"
    );
    // A key from a fast-path node reaches the user-transport node and the other way round.
    nodes[n - 1]
        .with_chitchat(|c| c.self_node_state().set("from", "fast"))
        .await;
    nodes[0]
        .with_chitchat(|c| c.self_node_state().set("from", "user"))
        .await;
    let fast_id = nodes[n - 1].chitchat_id().clone();
    let user_id = nodes[0].chitchat_id().clone();
    assert!(
        wait_until(WAIT, || spread(&nodes, &fast_id, "from", "fast")
            && spread(&nodes, &user_id, "from", "user"))
        .await,
        "keys did not spread across the mixed cluster ({names:?})"
    );
    assert!(user.counts.messages_received.load(Ordering::Relaxed) > 0);
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portable_cluster_converges_spreads_and_detects_failure() {
    let transport = UdpTransport {
        mode: UdpMode::Portable,
        ..UdpTransport::DEFAULT
    };
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let seed = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let mut nodes = Vec::new();
    for &port in &ports {
        nodes.push(start(port, &[seed], &transport).await);
    }
    assert_eq!(nodes[0].transport_kind(), TransportKind::Portable);
    assert!(wait_until(WAIT, || all_live(&nodes, 3)).await, "no cluster");
    nodes[0]
        .with_chitchat(|c| c.self_node_state().set("k", "v1"))
        .await;
    let origin = nodes[0].chitchat_id().clone();
    assert!(wait_until(WAIT, || spread(&nodes, &origin, "k", "v1")).await);
    // An update spreads too.
    nodes[0]
        .with_chitchat(|c| c.self_node_state().set("k", "v2"))
        .await;
    assert!(wait_until(WAIT, || spread(&nodes, &origin, "k", "v2")).await);

    let stopped = nodes.pop().unwrap();
    let stopped_id = stopped.chitchat_id().clone();
    stopped.shutdown().await.unwrap();
    assert!(port_is_free(ports[2]));
    let seen_dead = |nodes: &[ChitchatHandle]| {
        nodes.iter().all(|node| {
            let chitchat = node.chitchat();
            let chitchat = chitchat.lock();
            chitchat.dead_nodes().any(|id| *id == stopped_id)
                && !chitchat.live_nodes().any(|id| *id == stopped_id)
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || seen_dead(&nodes)).await,
        "the stopped node was not seen dead"
    );
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

fn sample_syn(version: ProtocolVersion) -> ChitchatEnvelope {
    ChitchatEnvelope {
        version,
        message: ChitchatMessage::Syn {
            cluster_id: "cluster".to_string(),
            digest: Digest::default(),
        },
    }
}

/// `open` twice, send one way, receive: chitchat's socket contract.
async fn socket_round_trip(name: &str, transport: &dyn Transport) {
    let mut a = transport.open(([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut b = transport.open(([127, 0, 0, 1], 0).into()).await.unwrap();
    let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    assert_ne!(addr_a, addr_b, "{name}");
    // The address is taken while the socket lives.
    assert!(transport.open(addr_a).await.is_err(), "{name}");
    // Nothing to receive yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), b.recv())
            .await
            .is_err(),
        "{name}"
    );
    for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
        let sent = a.send(addr_b, sample_syn(version)).await.unwrap();
        let received = tokio::time::timeout(WAIT, b.recv())
            .await
            .unwrap_or_else(|_| panic!("{name}: nothing received"))
            .unwrap();
        assert_eq!(received.from_addr, addr_a, "{name}");
        assert_eq!(received.envelope, sample_syn(version), "{name}");
        assert_eq!(received.num_bytes_received, sent.num_bytes_sent, "{name}");
    }
    // Sending where nobody listens is not an error (a lost datagram).
    let mut unbound = addr_b;
    unbound.set_ip([127, 0, 0, 2].into());
    a.send(unbound, sample_syn(ProtocolVersion::V0))
        .await
        .unwrap_or_else(|error| panic!("{name}: {error:#}"));
    // And back.
    b.send(addr_a, sample_syn(ProtocolVersion::V0))
        .await
        .unwrap();
    let back = tokio::time::timeout(WAIT, a.recv()).await.unwrap().unwrap();
    assert_eq!(back.from_addr, addr_b, "{name}");
    // Dropping a socket frees its address.
    drop(a);
    let again = transport.open(addr_a).await.unwrap();
    assert_eq!(again.local_addr().unwrap(), addr_a, "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_transports_open_working_sockets() {
    for (name, transport) in udp_transports() {
        socket_round_trip(name, &transport).await;
    }
    socket_round_trip("channel", &ChannelTransport::new()).await;
    socket_round_trip("user counting", &CountingTransport::default()).await;
    // `drop_message` wraps a user's sockets too (our transports keep their fast path under it).
    let lossless = CountingTransport::default().drop_message(0.0);
    assert!(lossless.datagram_transport().is_none());
    socket_round_trip("user counting, drop 0", lossless.as_ref()).await;
    let fast = UdpTransport::DEFAULT.drop_message(0.0);
    assert!(fast.datagram_transport().is_some());
    socket_round_trip("udp, drop 0", fast.as_ref()).await;
}

#[tokio::test]
async fn drop_message_one_loses_everything_on_a_user_socket() {
    let lossy = CountingTransport::default().drop_message(1.0);
    let mut a = lossy.open(([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut b = lossy.open(([127, 0, 0, 1], 0).into()).await.unwrap();
    let addr_b = b.local_addr().unwrap();
    for _ in 0..10 {
        a.send(addr_b, sample_syn(ProtocolVersion::V0))
            .await
            .unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.recv())
            .await
            .is_err(),
        "every received message is lost"
    );
}

#[tokio::test]
async fn udp_socket_skips_junk_and_sends_from_its_address() {
    let mut socket = UdpSocket::open(([127, 0, 0, 1], 0).into()).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    peer.send_to(b"junk", addr).await.unwrap();
    let bytes = chitchat_uring::wire::encode_envelope(&sample_syn(ProtocolVersion::V0)).unwrap();
    peer.send_to(&bytes, addr).await.unwrap();
    let received = tokio::time::timeout(WAIT, socket.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received.from_addr, peer.local_addr().unwrap());
    assert_eq!(received.envelope, sample_syn(ProtocolVersion::V0));
    assert_eq!(received.num_bytes_received, bytes.len());
    // A taken port is an error naming it.
    let error = UdpSocket::open(addr).await.err().unwrap();
    assert!(
        format!("{error:#}").contains(&addr.to_string()),
        "{error:#}"
    );
}

/// A node on a ChannelTransport talks to a socket opened on the same network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_socket_reaches_a_node_on_the_same_network() {
    let network = ChannelTransport::new();
    let port = free_port();
    let node = start(port, &[], &network).await;
    let mut socket = network.open(([127, 0, 0, 1], 0).into()).await.unwrap();
    let node_addr = node.local_addr();
    let syn = ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn {
            cluster_id: "test-cluster".to_string(),
            digest: Digest::default(),
        },
    };
    socket.send(node_addr, syn).await.unwrap();
    let reply = tokio::time::timeout(WAIT, socket.recv())
        .await
        .expect("the node answers")
        .unwrap();
    assert_eq!(reply.from_addr, node_addr);
    assert!(
        matches!(reply.envelope.message, ChitchatMessage::SynAck { .. }),
        "{:?}",
        reply.envelope
    );
    node.shutdown().await.unwrap();
}

/// `open` of a keyed transport seals: two of its sockets talk, a plaintext socket is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_transport_sockets_seal_and_refuse_plaintext() {
    use chitchat_uring::transport::KeyedTransport;
    use chitchat_uring::transport::seal::{Key, KeyedMode, Keyring, KeyringHandle};
    let keyring = KeyringHandle::new(Keyring::new(Key::generate().unwrap()));
    let keyed = KeyedTransport::new(
        UdpTransport::DEFAULT,
        keyring,
        "cluster",
        KeyedMode::Required,
    );
    socket_round_trip("keyed", &keyed).await;
    let mut sealed = keyed.open(([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut plain = UdpTransport.open(([127, 0, 0, 1], 0).into()).await.unwrap();
    plain
        .send(
            sealed.local_addr().unwrap(),
            sample_syn(ProtocolVersion::V0),
        )
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sealed.recv())
            .await
            .is_err(),
        "a plaintext message reached a keyed socket"
    );
    // And a sealed message is junk to a plaintext socket.
    sealed
        .send(plain.local_addr().unwrap(), sample_syn(ProtocolVersion::V0))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), plain.recv())
            .await
            .is_err(),
        "a sealed message decoded as plaintext"
    );
}
