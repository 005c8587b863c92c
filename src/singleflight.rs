//! Single-flight: concurrent callers with the same key share one run of the work.
//!
//! The work runs in a task of its own, so a caller that hangs up never cancels it for the
//! others. The task owns a drop guard that removes its entry from the map, so a finished, a
//! panicked and an aborted flight all leave the key free for the next caller: no stale entry
//! can poison a key until restart.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

/// Why a flight produced no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlightError {
    /// The work panicked.
    #[error("the shared work panicked")]
    Panicked,
    /// The work's task was cancelled (the runtime is shutting down).
    #[error("the shared work was cancelled")]
    Cancelled,
}

/// The shared result of one flight.
type Flight<T> = Shared<BoxFuture<'static, Result<T, FlightError>>>;

/// One entry: the flight and the generation that inserted it.
struct Entry<T> {
    /// Which flight this is; the drop guard removes only its own entry.
    id: u64,
    /// What every caller awaits.
    flight: Flight<T>,
}

/// Flights in progress by key. Cheap to clone (shared map).
pub struct Flights<K, T> {
    /// In-progress flights.
    map: Arc<Mutex<HashMap<K, Entry<T>>>>,
    /// Source of flight ids.
    next_id: Arc<AtomicU64>,
}

impl<K, T> Clone for Flights<K, T> {
    fn clone(&self) -> Self {
        Flights {
            map: Arc::clone(&self.map),
            next_id: Arc::clone(&self.next_id),
        }
    }
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Flights {
            map: Arc::new(Mutex::new(HashMap::new())),
            next_id: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<K, T> std::fmt::Debug for Flights<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights")
            .field(
                "in_flight",
                &self.map.lock().unwrap_or_else(|p| p.into_inner()).len(),
            )
            .finish()
    }
}

/// A caller's place in a flight.
pub struct Joined<T> {
    /// Resolves to the flight's result.
    pub flight: Flight<T>,
    /// True for the caller that started the work; false for callers that joined it.
    pub leader: bool,
}

/// Removes a flight's entry when the task that runs it ends, however it ends.
struct RemoveOnDrop<K: Hash + Eq, T> {
    /// The map to remove from.
    map: Arc<Mutex<HashMap<K, Entry<T>>>>,
    /// The key of this flight.
    key: Option<K>,
    /// This flight's id, so a newer flight under the same key is left alone.
    id: u64,
}

impl<K: Hash + Eq, T> Drop for RemoveOnDrop<K, T> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key).is_some_and(|e| e.id == self.id) {
            map.remove(&key);
        }
    }
}

impl<K, T> Flights<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// An empty set of flights.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry<T>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the flight for `key`, or starts `work` as a new one. Must be called within a
    /// tokio runtime. `work` is dropped unused when a flight is already running.
    pub fn join<F>(&self, key: K, work: F) -> Joined<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut map = self.lock();
        if let Some(e) = map.get(&key) {
            return Joined {
                flight: e.flight.clone(),
                leader: false,
            };
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let guard = RemoveOnDrop {
            map: Arc::clone(&self.map),
            key: Some(key.clone()),
            id,
        };
        // Spawned while the map is locked: the guard cannot run before the entry exists.
        let task = tokio::spawn(async move {
            let _guard = guard;
            work.await
        });
        let flight = async move {
            task.await.map_err(|e| {
                if e.is_panic() {
                    FlightError::Panicked
                } else {
                    FlightError::Cancelled
                }
            })
        }
        .boxed()
        .shared();
        map.insert(
            key,
            Entry {
                id,
                flight: flight.clone(),
            },
        );
        Joined {
            flight,
            leader: true,
        }
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn counted(
        calls: &Arc<AtomicUsize>,
        value: u32,
        delay: Duration,
    ) -> impl Future<Output = u32> + Send + 'static {
        let calls = Arc::clone(calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            value
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_run() {
        let flights: Flights<&str, u32> = Flights::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..200 {
            let j = flights.join("k", counted(&calls, 7, Duration::from_secs(1)));
            waiters.push(j);
        }
        assert_eq!(waiters.iter().filter(|j| j.leader).count(), 1);
        for j in waiters {
            assert_eq!(j.flight.await, Ok(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty(), "a finished flight frees its key");
        // The next caller starts a new run.
        let j = flights.join("k", counted(&calls, 8, Duration::ZERO));
        assert!(j.leader);
        assert_eq!(j.flight.await, Ok(8));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_does_not_poison_the_key() {
        let flights: Flights<&str, u32> = Flights::new();
        let a = flights.join("k", async { panic!("boom") });
        let b = flights.join("k", async { 1 });
        assert!(!b.leader);
        assert_eq!(a.flight.await, Err(FlightError::Panicked));
        assert_eq!(b.flight.await, Err(FlightError::Panicked));
        assert!(flights.is_empty());
        let c = flights.join("k", async { 2 });
        assert!(c.leader);
        assert_eq!(c.flight.await, Ok(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_caller_does_not_cancel_the_work() {
        let flights: Flights<&str, u32> = Flights::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let d = Arc::clone(&done);
        let c = Arc::clone(&calls);
        let leader = flights.join("k", async move {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(5)).await;
            d.fetch_add(1, Ordering::SeqCst);
            3
        });
        // The only caller hangs up before the work finishes.
        let hung_up = tokio::time::timeout(Duration::from_secs(1), leader.flight).await;
        assert!(hung_up.is_err());
        assert_eq!(flights.len(), 1, "the work is still in flight");
        // A later caller joins the same run and gets its result.
        let late = flights.join("k", counted(&calls, 9, Duration::ZERO));
        assert!(!late.leader);
        assert_eq!(late.flight.await, Ok(3));
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn different_keys_run_separately() {
        let flights: Flights<u8, u8> = Flights::new();
        let a = flights.join(1, async { 1 });
        let b = flights.join(2, async { 2 });
        assert!(a.leader && b.leader);
        assert_eq!((a.flight.await, b.flight.await), (Ok(1), Ok(2)));
    }
}
