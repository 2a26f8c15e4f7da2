//! Helpers shared by the integration tests: free ports, node configs, a fake UDP peer speaking
//! our codec, and bounded waits on conditions.
#![allow(dead_code)]

pub mod capture;
pub mod mixed;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use chitchat_uring::transport::UdpMode;
use chitchat_uring::wire::{decode_envelope, encode_envelope};
use chitchat_uring::{
    ChannelTransport, ChitchatConfig, ChitchatEnvelope, ChitchatId, FailureDetectorConfig,
    Transport, UdpTransport,
};

/// A port nobody listens on right now (UDP and TCP), from a per-process range so parallel
/// tests do not pick the same one.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 20_000) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = if !(20_000..=60_000).contains(&port) {
            NEXT.store(20_001, Ordering::SeqCst);
            20_000
        } else {
            port
        };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A node config on 127.0.0.1:`port` gossiping every `gossip_ms`.
pub fn node_config(port: u16, gossip_ms: u64, seeds: &[SocketAddr]) -> ChitchatConfig {
    let mut config = ChitchatConfig::for_test(port);
    config.chitchat_id = ChitchatId::new(format!("node-{port}"), 1, ([127, 0, 0, 1], port).into());
    config.cluster_id = "test-cluster".to_string();
    config.gossip_interval = Duration::from_millis(gossip_ms);
    config.seed_nodes = seeds.iter().map(ToString::to_string).collect();
    config.failure_detector_config = FailureDetectorConfig {
        initial_interval: Duration::from_millis(gossip_ms * 2),
        dead_node_grace_period: Duration::from_secs(3_600),
        ..FailureDetectorConfig::default()
    };
    config.marked_for_deletion_grace_period = Duration::from_secs(3_600);
    config
}

/// The transports every server test runs on.
pub fn transports() -> Vec<(&'static str, Box<dyn Transport>)> {
    vec![
        (
            "uring",
            Box::new(UdpTransport {
                mode: UdpMode::Uring,
                ..UdpTransport::DEFAULT
            }),
        ),
        (
            "epoll",
            Box::new(UdpTransport {
                mode: UdpMode::Epoll,
                ..UdpTransport::DEFAULT
            }),
        ),
        ("channel", Box::new(ChannelTransport::new())),
    ]
}

/// The real-UDP transports (a plain socket can talk to them).
pub fn udp_transports() -> Vec<(&'static str, UdpTransport)> {
    vec![
        (
            "uring",
            UdpTransport {
                mode: UdpMode::Uring,
                ..UdpTransport::DEFAULT
            },
        ),
        (
            "epoll",
            UdpTransport {
                mode: UdpMode::Epoll,
                ..UdpTransport::DEFAULT
            },
        ),
    ]
}

/// A plain UDP socket that speaks envelopes.
pub struct FakePeer {
    pub socket: UdpSocket,
}

impl FakePeer {
    pub fn bind() -> FakePeer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        FakePeer { socket }
    }

    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    pub fn send(&self, to: SocketAddr, envelope: &ChitchatEnvelope) {
        let bytes = encode_envelope(envelope).unwrap();
        self.socket.send_to(&bytes, to).unwrap();
    }

    pub fn send_raw(&self, to: SocketAddr, bytes: &[u8]) {
        self.socket.send_to(bytes, to).unwrap();
    }

    /// The next datagram that decodes, within `timeout`, with its raw bytes.
    pub fn recv_within(
        &self,
        timeout: Duration,
    ) -> Option<(SocketAddr, ChitchatEnvelope, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        while Instant::now() < deadline {
            match self.socket.recv_from(&mut buf) {
                Ok((len, from)) => {
                    if let Ok(envelope) = decode_envelope(&buf[..len]) {
                        return Some((from, envelope, buf[..len].to_vec()));
                    }
                }
                Err(_) => continue,
            }
        }
        None
    }

    /// Receives until a datagram matches `pred`, within `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        pred: impl Fn(&ChitchatEnvelope) -> bool,
    ) -> Option<(SocketAddr, ChitchatEnvelope, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(got) = self.recv_within(deadline - Instant::now())
                && pred(&got.1)
            {
                return Some(got);
            }
        }
        None
    }
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
