//! The portable UDP backend: tokio's `UdpSocket`, one datagram per handler call, on a thread of
//! the endpoint's own running a current-thread tokio runtime. No io_uring, no epoll, no libc:
//! it is the only UDP backend off Linux and is selectable on Linux (`UdpMode::Portable`,
//! `CHITCHAT_URING_TRANSPORT=portable`) so it is tested there.
//!
//! Replies leave from that thread; `send_to` sends from the caller's thread through a clone of
//! the socket (or queues for the thread when the endpoint has faults, which the thread applies,
//! or when the socket's buffer is full). `close()` stops the thread and returns once the socket
//! is closed.

use std::io;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use anyhow::anyhow;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::transport::api::{
    Datagram, DatagramHandler, Endpoint, EndpointStats, MAX_DATAGRAM_LEN, ReplySink, TransportKind,
};
use crate::transport::dispatch::{AtomicStats, bump, panic_message};
use crate::transport::faults::{FaultInjector, Faults};

/// Datagrams `send_to` may queue for the endpoint's thread before it reports `WouldBlock`.
const OUTBOX_CAPACITY: usize = 4096;

/// A datagram queued for the endpoint's thread.
type Outgoing = (SocketAddr, Vec<u8>);

/// Binds `listen_addr` (no SO_REUSEPORT: a taken port is an error naming it) and serves it to
/// `handler` from a new thread. Datagrams longer than `max_datagram` are dropped and counted as
/// receive errors.
pub(crate) fn open(
    listen_addr: SocketAddr,
    handler: Arc<dyn DatagramHandler>,
    faults: &Faults,
    max_datagram: usize,
) -> anyhow::Result<Box<dyn Endpoint>> {
    let socket = std::net::UdpSocket::bind(listen_addr)
        .map_err(|e| anyhow!("failed to bind UDP socket to {listen_addr}: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| anyhow!("UDP socket bound to {listen_addr}: set_nonblocking: {e}"))?;
    let local_addr = socket
        .local_addr()
        .map_err(|e| anyhow!("getsockname for UDP socket bound to {listen_addr}: {e}"))?;
    let send_socket =
        Arc::new(Mutex::new(Some(socket.try_clone().map_err(|e| {
            anyhow!("dup of UDP socket bound to {listen_addr}: {e}")
        })?)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| anyhow!("portable UDP backend: cannot start its runtime: {e}"))?;
    let stats = Arc::new(AtomicStats::default());
    let (out_tx, out_rx) = mpsc::channel(OUTBOX_CAPACITY);
    let faults = FaultInjector::for_endpoint(faults, local_addr).map(Arc::new);
    let has_faults = faults.is_some();
    let worker = Worker {
        local_addr,
        handler,
        faults,
        stats: stats.clone(),
        out_rx,
        max_datagram: max_datagram.clamp(1, MAX_DATAGRAM_LEN),
        send_socket: send_socket.clone(),
    };
    let thread = thread::Builder::new()
        .name("chitchat-udp".to_string())
        .spawn(move || {
            let send_socket = worker.send_socket.clone();
            runtime.block_on(async move {
                match tokio::net::UdpSocket::from_std(socket) {
                    Ok(socket) => worker.run(Arc::new(socket)).await,
                    Err(error) => tracing::error!(%local_addr, %error,
                                                  "portable UDP backend: cannot register socket"),
                }
            });
            // Closed, or the handler panicked: `send_to` fails from now on and the clone no
            // longer holds the port.
            send_socket.lock().take();
            // Dropping the runtime drops the delayed sends still pending, and with them the
            // last reference to the socket: the port is free when the thread ends.
            drop(runtime);
        })
        .map_err(|e| anyhow!("portable UDP backend: cannot start its thread: {e}"))?;
    Ok(Box::new(PortableEndpoint {
        local_addr,
        send_socket,
        has_faults,
        out_tx: Mutex::new(Some(out_tx)),
        stats,
        closed: AtomicBool::new(false),
        thread: Mutex::new(Some(thread)),
    }))
}

/// The endpoint's thread: receives, calls the handler, sends.
struct Worker {
    local_addr: SocketAddr,
    handler: Arc<dyn DatagramHandler>,
    faults: Option<Arc<FaultInjector>>,
    stats: Arc<AtomicStats>,
    out_rx: mpsc::Receiver<Outgoing>,
    /// Longest datagram handed to the handler.
    max_datagram: usize,
    /// The handle's clone of the socket, dropped when this thread ends.
    send_socket: Arc<Mutex<Option<std::net::UdpSocket>>>,
}

/// Errors a UDP receive reports that say nothing about the socket (ICMP feedback of an earlier
/// send on some systems, memory pressure).
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::OutOfMemory
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// What one wake-up brought.
enum Event {
    Outgoing(Option<Outgoing>),
    Received(io::Result<(usize, SocketAddr)>),
}

impl Worker {
    async fn run(mut self, socket: Arc<tokio::net::UdpSocket>) {
        // One byte more than the longest datagram accepted: a longer one is seen as such (and
        // dropped) rather than silently truncated.
        let mut buf = vec![0u8; self.max_datagram + 1];
        let mut sink = Replies::default();
        loop {
            let event = tokio::select! {
                biased;
                outgoing = self.out_rx.recv() => Event::Outgoing(outgoing),
                received = socket.recv_from(&mut buf) => Event::Received(received),
            };
            match event {
                // Closed or dropped.
                Event::Outgoing(None) => break,
                Event::Outgoing(Some((to, payload))) => self.send(&socket, to, payload).await,
                Event::Received(Ok((len, from))) => {
                    if len > self.max_datagram {
                        bump(&self.stats.recv_errors, 1);
                        continue;
                    }
                    bump(&self.stats.datagrams_received, 1);
                    bump(&self.stats.bytes_received, len as u64);
                    let batch = [Datagram {
                        from,
                        payload: &buf[..len],
                    }];
                    sink.sent.clear();
                    let handler = &self.handler;
                    if let Err(panic) =
                        catch_unwind(AssertUnwindSafe(|| handler.handle_batch(&batch, &mut sink)))
                    {
                        self.panicked(panic.as_ref());
                        break;
                    }
                    let sent = std::mem::take(&mut sink.sent);
                    for (to, reply) in sent {
                        self.send(&socket, to, reply).await;
                    }
                }
                Event::Received(Err(error)) => {
                    bump(&self.stats.recv_errors, 1);
                    if !is_transient(&error) {
                        tracing::warn!(addr = %self.local_addr, %error, "UDP receive failed");
                        // Not a busy loop if the error persists.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        }
    }

    /// Sends one datagram with the faults applied (a delayed one from a task of this runtime).
    async fn send(
        &self,
        socket: &Arc<tokio::net::UdpSocket>,
        to: SocketAddr,
        mut payload: Vec<u8>,
    ) {
        let Some(faults) = &self.faults else {
            send_one(socket, &self.stats, to, &payload).await;
            return;
        };
        let plan = faults.apply(to, &mut payload);
        if plan.drop {
            bump(&self.stats.dropped_by_faults, 1);
            return;
        }
        let copies = if plan.duplicate { 2 } else { 1 };
        for delay in plan.delay.iter().take(copies) {
            match delay {
                None => send_one(socket, &self.stats, to, &payload).await,
                Some(delay) => {
                    let (socket, stats, payload, delay) =
                        (socket.clone(), self.stats.clone(), payload.clone(), *delay);
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        send_one(&socket, &stats, to, &payload).await;
                    });
                }
            }
        }
    }

    fn panicked(&self, panic: &(dyn std::any::Any + Send)) {
        let message = panic_message(panic);
        tracing::error!(addr = %self.local_addr, "datagram handler panicked, endpoint closed: {message}");
        let handler = &self.handler;
        if catch_unwind(AssertUnwindSafe(|| handler.on_panic(message))).is_err() {
            tracing::error!(addr = %self.local_addr, "on_panic panicked too");
        }
    }
}

async fn send_one(
    socket: &tokio::net::UdpSocket,
    stats: &AtomicStats,
    to: SocketAddr,
    payload: &[u8],
) {
    match socket.send_to(payload, to).await {
        Ok(n) => {
            bump(&stats.datagrams_sent, 1);
            bump(&stats.bytes_sent, n as u64);
        }
        Err(error) => {
            bump(&stats.send_errors, 1);
            tracing::debug!(%to, %error, "UDP send failed");
        }
    }
}

/// A handler's replies of one datagram.
#[derive(Default)]
struct Replies {
    current: Vec<u8>,
    sent: Vec<(SocketAddr, Vec<u8>)>,
}

impl ReplySink for Replies {
    fn buffer(&mut self) -> &mut Vec<u8> {
        self.current.clear();
        &mut self.current
    }

    fn send(&mut self, to: SocketAddr) {
        self.sent.push((to, std::mem::take(&mut self.current)));
    }
}

/// The handle of a portable endpoint.
struct PortableEndpoint {
    local_addr: SocketAddr,
    /// A clone of the thread's socket for `send_to` from any thread (`None` once closed, so the
    /// port is free when the thread ends).
    send_socket: Arc<Mutex<Option<std::net::UdpSocket>>>,
    /// Sends then go through the thread, which applies the faults.
    has_faults: bool,
    /// `None` once closed: dropping the sender ends the thread.
    out_tx: Mutex<Option<mpsc::Sender<Outgoing>>>,
    stats: Arc<AtomicStats>,
    closed: AtomicBool,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Endpoint for PortableEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Portable
    }

    fn send_to(&self, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        if !self.has_faults {
            let socket = self.send_socket.lock();
            let socket = socket
                .as_ref()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "endpoint closed"))?;
            match socket.send_to(payload, to) {
                Ok(n) => {
                    bump(&self.stats.datagrams_sent, 1);
                    bump(&self.stats.bytes_sent, n as u64);
                    return Ok(());
                }
                // The socket's buffer is full: the thread sends it when it drains.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    bump(&self.stats.send_errors, 1);
                    return Err(error);
                }
            }
        }
        let guard = self.out_tx.lock();
        let tx = guard
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "endpoint closed"))?;
        tx.try_send((to, payload.to_vec()))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => {
                    bump(&self.stats.send_errors, 1);
                    io::Error::new(io::ErrorKind::WouldBlock, "the endpoint's outbox is full")
                }
                mpsc::error::TrySendError::Closed(_) => {
                    io::Error::new(io::ErrorKind::NotConnected, "endpoint closed")
                }
            })
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.out_tx.lock().take();
        self.send_socket.lock().take();
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        // From a handler on the endpoint's own thread: it ends right after this datagram.
        if thread.thread().id() == thread::current().id() {
            return;
        }
        if thread.join().is_err() {
            tracing::error!(addr = %self.local_addr, "portable UDP thread panicked");
        }
    }

    fn stats(&self) -> EndpointStats {
        self.stats.snapshot()
    }
}

impl Drop for PortableEndpoint {
    fn drop(&mut self) {
        self.close();
    }
}
