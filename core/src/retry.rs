//! Retry policy: when a failed row is tried again, and when it is given up.
//!
//! The delay before retry `n` (n = 1 for the first retry) is `base × multiplier^(n-1)`, capped,
//! with up to ±`jitter` spread; a `Retry-After` from Money is a floor. After `max_retries`
//! retries (so `max_retries + 1` attempts) the row becomes DEAD.

use std::time::Duration;

/// Backoff settings (requirements: 3 s × 2^(n-1), ±20 %, at most 5 retries).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub multiplier: f64,
    pub max_delay: Duration,
    pub max_retries: u32,
    /// Share of the delay by which it may randomly vary either way (0.2 = ±20 %).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_delay: Duration::from_secs(3),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            max_retries: 5,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Whether a row that has made `attempts` attempts (this one included) may be tried again.
    pub fn may_retry(&self, attempts: u32) -> bool {
        attempts <= self.max_retries
    }

    /// The delay before retry `retry` (1-based) without jitter, capped at `max_delay`.
    pub fn nominal_delay(&self, retry: u32) -> Duration {
        let exp = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.base_delay.as_secs_f64() * self.multiplier.powi(exp);
        Duration::try_from_secs_f64(secs).unwrap_or(self.max_delay).min(self.max_delay)
    }

    /// The delay before retry `retry` with jitter drawn from `unit` (a number in `[0, 1)`), and
    /// never shorter than Money's `Retry-After`.
    pub fn delay(&self, retry: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
        let nominal = self.nominal_delay(retry).as_secs_f64();
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let jittered = Duration::from_secs_f64((nominal * factor).max(0.0));
        match retry_after {
            Some(floor) => jittered.max(floor),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_three_seconds() {
        let p = RetryPolicy::default();
        let got: Vec<u64> = (1..=5).map(|n| p.nominal_delay(n).as_secs()).collect();
        assert_eq!(got, [3, 6, 12, 24, 48]);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1, 0.0, None), Duration::from_secs_f64(2.4));
        assert_eq!(p.delay(1, 0.5, None), Duration::from_secs(3));
        assert!(p.delay(1, 0.999_999, None) <= Duration::from_secs_f64(3.6));
    }

    #[test]
    fn retry_after_is_a_floor_and_the_cap_holds() {
        let p = RetryPolicy { max_delay: Duration::from_secs(10), ..RetryPolicy::default() };
        assert_eq!(p.delay(1, 0.5, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(p.nominal_delay(9), Duration::from_secs(10));
    }

    #[test]
    fn six_attempts_at_most() {
        let p = RetryPolicy::default();
        assert!(p.may_retry(1));
        assert!(p.may_retry(5));
        assert!(!p.may_retry(6));
    }
}
