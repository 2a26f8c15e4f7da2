//! Helpers shared by the integration tests: node configs, the transports to run on (io_uring
//! only where it can be set up), a fake UDP peer speaking our codec; free ports and bounded
//! waits come from the workspace's `test-support` crate.
#![allow(dead_code)]

pub mod capture;
pub mod mixed;

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chitchat_uring::transport::{Datagram, DatagramHandler, DatagramTransport, ReplySink, UdpMode};
use chitchat_uring::wire::{decode_envelope, encode_envelope};
use chitchat_uring::{
    ChannelTransport, ChitchatConfig, ChitchatEnvelope, ChitchatId, FailureDetectorConfig,
    Transport, UdpTransport,
};
// Each test binary uses some of them.
#[allow(unused_imports)]
pub use test_support::{free_port, wait_until, wait_until_blocking};

/// Why io_uring cannot be used here (kernel too old, `kernel.io_uring_disabled`, a seccomp
/// filter, RLIMIT_MEMLOCK...), or `None` when it can. Found once per test binary by opening a
/// forced-io_uring endpoint on 127.0.0.1:0, the same path every io_uring test takes.
pub fn uring_unavailable() -> Option<&'static str> {
    static PROBE: OnceLock<Option<String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            struct Ignore;
            impl DatagramHandler for Ignore {
                fn handle_batch(&self, _: &[Datagram<'_>], _: &mut dyn ReplySink) {}
            }
            let transport = UdpTransport {
                mode: UdpMode::Uring,
                ..UdpTransport::DEFAULT
            };
            match transport.open_endpoint(([127, 0, 0, 1], 0).into(), Arc::new(Ignore)) {
                Ok(endpoint) => {
                    endpoint.close();
                    None
                }
                Err(error) => Some(format!("{error:#}")),
            }
        })
        .as_deref()
}

/// True when io_uring works here; otherwise prints that `what` is skipped and why. Tests that
/// force `UdpMode::Uring` return early on false, so the suite passes (and says what it did not
/// run) where io_uring is unavailable.
pub fn uring_or_skip(what: &str) -> bool {
    match uring_unavailable() {
        None => true,
        Some(reason) => {
            eprintln!("skipping {what}: io_uring unavailable: {reason}");
            false
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

/// The transports every server test runs on; io_uring only where it works (the skip is printed).
pub fn transports() -> Vec<(&'static str, Box<dyn Transport>)> {
    let mut transports: Vec<(&'static str, Box<dyn Transport>)> = udp_transports()
        .into_iter()
        .map(|(name, transport)| (name, Box::new(transport) as Box<dyn Transport>))
        .collect();
    transports.push(("channel", Box::new(ChannelTransport::new())));
    transports
}

/// The real-UDP transports (a plain socket can talk to them); io_uring only where it works.
pub fn udp_transports() -> Vec<(&'static str, UdpTransport)> {
    let mut transports = Vec::new();
    // libtest names each test's thread after the test, and tokio::test runs the body on it.
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    if uring_or_skip(&format!("the io_uring run of {test}")) {
        transports.push((
            "uring",
            UdpTransport {
                mode: UdpMode::Uring,
                ..UdpTransport::DEFAULT
            },
        ));
    }
    // epoll and io_uring exist only on Linux.
    #[cfg(target_os = "linux")]
    transports.push((
        "epoll",
        UdpTransport {
            mode: UdpMode::Epoll,
            ..UdpTransport::DEFAULT
        },
    ));
    transports.push((
        "portable",
        UdpTransport {
            mode: UdpMode::Portable,
            ..UdpTransport::DEFAULT
        },
    ));
    transports
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
