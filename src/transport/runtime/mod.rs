//! Thread-per-core runtime shared by every endpoint of the process: worker threads (pinned, one
//! per allowed CPU by default), their command queues, and the process-wide registry that hands
//! out one runtime per backend configuration. It knows workers, queues and lifecycle only: a
//! backend hands it its worker loop as a [`Backend`], and the runtime runs that loop on each
//! worker thread without knowing which backend it is.

mod worker;

use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::transport::sys::{allowed_cpus, pin_current_thread};

pub(crate) use worker::{Command, Latch, WorkerShared};

/// How long `close()` waits for the workers' acknowledgements before giving up loudly.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long starting a runtime may take before it is considered failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A backend as the runtime sees it: a configuration (equal configurations share workers) and
/// the loop each worker thread runs.
pub(crate) trait Backend: Clone + PartialEq + Send + Sync + 'static {
    /// The backend's own worker commands (carried in [`Command::Backend`]).
    type Command: Send + 'static;
    /// Short name, for the worker threads' names.
    const NAME: &'static str;
    /// Runs one worker on the calling thread: sets up, reports the outcome through `ready`,
    /// then serves until [`Command::Shutdown`].
    fn run_worker(&self, ctx: WorkerCtx<Self::Command>, ready: Ready);
}

/// How a worker reports that its setup succeeded (or why not).
pub(crate) type Ready = Box<dyn FnOnce(Result<(), String>) + Send>;

/// What a worker thread gets.
pub(crate) struct WorkerCtx<M> {
    /// This worker's index in its runtime.
    pub(crate) index: usize,
    /// This worker's queue.
    pub(crate) me: Arc<WorkerShared<M>>,
    all: Arc<[Arc<WorkerShared<M>>]>,
}

impl<M> WorkerCtx<M> {
    /// Asks every other worker of the runtime to close endpoint `id` (after a handler panic:
    /// the calling worker closes its own socket itself).
    pub(crate) fn close_on_other_workers(&self, id: u64) {
        for (i, w) in self.all.iter().enumerate() {
            if i != self.index {
                w.push(Command::Close { id, ack: None });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// One started runtime: the backend configuration and worker count it was started with.
struct Entry {
    backend: Box<dyn Any + Send>,
    workers: usize,
    /// Weak, so that the workers stop when the last endpoint using them is gone.
    runtime: Weak<dyn Any + Send + Sync>,
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Id of the runtime whose worker this thread is (0: none), so `close()` never waits on itself.
    static CURRENT_RUNTIME: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Returns the running runtime of `workers` workers for `backend`, starting it if none is alive.
pub(crate) fn get_runtime<B: Backend>(
    backend: &B,
    workers: usize,
) -> Result<Arc<Runtime<B::Command>>, String> {
    let mut registry = REGISTRY.lock();
    registry.retain(|e| e.runtime.strong_count() > 0);
    if let Some(runtime) = registry
        .iter()
        .filter(|e| e.workers == workers && e.backend.downcast_ref::<B>() == Some(backend))
        .find_map(|e| e.runtime.upgrade()?.downcast::<Runtime<B::Command>>().ok())
    {
        return Ok(runtime);
    }
    let runtime = Runtime::start(backend.clone(), workers)?;
    let any: Arc<dyn Any + Send + Sync> = runtime.clone();
    registry.push(Entry {
        backend: Box::new(backend.clone()),
        workers,
        runtime: Arc::downgrade(&any),
    });
    Ok(runtime)
}

/// Whether a runtime of `workers` workers for `backend` runs already, answered without waiting:
/// false too while another thread holds the registry (it may be starting one).
pub(crate) fn is_running<B: Backend>(backend: &B, workers: usize) -> bool {
    REGISTRY.try_lock().is_some_and(|registry| {
        registry.iter().any(|e| {
            e.workers == workers
                && e.backend.downcast_ref::<B>() == Some(backend)
                && e.runtime.strong_count() > 0
        })
    })
}

/// Whether a runtime of `workers` workers for `backend` is alive (tests check that workers go
/// away).
#[cfg(test)]
pub(crate) fn runtime_alive<B: Backend>(backend: &B, workers: usize) -> bool {
    REGISTRY.lock().iter().any(|e| {
        e.workers == workers
            && e.backend.downcast_ref::<B>() == Some(backend)
            && e.runtime.strong_count() > 0
    })
}

/// Default worker count: one per CPU the process may use.
pub(crate) fn default_workers() -> usize {
    allowed_cpus().len().max(1)
}

// ---------------------------------------------------------------------------------------------
// Runtime lifecycle
// ---------------------------------------------------------------------------------------------

/// A set of worker threads running one backend, whose commands are `M`.
pub(crate) struct Runtime<M> {
    id: u64,
    name: &'static str,
    workers: Arc<[Arc<WorkerShared<M>>]>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Round-robin placement of single-worker (channel) endpoints.
    next_worker: AtomicUsize,
}

impl<M> std::fmt::Debug for Runtime<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("id", &self.id)
            .field("backend", &self.name)
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl<M: Send + 'static> Runtime<M> {
    /// Starts `workers` threads running `backend`'s loop and waits until each reported its setup.
    fn start<B: Backend<Command = M>>(
        backend: B,
        workers: usize,
    ) -> Result<Arc<Runtime<M>>, String> {
        let n = workers.max(1);
        let mut shared = Vec::with_capacity(n);
        for _ in 0..n {
            shared.push(Arc::new(
                WorkerShared::new().map_err(|e| format!("eventfd: {e}"))?,
            ));
        }
        let all: Arc<[Arc<WorkerShared<M>>]> = shared.into();
        let id = NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed);
        let cpus = allowed_cpus();
        let (tx, rx) = mpsc::channel::<(usize, Result<(), String>)>();
        let mut threads = Vec::with_capacity(n);
        let mut spawn_error = None;
        for index in 0..n {
            let ctx = WorkerCtx {
                index,
                me: all[index].clone(),
                all: all.clone(),
            };
            let cpu = if cpus.is_empty() {
                None
            } else {
                Some(cpus[index % cpus.len()])
            };
            let tx = tx.clone();
            let backend = backend.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("cc-{}-{index}", B::NAME))
                .spawn(move || {
                    CURRENT_RUNTIME.with(|c| c.set(id));
                    if let Some(cpu) = cpu {
                        pin_current_thread(cpu);
                    }
                    let ready: Ready = Box::new(move |r| {
                        let _ = tx.send((index, r));
                    });
                    backend.run_worker(ctx, ready);
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    spawn_error = Some(format!("spawning worker thread: {e}"));
                    break;
                }
            }
        }
        drop(tx);
        let runtime = Arc::new(Runtime {
            id,
            name: B::NAME,
            workers: all,
            threads: Mutex::new(threads),
            next_worker: AtomicUsize::new(0),
        });
        if let Some(e) = spawn_error {
            return Err(e);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((_, Ok(()))) => {}
                Ok((index, Err(e))) => return Err(format!("worker {index}: {e}")),
                Err(_) => return Err("worker setup timed out".to_string()),
            }
        }
        Ok(runtime)
    }
}

impl<M> Runtime<M> {
    /// Number of workers.
    pub(crate) fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Worker `index` (modulo the worker count).
    pub(crate) fn worker(&self, index: usize) -> &Arc<WorkerShared<M>> {
        &self.workers[index % self.workers.len()]
    }

    /// Index of the worker a single-worker endpoint should live on.
    pub(crate) fn pick_worker(&self) -> usize {
        self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len()
    }

    /// True on one of this runtime's worker threads (which must never block on a latch).
    fn on_worker_thread(&self) -> bool {
        CURRENT_RUNTIME.with(|c| c.get()) == self.id
    }

    /// [`push_close`](Self::push_close) then [`wait_close`](Self::wait_close).
    #[cfg(test)]
    pub(crate) fn close_endpoint(&self, id: u64, only: Option<usize>) {
        let latch = self.push_close(id, only);
        self.wait_close(id, &latch);
    }

    /// Queues the close of endpoint `id` on `only` (all workers when `None`) without waiting:
    /// the latch counts their acknowledgements. Awaited as a
    /// [`Closing`](crate::transport::closing::Closing), many endpoints close
    /// in the same few worker wake-ups instead of one after the other.
    pub(crate) fn push_close(&self, id: u64, only: Option<usize>) -> Arc<Latch> {
        let targets: Vec<usize> = match only {
            Some(i) => vec![i % self.workers.len()],
            None => (0..self.workers.len()).collect(),
        };
        let latch = Arc::new(Latch::new(targets.len()));
        for &i in &targets {
            self.workers[i].push(Command::Close {
                id,
                ack: Some(latch.clone()),
            });
        }
        latch
    }

    /// Blocks until the close of endpoint `id` queued by [`push_close`](Self::push_close) is
    /// acknowledged (at most [`CLOSE_TIMEOUT`], then loudly), unless called from one of our own
    /// workers, which must never wait for themselves.
    pub(crate) fn wait_close(&self, id: u64, latch: &Latch) {
        if self.on_worker_thread() {
            return;
        }
        if !latch.wait(CLOSE_TIMEOUT) {
            tracing::error!(
                endpoint = id,
                "workers did not acknowledge the close within {CLOSE_TIMEOUT:?}"
            );
        }
    }
}

impl<M> Drop for Runtime<M> {
    fn drop(&mut self) {
        for w in self.workers.iter() {
            w.push(Command::Shutdown);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        if self.on_worker_thread() {
            // Dropped from inside a handler of this runtime: the threads exit on their own.
            return;
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_cpus_not_empty() {
        assert!(!allowed_cpus().is_empty());
        assert!(default_workers() >= 1);
    }

    /// A backend whose workers only count what they were asked to do.
    #[derive(Clone)]
    struct Counting {
        fail_setup: bool,
        seen: Arc<AtomicUsize>,
    }

    impl PartialEq for Counting {
        fn eq(&self, other: &Counting) -> bool {
            self.fail_setup == other.fail_setup && Arc::ptr_eq(&self.seen, &other.seen)
        }
    }

    impl Backend for Counting {
        type Command = ();
        const NAME: &'static str = "test";
        fn run_worker(&self, ctx: WorkerCtx<()>, ready: Ready) {
            if self.fail_setup {
                ready(Err("no".to_string()));
                return;
            }
            ready(Ok(()));
            let mut commands = Vec::new();
            loop {
                sys_wait(&ctx);
                ctx.me.take_commands(&mut commands);
                for c in commands.drain(..) {
                    match c {
                        Command::Backend(()) => {
                            self.seen.fetch_add(1, Ordering::SeqCst);
                        }
                        Command::Close { ack, .. } => {
                            if let Some(a) = ack {
                                a.ack()
                            }
                        }
                        Command::Shutdown => return,
                    }
                }
            }
        }
    }

    fn sys_wait(ctx: &WorkerCtx<()>) {
        if crate::transport::sys::poll_readable(ctx.me.eventfd(), 1000) {
            ctx.me.consume_eventfd();
            ctx.me.rearm_wake();
        }
    }

    #[test]
    fn equal_backends_share_a_runtime_that_stops_with_its_last_user() {
        let seen = Arc::new(AtomicUsize::new(0));
        let backend = Counting {
            fail_setup: false,
            seen: seen.clone(),
        };
        let a = get_runtime(&backend, 3).unwrap();
        let b = get_runtime(&backend, 3).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.workers(), 3);
        let other = get_runtime(&backend, 2).unwrap();
        assert!(!Arc::ptr_eq(&a, &other));
        for i in 0..3 {
            a.worker(i).push_backend(());
        }
        // Each worker acknowledges the close only after the command queued before it.
        a.close_endpoint(1, None);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        drop((a, b, other));
        assert!(!runtime_alive(&backend, 3));
        assert!(!runtime_alive(&backend, 2));
    }

    #[test]
    fn failed_worker_setup_is_an_error() {
        let backend = Counting {
            fail_setup: true,
            seen: Arc::new(AtomicUsize::new(0)),
        };
        let err = get_runtime(&backend, 2).unwrap_err();
        assert!(err.contains("no"), "{err}");
        assert!(!runtime_alive(&backend, 2));
    }
}
