//! Whether io_uring works here, and if not, why (the reason the UDP transport reports when it
//! falls back to epoll): checked once per process with a real multishot receive, since probing
//! opcodes alone cannot tell a kernel without multishot `RecvMsg`. Also builds the rings the
//! workers use, with the fastest setup flags the kernel accepts.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::Duration;

use io_uring::{IoUring, Probe, cqueue, opcode, types};

use crate::transport::sys::recv_msghdr;
use crate::transport::udp_shared::{NAME_LEN, RECV_HEADER_LEN};
use crate::transport::uring::buf_ring::{BGID, BufRing};

/// `Ok` if io_uring with multishot receives works in this process, else the reason it does
/// not (seccomp, an old kernel, ...). The check runs once.
pub(crate) fn probe_once() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_multishot).clone()
}

fn probe_multishot() -> Result<(), String> {
    // Declared before the ring, so that every return drops the ring (cancelling the receive)
    // before what the receive points at.
    let hdr = recv_msghdr(NAME_LEN);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").ok();
    let bufs = BufRing::new(2, 64 + RECV_HEADER_LEN).map_err(|e| format!("mmap: {e}"))?;
    let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    check_ring(&ring)?;
    bufs.register(&ring)?;
    // No loopback: the opcode probe above is all we can do.
    let Some(socket) = socket.as_ref() else {
        return Ok(());
    };
    let addr = socket.local_addr().map_err(|e| e.to_string())?;
    let entry = opcode::RecvMsgMulti::new(types::Fd(socket.as_raw_fd()), &*hdr, BGID)
        .build()
        .user_data(1);
    // SAFETY: the entry points at `hdr` and the socket, and receives into the buffer ring, all
    // declared before the io_uring and so dropped after it, on every path.
    unsafe { ring.submission().push(&entry) }.map_err(|_| "submission queue full".to_string())?;
    ring.submit().map_err(|e| format!("submit: {e}"))?;
    socket
        .send_to(b"x", addr)
        .map_err(|e| format!("probe send: {e}"))?;
    let ts = types::Timespec::from(Duration::from_secs(1));
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
        Err(e) => return Err(format!("io_uring_enter: {e}")),
    }
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| "multishot RecvMsg probe got no completion".to_string())?;
    let result = if cqe.result() < 0 {
        Err(format!(
            "multishot RecvMsg: {}",
            io::Error::from_raw_os_error(-cqe.result())
        ))
    } else if !cqueue::more(cqe.flags()) {
        Err("multishot RecvMsg is not supported (no IORING_CQE_F_MORE)".to_string())
    } else {
        Ok(())
    };
    drop(ring);
    drop(bufs);
    result
}

/// Builds a worker's ring: SINGLE_ISSUER | DEFER_TASKRUN when the kernel has them, else plainer.
pub(crate) fn build_ring(entries: u32) -> io::Result<IoUring> {
    let cq = entries.saturating_mul(4);
    IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| {
            IoUring::builder()
                .setup_cqsize(cq)
                .setup_coop_taskrun()
                .build(entries)
        })
        .or_else(|_| IoUring::builder().setup_cqsize(cq).build(entries))
}

/// Checks the features and opcodes the io_uring backend relies on.
pub(crate) fn check_ring(ring: &IoUring) -> Result<(), String> {
    if !ring.params().is_feature_ext_arg() {
        return Err("io_uring lacks IORING_FEAT_EXT_ARG (kernel < 5.11)".to_string());
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    for (name, code) in [
        ("RecvMsg", opcode::RecvMsgMulti::CODE),
        ("SendMsg", opcode::SendMsg::CODE),
        ("AsyncCancel", opcode::AsyncCancel::CODE),
        ("Read", opcode::Read::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring opcode {name} not supported"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why io_uring cannot be used at all here (seccomp, sysctl, old kernel), if so: these tests
    /// then have nothing to check and say so.
    fn io_uring_blocked() -> Option<std::io::Error> {
        io_uring::IoUring::new(8).err()
    }

    #[test]
    fn ring_gets_single_issuer_and_defer_taskrun_here() {
        if let Some(error) = io_uring_blocked() {
            eprintln!(
                "skipping ring_gets_single_issuer_and_defer_taskrun_here: io_uring unavailable: {error}"
            );
            return;
        }
        // Kernel 6.18: the first, fastest configuration must be the one that is used.
        let ring = build_ring(64).unwrap();
        assert!(ring.params().is_setup_single_issuer());
        assert!(check_ring(&ring).is_ok());
    }

    #[test]
    fn probe_works_here() {
        match io_uring_blocked() {
            // io_uring works on this machine: the probe must agree.
            None => assert_eq!(probe_once(), Ok(())),
            // It is blocked: the probe must say so, with a reason.
            Some(error) => {
                eprintln!(
                    "probe_works_here: io_uring unavailable ({error}): checking the probe reports it"
                );
                assert!(probe_once().is_err_and(|reason| !reason.is_empty()));
            }
        }
    }
}
