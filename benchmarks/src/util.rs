//! Small helpers: errors with context, tasks aborted on drop, percentiles, a counting
//! allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// Every failure of the bench is a message that says what was being done.
pub type BenchResult<T> = Result<T, String>;

/// Adds what was being done to an error.
pub trait Ctx<T> {
    /// `what: error`.
    fn ctx(self, what: impl Display) -> BenchResult<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl Display) -> BenchResult<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// A spawned task that is aborted when this handle is dropped.
pub struct Task(JoinHandle<()>);

impl Task {
    /// Spawns `future` on the current runtime.
    pub fn spawn(future: impl Future<Output = ()> + Send + 'static) -> Task {
        Task(tokio::spawn(future))
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `future` with a deadline; on expiry the error names `what`.
pub async fn within<T>(
    limit: Duration,
    what: impl Display,
    future: impl Future<Output = BenchResult<T>>,
) -> BenchResult<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(format!("{what}: no result within {limit:?}")),
    }
}

/// Microseconds since `start`.
pub fn micros_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6
}

/// The `p`-th percentile (0..=100) of `samples`: the sample at rank `p% x (n - 1)`, rounded
/// (so the p50 of an even count is the upper of the middle two); `None` when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank.min(sorted.len() - 1)).copied()
}

/// The median of `samples` (the mean of the middle two for an even count); `None` when empty.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => sorted.get(mid).copied(),
        _ => Some((sorted.get(mid - 1)? + sorted.get(mid)?) / 2.0),
    }
}

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

/// The system allocator, counting the bytes currently allocated by this process.
pub struct CountingAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        new
    }
}

/// Bytes currently allocated by the whole process (through [`CountingAllocator`]).
pub fn live_bytes() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_rounded_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(51.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
        // Two repetitions: their mean, not the larger.
        assert_eq!(median(&[4.0, 2.0]), Some(3.0));
        assert_eq!(median(&[1.0, 9.0, 2.0, 4.0]), Some(3.0));
    }
}
