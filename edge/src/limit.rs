//! The connection limit (`max_connections`): a semaphore whose size follows the config across
//! reloads, and the permit each client connection holds until it closes, an upgraded
//! (WebSocket) one included.
//!
//! Invariant: open connections never exceed the limit last configured, once the connections
//! opened under a higher one have closed. Raising the limit adds permits at once; lowering it
//! takes free permits away at once and the rest as connections close (their permits are
//! forgotten instead of given back while a debt is left).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// How many client connections may be open at once.
#[derive(Debug)]
pub(crate) struct ConnLimit {
    permits: Arc<Semaphore>,
    /// The configured limit.
    size: Mutex<usize>,
    /// Permits still to take away after a lower limit, as connections close.
    debt: Arc<AtomicUsize>,
}

/// One connection's place under the limit, held until the connection (and its upgrade) ends.
#[derive(Debug)]
pub(crate) struct ConnPermit {
    permit: Option<OwnedSemaphorePermit>,
    debt: Arc<AtomicUsize>,
}

impl ConnLimit {
    /// A limit of `size` connections.
    pub(crate) fn new(size: usize) -> ConnLimit {
        ConnLimit {
            permits: Arc::new(Semaphore::new(size)),
            size: Mutex::new(size),
            debt: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Waits for a free place.
    pub(crate) async fn acquire(&self) -> Result<ConnPermit, AcquireError> {
        let permit = self.permits.clone().acquire_owned().await?;
        Ok(ConnPermit {
            permit: Some(permit),
            debt: self.debt.clone(),
        })
    }

    /// Takes a free place if there is one (a QUIC connection cannot wait in a backlog: one
    /// over the limit is refused and its client falls back to TCP).
    pub(crate) fn try_acquire(&self) -> Option<ConnPermit> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(ConnPermit {
            permit: Some(permit),
            debt: self.debt.clone(),
        })
    }

    /// Makes the limit `size` (a reload changed `max_connections`).
    pub(crate) fn resize(&self, size: usize) {
        let mut current = self.size.lock().expect("the limit lock is never poisoned");
        if size > *current {
            let grow = size - *current;
            // Permits still owed were never taken away: cancelling the debt gives them back.
            let mut paid = 0;
            let _ = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                    paid = debt.min(grow);
                    Some(debt - paid)
                });
            self.permits.add_permits(grow - paid);
        } else if size < *current {
            let shrink = *current - size;
            let taken = self.permits.forget_permits(shrink);
            self.debt.fetch_add(shrink - taken, Ordering::AcqRel);
        }
        *current = size;
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let owed = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if owed {
            permit.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lower_limit_takes_effect_as_connections_close() {
        let limit = ConnLimit::new(3);
        let a = limit.acquire().await.unwrap();
        let b = limit.acquire().await.unwrap();
        limit.resize(1);
        assert_eq!(limit.permits.available_permits(), 0);
        drop(a);
        assert_eq!(
            limit.permits.available_permits(),
            0,
            "b is still over the limit"
        );
        drop(b);
        assert_eq!(limit.permits.available_permits(), 1);
        limit.resize(2);
        assert_eq!(limit.permits.available_permits(), 2);
    }

    #[tokio::test]
    async fn raising_the_limit_first_cancels_what_is_still_owed() {
        let limit = ConnLimit::new(2);
        let a = limit.acquire().await.unwrap();
        let b = limit.acquire().await.unwrap();
        limit.resize(0);
        limit.resize(1);
        drop(a);
        drop(b);
        assert_eq!(limit.permits.available_permits(), 1);
    }
}
