//! Sliding one-second windows over grant-request arrivals: Money's own rate limit and the
//! peak-rate metric (`max_requests_in_any_second`) that tells whether payoutd kept its limit.
//!
//! Times are offsets from the simulator's start so tests can feed synthetic sequences. A time
//! earlier than the latest one counted counts as that latest one: requests received a little
//! apart can be handled in the other order.

use std::collections::VecDeque;
use std::time::Duration;

const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Admitted,
    RateLimited,
}

#[derive(Debug, Default)]
pub(crate) struct Windows {
    /// Every arrival of the last second.
    arrivals: VecDeque<Duration>,
    /// Admitted arrivals of the last second; the rate limit counts only these.
    admitted: VecDeque<Duration>,
    limit_per_sec: u32,
    requests_total: u64,
    max_in_window: u64,
}

impl Windows {
    pub(crate) fn new(limit_per_sec: u32) -> Self {
        Windows { limit_per_sec, ..Windows::default() }
    }

    pub(crate) fn limit_per_sec(&self) -> u32 {
        self.limit_per_sec
    }

    /// Takes effect for the next arrival; the admitted history is kept, so lowering the limit
    /// mid-second can reject until the window has slid past earlier admissions.
    pub(crate) fn set_limit_per_sec(&mut self, limit_per_sec: u32) {
        self.limit_per_sec = limit_per_sec;
    }

    pub(crate) fn requests_total(&self) -> u64 {
        self.requests_total
    }

    /// The latest arrival counted (zero before any).
    pub(crate) fn latest(&self) -> Duration {
        self.arrivals.back().copied().unwrap_or_default()
    }

    /// The most arrivals in any half-open window `[t, t + 1s)` so far.
    pub(crate) fn max_in_window(&self) -> u64 {
        self.max_in_window
    }

    /// Forgets all history; keeps the limit.
    pub(crate) fn clear(&mut self) {
        *self = Windows::new(self.limit_per_sec);
    }

    /// Records one arrival at `at` (or at the latest arrival, if that is later) and decides whether
    /// the rate limit admits it.
    ///
    /// The busiest half-open window always starts at some arrival, so it is enough to count,
    /// for each arrival `a`, the arrivals in `(a - 1s, a]`.
    pub(crate) fn arrive(&mut self, at: Duration) -> Admission {
        let now = at.max(self.latest());
        self.requests_total += 1;
        evict_older_than_window(&mut self.arrivals, now);
        self.arrivals.push_back(now);
        self.max_in_window = self.max_in_window.max(self.arrivals.len() as u64);

        evict_older_than_window(&mut self.admitted, now);
        if self.limit_per_sec > 0 && self.admitted.len() >= self.limit_per_sec as usize {
            return Admission::RateLimited;
        }
        self.admitted.push_back(now);
        Admission::Admitted
    }
}

fn evict_older_than_window(times: &mut VecDeque<Duration>, now: Duration) {
    while let Some(&oldest) = times.front() {
        if now.saturating_sub(oldest) < WINDOW {
            break;
        }
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn feed(windows: &mut Windows, times_ms: &[u64]) -> Vec<Admission> {
        times_ms.iter().map(|&t| windows.arrive(ms(t))).collect()
    }

    #[test]
    fn the_busiest_half_open_second_is_reported() {
        let cases: &[(&[u64], u64)] = &[
            (&[], 0),
            (&[5], 1),
            // Exactly one second apart: never in the same half-open window.
            (&[0, 1000, 2000, 3000], 1),
            (&[0, 999], 2),
            // {100, 999, 1000, 1001} fits in [100, 1100).
            (&[0, 100, 999, 1000, 1001, 1999, 2000], 4),
            // Same instant counts every request.
            (&[7, 7, 7, 7, 7], 5),
            // A burst of 3, a gap, then a burst of 5.
            (&[0, 10, 20, 1500, 1510, 1520, 1530, 1540], 5),
            // Everything but the last arrival fits in [0, 1000).
            (&[0, 0, 600, 990, 990, 990, 1600], 6),
        ];
        for (times, expected) in cases {
            let mut windows = Windows::new(0);
            feed(&mut windows, times);
            assert_eq!(windows.max_in_window(), *expected, "arrivals {times:?}");
            assert_eq!(windows.requests_total(), times.len() as u64);
        }
    }

    #[test]
    fn rate_limit_counts_admitted_requests_in_the_last_second() {
        use Admission::{Admitted as A, RateLimited as R};
        let mut windows = Windows::new(3);
        let got = feed(&mut windows, &[0, 0, 0, 0, 500, 999, 1000, 1000, 1000, 1000]);
        // At 1000 the three admissions at 0 have left the window (1000 - 1s is excluded).
        assert_eq!(got, vec![A, A, A, R, R, R, A, A, A, R]);
        // Arrivals are counted whether admitted or not: {0 x4, 500, 999} and
        // {500, 999, 1000 x4} both hold six.
        assert_eq!(windows.max_in_window(), 6);
    }

    #[test]
    fn zero_limit_admits_everything() {
        let mut windows = Windows::new(0);
        let got = feed(&mut windows, &[0; 1000]);
        assert!(got.iter().all(|a| *a == Admission::Admitted));
        assert_eq!(windows.max_in_window(), 1000);
    }

    #[test]
    fn clear_keeps_the_limit_and_forgets_history() {
        let mut windows = Windows::new(1);
        feed(&mut windows, &[0, 1]);
        windows.clear();
        assert_eq!(windows.requests_total(), 0);
        assert_eq!(windows.max_in_window(), 0);
        assert_eq!(windows.limit_per_sec(), 1);
        assert_eq!(windows.arrive(ms(2)), Admission::Admitted);
        assert_eq!(windows.arrive(ms(3)), Admission::RateLimited);
    }
}
