//! `Backoff`: capped, jittered exponential delays for every retry loop in the workspace.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter.
///
/// Guarantees: every delay is in `[initial / 2, max]`; the cap doubles from `initial` up to
/// `max` and returns to `initial` on [`reset`](Backoff::reset).
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.current;
        // Checked: a cap of `Duration::MAX` ("no cap") would overflow the doubling.
        self.current = self
            .current
            .checked_mul(2)
            .unwrap_or(self.max)
            .min(self.max);
        let low = cap / 2;
        let span = u64::try_from(cap.saturating_sub(low).as_millis()).unwrap_or(u64::MAX);
        let jitter = if span == 0 {
            0
        } else {
            rand::thread_rng().gen_range(0..=span)
        };
        low.saturating_add(Duration::from_millis(jitter))
    }

    /// Starts over from the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_growing() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        assert_eq!(b.current, Duration::from_secs(2));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn no_cap_never_overflows() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::MAX);
        let mut last = Duration::ZERO;
        for _ in 0..200 {
            last = b.next_delay();
        }
        assert!(last >= Duration::from_secs(3600), "{last:?}");
    }
}
