//! Coarse deadlines for the steps that set up a connection (a data channel's hello, a connect),
//! all bounded by one limit, `handshake_timeout`.
//!
//! Why not `tokio::time::timeout` per step: tokio wakes its own driver (an eventfd write, and
//! one more `epoll_wait` to read it) whenever a timer is armed earlier than the next one it
//! sleeps for, which a step's timer always is (the others are heartbeats and idle limits):
//! three times per visitor connection across the server and the client. Here a step that
//! must wait is put at the back of one queue (same limit for all, so the queue is in deadline
//! order) and one task with one timer expires the queue's front. Steps that finish leave a
//! dead entry, dropped from the front as new steps arrive, so the queue holds about as many
//! entries as steps are in progress.
//!
//! The same queue also tells a long step, without cutting it, that it has lasted the limit
//! ([`Deadlines::meanwhile`]): the client turns TCP keepalive on for a data channel that
//! outlives a short connection that way, rather than with three system calls per channel.
//!
//! Invariants: a step is never cut (or told) before its limit has passed since it first
//! waited; it may be up to [`GRAIN`] later (the sweeping task wakes at most once per grain).
//! A step that finishes without waiting costs no entry and reads no clock.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How late a deadline may fire, and so how often the sweeping task may wake at most.
pub(crate) const GRAIN: Duration = Duration::from_millis(100);

/// One limit for many steps, and the task that enforces it. Dropping it stops the task; steps
/// still running then are no longer cut.
pub(crate) struct Deadlines {
    shared: Arc<Shared>,
    sweeper: JoinHandle<()>,
}

struct Shared {
    limit: Duration,
    /// Steps waiting, in the order they first waited (and so of their deadlines).
    queue: Mutex<VecDeque<(Instant, Weak<Step>)>>,
    /// Tells the sweeping task the queue is no longer empty.
    armed: Notify,
}

/// A step that waits: whether its deadline passed, and who to tell.
struct Step {
    expired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Deadlines {
    /// Starts the sweeping task on the current runtime.
    pub(crate) fn start(limit: Duration) -> Deadlines {
        let shared = Arc::new(Shared {
            limit,
            queue: Mutex::new(VecDeque::new()),
            armed: Notify::new(),
        });
        let sweeper = tokio::spawn(sweep(shared.clone()));
        Deadlines { shared, sweeper }
    }

    /// Runs `step`; `None` if it was still waiting when its limit (plus at most [`GRAIN`])
    /// had passed since it first waited.
    pub(crate) async fn within<F: Future>(&self, step: F) -> Option<F::Output> {
        let mut step = std::pin::pin!(step);
        let mut entry: Option<Arc<Step>> = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = step.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            let entry = entry.get_or_insert_with(|| self.shared.enter());
            *entry.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            // Checked after the waker is stored: an expiry before it would find no waker.
            if entry.expired.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// Runs `step` to its end; if it is still waiting once the limit (plus at most
    /// [`GRAIN`]) has passed since it first waited, calls `late` once, between two polls of
    /// `step` (so `late` may use what `step` borrows), and goes on.
    pub(crate) async fn meanwhile<F: Future>(&self, step: F, late: impl FnOnce()) -> F::Output {
        let mut step = std::pin::pin!(step);
        let mut late = Some(late);
        let mut entry: Option<Arc<Step>> = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = step.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            if late.is_none() {
                return Poll::Pending;
            }
            let waiting = entry.get_or_insert_with(|| self.shared.enter());
            {
                let mut waker = waiting.waker.lock().unwrap_or_else(|e| e.into_inner());
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
            }
            // Checked after the waker is stored: an expiry before it would find no waker.
            if waiting.expired.load(Ordering::Acquire)
                && let Some(late) = late.take()
            {
                late();
                // Its queue entry is dead now; the step goes on without one.
                entry = None;
            }
            Poll::Pending
        })
        .await
    }
}

impl Drop for Deadlines {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Weak<Step>)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a step that has started waiting now.
    fn enter(&self) -> Arc<Step> {
        let step = Arc::new(Step {
            expired: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        let mut queue = self.lock();
        while queue.front().is_some_and(|(_, s)| s.strong_count() == 0) {
            queue.pop_front();
        }
        let was_empty = queue.is_empty();
        queue.push_back((Instant::now() + self.limit, Arc::downgrade(&step)));
        drop(queue);
        if was_empty {
            self.armed.notify_one();
        }
        step
    }

    /// Expires the steps whose deadline is `now` or earlier; the next deadline, if any.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        let next = {
            let mut queue = self.lock();
            loop {
                match queue.front() {
                    Some((at, step)) if *at <= now || step.strong_count() == 0 => {
                        if let Some(step) = step.upgrade() {
                            expired.push(step);
                        }
                        queue.pop_front();
                    }
                    Some((at, _)) => break Some(*at),
                    None => break None,
                }
            }
        };
        for step in expired {
            step.expired.store(true, Ordering::Release);
            if let Some(waker) = step.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
                waker.wake();
            }
        }
        next
    }
}

/// Sleeps until the queue's front is due (but at most once per [`GRAIN`]) and expires what is.
async fn sweep(shared: Arc<Shared>) {
    let mut last = Instant::now();
    loop {
        match shared.expire(Instant::now()) {
            None => shared.armed.notified().await,
            Some(at) => tokio::time::sleep_until(at.max(last + GRAIN)).await,
        }
        last = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_step_that_finishes_in_time_gives_its_output_and_leaves_no_live_entry() {
        let deadlines = Deadlines::start(Duration::from_secs(5));
        assert_eq!(deadlines.within(async { 7 }).await, Some(7));
        let waited = deadlines
            .within(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                8
            })
            .await;
        assert_eq!(waited, Some(8));
        let queue = deadlines.shared.lock();
        assert!(
            queue.iter().all(|(_, step)| step.strong_count() == 0),
            "only dead entries are left"
        );
    }

    #[tokio::test]
    async fn a_step_still_waiting_after_the_limit_is_cut_within_a_grain() {
        let limit = Duration::from_millis(300);
        let deadlines = Deadlines::start(limit);
        let start = Instant::now();
        let cut = deadlines.within(std::future::pending::<()>()).await;
        let waited = start.elapsed();
        assert_eq!(cut, None);
        assert!(waited >= limit, "cut after {waited:?}");
        // A grain late at most, plus what a busy machine adds.
        assert!(waited < Duration::from_secs(3), "cut after {waited:?}");
    }

    #[tokio::test]
    async fn a_long_step_is_told_once_when_it_has_lasted_the_limit_and_goes_on() {
        let limit = Duration::from_millis(200);
        let deadlines = Deadlines::start(limit);
        let told = std::cell::Cell::new(None);
        let start = Instant::now();
        let out = deadlines
            .meanwhile(
                async {
                    tokio::time::sleep(limit * 3).await;
                    9
                },
                || told.set(Some(start.elapsed())),
            )
            .await;
        assert_eq!(out, 9, "the step ran to its end");
        let told = told.get().expect("the step was told");
        assert!(told >= limit && told < limit * 3, "told after {told:?}");

        let quick = std::cell::Cell::new(false);
        let out = deadlines
            .meanwhile(
                async {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    3
                },
                || quick.set(true),
            )
            .await;
        assert_eq!(out, 3);
        tokio::time::sleep(limit * 2).await;
        assert!(!quick.get(), "a step that ended in time is never told");
    }

    #[tokio::test]
    async fn steps_started_at_different_times_are_each_cut_at_their_own_deadline() {
        let limit = Duration::from_millis(300);
        let deadlines = Arc::new(Deadlines::start(limit));
        let start = Instant::now();
        let first = {
            let deadlines = deadlines.clone();
            tokio::spawn(async move {
                deadlines.within(std::future::pending::<()>()).await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = deadlines.within(std::future::pending::<()>()).await;
        let first = first.await.unwrap();
        assert_eq!(second, None);
        let both = start.elapsed();
        assert!(
            first >= limit && first < Duration::from_secs(3),
            "{first:?}"
        );
        assert!(both >= limit + Duration::from_millis(200), "{both:?}");
    }
}
