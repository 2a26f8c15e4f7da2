//! Datagram I/O: moves bytes between UDP sockets (io_uring, epoll or tokio) or an in-memory
//! network and a [`DatagramHandler`], knowing nothing about the protocol.
//!
//! Two layers of traits: [`Transport`]/[`Socket`] are chitchat 0.13's message-level API (a user
//! can write their own and hand it to `spawn_chitchat`, which drives the socket with a tokio
//! task); [`DatagramTransport`]/[`Endpoint`] are this crate's byte-level fast path, which our
//! transports expose through [`Transport::datagram_transport`].
//!
//! Every endpoint is served by a shared thread-per-core runtime: each worker thread owns one
//! socket of the endpoint (all bound to the same address with `SO_REUSEPORT`), receives a batch
//! of datagrams per wake-up, hands the batch to the handler and sends the replies the handler
//! queued in pre-allocated send slots, in one batch.
//!
//! ```
//! use std::sync::Arc;
//! use chitchat_uring::transport::{
//!     Datagram, DatagramHandler, DatagramTransport, ReplySink, UdpTransport,
//! };
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
//! let endpoint = UdpTransport.open_endpoint("127.0.0.1:0".parse()?, Arc::new(Echo))?;
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
//! - `udp`, `channel`, `keyed`, `ext`: the transports (they pick a backend and hand it to the
//!   runtime) and their wrappers;
//! - `bridge`: a chitchat `Socket` over our endpoints, and an endpoint driving a user's `Socket`;
//!   `udp_socket`: chitchat's tokio `UdpSocket`;
//! - `portable`: the tokio UDP backend (every system);
//! - `uring/`, `epoll`: the UDP worker loops (Linux); `udp_shared`: what both share;
//! - `runtime/`: worker threads, their queues and lifecycle, knowing no backend;
//! - `dispatch`: endpoint state, send slots, handler calls (panics isolated), reply faults;
//! - `delay_queue`, `faults`, `log_limit`, `sys` (every libc call of the transport).

// Off Linux the io_uring/epoll paths are compiled out, leaving parts of the shared worker
// machinery (send headers, reply faults, raw socket helpers) without a user there.
#![cfg_attr(not(target_os = "linux"), allow(dead_code, unused_imports))]

mod api;
mod bridge;
mod channel;
mod delay_queue;
mod dispatch;
#[cfg(target_os = "linux")]
mod epoll;
mod ext;
mod faults;
mod keyed;
mod log_limit;
mod portable;
mod runtime;
pub mod seal;
mod sys;
mod udp;
#[cfg(target_os = "linux")]
mod udp_shared;
mod udp_socket;
#[cfg(target_os = "linux")]
mod uring;

pub use api::{
    Datagram, DatagramHandler, DatagramTransport, Endpoint, EndpointStats, MAX_DATAGRAM_LEN,
    RecvOutcome, ReplySink, SendOutcome, Socket, Transport, TransportKind,
};
pub use channel::{ChannelTransport, Statistics};
pub use ext::TransportExt;
pub use faults::{Faults, Partition};
pub use keyed::KeyedTransport;
pub use udp::{TRANSPORT_ENV, UdpMode, UdpTransport};
pub use udp_socket::UdpSocket;

pub(crate) use bridge::drive_socket;
