//! Gives the heap a load freed back to the system once the load ends. glibc keeps it: after
//! 1000 streams ferry held some 61 MiB at rest, 24–29 MiB with the trim (BENCHMARKS.md,
//! "Memory after a load"). It lowers what an idle ferry holds, not a load's peak. jemalloc,
//! the static build's allocator, returns freed pages on its own, so there is nothing to do
//! there.

/// Starts the task that trims glibc's heap each time the blob streams served fall to none and
/// stay so for a second. A no-op with any other allocator.
pub fn trim_after_loads() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(glibc::trim_after_loads());
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::time::{Duration, Instant};

    /// How often the blob streams are counted.
    const TICK: Duration = Duration::from_secs(1);

    pub(super) async fn trim_after_loads() {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Streams seen since the last trim, and whether the previous count was none.
        let (mut busy, mut idle_before) = (false, false);
        loop {
            tick.tick().await;
            let idle = ferry_core::chunks::in_use().0 == 0;
            busy |= !idle;
            if busy && idle && idle_before {
                let started = Instant::now();
                // SAFETY: malloc_trim takes glibc's own arena locks and touches only memory
                // that glibc holds free; it may be called from any thread at any time.
                let released = unsafe { libc::malloc_trim(0) } == 1;
                tracing::debug!(
                    released,
                    took_us = started.elapsed().as_micros() as u64,
                    "load ended: heap trimmed"
                );
                busy = false;
            }
            idle_before = idle;
        }
    }
}
