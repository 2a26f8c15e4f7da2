//! The control runtime: a small multi-threaded tokio runtime shared by every node of the process,
//! hosting each node's gossip interval, command loop and DNS refresh as its own task. Datagrams
//! never pass through it (the I/O workers handle them). With several threads, the rounds and
//! failure detectors of hundreds of nodes run in parallel, and a node whose state is busy does
//! not hold up the others' rounds.

use std::cell::Cell;
use std::sync::{Arc, Weak};
use std::thread;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Most threads the control runtime runs (one per allowed CPU up to this).
const MAX_CONTROL_THREADS: usize = 8;
/// Most threads of its blocking pool (the slow parts of starting a node's transport).
const MAX_BLOCKING_THREADS: usize = 16;

thread_local! {
    /// Set on the control runtime's threads, which must never wait for the runtime to stop.
    static ON_CONTROL_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Shared by every running node of the process; the runtime stops when the last node lets go.
pub(crate) struct ControlThread {
    handle: Handle,
    stop_tx: Mutex<Option<oneshot::Sender<()>>>,
    /// The thread that owns the runtime: it drops it (waiting for its threads) once stopped.
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

static SHARED: Mutex<Weak<ControlThread>> = Mutex::new(Weak::new());

impl ControlThread {
    /// The process's control runtime, started on first use.
    pub(crate) fn shared() -> std::io::Result<Arc<ControlThread>> {
        let mut shared = SHARED.lock();
        if let Some(control) = shared.upgrade() {
            return Ok(control);
        }
        let control = Arc::new(ControlThread::start()?);
        *shared = Arc::downgrade(&control);
        Ok(control)
    }

    fn start() -> std::io::Result<ControlThread> {
        let threads = thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .clamp(1, MAX_CONTROL_THREADS);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_name("chitchat-control")
            .on_thread_start(|| {
                ON_CONTROL_THREAD.with(|c| c.set(true));
                // All on one core (the design: gossip and DNS pinned to one core, the other
                // cores left to the I/O workers); several threads so that one node's busy
                // lock or slow job never holds up the others' rounds.
                if let Err(error) = pin_to_first_allowed_cpu() {
                    tracing::debug!(%error, "control thread not pinned");
                }
            })
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("chitchat-control".to_string())
            .spawn(move || {
                ON_CONTROL_THREAD.with(|c| c.set(true));
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
                // Outside any async context: dropping waits for the runtime's threads.
                drop(runtime);
            })?;
        Ok(ControlThread {
            handle,
            stop_tx: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        if let Some(stop_tx) = self.stop_tx.lock().take() {
            let _ = stop_tx.send(());
        }
        // The last reference may be dropped by a task of the runtime itself: it cannot wait for
        // its own runtime to stop, and the owning thread finishes on its own.
        if !ON_CONTROL_THREAD.with(Cell::get)
            && let Some(thread) = self.thread.lock().take()
        {
            let _ = thread.join();
        }
    }
}

/// Off Linux the control threads are not pinned.
#[cfg(not(target_os = "linux"))]
fn pin_to_first_allowed_cpu() -> std::io::Result<()> {
    Ok(())
}

/// Pins the calling thread to the first CPU it may run on.
#[cfg(target_os = "linux")]
fn pin_to_first_allowed_cpu() -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity/sched_setaffinity only read/write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let Some(cpu) = (0..libc::CPU_SETSIZE as usize).find(|&cpu| libc::CPU_ISSET(cpu, &set))
        else {
            return Ok(());
        };
        let mut pinned: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut pinned);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &pinned) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_while_referenced_and_restarted_after() {
        let a = ControlThread::shared().unwrap();
        let b = ControlThread::shared().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let (tx, rx) = std::sync::mpsc::channel();
        a.handle().spawn(async move {
            tx.send(thread::current().name().map(str::to_string))
                .unwrap();
        });
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(),
            Some("chitchat-control".to_string())
        );
        drop(a);
        drop(b);
        let c = ControlThread::shared().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        c.handle().spawn(async move {
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    }
}
