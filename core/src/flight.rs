//! Single flight: one run of a piece of work per key, however many callers ask for it at
//! once; the others wait for that run and share its result. The work runs as a task of its
//! own, so it finishes (and whoever still waits gets the result) even when the caller that
//! started it goes away; a caller that comes after it ended starts a new run — unless the run
//! failed less than the failure memory ago: then that failure is the answer (an export that
//! fails is not repeated for every request that comes in right after).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};

use crate::error::{Error, Result};

type Running<T> = Shared<BoxFuture<'static, Result<T>>>;

struct State<T: Clone> {
    running: HashMap<String, Running<T>>,
    /// Recent failures, by key, with when they happened.
    failed: HashMap<String, (Instant, Error)>,
}

/// The runs under way, by key.
pub struct Flights<T: Clone> {
    state: Arc<Mutex<State<T>>>,
    failure_memory: Duration,
}

impl<T: Clone> Default for Flights<T> {
    fn default() -> Self {
        Flights::remembering_failures(Duration::ZERO)
    }
}

impl<T: Clone> Flights<T> {
    /// Flights whose failures answer later callers for `memory`.
    pub fn remembering_failures(memory: Duration) -> Self {
        Flights {
            state: Arc::new(Mutex::new(State {
                running: HashMap::new(),
                failed: HashMap::new(),
            })),
            failure_memory: memory,
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Runs `work` for `key` unless a run for it is under way, and waits for that run.
    /// `work` is dropped unrun when another caller's run is used.
    pub async fn run<F>(&self, key: &str, work: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let shared = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let memory = self.failure_memory;
            state.failed.retain(|_, (at, _)| at.elapsed() < memory);
            if let Some((_, e)) = state.failed.get(key) {
                return Err(e.clone());
            }
            if let Some(r) = state.running.get(key) {
                r.clone()
            } else {
                let map = self.state.clone();
                let owned_key = key.to_string();
                // Spawned while the map is locked: the task's removal of its key waits until
                // the key is in, so a run never stays behind after it ended.
                let task = tokio::spawn(async move {
                    let out = work.await;
                    let mut state = map.lock().unwrap_or_else(PoisonError::into_inner);
                    state.running.remove(&owned_key);
                    if let (Err(e), false) = (&out, memory.is_zero()) {
                        state.failed.insert(owned_key, (Instant::now(), e.clone()));
                    }
                    out
                });
                let r = async move {
                    task.await
                        .unwrap_or_else(|e| Err(Error::Internal(format!("background work failed: {e}"))))
                }
                .boxed()
                .shared();
                state.running.insert(key.to_string(), r.clone());
                r
            }
        };
        shared.await
    }

    /// Keys with a run under way.
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).running.len()
    }

    /// Forgets a remembered failure of `key` (something changed that may fix it).
    pub fn forget_failure(&self, key: &str) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_its_failure() {
        let flights = Arc::new(Flights::<u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut callers = Vec::new();
        for _ in 0..5 {
            let (flights, runs) = (flights.clone(), runs.clone());
            callers.push(tokio::spawn(async move {
                flights
                    .run("img", async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err::<u32, _>(Error::Unauthorized {
                            realm: "r".into(),
                            message: "needs credentials".into(),
                            challenge: None,
                        })
                    })
                    .await
            }));
        }
        for c in callers {
            assert!(matches!(c.await.unwrap(), Err(Error::Unauthorized { .. })));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0);
        // After the run ended, a new caller runs again.
        assert_eq!(flights.run("img", async { Ok(7) }).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_failure_is_remembered_for_a_while() {
        // Long enough that no stall of a loaded machine ends it between the two runs.
        let flights = Flights::<u32>::remembering_failures(Duration::from_millis(800));
        let fail = || async { Err::<u32, _>(Error::Internal("export broke".into())) };
        assert!(flights.run("img", fail()).await.is_err());
        // Within the memory: the failure, without a new run.
        let e = flights.run("img", async { Ok(1) }).await.err().unwrap();
        assert!(matches!(e, Error::Internal(ref m) if m == "export broke"));
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(flights.run("img", async { Ok(2) }).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_run_outlives_the_caller_that_started_it() {
        let flights = Arc::new(Flights::<u32>::default());
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        // The run lasts long enough that the second caller joins it however slow the machine.
        let first = flights.run("img", async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            d.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        });
        // The starting caller gives up at once; a second one still gets the run's result.
        let _ = tokio::time::timeout(Duration::from_millis(5), first).await;
        assert_eq!(flights.run("img", async { Ok(2) }).await.unwrap(), 1);
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
