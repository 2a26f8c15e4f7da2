//! Waiting for I/O workers to let go of an endpoint: the [`Latch`] each worker counts down once
//! it closed its socket, waited on either by blocking (`Endpoint::close`) or by awaiting a
//! [`Closing`] (`Endpoint::close_nonblocking`), so that many endpoints can close at once without
//! a thread parked per endpoint.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Counts down worker acknowledgements of a close.
pub(crate) struct Latch {
    state: Mutex<LatchState>,
    cv: Condvar,
}

struct LatchState {
    left: usize,
    /// Tasks awaiting a [`Closing`] of this latch.
    wakers: Vec<Waker>,
}

impl Latch {
    /// A latch released after `n` acknowledgements.
    pub(crate) fn new(n: usize) -> Latch {
        Latch {
            state: Mutex::new(LatchState {
                left: n,
                wakers: Vec::new(),
            }),
            cv: Condvar::new(),
        }
    }

    /// One worker is done.
    pub(crate) fn ack(&self) {
        let wakers = {
            let mut state = self.state.lock();
            state.left = state.left.saturating_sub(1);
            if state.left > 0 {
                return;
            }
            self.cv.notify_all();
            std::mem::take(&mut state.wakers)
        };
        // Woken outside the lock: a waker may run the task on this very thread.
        for waker in wakers {
            waker.wake();
        }
    }

    /// Waits until every worker acknowledged or `timeout` passed; true if all did.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock();
        while state.left > 0 {
            if self.cv.wait_until(&mut state, deadline).timed_out() {
                return state.left == 0;
            }
        }
        true
    }

    /// Ready once every worker acknowledged; otherwise registers `cx`'s waker.
    fn poll_released(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state.lock();
        if state.left == 0 {
            return Poll::Ready(());
        }
        if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A close in progress: resolves once every I/O worker serving the endpoint closed its socket
/// (the port is free then). Dropping it does not stop the close.
#[must_use = "the close goes on without it; await it to know the port is free"]
pub struct Closing {
    latch: Option<Arc<Latch>>,
}

impl Closing {
    /// A close that has already completed.
    pub fn done() -> Closing {
        Closing { latch: None }
    }

    /// The close acknowledged through `latch`.
    pub(crate) fn of(latch: Arc<Latch>) -> Closing {
        Closing { latch: Some(latch) }
    }
}

impl std::fmt::Debug for Closing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closing")
            .field("pending", &self.latch.is_some())
            .finish()
    }
}

impl Future for Closing {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(latch) = &self.latch else {
            return Poll::Ready(());
        };
        let poll = latch.poll_released(cx);
        if poll.is_ready() {
            self.latch = None;
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latch_releases_after_all_acks_and_times_out_otherwise() {
        let latch = Arc::new(Latch::new(2));
        latch.ack();
        assert!(!latch.wait(Duration::from_millis(1)));
        let l = latch.clone();
        let t = std::thread::spawn(move || l.ack());
        assert!(latch.wait(Duration::from_secs(10)));
        t.join().unwrap();
    }

    #[test]
    fn closing_resolves_once_every_worker_acknowledged() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let latch = Arc::new(Latch::new(2));
        let acks = latch.clone();
        let acker = std::thread::spawn(move || {
            acks.ack();
            acks.ack();
        });
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), Closing::of(latch))
                .await
                .expect("the close resolves after both acknowledgements");
        });
        acker.join().unwrap();
        runtime.block_on(Closing::done());
    }
}
