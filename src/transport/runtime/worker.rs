//! The part of a worker other threads talk to: its command queue and the eventfd that wakes it
//! (the latch a closing endpoint waits on is `closing`'s). Generic over the backend's own commands, which the
//! runtime carries without looking at them.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

pub(crate) use crate::transport::closing::Latch;
use crate::transport::sys::EventFd;

/// Commands a worker executes between batches.
pub(crate) enum Command<M> {
    /// A request only the backend understands (open an endpoint, deliver or send later...).
    Backend(M),
    /// Stop serving endpoint `id`, close its socket, then acknowledge.
    Close {
        /// The endpoint.
        id: u64,
        /// Counted down once the worker let go of the endpoint.
        ack: Option<std::sync::Arc<Latch>>,
    },
    /// Exit the loop (the runtime is being dropped).
    Shutdown,
}

/// The part of a worker other threads talk to.
pub(crate) struct WorkerShared<M> {
    commands: Mutex<Vec<Command<M>>>,
    waker: EventFd,
    /// Set when the eventfd has been written and not yet consumed: one write per wake-up.
    notified: AtomicBool,
}

impl<M> WorkerShared<M> {
    pub(super) fn new() -> io::Result<WorkerShared<M>> {
        Ok(WorkerShared {
            commands: Mutex::new(Vec::new()),
            waker: EventFd::new()?,
            notified: AtomicBool::new(false),
        })
    }

    /// Queues `command` and wakes the worker.
    pub(crate) fn push(&self, command: Command<M>) {
        self.commands.lock().push(command);
        self.wake();
    }

    /// Queues a backend command and wakes the worker.
    pub(crate) fn push_backend(&self, message: M) {
        self.push(Command::Backend(message));
    }

    fn wake(&self) {
        if !self.notified.swap(true, Ordering::SeqCst) {
            self.waker.write();
        }
    }

    /// The eventfd the worker waits on.
    pub(crate) fn eventfd(&self) -> RawFd {
        self.waker.raw_fd()
    }

    /// Re-enables wake-ups; call after consuming the eventfd and before taking work.
    pub(crate) fn rearm_wake(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }

    /// Consumes the eventfd counter (only call when it is readable: the fd blocks).
    pub(crate) fn consume_eventfd(&self) {
        self.waker.read();
    }

    /// Moves every queued command, in order, to the end of `out`.
    pub(crate) fn take_commands(&self, out: &mut Vec<Command<M>>) {
        out.append(&mut self.commands.lock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_keep_their_order_and_one_wake_up_is_written() {
        let w = WorkerShared::<u8>::new().unwrap();
        w.push_backend(1);
        w.push(Command::Shutdown);
        w.push_backend(2);
        assert!(crate::transport::sys::poll_readable(w.eventfd(), 0));
        w.consume_eventfd();
        assert!(!crate::transport::sys::poll_readable(w.eventfd(), 0));
        w.rearm_wake();
        let mut out = Vec::new();
        w.take_commands(&mut out);
        let seen: Vec<Option<u8>> = out
            .iter()
            .map(|c| match c {
                Command::Backend(m) => Some(*m),
                _ => None,
            })
            .collect();
        assert_eq!(seen, vec![Some(1), None, Some(2)]);
    }
}
