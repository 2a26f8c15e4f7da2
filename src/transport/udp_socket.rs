//! chitchat 0.13's `UdpSocket`: a message-level [`Socket`] on tokio's UDP socket, for users who
//! build their own [`Transport`](crate::transport::Transport) around it (for example to count
//! gossip bytes). A node on such a transport runs through the socket driver, not the fast path.

use std::io;
use std::net::SocketAddr;

use anyhow::Context;
use async_trait::async_trait;

use crate::message::ChitchatEnvelope;
use crate::transport::api::{MAX_DATAGRAM_LEN, RecvOutcome, SendOutcome, Socket};
use crate::wire::{Decoder, Encoder};

/// A UDP socket that sends and receives whole chitchat messages (tokio-based, usable on every
/// system).
pub struct UdpSocket {
    socket: tokio::net::UdpSocket,
    send_buf: Vec<u8>,
    recv_buf: Box<[u8]>,
    encoder: Encoder,
    decoder: Decoder,
}

impl std::fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSocket")
            .field("local_addr", &self.socket.local_addr().ok())
            .finish()
    }
}

impl UdpSocket {
    /// Binds `bind_addr` (an error naming it if it is taken). Call it inside a tokio runtime.
    pub async fn open(bind_addr: SocketAddr) -> anyhow::Result<UdpSocket> {
        let socket = tokio::net::UdpSocket::bind(bind_addr)
            .await
            .with_context(|| format!("failed to bind to {bind_addr}/UDP for gossip"))?;
        Ok(UdpSocket {
            socket,
            send_buf: Vec::with_capacity(2_048),
            // One byte more than a datagram can carry: an oversized one is seen, not truncated.
            recv_buf: vec![0u8; MAX_DATAGRAM_LEN + 1].into_boxed_slice(),
            encoder: Encoder::new(),
            decoder: Decoder::new(),
        })
    }

    /// One datagram: `Ok(None)` if it was skipped (undecodable, oversized, a transient error).
    async fn recv_one(&mut self) -> anyhow::Result<Option<RecvOutcome>> {
        let (len, from_addr) = match self.socket.recv_from(&mut self.recv_buf).await {
            Ok(received) => received,
            Err(error) if is_transient(&error) => {
                tracing::debug!(%error, "transient UDP receive error");
                return Ok(None);
            }
            Err(error) => return Err(error).context("fatal UDP receive error"),
        };
        if len > MAX_DATAGRAM_LEN {
            tracing::debug!(from = %from_addr, len, "skipping oversized datagram");
            return Ok(None);
        }
        match self.decoder.decode_envelope(&self.recv_buf[..len]) {
            Ok(envelope) => Ok(Some(RecvOutcome {
                from_addr,
                envelope,
                num_bytes_received: len,
            })),
            Err(error) => {
                tracing::debug!(from = %from_addr, len, %error, "skipping undecodable datagram");
                Ok(None)
            }
        }
    }
}

/// Receive errors that say nothing about the socket (ICMP feedback of an earlier send).
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::OutOfMemory
            | io::ErrorKind::Interrupted
    )
}

#[async_trait]
impl Socket for UdpSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket
            .local_addr()
            .context("failed to get the UDP socket's address")
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.send_buf.clear();
        self.encoder
            .encode_envelope(&envelope, &mut self.send_buf)
            .context("failed to encode the chitchat message")?;
        let num_bytes_sent = self
            .socket
            .send_to(&self.send_buf, to)
            .await
            .with_context(|| format!("failed to send a chitchat message to {to}"))?;
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancellable: a datagram is either returned or still in the kernel's queue.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if let Some(outcome) = self.recv_one().await? {
                return Ok(outcome);
            }
        }
    }
}
