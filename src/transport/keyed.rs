//! Keyed clusters at the transport boundary: [`KeyedTransport`] wraps any transport (io_uring,
//! epoll, channel) so that every datagram it receives is opened — or dropped and counted —
//! before anything decodes it, and every datagram it sends is sealed
//! ([`seal`](crate::transport::seal) has the format and the keyring).
//!
//! The wrapper sits between the backend and the node's handler, so the backends stay unaware of
//! keys: a received batch is opened into a per-thread scratch buffer (one copy; the AEAD costs
//! far more than the copy), the plaintext batch goes to the handler, and each reply the handler
//! writes is sealed into the backend's pre-allocated send slot.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::transport::api::{
    Datagram, DatagramHandler, DatagramTransport, Endpoint, EndpointStats, MAX_DATAGRAM_LEN,
    ReplySink, Socket, Transport, TransportKind,
};
use crate::transport::bridge;
use crate::transport::seal::{
    KeyedMode, KeyringHandle, Received, Reject, SealContext, plaintext_budget, reserve_header,
};

/// A transport whose endpoints only speak sealed datagrams of one cluster (see the module docs).
///
/// ```
/// use chitchat_uring::transport::seal::{Key, KeyedMode, Keyring, KeyringHandle};
/// use chitchat_uring::transport::{KeyedTransport, UdpTransport};
///
/// let keyring = KeyringHandle::new(Keyring::new(Key::generate()?));
/// let transport = KeyedTransport::new(UdpTransport::DEFAULT, keyring, "my-cluster", KeyedMode::Required);
/// // spawn_chitchat(config, kvs, &transport): config.cluster_id must be "my-cluster".
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct KeyedTransport<T> {
    inner: T,
    keyring: Arc<KeyringHandle>,
    cluster_id: String,
    mode: KeyedMode,
}

impl<T: DatagramTransport> KeyedTransport<T> {
    /// `inner` with every datagram sealed under `keyring`'s primary key and bound to
    /// `cluster_id` (which must be the node's `ChitchatConfig::cluster_id`; `spawn_chitchat`
    /// refuses a mismatch). The keyring can be changed while nodes run (rotation).
    pub fn new(
        inner: T,
        keyring: Arc<KeyringHandle>,
        cluster_id: impl Into<String>,
        mode: KeyedMode,
    ) -> KeyedTransport<T> {
        KeyedTransport {
            inner,
            keyring,
            cluster_id: cluster_id.into(),
            mode,
        }
    }

    /// The shared keyring: install, switch primary, remove or replace it on running nodes.
    pub fn keyring(&self) -> &Arc<KeyringHandle> {
        &self.keyring
    }
}

/// chitchat 0.13's transport: `open` returns a message-level socket that seals and opens like
/// the node's endpoints; `spawn_chitchat` takes the fast path.
#[async_trait]
impl<T: DatagramTransport + 'static> Transport for KeyedTransport<T> {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        bridge::open_socket(self, listen_addr)
    }

    fn datagram_transport(&self) -> Option<&dyn DatagramTransport> {
        Some(self)
    }
}

impl<T: DatagramTransport> DatagramTransport for KeyedTransport<T> {
    fn open_endpoint(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        let ctx = Arc::new(SealContext::new(
            self.keyring.clone(),
            &self.cluster_id,
            self.mode,
        ));
        let counters = Arc::new(KeyedCounters::default());
        let sealed = Arc::new(OpeningHandler {
            inner: handler,
            ctx: ctx.clone(),
            counters: counters.clone(),
        });
        let endpoint = self.inner.open_endpoint(listen_addr, sealed)?;
        Ok(Box::new(SealingEndpoint {
            inner: endpoint,
            ctx,
            counters,
        }))
    }

    fn cluster_label(&self) -> Option<&str> {
        Some(&self.cluster_id)
    }

    fn max_payload(&self) -> usize {
        plaintext_budget(self.inner.max_payload().min(MAX_DATAGRAM_LEN))
    }
}

/// What the keyed wrapper refused or accepted, per endpoint.
#[derive(Debug, Default)]
struct KeyedCounters {
    /// Datagrams that did not open: bad tag, unknown key, replayed, too old, truncated, foreign.
    auth_failures: AtomicU64,
    /// Plaintext chitchat datagrams refused in [`KeyedMode::Required`].
    plaintext_refused: AtomicU64,
    /// Plaintext chitchat datagrams accepted in [`KeyedMode::AcceptPlaintext`].
    plaintext_accepted: AtomicU64,
    /// Replies or Syns that could not be sealed (larger than the sealed budget): a budget bug.
    seal_failures: AtomicU64,
}

/// Opens each received datagram before the node's handler sees it.
struct OpeningHandler {
    inner: Arc<dyn DatagramHandler>,
    ctx: Arc<SealContext>,
    counters: Arc<KeyedCounters>,
}

/// Per-thread scratch of the opening handler: the batch's datagrams copied and opened in place,
/// and the plaintext buffer replies are written into before sealing. Reused across batches, so
/// nothing is allocated per datagram once it has grown.
#[derive(Default)]
struct Scratch {
    opened: Vec<u8>,
    ranges: Vec<(SocketAddr, Range<usize>)>,
    reply: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl DatagramHandler for OpeningHandler {
    fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink) {
        SCRATCH.with(|scratch| {
            // A handler never re-enters itself on the same thread; if it somehow did, fall back
            // to a fresh scratch rather than panic.
            let mut fresh = Scratch::default();
            let mut guard = scratch.try_borrow_mut();
            let scratch = match guard.as_mut() {
                Ok(scratch) => &mut **scratch,
                Err(_) => &mut fresh,
            };
            self.handle_with(scratch, batch, replies);
        });
    }

    fn on_panic(&self, message: String) {
        self.inner.on_panic(message);
    }
}

impl OpeningHandler {
    fn handle_with(
        &self,
        scratch: &mut Scratch,
        batch: &[Datagram<'_>],
        replies: &mut dyn ReplySink,
    ) {
        scratch.opened.clear();
        scratch.ranges.clear();
        for datagram in batch {
            let start = scratch.opened.len();
            scratch.opened.extend_from_slice(datagram.payload);
            let end = scratch.opened.len();
            match self.ctx.classify(&mut scratch.opened[start..end]) {
                Received::Sealed(plain) => scratch
                    .ranges
                    .push((datagram.from, start + plain.start..start + plain.end)),
                Received::Plaintext => {
                    self.counters
                        .plaintext_accepted
                        .fetch_add(1, Ordering::Relaxed);
                    scratch.ranges.push((datagram.from, start..end));
                }
                Received::Rejected(reject) => {
                    let counter = match reject {
                        Reject::PlaintextRefused => &self.counters.plaintext_refused,
                        Reject::Open(_) | Reject::Foreign => &self.counters.auth_failures,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    scratch.opened.truncate(start);
                }
            }
        }
        if scratch.ranges.is_empty() {
            return;
        }
        let plain: Vec<Datagram<'_>> = scratch
            .ranges
            .iter()
            .map(|(from, range)| Datagram {
                from: *from,
                payload: &scratch.opened[range.clone()],
            })
            .collect();
        let mut sink = SealingSink {
            inner: replies,
            ctx: &self.ctx,
            counters: &self.counters,
            plain: &mut scratch.reply,
        };
        self.inner.handle_batch(&plain, &mut sink);
    }
}

/// Hands the node's handler a plaintext buffer and seals what it sends into the backend's slot.
struct SealingSink<'a> {
    inner: &'a mut dyn ReplySink,
    ctx: &'a SealContext,
    counters: &'a KeyedCounters,
    plain: &'a mut Vec<u8>,
}

impl ReplySink for SealingSink<'_> {
    fn buffer(&mut self) -> &mut Vec<u8> {
        self.plain.clear();
        self.plain
    }

    fn send(&mut self, to: SocketAddr) {
        let slot = self.inner.buffer();
        reserve_header(slot);
        slot.extend_from_slice(self.plain);
        match self.ctx.seal_reserved(slot) {
            Ok(()) => self.inner.send(to),
            Err(error) => {
                // Not sent: the backend hands the same slot back, cleared, next time.
                self.counters.seal_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%to, %error, "reply not sealed: dropped");
            }
        }
        self.plain.clear();
    }
}

/// The inner endpoint with sealed sends, the sealed budget and the keyed counters.
struct SealingEndpoint {
    inner: Box<dyn Endpoint>,
    ctx: Arc<SealContext>,
    counters: Arc<KeyedCounters>,
}

impl Endpoint for SealingEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    fn kind(&self) -> TransportKind {
        self.inner.kind()
    }

    fn send_to(&self, to: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
        // Gossip Syns only (a few per interval), so one buffer per send is fine here.
        let mut sealed = Vec::with_capacity(payload.len() + crate::transport::seal::SEAL_OVERHEAD);
        reserve_header(&mut sealed);
        sealed.extend_from_slice(payload);
        if let Err(error) = self.ctx.seal_reserved(&mut sealed) {
            self.counters.seal_failures.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, error));
        }
        self.inner.send_to(to, &sealed)
    }

    fn close(&self) {
        self.inner.close();
    }

    fn stats(&self) -> EndpointStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EndpointStats {
            auth_failures: g(&self.counters.auth_failures),
            plaintext_refused: g(&self.counters.plaintext_refused),
            plaintext_accepted: g(&self.counters.plaintext_accepted),
            seal_failures: g(&self.counters.seal_failures),
            ..self.inner.stats()
        }
    }
}
