//! Bridges between the two transport layers: the byte-level endpoints of this crate
//! ([`DatagramTransport`]) and chitchat 0.13's message-level [`Socket`]s.
//!
//! - [`open_socket`]: a [`Socket`] over one of our endpoints, which is what `Transport::open` of
//!   our transports returns (chitchat's tests and users call it directly);
//! - [`drive_socket`]: an [`Endpoint`] over a user's [`Socket`], served by a tokio task on the
//!   application's runtime; `spawn_chitchat` uses it for transports without a fast path.
//!
//! Messages cross the boundary encoded: the protocol core reads and writes bytes, a `Socket`
//! takes and gives envelopes, so the socket path pays one extra encode or decode per message.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::message::ChitchatEnvelope;
use crate::transport::api::{
    Datagram, DatagramHandler, DatagramTransport, Endpoint, EndpointStats, RecvOutcome, ReplySink,
    SendOutcome, Socket, Transport, TransportKind,
};
use crate::transport::dispatch::{AtomicStats, bump, panic_message};
use crate::wire::{DecodeError, Decoder, EncodeError, Encoder};

/// Messages a socket over an endpoint may hold before new ones are dropped (chitchat's channel
/// transport bounds its queues at 100; a real UDP socket's receive buffer holds more).
const SOCKET_BACKLOG: usize = 1024;

/// Syns the gossip loop may queue for a user socket's task before `send_to` reports
/// `WouldBlock`.
const OUTBOX_CAPACITY: usize = 1024;

/// Longest `close()` waits for a user socket's task to drop the socket.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

thread_local! {
    /// Codec state (zstd contexts, scratch) per thread that crosses the boundary.
    static CODEC: RefCell<(Encoder, Decoder)> = RefCell::new((Encoder::new(), Decoder::new()));
}

/// Decodes one datagram with this thread's decoder.
fn decode(bytes: &[u8]) -> Result<ChitchatEnvelope, DecodeError> {
    CODEC.with(|codec| codec.borrow_mut().1.decode_envelope(bytes))
}

/// Encodes `envelope` into `out` (cleared first) with this thread's encoder.
fn encode(envelope: &ChitchatEnvelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.clear();
    CODEC.with(|codec| codec.borrow_mut().0.encode_envelope(envelope, out))
}

// ---------------------------------------------------------------------------------------------
// A Socket over one of our endpoints
// ---------------------------------------------------------------------------------------------

/// Opens an endpoint of `transport` on `listen_addr` and wraps it as a chitchat [`Socket`]:
/// received datagrams are decoded on the worker and queued for [`Socket::recv`] (undecodable
/// ones skipped, a full queue drops, as a socket buffer would); [`Socket::send`] encodes and
/// sends from the endpoint's address. Dropping the socket closes the endpoint.
pub(crate) fn open_socket(
    transport: &dyn DatagramTransport,
    listen_addr: SocketAddr,
) -> anyhow::Result<Box<dyn Socket>> {
    let (tx, rx) = mpsc::channel(SOCKET_BACKLOG);
    let endpoint = transport.open_endpoint(listen_addr, Arc::new(Forward { tx }))?;
    Ok(Box::new(EndpointSocket {
        endpoint,
        rx,
        send_buf: Vec::new(),
    }))
}

/// The handler of a socket's endpoint: decodes and queues.
struct Forward {
    tx: mpsc::Sender<RecvOutcome>,
}

impl DatagramHandler for Forward {
    fn handle_batch(&self, batch: &[Datagram<'_>], _replies: &mut dyn ReplySink) {
        for datagram in batch {
            match decode(datagram.payload) {
                Ok(envelope) => {
                    // Full (nobody reads) or closed (socket dropped): the datagram is lost.
                    let _ = self.tx.try_send(RecvOutcome {
                        from_addr: datagram.from,
                        envelope,
                        num_bytes_received: datagram.payload.len(),
                    });
                }
                Err(error) => {
                    tracing::debug!(from = %datagram.from, %error, "socket: skipping undecodable datagram")
                }
            }
        }
    }
}

/// A chitchat socket over one of our endpoints.
struct EndpointSocket {
    endpoint: Box<dyn Endpoint>,
    rx: mpsc::Receiver<RecvOutcome>,
    send_buf: Vec<u8>,
}

#[async_trait]
impl Socket for EndpointSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr())
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        encode(&envelope, &mut self.send_buf).context("failed to encode the chitchat message")?;
        self.endpoint
            .send_to(to, &self.send_buf)
            .with_context(|| format!("failed to send a chitchat message to {to}"))?;
        Ok(SendOutcome {
            num_bytes_sent: self.send_buf.len(),
        })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.rx
            .recv()
            .await
            .context("the socket's endpoint is closed")
    }
}

impl Drop for EndpointSocket {
    fn drop(&mut self) {
        // Frees the address at once, as dropping a UDP socket does.
        self.endpoint.close();
    }
}

// ---------------------------------------------------------------------------------------------
// An endpoint over a user's Socket
// ---------------------------------------------------------------------------------------------

/// A message queued for a driven socket's task.
type Outgoing = (SocketAddr, ChitchatEnvelope);

/// Opens `transport`'s socket on `listen_addr` and serves it to `handler` from a tokio task on
/// the current runtime: each received message is encoded and handed to the handler as a batch
/// of one (the same entry point the fast path calls), its replies decoded and sent through the
/// socket; [`Endpoint::send_to`] (the gossip Syns) queues for the same task, which owns the
/// socket. A socket error or a handler panic ends the task and is reported to
/// [`DatagramHandler::on_panic`], which stops the node.
pub(crate) async fn drive_socket(
    transport: &dyn Transport,
    listen_addr: SocketAddr,
    handler: Arc<dyn DatagramHandler>,
) -> anyhow::Result<Box<dyn Endpoint>> {
    let runtime = tokio::runtime::Handle::try_current().context(
        "a transport without a datagram fast path is driven by a tokio task: \
         call spawn_chitchat inside a tokio runtime",
    )?;
    let socket = transport.open(listen_addr).await?;
    let local_addr = socket.local_addr()?;
    let stats = Arc::new(AtomicStats::default());
    let (out_tx, out_rx) = mpsc::channel(OUTBOX_CAPACITY);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let driver = Driver {
        socket,
        handler,
        out_rx,
        stats: stats.clone(),
        _done: done_tx,
    };
    runtime.spawn(driver.run());
    Ok(Box::new(SocketEndpoint {
        local_addr,
        out_tx: Mutex::new(Some(out_tx)),
        stats,
        closed: AtomicBool::new(false),
        done: Mutex::new(Some(done_rx)),
        runtime_id: runtime.id(),
    }))
}

/// The task that owns a user's socket.
struct Driver {
    socket: Box<dyn Socket>,
    handler: Arc<dyn DatagramHandler>,
    out_rx: mpsc::Receiver<Outgoing>,
    stats: Arc<AtomicStats>,
    /// Dropped with the task (ended, or dropped with its runtime): tells `close()` the socket is
    /// gone.
    _done: std::sync::mpsc::Sender<()>,
}

/// What one wake-up of the driver brought.
enum Event {
    Outgoing(Option<Outgoing>),
    Received(anyhow::Result<RecvOutcome>),
}

impl Driver {
    async fn run(mut self) {
        let mut received = Vec::new();
        let mut sink = VecSink::default();
        loop {
            let event = tokio::select! {
                biased;
                outgoing = self.out_rx.recv() => Event::Outgoing(outgoing),
                incoming = self.socket.recv() => Event::Received(incoming),
            };
            match event {
                // The endpoint was closed (or dropped): drop the socket.
                Event::Outgoing(None) => break,
                Event::Outgoing(Some((to, envelope))) => self.send(to, envelope).await,
                Event::Received(Ok(outcome)) => {
                    bump(&self.stats.datagrams_received, 1);
                    bump(
                        &self.stats.bytes_received,
                        outcome.num_bytes_received as u64,
                    );
                    if let Err(error) = encode(&outcome.envelope, &mut received) {
                        bump(&self.stats.recv_errors, 1);
                        tracing::warn!(from = %outcome.from_addr, %error,
                                       "received message cannot be encoded: dropped");
                        continue;
                    }
                    let batch = [Datagram {
                        from: outcome.from_addr,
                        payload: &received,
                    }];
                    sink.clear();
                    let handler = &self.handler;
                    if let Err(panic) =
                        catch_unwind(AssertUnwindSafe(|| handler.handle_batch(&batch, &mut sink)))
                    {
                        self.fail(panic_message(panic.as_ref()));
                        break;
                    }
                    for (to, reply) in sink.sent.drain(..) {
                        match decode(&reply) {
                            Ok(envelope) => self.send(to, envelope).await,
                            Err(error) => {
                                bump(&self.stats.send_errors, 1);
                                tracing::error!(%to, %error, "reply does not decode: not sent");
                            }
                        }
                        sink.spare.push(reply);
                    }
                }
                Event::Received(Err(error)) => {
                    bump(&self.stats.recv_errors, 1);
                    self.fail(format!("the transport's socket failed: {error:#}"));
                    break;
                }
            }
        }
    }

    /// Sends one message; an error is counted and logged, the node keeps running (a lost
    /// datagram, as far as the protocol is concerned).
    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) {
        match self.socket.send(to, envelope).await {
            Ok(outcome) => {
                bump(&self.stats.datagrams_sent, 1);
                bump(&self.stats.bytes_sent, outcome.num_bytes_sent as u64);
            }
            Err(error) => {
                bump(&self.stats.send_errors, 1);
                tracing::warn!(%to, error = %format!("{error:#}"), "gossip socket send failed");
            }
        }
    }

    /// Reports the end of the driver to the handler (its own panic caught too).
    fn fail(&self, message: String) {
        tracing::error!("gossip socket driver stopped: {message}");
        let handler = &self.handler;
        if catch_unwind(AssertUnwindSafe(|| handler.on_panic(message))).is_err() {
            tracing::error!("on_panic panicked too");
        }
    }
}

/// Collects a handler's replies; buffers are reused across messages.
#[derive(Default)]
struct VecSink {
    current: Vec<u8>,
    sent: Vec<(SocketAddr, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
}

impl VecSink {
    fn clear(&mut self) {
        self.current.clear();
        self.sent.clear();
    }
}

impl ReplySink for VecSink {
    fn buffer(&mut self) -> &mut Vec<u8> {
        self.current.clear();
        &mut self.current
    }

    fn send(&mut self, to: SocketAddr) {
        let next = self.spare.pop().unwrap_or_default();
        let reply = std::mem::replace(&mut self.current, next);
        self.sent.push((to, reply));
        self.current.clear();
    }
}

/// The endpoint over a driven user socket.
struct SocketEndpoint {
    local_addr: SocketAddr,
    /// `None` once closed: dropping the sender ends the driver.
    out_tx: Mutex<Option<mpsc::Sender<Outgoing>>>,
    stats: Arc<AtomicStats>,
    closed: AtomicBool,
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// The runtime the driver runs on: `close()` called from it must not wait for it.
    runtime_id: tokio::runtime::Id,
}

impl Endpoint for SocketEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Socket
    }

    fn send_to(&self, to: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
        let envelope = decode(payload)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        let guard = self.out_tx.lock();
        let tx = guard.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotConnected, "endpoint closed")
        })?;
        tx.try_send((to, envelope)).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "the gossip socket's outbox is full",
            ),
            mpsc::error::TrySendError::Closed(_) => std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the gossip socket's driver has stopped",
            ),
        })
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.out_tx.lock().take();
        // Waiting on the driver's own runtime could block the very thread that must run it.
        let on_driver_runtime = tokio::runtime::Handle::try_current()
            .is_ok_and(|handle| handle.id() == self.runtime_id);
        if on_driver_runtime {
            return;
        }
        if let Some(done) = self.done.lock().take()
            && let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(CLOSE_WAIT)
        {
            tracing::warn!(addr = %self.local_addr,
                           "the gossip socket's driver did not stop within {CLOSE_WAIT:?}");
        }
    }

    fn stats(&self) -> EndpointStats {
        self.stats.snapshot()
    }
}

impl Drop for SocketEndpoint {
    fn drop(&mut self) {
        self.close();
    }
}
