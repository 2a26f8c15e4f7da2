//! The control thread: one current-thread tokio runtime, pinned to one core, that hosts every
//! node's gossip interval, command loop and DNS refresh. Datagrams never pass through it (the
//! I/O workers handle them), so one thread serves hundreds of nodes.

use std::sync::{Arc, Weak};
use std::thread;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::warn;

/// Shared by every running node of the process; the thread ends when the last node lets go.
pub(crate) struct ControlThread {
    handle: Handle,
    stop_tx: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

static SHARED: Mutex<Weak<ControlThread>> = Mutex::new(Weak::new());

impl ControlThread {
    /// The process's control thread, started on first use.
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("chitchat-control".to_string())
            .spawn(move || {
                if let Err(error) = pin_to_first_allowed_cpu() {
                    warn!(%error, "could not pin the control thread");
                }
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
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

    fn on_control_thread(&self) -> bool {
        self.thread
            .lock()
            .as_ref()
            .is_some_and(|t| t.thread().id() == thread::current().id())
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        if let Some(stop_tx) = self.stop_tx.lock().take() {
            let _ = stop_tx.send(());
        }
        // The last reference may be dropped by a task on the control thread itself: it cannot
        // join itself, and it exits on its own once the stop signal is seen.
        if !self.on_control_thread()
            && let Some(thread) = self.thread.lock().take()
        {
            let _ = thread.join();
        }
    }
}

/// Off Linux the control thread is not pinned.
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
