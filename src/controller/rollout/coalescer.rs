//! At most one rollout of a workload per `minInterval`, and the last
//! content always gets its rollout (the trailing edge).
//!
//! The first change after a quiet interval rolls at once; changes inside
//! the interval replace each other as the one pending digest, which rolls
//! when the interval since the last rollout ends. So a burst of changes
//! lasting `D` gives at most `ceil(D / minInterval) + 1` rollouts, however
//! many changes it holds. Pure: the caller reads the workload, writes, and
//! reports back with [`Coalescer::rolled`], [`Coalescer::unchanged`] or
//! [`Coalescer::retry`].

use std::time::Duration;

use tokio::time::Instant;

/// What to do with an offered digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Roll now, to this digest.
    Now(String),
    /// Kept as the pending digest, due at this instant.
    Later(Instant),
    /// The workload already carries this digest (as far as we know).
    Nothing,
}

#[derive(Debug, Clone)]
pub struct Coalescer {
    min_interval: Duration,
    /// When the last rollout was decided.
    last_roll: Option<Instant>,
    /// The digest the workload carries, as last read or written.
    known: Option<String>,
    /// The digest waiting for the interval to end, and when it is due.
    pending: Option<(String, Instant)>,
    /// Changes that did not get a rollout of their own, not yet counted.
    coalesced: u64,
}

impl Coalescer {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            last_roll: None,
            known: None,
            pending: None,
            coalesced: 0,
        }
    }

    /// A coalescer whose last rollout was at `last_roll` (one an earlier
    /// process made, read back from status): a restart or a failover keeps
    /// to the interval too.
    pub fn resumed(min_interval: Duration, last_roll: Option<Instant>) -> Self {
        Self {
            last_roll,
            ..Self::new(min_interval)
        }
    }

    /// The content changed to `digest` at `now`.
    pub fn offer(&mut self, digest: &str, now: Instant) -> Offer {
        if self.known.as_deref() == Some(digest) {
            // back to what the workload runs: a pending change is dropped
            if self.pending.take().is_some() {
                self.coalesced += 1;
            }
            return Offer::Nothing;
        }
        if self.pending.as_ref().is_some_and(|(d, _)| d == digest) {
            return Offer::Later(self.pending.as_ref().map_or(now, |(_, at)| *at));
        }
        let ready = self.last_roll.map(|at| at + self.min_interval);
        match ready {
            Some(ready) if now < ready => {
                let due = self.pending.as_ref().map_or(ready, |(_, at)| *at);
                if self.pending.replace((digest.to_owned(), due)).is_some() {
                    self.coalesced += 1;
                }
                Offer::Later(due)
            }
            _ => {
                if self.pending.take().is_some() {
                    self.coalesced += 1;
                }
                Offer::Now(digest.to_owned())
            }
        }
    }

    /// When the pending digest is due.
    pub fn due(&self) -> Option<Instant> {
        self.pending.as_ref().map(|(_, at)| *at)
    }

    /// The pending digest, once it is due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<String> {
        match &self.pending {
            Some((_, at)) if *at <= now => self.pending.take().map(|(d, _)| d),
            _ => None,
        }
    }

    /// The rollout to `digest`, decided at `at`, was written.
    pub fn rolled(&mut self, digest: &str, at: Instant) {
        self.last_roll = Some(at);
        self.known = Some(digest.to_owned());
    }

    /// The workload already carried `digest`: nothing was written.
    pub fn unchanged(&mut self, digest: &str) {
        self.known = Some(digest.to_owned());
    }

    /// The rollout to `digest` failed: try again at `at`, unless a newer
    /// change is offered first.
    pub fn retry(&mut self, digest: &str, at: Instant) {
        self.known = None;
        if self.pending.is_none() {
            self.pending = Some((digest.to_owned(), at));
        }
    }

    /// Forgets what the workload carries (a standby, or a failed write):
    /// the next offer reads it again.
    pub fn forget(&mut self) {
        self.known = None;
        self.pending = None;
    }

    /// Changes coalesced away since the last call.
    pub fn take_coalesced(&mut self) -> u64 {
        std::mem::take(&mut self.coalesced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(5);

    /// Feeds `changes` (digest, offset) and rolls whatever is due as a
    /// caller would; returns the rollouts as (digest, offset).
    async fn drive(c: &mut Coalescer, changes: &[(&str, Duration)]) -> Vec<(String, Duration)> {
        let start = Instant::now();
        let mut rolled = Vec::new();
        let roll = |c: &mut Coalescer, d: String, rolled: &mut Vec<(String, Duration)>| {
            let now = Instant::now();
            c.rolled(&d, now);
            rolled.push((d, now - start));
        };
        for (digest, at) in changes {
            // roll what falls due before this change
            while let Some(due) = c.due().filter(|d| *d <= start + *at) {
                tokio::time::sleep_until(due).await;
                let d = c.take_due(Instant::now()).unwrap();
                roll(c, d, &mut rolled);
            }
            tokio::time::sleep_until(start + *at).await;
            if let Offer::Now(d) = c.offer(digest, Instant::now()) {
                roll(c, d, &mut rolled);
            }
        }
        while let Some(due) = c.due() {
            tokio::time::sleep_until(due).await;
            let d = c.take_due(Instant::now()).unwrap();
            roll(c, d, &mut rolled);
        }
        rolled
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_after_a_quiet_interval_rolls_at_once() {
        let mut c = Coalescer::new(MIN);
        let rolled = drive(
            &mut c,
            &[("a", Duration::ZERO), ("b", Duration::from_secs(10))],
        )
        .await;
        assert_eq!(
            rolled,
            [
                ("a".into(), Duration::ZERO),
                ("b".into(), Duration::from_secs(10))
            ]
        );
        assert_eq!(c.take_coalesced(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_rolls_at_most_once_per_interval_and_always_delivers_the_last() {
        let mut c = Coalescer::new(MIN);
        // 10,000 changes over 12 s
        let changes: Vec<(String, Duration)> = (0..10_000u64)
            .map(|i| (format!("d{i}"), Duration::from_micros(i * 1_200)))
            .collect();
        let refs: Vec<(&str, Duration)> = changes.iter().map(|(d, t)| (d.as_str(), *t)).collect();
        let rolled = drive(&mut c, &refs).await;
        let burst = changes.last().unwrap().1;
        let bound = burst.as_secs_f64() / MIN.as_secs_f64();
        assert!(rolled.len() as f64 <= bound.ceil() + 1.0, "{rolled:?}");
        assert_eq!(rolled.last().unwrap().0, "d9999", "the last content rolls");
        for pair in rolled.windows(2) {
            assert!(pair[1].1 - pair[0].1 >= MIN, "{rolled:?}");
        }
        assert_eq!(c.take_coalesced() + rolled.len() as u64, 10_000);
        assert_eq!(c.take_coalesced(), 0, "taken once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_digest_the_workload_carries_rolls_nothing() {
        let mut c = Coalescer::new(MIN);
        c.unchanged("a");
        assert_eq!(c.offer("a", Instant::now()), Offer::Nothing);
        assert_eq!(c.offer("b", Instant::now()), Offer::Now("b".into()));
        c.rolled("b", Instant::now());
        // a change and its undo inside the interval roll nothing
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(c.offer("c", Instant::now()), Offer::Later(_)));
        assert_eq!(c.offer("b", Instant::now()), Offer::Nothing);
        assert_eq!(c.due(), None);
        assert_eq!(c.take_coalesced(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_coalescer_keeps_to_the_interval_of_the_last_rollout() {
        let now = Instant::now();
        let mut c = Coalescer::resumed(MIN, Some(now));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            c.offer("a", Instant::now()),
            Offer::Later(now + MIN),
            "a rollout 2 s ago: the next waits 3 s more"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_rollout_is_retried_unless_a_newer_change_comes_first() {
        let mut c = Coalescer::new(MIN);
        let now = Instant::now();
        assert_eq!(c.offer("a", now), Offer::Now("a".into()));
        c.retry("a", now + Duration::from_secs(2));
        assert_eq!(c.due(), Some(now + Duration::from_secs(2)));
        assert_eq!(c.take_due(now + Duration::from_secs(1)), None);
        assert_eq!(c.take_due(now + Duration::from_secs(2)), Some("a".into()));
        c.retry("a", now + Duration::from_secs(4));
        // nothing rolled yet: a newer change goes at once
        assert_eq!(
            c.offer("b", now + Duration::from_secs(3)),
            Offer::Now("b".into())
        );
        assert_eq!(c.due(), None);
    }
}
