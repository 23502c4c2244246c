//! The threads guest code runs on: per priority a few threads, each driving a single-threaded
//! Tokio runtime of its own, created once per process and never stopped.
//!
//! One runtime per thread, not one runtime over all of them, so that everything a call sets
//! going stays on the thread it started on: the guest, the task wasi-http sends its request
//! from, and the task driving the kept-alive connection (see `outgoing`). With a work-stealing
//! runtime those tasks woke each other across threads on every request (an eventfd write and
//! a context switch each way), which cost about a fifth of a pooled webhook call's CPU. What
//! is given up is stealing: a task waits for its own thread even when another is idle. New
//! tasks go to the thread with the fewest, and a connector that burns CPU is demoted to the
//! low-priority threads, so no thread collects a queue behind one busy guest.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

/// A fixed set of hook threads.
pub struct HookThreads {
    first: Thread,
    rest: Vec<Thread>,
}

struct Thread {
    handle: Handle,
    /// Tasks placed here that have not finished. Tokio's own count of alive tasks would also
    /// count the long-lived ones a call leaves behind (a kept connection, the pool's reaper),
    /// and steer sequential calls away from the thread that holds their connection.
    busy: Arc<AtomicUsize>,
}

/// Counts a placed task until it finishes (or is dropped unfinished).
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HookThreads {
    /// Starts `count` threads named `name` (at least one); each runs `on_start` first.
    pub(super) fn start(name: &str, count: usize, on_start: fn()) -> std::io::Result<Self> {
        let mut threads = Vec::with_capacity(count);
        for _ in 0..count.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let thread_name = name.to_owned();
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    on_start();
                    let built = tokio::runtime::Builder::new_current_thread()
                        .thread_name(thread_name)
                        .enable_all()
                        .build();
                    match built {
                        Ok(runtime) => {
                            // The receiver waits for exactly this message; if it is gone the
                            // process is failing to start and the thread idles harmlessly.
                            let _ = tx.send(Ok(runtime.handle().clone()));
                            runtime.block_on(std::future::pending::<()>());
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })?;
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other("a hook thread ended while starting"))??;
            threads.push(Thread {
                handle,
                busy: Arc::default(),
            });
        }
        let mut threads = threads.into_iter();
        let first = threads
            .next()
            .ok_or_else(|| std::io::Error::other("no hook thread started"))?;
        Ok(HookThreads {
            first,
            rest: threads.collect(),
        })
    }

    /// Places `task` on the thread with the fewest unfinished placed tasks (the first of
    /// equals: sequential calls keep to one thread and its kept connections), and answers
    /// where to spawn it and the task to spawn there.
    pub fn place<F>(&self, task: F) -> (&Handle, impl Future<Output = F::Output> + use<F>)
    where
        F: Future,
    {
        let load = |t: &Thread| t.busy.load(Ordering::Relaxed);
        let thread =
            self.rest.iter().fold(
                &self.first,
                |best, t| {
                    if load(t) < load(best) { t } else { best }
                },
            );
        thread.busy.fetch_add(1, Ordering::Relaxed);
        let busy = Busy(thread.busy.clone());
        (&thread.handle, async move {
            let _busy = busy;
            task.await
        })
    }

    /// Spawns `task` where [`HookThreads::place`] puts it.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (handle, task) = self.place(task);
        handle.spawn(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_spawned_by_a_task_stay_on_its_thread() {
        let threads = HookThreads::start("test-hooks", 2, || {}).unwrap();
        for _ in 0..8 {
            let same = threads
                .spawn(async {
                    let outer = std::thread::current().id();
                    let inner = tokio::spawn(async { std::thread::current().id() })
                        .await
                        .unwrap();
                    outer == inner
                })
                .await
                .unwrap();
            assert!(
                same,
                "a task spawned from a hook task ran on another thread"
            );
        }
    }

    #[tokio::test]
    async fn sequential_tasks_keep_to_one_thread_and_concurrent_ones_spread() {
        let threads = HookThreads::start("test-hooks", 2, || {}).unwrap();
        let here = || async { std::thread::current().id() };
        let first = threads.spawn(here()).await.unwrap();
        for _ in 0..4 {
            assert_eq!(threads.spawn(here()).await.unwrap(), first);
        }
        // While one task runs on the first thread, the next goes to the other.
        let (hold, wait) = tokio::sync::oneshot::channel::<()>();
        let busy = threads.spawn(async move {
            let _ = wait.await;
        });
        let other = threads.spawn(here()).await.unwrap();
        assert_ne!(other, first);
        hold.send(()).unwrap();
        busy.await.unwrap();
        assert_eq!(threads.spawn(here()).await.unwrap(), first);
    }
}
