//! The circuit breaker in front of Money: a small state machine, driven by request outcomes.
//!
//! Closed: requests flow; `failure_threshold` transient failures in a row (timeouts, connection
//! errors, 5xx, broken answers) open it. Open: nothing is sent for `open_for`; the engine pauses
//! the campaign it was serving (marked as paused by the breaker). Then half-open: exactly one probe
//! request goes out; its success closes the breaker (and breaker-paused campaigns resume), its
//! failure opens it again for another `open_for`.
//!
//! "Success" here means Money answered for itself: a grant or a permanent rejection both prove it
//! is up. Rate limiting and our own configuration faults say nothing about an outage and leave
//! the count alone.

use std::time::{Duration, Instant};

use crate::money::{Disposition, Granted, MoneyError};

/// Breaker thresholds (requirements: 10 consecutive failures, 30 s open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings { failure_threshold: 10, open_for: Duration::from_secs(30) }
    }
}

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The probe is out; everything else waits.
    HalfOpen,
}

/// How an answer counts for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Money answered for itself.
    Healthy,
    /// Money looks down or broken.
    Failure,
    /// Says nothing about Money's health.
    Neutral,
}

impl Signal {
    pub fn of(result: &Result<Granted, MoneyError>) -> Signal {
        match result {
            Ok(_) => Signal::Healthy,
            Err(e) => match e.disposition() {
                Disposition::Permanent => Signal::Healthy,
                Disposition::Transient | Disposition::UnknownOutcome => Signal::Failure,
                Disposition::RetryAfter(_) | Disposition::Configuration => Signal::Neutral,
            },
        }
    }
}

/// A change the engine must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed → open: pause the campaign being served, alert.
    Opened,
    /// Half-open → open: the probe failed.
    Reopened,
    /// Half-open → closed: resume breaker-paused campaigns, alert.
    Closed,
}

/// What the breaker allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Send,
    /// The one request of the half-open state.
    Probe,
    /// Nothing may be sent before this instant (or before the probe answers, if `None`).
    Wait(Option<Instant>),
}

/// The state machine.
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    state: BreakerState,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker { settings, state: BreakerState::Closed { consecutive_failures: 0 } }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, BreakerState::Closed { .. })
    }

    /// Asks to send one ordinary request.
    pub fn admit(&self) -> Admission {
        match self.state {
            BreakerState::Closed { .. } => Admission::Send,
            BreakerState::Open { until } => Admission::Wait(Some(until)),
            BreakerState::HalfOpen => Admission::Wait(None),
        }
    }

    /// Asks to send the probe: granted once the open period is over, and only once.
    pub fn admit_probe(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed { .. } => Admission::Send,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                Admission::Probe
            }
            BreakerState::Open { until } => Admission::Wait(Some(until)),
            BreakerState::HalfOpen => Admission::Wait(None),
        }
    }

    /// Records an ordinary request's answer.
    pub fn record(&mut self, signal: Signal, now: Instant) -> Option<Transition> {
        match (self.state, signal) {
            (BreakerState::Closed { .. }, Signal::Healthy) => {
                self.state = BreakerState::Closed { consecutive_failures: 0 };
                None
            }
            (BreakerState::Closed { consecutive_failures }, Signal::Failure) => {
                let n = consecutive_failures + 1;
                if n >= self.settings.failure_threshold {
                    self.state = BreakerState::Open { until: now + self.settings.open_for };
                    Some(Transition::Opened)
                } else {
                    self.state = BreakerState::Closed { consecutive_failures: n };
                    None
                }
            }
            // Answers of requests sent before the breaker opened change nothing; nor do
            // neutral answers.
            (BreakerState::Closed { .. }, Signal::Neutral)
            | (BreakerState::Open { .. } | BreakerState::HalfOpen, _) => None,
        }
    }

    /// Records the probe's answer.
    pub fn record_probe(&mut self, signal: Signal, now: Instant) -> Option<Transition> {
        match (self.state, signal) {
            (BreakerState::HalfOpen, Signal::Healthy) => {
                self.state = BreakerState::Closed { consecutive_failures: 0 };
                Some(Transition::Closed)
            }
            (BreakerState::HalfOpen, Signal::Failure | Signal::Neutral) => {
                self.state = BreakerState::Open { until: now + self.settings.open_for };
                Some(Transition::Reopened)
            }
            (BreakerState::Closed { .. } | BreakerState::Open { .. }, _) => None,
        }
    }

    /// Starts open, ready to probe at `until` (a restart found campaigns the breaker had paused:
    /// Money's health is unknown, so it is probed before anything else is sent).
    pub fn force_open(&mut self, until: Instant) {
        self.state = BreakerState::Open { until };
    }

    /// Closes a half-open breaker without a probe (there was nothing left to send).
    pub fn close_unprobed(&mut self) -> Option<Transition> {
        match self.state {
            BreakerState::HalfOpen => {
                self.state = BreakerState::Closed { consecutive_failures: 0 };
                Some(Transition::Closed)
            }
            BreakerState::Closed { .. } | BreakerState::Open { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings { failure_threshold: 3, open_for: Duration::from_secs(30) })
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = breaker();
        assert_eq!(b.record(Signal::Failure, t), None);
        assert_eq!(b.record(Signal::Failure, t), None);
        assert_eq!(b.record(Signal::Healthy, t), None);
        assert_eq!(b.record(Signal::Failure, t), None);
        assert_eq!(b.record(Signal::Neutral, t), None);
        assert_eq!(b.record(Signal::Failure, t), None);
        assert_eq!(b.record(Signal::Failure, t), Some(Transition::Opened));
        assert_eq!(b.admit(), Admission::Wait(Some(t + Duration::from_secs(30))));
    }

    #[test]
    fn it_half_opens_after_the_open_period_with_exactly_one_probe() {
        let t = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(Signal::Failure, t);
        }
        assert!(matches!(b.admit_probe(t + Duration::from_secs(29)), Admission::Wait(Some(_))));
        assert_eq!(b.admit_probe(t + Duration::from_secs(30)), Admission::Probe);
        assert_eq!(b.admit_probe(t + Duration::from_secs(30)), Admission::Wait(None));
        assert_eq!(b.admit(), Admission::Wait(None));
        // Late answers of the requests that opened it change nothing.
        assert_eq!(b.record(Signal::Healthy, t), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn the_probe_closes_or_reopens_it() {
        let t = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(Signal::Failure, t);
        }
        let later = t + Duration::from_secs(31);
        assert_eq!(b.admit_probe(later), Admission::Probe);
        assert_eq!(b.record_probe(Signal::Failure, later), Some(Transition::Reopened));
        assert_eq!(b.admit(), Admission::Wait(Some(later + Duration::from_secs(30))));
        let much_later = later + Duration::from_secs(30);
        assert_eq!(b.admit_probe(much_later), Admission::Probe);
        assert_eq!(b.record_probe(Signal::Healthy, much_later), Some(Transition::Closed));
        assert_eq!(b.admit(), Admission::Send);
    }

    #[test]
    fn answers_map_to_signals() {
        let ok = Ok(Granted { transaction_id: "t".into(), replayed: false });
        assert_eq!(Signal::of(&ok), Signal::Healthy);
        let table = [
            (MoneyError::Timeout, Signal::Failure),
            (MoneyError::Connect("refused".into()), Signal::Failure),
            (MoneyError::Server { status: 503, code: String::new() }, Signal::Failure),
            (MoneyError::Broken("eof".into()), Signal::Failure),
            (
                MoneyError::Rejected {
                    status: 404,
                    code: "customer_not_found".into(),
                    message: String::new(),
                },
                Signal::Healthy,
            ),
            (MoneyError::RateLimited { status: 429, retry_after: None }, Signal::Neutral),
            (MoneyError::Unauthorized, Signal::Neutral),
        ];
        for (e, want) in table {
            assert_eq!(Signal::of(&Err(e.clone())), want, "{e:?}");
        }
    }
}
