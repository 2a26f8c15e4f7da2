//! chitchat 0.13's `TransportExt`: wrappers any transport gets, for tests of lossy networks.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;

use super::api::{
    Datagram, DatagramHandler, DatagramTransport, Endpoint, RecvOutcome, ReplySink, SendOutcome,
    Socket, Transport,
};
use crate::message::ChitchatEnvelope;

/// Adapters available on every [`Transport`] (chitchat 0.13's `TransportExt`).
pub trait TransportExt {
    /// This transport, losing each received datagram with probability `drop_probability`
    /// (independently; clamped to `0.0..=1.0`, NaN counts as 0). The loss happens before the
    /// protocol sees the datagram, so to the protocol it is a datagram lost on the wire. Our
    /// transports keep their fast path under the wrapper; a user's transport gets its sockets
    /// wrapped.
    fn drop_message(self, drop_probability: f64) -> Box<dyn Transport>;
}

impl<T: Transport> TransportExt for T {
    fn drop_message(self, drop_probability: f64) -> Box<dyn Transport> {
        let drop_probability = if drop_probability.is_nan() {
            0.0
        } else {
            drop_probability.clamp(0.0, 1.0)
        };
        Box::new(DropTransport {
            inner: Box::new(self),
            drop_probability,
        })
    }
}

struct DropTransport {
    inner: Box<dyn Transport>,
    drop_probability: f64,
}

#[async_trait]
impl Transport for DropTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self.inner.open(listen_addr).await?;
        Ok(Box::new(DropSocket {
            inner,
            drop_probability: self.drop_probability,
        }))
    }

    fn datagram_transport(&self) -> Option<&dyn DatagramTransport> {
        self.inner.datagram_transport().map(|_| self as _)
    }
}

/// Only reached through `datagram_transport`, which is `Some` when the inner transport has a
/// fast path.
impl DatagramTransport for DropTransport {
    fn open_endpoint(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        let inner = self
            .inner
            .datagram_transport()
            .ok_or_else(|| anyhow::anyhow!("the wrapped transport has no datagram fast path"))?;
        let handler = Arc::new(DropHandler {
            inner: handler,
            drop_probability: self.drop_probability,
        });
        inner.open_endpoint(listen_addr, handler)
    }

    fn cluster_label(&self) -> Option<&str> {
        self.inner
            .datagram_transport()
            .and_then(|inner| inner.cluster_label())
    }

    fn max_payload(&self) -> usize {
        self.inner
            .datagram_transport()
            .map_or(crate::transport::MAX_DATAGRAM_LEN, |inner| {
                inner.max_payload()
            })
    }
}

struct DropHandler {
    inner: Arc<dyn DatagramHandler>,
    drop_probability: f64,
}

impl DatagramHandler for DropHandler {
    fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink) {
        // A test adapter: one small allocation per batch is fine here.
        let kept: Vec<Datagram<'_>> = batch
            .iter()
            .filter(|_| rand::random::<f64>() >= self.drop_probability)
            .copied()
            .collect();
        if !kept.is_empty() {
            self.inner.handle_batch(&kept, replies);
        }
    }

    fn on_panic(&self, message: String) {
        self.inner.on_panic(message);
    }
}

/// A user socket losing received messages.
struct DropSocket {
    inner: Box<dyn Socket>,
    drop_probability: f64,
}

#[async_trait]
impl Socket for DropSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.inner.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let outcome = self.inner.recv().await?;
            if rand::random::<f64>() >= self.drop_probability {
                return Ok(outcome);
            }
        }
    }
}
