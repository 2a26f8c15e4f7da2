//! Receive + reply throughput and receiver CPU per datagram of the UDP paths, so the transport
//! choice can be re-measured with one command: `cargo bench --bench udp_paths`.
//!
//! One receiver (a single worker pinned to the first allowed CPU) echoes every datagram; a
//! blaster thread pinned to another CPU sends with `sendmmsg` as fast as it can and never reads
//! the replies (the kernel drops them at its socket). Throughput is what the receiver handled
//! per second; CPU is the receiver thread's on-CPU time (schedstat) per datagram.
//! `BENCH_SECS` sets the measurement window (default 2).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chitchat_uring::transport::{
    Datagram, DatagramHandler, DatagramTransport, ReplySink, UdpMode, UdpTransport,
};

const SIZES: [usize; 3] = [64, 1400, 8192];
const WARMUP: Duration = Duration::from_millis(300);

/// Echoes every datagram (receive-only with `BENCH_NO_REPLY`, to split receive and send costs).
struct Echo {
    reply: bool,
}

impl DatagramHandler for Echo {
    fn handle_batch(&self, batch: &[Datagram<'_>], replies: &mut dyn ReplySink) {
        if !self.reply {
            return;
        }
        for d in batch {
            replies.buffer().extend_from_slice(d.payload);
            replies.send(d.from);
        }
    }
}

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: plain data filled by the kernel.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn pin(cpu: usize) {
    // SAFETY: plain data; pid 0 = calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// On-CPU nanoseconds of the process's thread named `name` (first field of schedstat).
fn thread_cpu_ns(name: &str) -> Option<u64> {
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let path = entry.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(path.join("schedstat")).ok()?;
            return stat.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

/// Sends `size`-byte datagrams to `to` in `sendmmsg` batches of 32 until `stop`.
fn blaster(
    to: SocketAddr,
    size: usize,
    cpu: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if std::env::var_os("BENCH_NO_PIN").is_none() {
            pin(cpu);
        }
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(to).unwrap();
        let payload = vec![0xA5u8; size];
        // SAFETY: zeroed C structs, pointed at `payload`, which outlives every call.
        let mut iov: libc::iovec = unsafe { std::mem::zeroed() };
        iov.iov_base = payload.as_ptr() as *mut _;
        iov.iov_len = size;
        let mut msgs: Vec<libc::mmsghdr> = (0..32)
            .map(|_| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: 32 valid messages on a connected socket.
            let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), 32, 0) };
            if n > 0 {
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    })
}

struct Row {
    path: &'static str,
    kpps: [f64; 3],
    cpu_us: [f64; 3],
    offered: [f64; 3],
}

fn reply() -> bool {
    std::env::var_os("BENCH_NO_REPLY").is_none()
}

fn window() -> Duration {
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// Measures one receiver: `counter` reads its handled-datagram count, `thread` names it.
fn measure(
    to: SocketAddr,
    size: usize,
    blaster_cpu: usize,
    counter: &dyn Fn() -> u64,
    thread: &str,
) -> (f64, f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let b = blaster(to, size, blaster_cpu, stop.clone(), sent.clone());
    std::thread::sleep(WARMUP);
    let (n0, c0, s0, t0) = (
        counter(),
        thread_cpu_ns(thread).unwrap_or(0),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(window());
    let (n1, c1, s1, t1) = (
        counter(),
        thread_cpu_ns(thread).unwrap_or(0),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    stop.store(true, Ordering::Relaxed);
    b.join().unwrap();
    let n = (n1 - n0).max(1) as f64;
    let kpps = n / (t1 - t0).as_secs_f64() / 1000.0;
    let cpu_us = (c1.saturating_sub(c0)) as f64 / 1000.0 / n;
    let offered = (s1 - s0) as f64 / (t1 - t0).as_secs_f64() / 1000.0;
    (kpps, cpu_us, offered)
}

fn bench_transport(path: &'static str, mode: UdpMode, blaster_cpu: usize) -> Row {
    let mut row = Row {
        path,
        kpps: [0.0; 3],
        cpu_us: [0.0; 3],
        offered: [0.0; 3],
    };
    let thread = match mode {
        UdpMode::Uring => "cc-uring-0",
        _ => "cc-epoll-0",
    };
    for (k, &size) in SIZES.iter().enumerate() {
        let transport = UdpTransport {
            mode,
            workers: Some(1),
            ..UdpTransport::DEFAULT
        };
        let ep = transport
            .open_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                Arc::new(Echo { reply: reply() }),
            )
            .expect("open");
        let counter = || ep.stats().datagrams_received;
        (row.kpps[k], row.cpu_us[k], row.offered[k]) =
            measure(ep.local_addr(), size, blaster_cpu, &counter, thread);
        drop(ep);
    }
    row
}

fn bench_tokio(cpu: usize, blaster_cpu: usize) -> Row {
    let mut row = Row {
        path: "tokio UdpSocket",
        kpps: [0.0; 3],
        cpu_us: [0.0; 3],
        offered: [0.0; 3],
    };
    for (k, &size) in SIZES.iter().enumerate() {
        let handled = Arc::new(AtomicU64::new(0));
        let std_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        std_socket.set_nonblocking(true).unwrap();
        let addr = std_socket.local_addr().unwrap();
        let h = handled.clone();
        let server = std::thread::Builder::new()
            .name("tokio-echo".into())
            .spawn(move || {
                pin(cpu);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let socket = tokio::net::UdpSocket::from_std(std_socket).unwrap();
                    let mut buf = vec![0u8; 65_536];
                    // The plain chitchat loop: one recv, one send. An empty datagram stops it.
                    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if reply() {
                            let _ = socket.send_to(&buf[..n], from).await;
                        }
                        h.fetch_add(1, Ordering::Relaxed);
                    }
                });
            })
            .unwrap();
        let counter = || handled.load(Ordering::Relaxed);
        (row.kpps[k], row.cpu_us[k], row.offered[k]) =
            measure(addr, size, blaster_cpu, &counter, "tokio-echo");
        let stopper = UdpSocket::bind("127.0.0.1:0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.is_finished() && Instant::now() < deadline {
            let _ = stopper.send_to(&[], addr);
            std::thread::sleep(Duration::from_millis(10));
        }
        server.join().unwrap();
    }
    row
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let cpus = allowed_cpus();
    let receiver_cpu = cpus[0];
    let blaster_cpu = *cpus.get(1).unwrap_or(&cpus[0]);
    println!(
        "receiver on CPU {receiver_cpu}, blaster on CPU {blaster_cpu}, window {:?}",
        window()
    );
    let rows = vec![
        bench_tokio(receiver_cpu, blaster_cpu),
        bench_transport("epoll recvmmsg/sendmmsg", UdpMode::Epoll, blaster_cpu),
        bench_transport("io_uring multishot+pbuf", UdpMode::Uring, blaster_cpu),
    ];
    println!();
    println!(
        "| receive+reply path | kpps 64 B | 1400 B | 8 KiB | receiver µs CPU/dgram 64 B | 1400 B | 8 KiB | offered kpps 64 B | 1400 B | 8 KiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |",
            r.path,
            r.kpps[0],
            r.kpps[1],
            r.kpps[2],
            r.cpu_us[0],
            r.cpu_us[1],
            r.cpu_us[2],
            r.offered[0],
            r.offered[1],
            r.offered[2]
        );
    }
}
