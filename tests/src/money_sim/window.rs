//! Sliding one-second windows over grant-request arrivals: Money's own rate limit and the
//! peak-rate metric (`max_requests_in_any_second`) that tells whether payoutd kept its limit.
//!
//! Times are offsets from the simulator's start so tests can feed synthetic sequences. Requests
//! received a little apart can be handled in the other order, so an arrival may be earlier than
//! ones already counted: it is counted at its own time, in every window that holds it, as long
//! as it is at most [`MAX_DISORDER`] before the latest arrival (further back, it counts as that
//! far back).

use std::collections::VecDeque;
use std::time::Duration;

const WINDOW: Duration = Duration::from_secs(1);
/// How far before the latest arrival another may still be dated.
const MAX_DISORDER: Duration = WINDOW;
/// How far back from the latest arrival the windows keep history: every window that can hold an
/// arrival dated [`MAX_DISORDER`] back.
const HISTORY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Admitted,
    RateLimited,
}

#[derive(Debug, Default)]
pub(crate) struct Windows {
    /// Every arrival of the last [`HISTORY`], sorted by time.
    arrivals: VecDeque<Duration>,
    /// Admitted arrivals of the last [`HISTORY`], sorted; the rate limit counts only these.
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

    /// Records one arrival at `at` and decides whether the rate limit admits it: only if no
    /// one-second window that holds it would then hold more admissions than the limit.
    pub(crate) fn arrive(&mut self, at: Duration) -> Admission {
        let at = at.max(self.latest().saturating_sub(MAX_DISORDER));
        self.requests_total += 1;
        insert_sorted(&mut self.arrivals, at);
        let busiest = busiest_window_around(&self.arrivals, at);
        self.max_in_window = self.max_in_window.max(busiest as u64);

        let horizon = self.latest().saturating_sub(HISTORY);
        forget_before(&mut self.admitted, horizon);
        if self.limit_per_sec > 0
            && busiest_window_around(&self.admitted, at) >= self.limit_per_sec as usize
        {
            return Admission::RateLimited;
        }
        insert_sorted(&mut self.admitted, at);
        Admission::Admitted
    }
}

/// Inserts `at` after every time not later than it, then forgets what is older than the
/// history kept.
fn insert_sorted(times: &mut VecDeque<Duration>, at: Duration) {
    let index = times.partition_point(|&t| t <= at);
    times.insert(index, at);
    let newest = times.back().copied().unwrap_or_default();
    forget_before(times, newest.saturating_sub(HISTORY));
}

fn forget_before(times: &mut VecDeque<Duration>, horizon: Duration) {
    while times.front().is_some_and(|&t| t < horizon) {
        times.pop_front();
    }
}

/// The most times in any window `(e - 1s, e]` that holds `at`, counting the sorted `times`
/// (whether or not `at` is among them).
///
/// Counts change only as a time enters or leaves, so the busiest such window ends at `at` or at
/// one of the times in `[at, at + 1s)`; the window's start moves forward with its end, so one pass
/// counts them all.
fn busiest_window_around(times: &VecDeque<Duration>, at: Duration) -> usize {
    // Index of the first time inside `(end - 1s, end]`.
    let first_inside = |end: Duration| {
        end.checked_sub(WINDOW).map_or(0, |start| times.partition_point(|&t| t <= start))
    };
    let mut start = first_inside(at);
    let mut busiest = times.partition_point(|&t| t <= at) - start;
    let first_later_end = times.partition_point(|&t| t < at);
    for (index, &end) in times.iter().enumerate().skip(first_later_end) {
        if end >= at + WINDOW {
            break;
        }
        while times.get(start).is_some_and(|&t| t + WINDOW <= end) {
            start += 1;
        }
        busiest = busiest.max(index + 1 - start);
    }
    busiest
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
    fn a_request_handled_late_counts_at_its_own_arrival_time() {
        // 60 was received before 1100 and 1150 but handled after them: it shares a second
        // with 0 only. Counted at 1150 it would have made {1100, 1150, 1150}.
        let mut windows = Windows::new(0);
        feed(&mut windows, &[0, 1100, 1150, 60]);
        assert_eq!(windows.max_in_window(), 2);
        assert_eq!(windows.latest(), ms(1150));

        // It does count in the windows that hold it: {900, 950, 1000} fits in [900, 1900).
        let mut windows = Windows::new(0);
        feed(&mut windows, &[0, 900, 1000, 1899, 950]);
        assert_eq!(windows.max_in_window(), 4);
    }

    #[test]
    fn a_late_request_is_limited_by_every_second_that_holds_it() {
        use Admission::{Admitted as A, RateLimited as R};
        // Admitted: [0, 1000) holds 0 and 60, [60, 1060) holds 60 only.
        let mut windows = Windows::new(2);
        assert_eq!(feed(&mut windows, &[0, 1100, 1150, 60]), vec![A, A, A, A]);
        // Rejected: [0, 1000) would hold three.
        let mut windows = Windows::new(2);
        assert_eq!(feed(&mut windows, &[0, 900, 1000, 950]), vec![A, A, A, R]);
        // Rejected by a later second: [450, 1450) would hold 450, 500 and 1400.
        let mut windows = Windows::new(2);
        assert_eq!(feed(&mut windows, &[500, 1400, 450]), vec![A, A, R]);
    }

    #[test]
    fn an_arrival_dated_further_back_than_the_history_counts_at_its_edge() {
        let mut windows = Windows::new(0);
        feed(&mut windows, &[0, 3000, 3100, 500]);
        // 500 counts as 2100, one second before the latest: [2100, 3100) holds it and 3000.
        assert_eq!(windows.max_in_window(), 2);
        assert_eq!(windows.requests_total(), 4);
        assert_eq!(windows.latest(), ms(3100));
    }

    /// The most of `times` in any half-open second, counted independently of `Windows`: sort,
    /// then for each time count those less than a second after it.
    fn busiest_by_sorting(times: &[Duration]) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort();
        let mut end = 0;
        let mut busiest = 0;
        for (start, &s) in sorted.iter().enumerate() {
            while end < sorted.len() && sorted[end] < s + WINDOW {
                end += 1;
            }
            busiest = busiest.max(end - start);
        }
        busiest
    }

    #[test]
    fn shuffled_arrivals_are_counted_and_limited_as_a_count_made_by_sorting_says() {
        // Arrivals about 2 ms apart, each handled up to 40 ms out of order (a fixed LCG keeps
        // the sequence the same on every run).
        let mut seed: u64 = 0x5eed;
        let mut next = move |bound: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % bound
        };
        let mut times: Vec<Duration> =
            (0..3_000u64).map(|i| Duration::from_micros(i * 2_000 + next(40_000))).collect();
        for i in 0..times.len() - 1 {
            if next(3) == 0 {
                times.swap(i, i + 1);
            }
        }
        let limit = 450;
        let mut windows = Windows::new(limit);
        let mut admitted = Vec::new();
        for (i, &at) in times.iter().enumerate() {
            let got = windows.arrive(at);
            admitted.push(at);
            // Only the seconds that hold `at` can have changed.
            let near: Vec<Duration> =
                admitted.iter().copied().filter(|&t| t + WINDOW > at && t < at + WINDOW).collect();
            let fits = busiest_by_sorting(&near) <= limit as usize;
            if !fits {
                admitted.pop();
            }
            let expected = if fits { Admission::Admitted } else { Admission::RateLimited };
            assert_eq!(got, expected, "arrival {i} at {at:?}");
        }
        assert_eq!(windows.max_in_window() as usize, busiest_by_sorting(&times));
        assert!(admitted.len() < times.len(), "the limit was never reached");
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
