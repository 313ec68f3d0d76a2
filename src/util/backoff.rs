//! The one retry backoff: exponential with jitter, from `backon` (the crate
//! kube-runtime already uses for its own retries).
//!
//! Jitter spreads the retries of many bindings (or replicas) that failed
//! together. backon adds a random part of up to the delay itself, so the
//! schedule starts at half of `min` and is capped at half of `max`: the
//! first delay lies in `[min/2, min)`, every delay is at most `max`, and
//! the mean stays close to the plain doubling schedule.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays for retrying a failing operation: `min`, doubling up to `max`,
/// each with jitter; [`reset`](Self::reset) after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min / 2)
            .with_max_delay((max / 2).max(min / 2))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        // without_max_times: the iterator never ends; the fallback is the cap
        self.delays.next().unwrap_or(self.max)
    }

    /// Starts over at the shortest delay.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_within_the_plain_schedule_and_reset() {
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        let mut base = min / 2;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= base && d <= base * 2,
                "{d:?} outside [{base:?}, {:?}]",
                base * 2
            );
            assert!(d <= max);
            base = (base * 2).min(max / 2);
        }
        b.reset();
        let d = b.next_delay();
        assert!(d >= min / 2 && d <= min, "{d:?}");
    }
}
