//! Datagram I/O: moves bytes between UDP sockets (io_uring or epoll) or an in-memory network and
//! a [`DatagramHandler`], knowing nothing about the protocol.
//!
//! Every endpoint is served by a shared thread-per-core runtime: each worker thread owns one
//! socket of the endpoint (all bound to the same address with `SO_REUSEPORT`), receives a batch
//! of datagrams per wake-up, hands the batch to the handler and sends the replies the handler
//! queued in pre-allocated send slots, in one batch.
//!
//! ```
//! use std::sync::Arc;
//! use chitchat_uring::transport::{Datagram, DatagramHandler, ReplySink, Transport, UdpTransport};
//!
//! struct Echo;
//! impl DatagramHandler for Echo {
//!     fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink) {
//!         for d in batch {
//!             replies.buffer().extend_from_slice(d.payload);
//!             replies.send(d.from);
//!         }
//!     }
//! }
//!
//! let endpoint = UdpTransport.open("127.0.0.1:0".parse()?, Arc::new(Echo))?;
//! let peer = std::net::UdpSocket::bind("127.0.0.1:0")?;
//! peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
//! peer.send_to(b"ping", endpoint.local_addr())?;
//! let mut buf = [0u8; 16];
//! let (n, from) = peer.recv_from(&mut buf)?;
//! assert_eq!((&buf[..n], from), (&b"ping"[..], endpoint.local_addr()));
//! endpoint.close(); // the port is free again
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) mod channel;
pub(crate) mod epoll;
pub(crate) mod faults;
pub mod seal;
pub(crate) mod udp;
pub(crate) mod uring;

pub use channel::{ChannelTransport, Statistics};
pub use faults::{Faults, Partition};
pub use udp::{TRANSPORT_ENV, UdpMode, UdpTransport};

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
    /// In-memory datagrams ([`ChannelTransport`]).
    Channel,
}

/// Counters of one endpoint, summed over its workers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    pub datagrams_received: u64,
    pub bytes_received: u64,
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    pub dropped_by_faults: u64,
    /// The multishot receive was re-armed, e.g. after the buffer ring ran dry (ENOBUFS).
    pub recv_rearms: u64,
}

/// An open, receiving endpoint.
pub trait Endpoint: Send + Sync {
    fn local_addr(&self) -> SocketAddr;
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
    fn stats(&self) -> EndpointStats;
}

/// Opens endpoints.
pub trait Transport: Send + Sync {
    /// Binds `listen_addr` (one SO_REUSEPORT socket per worker) and starts delivering its
    /// datagrams to `handler`. A bind failure is an error that names the address.
    fn open(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>>;
}
