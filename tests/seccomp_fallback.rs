//! With io_uring_setup denied by seccomp (EPERM, as container runtimes do), Auto mode falls back
//! to epoll and says why, and forced io_uring is an error. Own process: the filter is permanent.
//! Linux only (seccomp, io_uring and epoll are).
#![cfg(target_os = "linux")]

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use chitchat_uring::transport::{
    Datagram, DatagramHandler, DatagramTransport, ReplySink, TRANSPORT_ENV, TransportKind, UdpMode,
    UdpTransport,
};

struct Echo;

impl DatagramHandler for Echo {
    fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink) {
        for d in batch {
            replies.buffer().extend_from_slice(d.payload);
            replies.send(d.from);
        }
    }
}

/// Denies io_uring_setup with EPERM for this thread and the threads it spawns.
fn deny_io_uring() {
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let mut filter = [
        // A = seccomp_data.nr
        stmt((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        stmt(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_ALLOW,
        ),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: a valid filter program; no_new_privs first so no privilege is needed.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog
            ),
            0
        );
    }
}

#[test]
fn seccomp_denied_io_uring_falls_back_to_epoll() {
    // SAFETY: the only test in this binary; Auto mode must not be overridden from outside.
    unsafe { std::env::remove_var(TRANSPORT_ENV) };
    deny_io_uring();
    let err = match (UdpTransport {
        mode: UdpMode::Uring,
        ..UdpTransport::DEFAULT
    })
    .open_endpoint("127.0.0.1:0".parse().unwrap(), Arc::new(Echo))
    {
        Ok(_) => panic!("forced io_uring must fail when io_uring_setup is denied"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("io_uring"), "{err}");

    let ep = UdpTransport
        .open_endpoint("127.0.0.1:0".parse().unwrap(), Arc::new(Echo))
        .unwrap();
    match ep.kind() {
        TransportKind::Epoll { reason } => {
            assert!(reason.contains("io_uring_setup"), "{reason}")
        }
        other => panic!("expected the epoll fallback, got {other:?}"),
    }
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.send_to(b"fallback", ep.local_addr()).unwrap();
    let mut buf = [0u8; 32];
    let (n, _) = c.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"fallback");
}
