//! `CHITCHAT_URING_TRANSPORT=epoll` forces the epoll backend in Auto mode, `=portable` the
//! portable one (own process: the variable is process-wide).

use std::sync::Arc;

use chitchat_uring::transport::{
    Datagram, DatagramHandler, DatagramTransport, ReplySink, TRANSPORT_ENV, TransportKind,
    UdpTransport,
};

struct Nop;

impl DatagramHandler for Nop {
    fn handle_batch(&self, _batch: &[Datagram<'_>], _replies: &mut dyn ReplySink) {}
}

#[test]
fn env_forces_epoll() {
    // SAFETY: the only test in this binary, before any thread reads the environment.
    unsafe { std::env::set_var(TRANSPORT_ENV, "epoll") };
    let ep = UdpTransport
        .open_endpoint("127.0.0.1:0".parse().unwrap(), Arc::new(Nop))
        .unwrap();
    match ep.kind() {
        TransportKind::Epoll { reason } => assert!(reason.contains(TRANSPORT_ENV), "{reason}"),
        other => panic!("expected epoll, got {other:?}"),
    }
    drop(ep);
    // SAFETY: still the only thread of this binary that reads or writes the environment (the
    // epoll endpoint above is closed).
    unsafe { std::env::set_var(TRANSPORT_ENV, "portable") };
    let ep = UdpTransport
        .open_endpoint("127.0.0.1:0".parse().unwrap(), Arc::new(Nop))
        .unwrap();
    assert_eq!(ep.kind(), TransportKind::Portable);
}
