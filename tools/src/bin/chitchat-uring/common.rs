//! What the subcommands share: logging, Ctrl-C, the transport flag, port checks.

use std::io::IsTerminal;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::anyhow;
use chitchat_uring::transport::seal::{KeyedMode, Keyring, KeyringHandle};
use chitchat_uring::transport::{KeyedTransport, Transport, UdpMode};
use chitchat_uring::{ProtocolVersion, UdpTransport};
use clap::ValueEnum;

/// Logs go to stderr so that stdout carries only results (JSON lines, tables).
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Set by the first Ctrl-C (or SIGTERM): the subcommand winds down gracefully.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe work here: atomics, and _exit on the second signal.
    INTERRUPTED.store(true, Ordering::SeqCst);
    if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// First Ctrl-C: graceful stop. Second: exit at once (130).
pub fn install_interrupt_handler() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches atomics and calls _exit.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// io_uring when available, else epoll (says why).
    Auto,
    /// io_uring or fail.
    Uring,
    /// epoll.
    Epoll,
    /// tokio's UdpSocket, one thread per node (what auto means off Linux).
    Portable,
}

impl TransportArg {
    pub fn transport(self) -> UdpTransport {
        let mode = match self {
            TransportArg::Auto => UdpMode::Auto,
            TransportArg::Uring => UdpMode::Uring,
            TransportArg::Epoll => UdpMode::Epoll,
            TransportArg::Portable => UdpMode::Portable,
        };
        UdpTransport {
            mode,
            ..UdpTransport::DEFAULT
        }
    }
}

/// `--protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// Plain digests: understood by every chitchat 0.13 node (the safe default).
    V0,
    /// zstd-compressed digests: only when every node decodes them.
    V1,
}

impl From<ProtocolArg> for ProtocolVersion {
    fn from(arg: ProtocolArg) -> ProtocolVersion {
        match arg {
            ProtocolArg::V0 => ProtocolVersion::V0,
            ProtocolArg::V1 => ProtocolVersion::V1,
        }
    }
}

/// Fails if someone already uses `addr`, naming the flag.
///
/// The node's sockets use SO_REUSEPORT, so a second node on the same port would bind happily
/// and silently share the traffic; a probe bind without it fails on any existing socket.
pub fn check_port_free(addr: SocketAddr, flag: &str) -> anyhow::Result<()> {
    match UdpSocket::bind(addr) {
        Ok(_) => Ok(()),
        Err(error) => Err(anyhow!("{flag} {addr}: cannot listen there: {error}")),
    }
}

/// `12.3 KB` style sizes.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `MiB` for memory, as `top` shows it.
pub fn human_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Prints a two-column table.
pub fn print_table(rows: &[(String, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in rows {
        println!("{key:<width$}  {value}");
    }
}

/// Raises the soft limit on open files to the hard limit: every node holds a socket per I/O
/// worker, so large local clusters need more than the usual 1024.
pub fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// `--key-file` (and `--accept-plaintext`): the UDP transport, sealed under the file's keys for
/// `cluster` when a key file is given. Errors name the flag and the line.
pub fn keyed_or_plain(
    udp: UdpTransport,
    key_file: Option<&std::path::Path>,
    accept_plaintext: bool,
    cluster: &str,
) -> anyhow::Result<Box<dyn Transport>> {
    let Some(path) = key_file else {
        if accept_plaintext {
            return Err(anyhow!("--accept-plaintext needs --key-file"));
        }
        return Ok(Box::new(udp));
    };
    let ring =
        Keyring::load_key_file(path).map_err(|e| anyhow!("--key-file {}: {e}", path.display()))?;
    let mode = if accept_plaintext {
        KeyedMode::AcceptPlaintext
    } else {
        KeyedMode::Required
    };
    Ok(Box::new(KeyedTransport::new(
        udp,
        KeyringHandle::new(ring),
        cluster,
        mode,
    )))
}

/// Installs the Prometheus recorder and serves `GET /metrics` on `addr` (on the exporter's own
/// thread: called outside any runtime). Call before starting nodes.
pub fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|error| anyhow::anyhow!("--metrics-addr {addr}: {error}"))?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}
