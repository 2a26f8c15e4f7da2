//! What the two UDP worker loops (io_uring and epoll) share: the state of a UDP endpoint, the
//! commands their workers take, and the layout of a receive buffer that sizes both.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard};

use crate::transport::delay_queue::Delayed;
use crate::transport::dispatch::EndpointCore;
use crate::transport::runtime::WorkerCtx;

/// Size of `struct io_uring_recvmsg_out`, which a multishot receive writes at the start of
/// every receive buffer (four `u32`s: name, control and payload lengths, flags).
const RECVMSG_OUT_LEN: usize = 16;
/// Size of the name field a multishot receive reserves after it: fits a `sockaddr_in6`.
pub(crate) const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// Bytes of a receive buffer in front of the payload on the io_uring path. The epoll path
/// subtracts it too, so one `recv_buffer_len` means the same largest datagram on both.
pub(crate) const RECV_HEADER_LEN: usize = RECVMSG_OUT_LEN + NAME_LEN;

/// Largest datagram a receive buffer of `recv_buffer_len` bytes holds (at least one byte).
pub(crate) fn max_payload(recv_buffer_len: usize) -> usize {
    recv_buffer_len.saturating_sub(RECV_HEADER_LEN).max(1)
}

/// A UDP endpoint as its handle and its workers see it.
pub(crate) struct UdpCore {
    /// What every backend knows of an endpoint.
    pub(crate) core: EndpointCore,
    /// A duplicate of one worker socket for `send_to` from any thread. Held here so that a
    /// handler panic can close it too and free the port.
    send_fd: RwLock<Option<OwnedFd>>,
}

impl UdpCore {
    /// The endpoint `core` whose `send_to` goes out through `send_fd`.
    pub(crate) fn new(core: EndpointCore, send_fd: OwnedFd) -> UdpCore {
        UdpCore {
            core,
            send_fd: RwLock::new(Some(send_fd)),
        }
    }

    /// The socket for `send_to` (`None` once closed).
    pub(crate) fn send_fd(&self) -> RwLockReadGuard<'_, Option<OwnedFd>> {
        self.send_fd.read()
    }

    /// Marks the endpoint closed and closes the `send_to` socket (the workers close theirs).
    pub(crate) fn close(&self) {
        self.core.mark_closed();
        *self.send_fd.write() = None;
    }

    /// After a handler panic on the worker of `ctx`: closes the endpoint, tells the handler, and
    /// asks the other workers to close their sockets. The calling worker closes its own.
    pub(crate) fn panicked(&self, ctx: &WorkerCtx<UdpCommand>, message: String) {
        self.close();
        self.core.panicked(message);
        ctx.close_on_other_workers(self.core.id);
    }
}

/// What a UDP worker is asked to do besides closing and shutting down.
pub(crate) enum UdpCommand {
    /// Serve this endpoint on this worker's socket of it.
    Open {
        /// The endpoint.
        ep: Arc<UdpCore>,
        /// This worker's socket, bound to the endpoint's address with `SO_REUSEPORT`.
        socket: OwnedFd,
    },
    /// A delayed (fault-injected) `send_to`, sent by the worker when due.
    SendLater(Delayed),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_what_a_multishot_receive_writes() {
        assert_eq!(RECV_HEADER_LEN, 44);
        assert_eq!(max_payload(RECV_HEADER_LEN + 10), 10);
        assert_eq!(max_payload(0), 1);
    }
}
