//! The transport's public interface: what a handler receives ([`Datagram`]), where it writes
//! replies ([`ReplySink`]), the traits an endpoint and a datagram transport implement, and
//! chitchat 0.13's message-level [`Transport`]/[`Socket`]. Kept apart from `mod.rs` so that every
//! module of the transport can import it without importing the module that re-exports them all.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::message::ChitchatEnvelope;

/// Largest payload of one UDP datagram over IPv4 (65 535 − 8 byte UDP header − 20 byte IP header).
pub const MAX_DATAGRAM_LEN: usize = 65_507;

/// One received datagram, borrowed from the receive buffers for the duration of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The sender.
    pub from: SocketAddr,
    /// The bytes, exactly as received (never truncated: oversized datagrams are dropped and counted).
    pub payload: &'a [u8],
}

/// Where a handler writes replies: pre-allocated send slots, sent in batches (no allocation per
/// datagram).
pub trait ReplySink {
    /// An empty buffer from the send-slot pool (its capacity grows to what replies need and is
    /// kept).
    fn buffer(&mut self) -> &mut Vec<u8>;
    /// Queues the bytes written in the current buffer for `to`; the next `buffer()` is a fresh
    /// slot. If `buffer()` is called again without `send`, the same slot is handed back, cleared.
    fn send(&mut self, to: SocketAddr);
}

/// The protocol side of one endpoint (implemented by the server).
pub trait DatagramHandler: Send + Sync + 'static {
    /// All datagrams one wake-up received for this endpoint, in arrival order. Called on a worker
    /// thread.
    ///
    /// Workers are shared by every endpoint of the process, so this must not block; with several
    /// workers it runs concurrently for the endpoint's different sockets.
    fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink);

    /// The handler panicked: the runtime caught it (catch_unwind), closed this endpoint (other
    /// endpoints on the same worker keep running) and reports the panic message here.
    /// Default: nothing.
    fn on_panic(&self, message: String) {
        let _ = message;
    }
}

/// Which backend serves an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportKind {
    /// io_uring: multishot `RecvMsgMulti` over a provided-buffer ring, batched `SendMsg`.
    Uring,
    /// epoll with `recvmmsg`/`sendmmsg`.
    Epoll {
        /// Why not io_uring: forced by configuration, or the setup error.
        reason: String,
    },
    /// In-memory datagrams ([`ChannelTransport`](crate::transport::ChannelTransport)).
    Channel,
    /// tokio's `UdpSocket` on a thread of the endpoint's own (`UdpMode::Portable`, and the only
    /// UDP backend off Linux).
    Portable,
    /// A [`Socket`] of a user's [`Transport`], driven by a tokio task on the application's
    /// runtime.
    Socket,
}

/// Counters of one endpoint, summed over its workers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    /// Datagrams handed to the handler.
    pub datagrams_received: u64,
    /// Payload bytes handed to the handler.
    pub bytes_received: u64,
    /// Datagrams the kernel (or the in-memory network) accepted.
    pub datagrams_sent: u64,
    /// Payload bytes of those datagrams.
    pub bytes_sent: u64,
    /// Sends that failed (the datagram is lost, the endpoint keeps running).
    pub send_errors: u64,
    /// Receive failures, and datagrams dropped on receipt (oversized, unknown address family).
    pub recv_errors: u64,
    /// Datagrams dropped by the configured [`Faults`](crate::transport::Faults).
    pub dropped_by_faults: u64,
    /// The multishot receive was re-armed, e.g. after the buffer ring ran dry (ENOBUFS).
    pub recv_rearms: u64,
    /// Keyed endpoints: received datagrams that did not open (bad tag, unknown key, replayed,
    /// too old, truncated, foreign); dropped before decoding.
    pub auth_failures: u64,
    /// Keyed endpoints: plaintext chitchat datagrams refused (`KeyedMode::Required`).
    pub plaintext_refused: u64,
    /// Keyed endpoints: plaintext chitchat datagrams accepted (`KeyedMode::AcceptPlaintext`).
    pub plaintext_accepted: u64,
    /// Keyed endpoints: datagrams that could not be sealed (over the sealed budget); not sent.
    pub seal_failures: u64,
}

/// An open, receiving endpoint.
pub trait Endpoint: Send + Sync {
    /// The bound address (with the port the kernel chose when asked for port 0).
    fn local_addr(&self) -> SocketAddr;
    /// The backend serving this endpoint (and, for epoll, why not io_uring).
    fn kind(&self) -> TransportKind;
    /// Sends one datagram from the endpoint's address, from any thread (gossip Syns; not the hot
    /// path). Transient errors are returned, never panic.
    fn send_to(&self, to: SocketAddr, payload: &[u8]) -> std::io::Result<()>;
    /// Stops receiving and returns once every worker has closed its socket: the port is free
    /// again. Idempotent; dropping the endpoint does it too.
    ///
    /// Called from a handler running on the same runtime it cannot wait for its own worker: it
    /// then returns at once and the sockets close right after the current batch.
    fn close(&self);
    /// The endpoint's counters, summed over its workers.
    fn stats(&self) -> EndpointStats;
}

/// Opens endpoints: the byte-level fast path of this crate's own transports (io_uring, epoll,
/// portable, channel), reached through [`Transport::datagram_transport`].
pub trait DatagramTransport: Send + Sync {
    /// Binds `listen_addr` (one SO_REUSEPORT socket per worker) and starts delivering its
    /// datagrams to `handler`. A bind failure is an error that names the address.
    fn open_endpoint(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>>;

    /// The cluster id this transport's datagrams are bound to, if it binds them to one (keyed
    /// transports): `spawn_chitchat` refuses a node of another cluster on it.
    fn cluster_label(&self) -> Option<&str> {
        None
    }

    /// Largest datagram payload the protocol may hand this transport's endpoints: less than
    /// [`MAX_DATAGRAM_LEN`] where the transport adds bytes of its own (sealing, in keyed
    /// clusters).
    fn max_payload(&self) -> usize {
        MAX_DATAGRAM_LEN
    }
}

/// What [`Socket::send`] did (chitchat 0.13's shape).
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
pub struct SendOutcome {
    /// Bytes handed to the transport for this message.
    pub num_bytes_sent: usize,
}

/// One message [`Socket::recv`] returned (chitchat 0.13's shape).
#[derive(Debug, Eq, PartialEq)]
pub struct RecvOutcome {
    /// The sender.
    pub from_addr: SocketAddr,
    /// The decoded message and the protocol version it came in.
    pub envelope: ChitchatEnvelope,
    /// Bytes the transport received for this message.
    pub num_bytes_received: usize,
}

/// chitchat 0.13's transport: opens message-level [`Socket`]s. Any implementation works with
/// [`spawn_chitchat`](crate::spawn_chitchat), which then drives the socket with a tokio task on
/// the caller's runtime. This crate's transports also return their byte-level fast path from
/// [`datagram_transport`](Self::datagram_transport), which `spawn_chitchat` prefers.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Binds `listen_addr` and returns the socket (an error if the address is taken).
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>>;

    /// The byte-level fast path, if this transport has one. Only this crate's transports (and
    /// wrappers around them) return `Some`; the default is `None`.
    fn datagram_transport(&self) -> Option<&dyn DatagramTransport> {
        None
    }
}

/// chitchat 0.13's socket: sends and receives whole messages.
#[async_trait]
pub trait Socket: Send + Sync + 'static {
    /// The bound address.
    fn local_addr(&self) -> anyhow::Result<SocketAddr>;

    /// Sends `envelope` to `to`. An error means the socket is broken (a lost datagram is not an
    /// error).
    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome>;

    /// The next valid message (undecodable datagrams are skipped). Must be cancellable: the
    /// driver drops a pending `recv` to send. An error means the socket is broken.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome>;
}
