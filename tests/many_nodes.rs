//! Many nodes in one process: hundreds of nodes stop together and free every port, and starting
//! nodes never holds up the caller's async runtime (issue 11). Speed is shown by the `cluster`
//! measurements, not asserted here: the bounds below only keep a broken build from hanging.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use chitchat_uring::transport::{
    DatagramHandler, DatagramTransport, Endpoint, Preparation, Socket, UdpMode,
};
use chitchat_uring::{ChitchatHandle, Transport, UdpTransport, spawn_chitchat};
use common::{free_port, node_config, transports, udp_transports, wait_until};

/// Nodes of the shutdown test, per transport.
const NODES: usize = 200;
/// Bound of every wait (not a timing assertion: a stuck close must fail, not hang).
const WAIT: Duration = Duration::from_secs(120);

/// Starts `n` nodes on free ports, all seeded with the first; retries a port taken meanwhile.
async fn start_nodes(n: usize, transport: &dyn Transport) -> Vec<ChitchatHandle> {
    let mut handles: Vec<ChitchatHandle> = Vec::with_capacity(n);
    let mut seed: Option<SocketAddr> = None;
    for i in 0..n {
        let mut attempt = 0;
        let handle = loop {
            let port = free_port();
            let seeds: Vec<SocketAddr> = seed.iter().copied().collect();
            match spawn_chitchat(node_config(port, 100, &seeds), Vec::new(), transport).await {
                Ok(handle) => break handle,
                Err(error) if attempt < 5 => {
                    eprintln!("node {i} on port {port}: {error:#}; retrying");
                    attempt += 1;
                }
                Err(error) => panic!("node {i}: {error:#}"),
            }
        };
        seed.get_or_insert(handle.chitchat_id().gossip_advertise_addr);
        handles.push(handle);
    }
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_nodes_stop_together_and_free_every_port() {
    for (name, transport) in transports() {
        let handles = start_nodes(NODES, transport.as_ref()).await;
        // Gossip is flowing (the seed has heard from many peers) when the shutdown starts.
        let seed = handles[0].chitchat();
        assert!(
            wait_until(WAIT, || seed.lock().node_states().len() >= NODES / 4).await,
            "{name}: the seed never heard from a quarter of the cluster"
        );
        let addrs: Vec<SocketAddr> = handles.iter().map(ChitchatHandle::local_addr).collect();
        for handle in &handles {
            handle.initiate_shutdown().unwrap();
        }
        let stops: Vec<_> = handles
            .into_iter()
            .map(|handle| tokio::spawn(handle.shutdown()))
            .collect();
        for (i, stop) in stops.into_iter().enumerate() {
            let result = tokio::time::timeout(WAIT, stop)
                .await
                .unwrap_or_else(|_| panic!("{name}: node {i} did not stop within {WAIT:?}"))
                .expect("the shutdown task panicked");
            assert!(result.is_ok(), "{name}: node {i} stopped with {result:?}");
        }
        if name == "channel" {
            // The in-memory network freed every address: a new endpoint may take each.
            for addr in &addrs {
                let mut config = node_config(addr.port(), 100, &[]);
                config.listen_addr = *addr;
                let node = spawn_chitchat(config, Vec::new(), transport.as_ref())
                    .await
                    .unwrap_or_else(|e| panic!("channel: {addr} still taken: {e:#}"));
                node.shutdown().await.unwrap();
            }
        } else {
            // A bind without SO_REUSEPORT fails while any socket holds the port.
            for addr in &addrs {
                UdpSocket::bind(addr)
                    .unwrap_or_else(|e| panic!("{name}: {addr} still bound after shutdown: {e}"));
            }
        }
    }
}

/// How long a gated start-up waits for the caller's other task before giving up (then the test
/// fails on its count, not by hanging).
const GATE_WAIT: Duration = Duration::from_secs(20);

/// A UDP transport whose first start-up job ([`DatagramTransport::prepare`]) cannot end before
/// the caller's other task has run once: a start-up that does not take the caller's thread
/// finishes as soon as that task runs; one that blocks the caller's thread waits out
/// [`GATE_WAIT`] with the task never run. Without the gate the check would race: a quick
/// start-up may end before the caller's first poll, and nothing would have to yield.
struct GatedStart {
    inner: UdpTransport,
    /// Taken by the first `prepare`: the other task's first run.
    ran: Mutex<Option<mpsc::Receiver<()>>>,
}

#[async_trait]
impl Transport for GatedStart {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        self.inner.open(listen_addr).await
    }

    fn datagram_transport(&self) -> Option<&dyn DatagramTransport> {
        Some(self)
    }
}

impl GatedStart {
    fn fast_path(&self) -> &dyn DatagramTransport {
        self.inner
            .datagram_transport()
            .expect("a UDP transport has a datagram path")
    }
}

impl DatagramTransport for GatedStart {
    fn open_endpoint(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        self.fast_path().open_endpoint(listen_addr, handler)
    }

    fn prepare(&self) -> Option<Preparation> {
        let inner = self.fast_path().prepare();
        let Some(ran) = self.ran.lock().unwrap().take() else {
            return inner;
        };
        Some(Box::new(move || {
            // A timeout is not an error here: the caller's count then shows what happened.
            let _ = ran.recv_timeout(GATE_WAIT);
            match inner {
                Some(job) => job(),
                None => Ok(Box::new(())),
            }
        }))
    }
}

/// A caller on a current-thread runtime keeps running its other tasks while nodes start, even
/// the first node of a transport whose I/O workers must start (and io_uring be probed) first.
#[test]
fn spawn_chitchat_lets_a_current_thread_runtime_run_its_other_tasks() {
    for (name, transport) in udp_transports() {
        if transport.mode == UdpMode::Portable {
            // No shared workers to start: nothing slow happens before its first node.
            continue;
        }
        // A configuration no other test uses, so that its workers are not running yet.
        let (ran_tx, ran_rx) = mpsc::channel();
        let transport = GatedStart {
            inner: UdpTransport {
                send_slots: 37,
                workers: Some(2),
                ..transport
            },
            ran: Mutex::new(Some(ran_rx)),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ticks = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let ticks_at_first_node = runtime.block_on(async {
            // The other task: counts every time the runtime lets it run, until the spawns end
            // (bounded by count too); its first run opens the gate.
            let ticker = {
                let (ticks, done) = (ticks.clone(), done.clone());
                tokio::spawn(async move {
                    for _ in 0..100_000_000u64 {
                        if done.load(Ordering::Acquire) {
                            break;
                        }
                        if ticks.fetch_add(1, Ordering::Relaxed) == 0 {
                            let _ = ran_tx.send(());
                        }
                        tokio::task::yield_now().await;
                    }
                })
            };
            let spawns = async {
                let mut handles = Vec::new();
                let mut ticks_at_first_node = None;
                for _ in 0..10 {
                    let port = free_port();
                    let node = spawn_chitchat(node_config(port, 100, &[]), Vec::new(), &transport)
                        .await
                        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    ticks_at_first_node.get_or_insert(ticks.load(Ordering::Relaxed));
                    handles.push(node);
                }
                for node in handles {
                    node.shutdown().await.unwrap();
                }
                ticks_at_first_node.unwrap()
            };
            let ticks_at_first_node = tokio::time::timeout(WAIT, spawns)
                .await
                .unwrap_or_else(|_| panic!("{name}: the spawns did not end within {WAIT:?}"));
            done.store(true, Ordering::Release);
            ticker.await.unwrap();
            ticks_at_first_node
        });
        assert!(
            ticks_at_first_node > 0,
            "{name}: the other task never ran while the first node started"
        );
    }
}
