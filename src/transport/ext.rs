//! chitchat 0.13's `TransportExt`: wrappers any transport gets, for tests of lossy networks.

use std::net::SocketAddr;
use std::sync::Arc;

use super::api::{Datagram, DatagramHandler, Endpoint, Preparation, ReplySink, Transport};

/// Adapters available on every [`Transport`] (chitchat 0.13's `TransportExt`).
pub trait TransportExt {
    /// This transport, losing each received datagram with probability `drop_probability`
    /// (independently; clamped to `0.0..=1.0`, NaN counts as 0). The loss happens before the
    /// protocol sees the datagram, so to the protocol it is a datagram lost on the wire.
    fn drop_message(self, drop_probability: f64) -> Box<dyn Transport>;
}

impl<T: Transport + 'static> TransportExt for T {
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

impl Transport for DropTransport {
    fn open(
        &self,
        listen_addr: SocketAddr,
        handler: Arc<dyn DatagramHandler>,
    ) -> anyhow::Result<Box<dyn Endpoint>> {
        let handler = Arc::new(DropHandler {
            inner: handler,
            drop_probability: self.drop_probability,
        });
        self.inner.open(listen_addr, handler)
    }

    fn prepare(&self) -> Option<Preparation> {
        self.inner.prepare()
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
