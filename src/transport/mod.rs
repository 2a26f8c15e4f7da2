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
//!
//! Layout (imports only point down this list; nothing here imports `mod.rs`):
//! - `api`: the public traits and types above;
//! - `udp`, `channel`: the transports (they pick a backend and hand it to the runtime);
//! - `uring/`, `epoll`: the UDP worker loops; `udp_shared`: what both share;
//! - `runtime/`: worker threads, their queues and lifecycle, knowing no backend;
//! - `dispatch`: endpoint state, send slots, handler calls (panics isolated), reply faults;
//! - `closing`: the latch a close waits on, blocking or as the awaitable [`Closing`];
//! - `delay_queue`, `faults`, `log_limit`, `sys` (every libc call of the transport).

mod api;
mod channel;
mod closing;
mod delay_queue;
mod dispatch;
mod epoll;
mod ext;
mod faults;
mod keyed;
mod log_limit;
mod runtime;
pub mod seal;
mod sys;
mod udp;
mod udp_shared;
mod uring;

pub use api::{
    Closing, Datagram, DatagramHandler, Endpoint, EndpointStats, MAX_DATAGRAM_LEN, Preparation,
    ReplySink, Transport, TransportKind,
};
pub use channel::{ChannelTransport, Statistics};
pub use ext::TransportExt;
pub use faults::{Faults, Partition};
pub use keyed::KeyedTransport;
pub use udp::{TRANSPORT_ENV, UdpMode, UdpTransport};
