//! Transit: how unevenly grant requests travel from the daemon's send log to money-sim.
//!
//! The daemon's limiter admits at most `limit` sends in any `1 s + slack`; money-sim counts
//! arrivals in any 1 s. The two agree only while the delay between admission and arrival varies
//! by less than the slack. With `--transit` the daemon logs every admission on the wall clock
//! (`payoutd::sends=trace`), money-sim stamps every arrival on the same clock, and this module
//! pairs them by idempotency key (the n-th admission of a key with its n-th arrival) and says
//! how much the delay varied and where the densest arrival second came from.
//!
//! The send log counts a request from its departure when that came more than 1 ms after its
//! admission (the daemon's `departed` lines), else from its admission. From that counted time,
//! a request that takes longer than the slack to arrive can land in a second the log already
//! filled: the daemon keeps `money.rate_reserve` places of every window free for such requests,
//! so Money sees more than the limit only when a second holds more of them than that
//! (`max_late_in_any_second`).

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::money_sim::RequestRecord;

/// The target of the daemon's admission trace lines.
pub const SENDS_TARGET: &str = "payoutd::sends";

/// A departure later than this after its admission moves the send in the daemon's log.
const DEPARTURE_TOLERANCE_US: u64 = payout_core::rate::DEPARTURE_TOLERANCE.as_micros() as u64;

/// What pairing admissions with arrivals found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Transit {
    /// Admissions in the daemon's log.
    pub admitted: u64,
    /// Admissions paired with an arrival.
    pub paired: u64,
    /// Delay from admission to arrival (ms): quantiles and extremes.
    pub delay_ms_p50: f64,
    pub delay_ms_p99: f64,
    pub delay_ms_p999: f64,
    pub delay_ms_min: f64,
    pub delay_ms_max: f64,
    /// When the largest delay happened, in seconds after the first admission.
    pub delay_max_at_s: f64,
    /// The most admissions in any sliding second (the daemon's side of the cap).
    pub max_admitted_in_any_second: u64,
    /// The most arrivals in any sliding second, on money-sim's wall-clock stamps.
    pub max_arrived_in_any_second: u64,
    /// The requests of that densest arrival second were admitted over this many ms: below
    /// 1,000 + slack means transit compressed them.
    pub densest_second_admission_span_ms: f64,
    /// Start of the densest arrival second, in seconds after the first admission.
    pub densest_second_at_s: f64,
    /// Departures in the daemon's log.
    #[serde(default)]
    pub departed: u64,
    /// Delay from the time the send log counted the request from (its departure when that was
    /// more than 1 ms after the admission, else its admission) to arrival (ms).
    #[serde(default)]
    pub counted_delay_ms_p999: f64,
    #[serde(default)]
    pub counted_delay_ms_max: f64,
    /// The daemon's `money.rate_slack` (from its start line).
    #[serde(default)]
    pub slack_ms: Option<f64>,
    /// Requests whose counted delay exceeded the slack.
    #[serde(default)]
    pub late_over_slack: u64,
    /// The most such requests arriving in any one second: Money sees more than the limit only
    /// where this exceeds the places the daemon reserves.
    #[serde(default)]
    pub max_late_in_any_second: u64,
}

/// The send trace of a JSON daemon log: admissions and departures as `(key, unix µs)` in log
/// order, and the daemon's `money.rate_slack` in µs (from its `payoutd starting` line,
/// `rate_slack_ms`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sends {
    pub admitted: Vec<(String, u64)>,
    pub departed: Vec<(String, u64)>,
    pub slack_us: Option<u64>,
}

impl Sends {
    /// The time the send log counted each admission from, in the order of `admitted`: the
    /// admission's own departure (the n-th departure of its key for its n-th admission) when that
    /// came more than [`DEPARTURE_TOLERANCE_US`] later, else the admission.
    pub fn counted(&self) -> Vec<(String, u64)> {
        let mut departures: HashMap<&str, VecDeque<u64>> = HashMap::new();
        for (key, at) in &self.departed {
            departures.entry(key.as_str()).or_default().push_back(*at);
        }
        self.admitted
            .iter()
            .map(|(key, adm)| {
                let dep = departures.get_mut(key.as_str()).and_then(VecDeque::pop_front);
                let at = match dep {
                    Some(dep) if dep > adm + DEPARTURE_TOLERANCE_US => dep,
                    _ => *adm,
                };
                (key.clone(), at)
            })
            .collect()
    }
}

/// Reads the admission and departure lines and the start line of a JSON daemon log.
pub fn sends(daemon_log: &Path) -> anyhow::Result<Sends> {
    let text = std::fs::read_to_string(daemon_log)
        .with_context(|| format!("cannot read {}", daemon_log.display()))?;
    let mut out = Sends::default();
    for line in text.lines() {
        let started = out.slack_us.is_none() && line.contains("payoutd starting");
        if !started && !line.contains(SENDS_TARGET) {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let fields = v.get("fields").unwrap_or(&v);
        if started {
            let ms = fields.get("rate_slack_ms").and_then(|m| m.as_f64());
            out.slack_us = ms.map(|ms| (ms * 1000.0).round() as u64);
            continue;
        }
        if v.get("target").and_then(|t| t.as_str()) != Some(SENDS_TARGET) {
            continue;
        }
        let into = match fields.get("message").and_then(|m| m.as_str()) {
            Some("admitted") => &mut out.admitted,
            Some("departed") => &mut out.departed,
            _ => continue,
        };
        let key = fields.get("key").and_then(|k| k.as_str());
        let at = fields.get("at_unix_us").and_then(|a| a.as_u64());
        if let (Some(key), Some(at)) = (key, at) {
            into.push((key.to_owned(), at));
        }
    }
    Ok(out)
}

/// A request paired with its arrival: unix µs of its arrival, its admission and the time the
/// send log counted it from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Trip {
    pub arrived: u64,
    pub admitted: u64,
    pub counted: u64,
}

/// Pairs every admission with an arrival as [`pairs`] does, in arrival order, with the time the
/// send log counted it from.
pub fn trips(sends: &Sends, arrivals: &[RequestRecord]) -> Vec<Trip> {
    let sent =
        sends.admitted.iter().zip(sends.counted()).map(|((key, adm), (_, at))| (key, (*adm, at)));
    let mut trips: Vec<Trip> = by_key(sent, arrivals)
        .into_iter()
        .map(|(arrived, (admitted, counted))| Trip { arrived, admitted, counted })
        .collect();
    trips.sort_unstable();
    trips
}

/// `(arrival µs, what was sent)` of every arrival whose key was sent: the n-th send of a key goes
/// with its n-th arrival; arrivals of keys never sent (or sent fewer times) are skipped.
fn by_key<'a, T>(
    sent: impl Iterator<Item = (&'a String, T)>,
    arrivals: &[RequestRecord],
) -> Vec<(u64, T)> {
    let mut queues: HashMap<&str, VecDeque<T>> = HashMap::new();
    for (key, what) in sent {
        queues.entry(key.as_str()).or_default().push_back(what);
    }
    let mut out = Vec::with_capacity(arrivals.len());
    for r in arrivals.iter().filter(|r| r.at_unix_us > 0) {
        if let Some(what) = queues.get_mut(r.idempotency_key.as_str()).and_then(VecDeque::pop_front)
        {
            out.push((r.at_unix_us, what));
        }
    }
    out
}

/// The `p` quantile (0 to 1) of sorted µs values, in ms.
fn quantile_ms(sorted: &[i64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

/// Writes `admitted_unix_us,arrived_unix_us,counted_unix_us` per trip.
pub fn write_trips(path: &Path, trips: &[Trip]) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut csv = String::from("admitted_unix_us,arrived_unix_us,counted_unix_us\n");
    for t in trips {
        let _ = writeln!(csv, "{},{},{}", t.admitted, t.arrived, t.counted);
    }
    std::fs::write(path, csv).with_context(|| format!("cannot write {}", path.display()))
}

/// `(arrival µs, admission µs)` of every paired request, in arrival order.
pub fn pairs(admitted: &[(String, u64)], arrivals: &[RequestRecord]) -> Vec<(u64, u64)> {
    let mut pairs = by_key(admitted.iter().map(|(key, at)| (key, *at)), arrivals);
    pairs.sort_unstable();
    pairs
}

/// Pairs admissions with arrivals and measures the transit.
pub fn analyse(admitted: &[(String, u64)], arrivals: &[RequestRecord]) -> Transit {
    analyse_pairs(admitted, &pairs(admitted, arrivals))
}

/// Measures the transit of `sends` from [`trips`].
pub fn analyse_trips(sends: &Sends, trips: &[Trip]) -> Transit {
    let pairs: Vec<(u64, u64)> = trips.iter().map(|t| (t.arrived, t.admitted)).collect();
    let mut t = analyse_pairs(&sends.admitted, &pairs);
    t.departed = sends.departed.len() as u64;
    if trips.is_empty() {
        return t;
    }
    let mut delays: Vec<i64> = trips.iter().map(|t| t.arrived as i64 - t.counted as i64).collect();
    delays.sort_unstable();
    t.counted_delay_ms_p999 = quantile_ms(&delays, 0.999);
    t.counted_delay_ms_max = quantile_ms(&delays, 1.0);
    let Some(slack) = sends.slack_us else { return t };
    t.slack_ms = Some(slack as f64 / 1000.0);
    let late: Vec<u64> =
        trips.iter().filter(|t| t.arrived > t.counted + slack).map(|t| t.arrived).collect();
    t.late_over_slack = late.len() as u64;
    t.max_late_in_any_second = densest_second(&late).0;
    t
}

/// Measures the transit of `pairs` (from [`pairs`]) of the `admitted` sends.
pub fn analyse_pairs(admitted: &[(String, u64)], pairs: &[(u64, u64)]) -> Transit {
    let first = admitted.iter().map(|(_, at)| *at).min().unwrap_or(0);
    let mut t = Transit {
        admitted: admitted.len() as u64,
        paired: pairs.len() as u64,
        ..Transit::default()
    };
    if pairs.is_empty() {
        return t;
    }
    let delay = |&(arr, adm): &(u64, u64)| arr as i64 - adm as i64;
    let (max_delay, max_at) = pairs.iter().map(|p| (delay(p), p.1)).max().unwrap_or_default();
    t.delay_ms_max = max_delay as f64 / 1000.0;
    t.delay_max_at_s = max_at.saturating_sub(first) as f64 / 1e6;
    let mut delays: Vec<i64> = pairs.iter().map(delay).collect();
    delays.sort_unstable();
    t.delay_ms_min = quantile_ms(&delays, 0.0);
    t.delay_ms_p50 = quantile_ms(&delays, 0.5);
    t.delay_ms_p99 = quantile_ms(&delays, 0.99);
    t.delay_ms_p999 = quantile_ms(&delays, 0.999);

    let mut admitted_times: Vec<u64> = admitted.iter().map(|(_, at)| *at).collect();
    admitted_times.sort_unstable();
    t.max_admitted_in_any_second = densest_second(&admitted_times).0;

    let arrival_times: Vec<u64> = pairs.iter().map(|&(arr, _)| arr).collect();
    let (count, start, end) = densest_second(&arrival_times);
    t.max_arrived_in_any_second = count;
    if count > 0 {
        let window = &pairs[start..=end];
        let lo = window.iter().map(|&(_, adm)| adm).min().unwrap_or(0);
        let hi = window.iter().map(|&(_, adm)| adm).max().unwrap_or(0);
        t.densest_second_admission_span_ms = (hi - lo) as f64 / 1000.0;
        t.densest_second_at_s = pairs[start].0.saturating_sub(first) as f64 / 1e6;
    }
    t
}

/// The most times (µs, sorted) in any half-open second, with the first and last index of it.
fn densest_second(times: &[u64]) -> (u64, usize, usize) {
    let mut best = (0u64, 0usize, 0usize);
    let mut lo = 0;
    for (hi, &t) in times.iter().enumerate() {
        while t - times[lo] >= 1_000_000 {
            lo += 1;
        }
        let n = (hi - lo + 1) as u64;
        if n > best.0 {
            best = (n, lo, hi);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(key: &str, at_unix_us: u64) -> RequestRecord {
        RequestRecord {
            idempotency_key: key.to_owned(),
            endpoint: "points".to_owned(),
            at_ms: 0,
            at_unix_us,
            answered_ms: None,
            status: None,
            replayed: false,
        }
    }

    #[test]
    fn admission_and_departure_lines_are_read_apart() {
        let log = std::env::temp_dir().join(format!("transit-{}.log", std::process::id()));
        std::fs::write(
            &log,
            concat!(
                r#"{"level":"TRACE","message":"admitted","key":"k1","at_unix_us":100,"target":"payoutd::sends"}"#,
                "\n",
                r#"{"level":"TRACE","message":"departed","key":"k1","at_unix_us":150,"after_admission_us":50,"target":"payoutd::sends"}"#,
                "\n",
                r#"{"level":"INFO","message":"admitted","key":"k2","at_unix_us":200,"target":"payoutd::engine"}"#,
                "\n",
            ),
        )
        .unwrap();
        let read = sends(&log);
        std::fs::remove_file(&log).unwrap();
        let read = read.unwrap();
        assert_eq!(read.admitted, vec![("k1".to_owned(), 100)]);
        assert_eq!(read.departed, vec![("k1".to_owned(), 150)]);
    }

    #[test]
    fn requests_count_from_a_late_departure_and_late_arrivals_are_counted_per_second() {
        let sends = Sends {
            admitted: vec![
                ("a".to_owned(), 100),
                ("b".to_owned(), 200),
                ("c".to_owned(), 300),
                ("a".to_owned(), 2_000_000),
            ],
            // b left 5 ms after its admission: the log counts it from then. a's first departure
            // (50 µs) is within the tolerance; its retry has none logged.
            departed: vec![("a".to_owned(), 150), ("b".to_owned(), 5_200), ("c".to_owned(), 400)],
            slack_us: Some(6_000),
        };
        let counted: Vec<u64> = sends.counted().into_iter().map(|(_, at)| at).collect();
        assert_eq!(counted, [100, 5_200, 300, 2_000_000]);
        let arrivals = [
            arrival("a", 300),
            arrival("b", 20_000),
            arrival("c", 16_300),
            arrival("a", 2_000_500),
        ];
        let trips = trips(&sends, &arrivals);
        assert_eq!(trips.len(), 4);
        assert_eq!(trips[1], Trip { arrived: 16_300, admitted: 300, counted: 300 });
        let t = analyse_trips(&sends, &trips);
        assert_eq!(t.departed, 3);
        assert_eq!(t.slack_ms, Some(6.0));
        // c (16 ms) and b (14.8 ms from its departure) came later than the slack, in one second.
        assert_eq!(t.counted_delay_ms_max, 16.0);
        assert_eq!(t.late_over_slack, 2);
        assert_eq!(t.max_late_in_any_second, 2);
        assert_eq!(t.delay_ms_max, 19.8);
        // Without the daemon's slack, only the delays.
        let unknown = Sends { slack_us: None, ..sends.clone() };
        assert_eq!(analyse_trips(&unknown, &trips).late_over_slack, 0);
    }

    #[test]
    fn the_slack_is_read_off_the_start_line() {
        let log = std::env::temp_dir().join(format!("transit-slack-{}.log", std::process::id()));
        std::fs::write(
            &log,
            r#"{"level":"INFO","fields":{"message":"payoutd starting","rate_slack_ms":6.0,"sends_per_window":998}}"#,
        )
        .unwrap();
        let read = sends(&log);
        std::fs::remove_file(&log).unwrap();
        assert_eq!(read.unwrap().slack_us, Some(6_000));
    }

    #[test]
    fn an_even_stream_delayed_alike_is_not_compressed() {
        let admitted: Vec<(String, u64)> =
            (0..3000u64).map(|i| (format!("k{i}"), 1_000_000 + i * 1_004)).collect();
        let arrivals: Vec<RequestRecord> =
            admitted.iter().map(|(k, at)| arrival(k, at + 2_000)).collect();
        let t = analyse(&admitted, &arrivals);
        assert_eq!(t.paired, 3000);
        assert_eq!(t.delay_ms_min, 2.0);
        assert_eq!(t.delay_ms_max, 2.0);
        assert_eq!(t.max_admitted_in_any_second, 997);
        assert_eq!(t.max_arrived_in_any_second, 997);
    }

    #[test]
    fn a_stall_released_at_once_shows_as_a_dense_arrival_second() {
        // 1,000 admissions 1 ms apart; the first 50 arrive only when the stall ends at 50 ms.
        let admitted: Vec<(String, u64)> =
            (0..2000u64).map(|i| (format!("k{i}"), i * 1_000)).collect();
        let arrivals: Vec<RequestRecord> = admitted
            .iter()
            .map(|(k, at)| {
                let arrive = if *at < 50_000 { 50_000 } else { at + 100 };
                arrival(k, arrive)
            })
            .collect();
        let t = analyse(&admitted, &arrivals);
        assert_eq!(t.max_admitted_in_any_second, 1000);
        assert_eq!(t.max_arrived_in_any_second, 1050);
        assert_eq!(t.delay_ms_max, 50.0);
        assert!(t.densest_second_admission_span_ms > 1000.0);
    }

    #[test]
    fn retries_pair_in_order_and_unknown_keys_are_skipped() {
        let admitted = vec![("a".to_owned(), 10), ("a".to_owned(), 5_000), ("b".to_owned(), 20)];
        let arrivals =
            vec![arrival("a", 110), arrival("b", 120), arrival("a", 5_300), arrival("z", 9)];
        let t = analyse(&admitted, &arrivals);
        assert_eq!(t.paired, 3);
        assert_eq!(t.delay_ms_max, 0.3);
        assert_eq!(t.delay_ms_min, 0.1);
    }
}
