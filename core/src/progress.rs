//! Progress of long work (an export, an engine pull): a log line every few seconds with the
//! bytes done, the percentage when the total is known, and the rate, so a user watching a
//! first pull of a large image sees it move. Fields, not prose, so the JSON log has them too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static INTERVAL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Sets how often a progress line is written (`server.progress_interval_ms`), before the
/// first; 5 s unless set.
pub fn set_interval(every: Duration) {
    let _ = INTERVAL.set(every);
}

fn interval() -> Duration {
    *INTERVAL.get_or_init(|| Duration::from_secs(5))
}

/// A byte counter for one piece of work; clones share it.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    work: &'static str,
    backend: String,
    image: String,
    started: Instant,
    done: AtomicU64,
    total: AtomicU64,
    last_log: Mutex<Instant>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Progress {
    /// `work` names it in the log (`export`, `pull`); `total` is 0 when unknown.
    pub fn new(work: &'static str, backend: &str, image: &str, total: u64) -> Self {
        let now = Instant::now();
        Progress {
            inner: Arc::new(Inner {
                work,
                backend: backend.to_string(),
                image: image.to_string(),
                started: now,
                done: AtomicU64::new(0),
                total: AtomicU64::new(total),
                last_log: Mutex::new(now),
            }),
        }
    }

    /// Counts `n` more bytes done.
    pub fn add(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
        self.maybe_log();
    }

    /// Sets the bytes done and the total (an engine pull reports both, per layer).
    pub fn set(&self, done: u64, total: u64) {
        self.inner.done.store(done, Ordering::Relaxed);
        self.inner.total.store(total, Ordering::Relaxed);
        self.maybe_log();
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.inner.done.load(Ordering::Relaxed)
    }

    fn rate(&self) -> f64 {
        let secs = self.inner.started.elapsed().as_secs_f64().max(0.001);
        self.done() as f64 / MIB / secs
    }

    fn maybe_log(&self) {
        let Ok(mut last) = self.inner.last_log.try_lock() else {
            return;
        };
        if last.elapsed() < interval() {
            return;
        }
        *last = Instant::now();
        let (done, total) = (self.done(), self.inner.total.load(Ordering::Relaxed));
        // A total that is an estimate (an export's image size) never reads as finished early.
        let percent = (total > 0).then(|| (done as f64 * 100.0 / total as f64).min(99.0).round() as u64);
        tracing::info!(backend = %self.inner.backend, image = %self.inner.image, work = self.inner.work,
            bytes_done = done, total_bytes = (total > 0).then_some(total), percent,
            rate_mib_s = format!("{:.1}", self.rate()),
            elapsed_s = self.inner.started.elapsed().as_secs(), "progress");
    }

    /// The closing line's fields: bytes, seconds, MiB/s.
    pub fn summary(&self) -> (u64, f64, String) {
        (
            self.done(),
            self.inner.started.elapsed().as_secs_f64(),
            format!("{:.1}", self.rate()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_is_added_and_set() {
        let p = Progress::new("export", "docker", "img:1", 0);
        let q = p.clone();
        p.add(10);
        q.add(5);
        assert_eq!(p.done(), 15);
        p.set(100, 200);
        assert_eq!(q.summary().0, 100);
    }
}
