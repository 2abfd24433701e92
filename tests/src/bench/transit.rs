//! Transit: how unevenly grant requests travel from the daemon's send log to money-sim.
//!
//! The daemon's limiter admits at most `limit` sends in any `1 s + slack`; money-sim counts
//! arrivals in any 1 s. The two agree only while the delay between admission and arrival varies
//! by less than the slack. With `--transit` the daemon logs every admission on the wall clock
//! (`payoutd::sends=trace`), money-sim stamps every arrival on the same clock, and this module
//! pairs them by idempotency key (the n-th admission of a key with its n-th arrival) and says
//! how much the delay varied and where the densest arrival second came from.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::money_sim::RequestRecord;

/// The target of the daemon's admission trace lines.
pub const SENDS_TARGET: &str = "payoutd::sends";

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
}

/// Reads the admission lines of a JSON daemon log: `(key, unix µs)` in log order. The same
/// target also logs each request's departure (`departed`), which is not an admission.
pub fn admissions(daemon_log: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let text = std::fs::read_to_string(daemon_log)
        .with_context(|| format!("cannot read {}", daemon_log.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains(SENDS_TARGET)) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v.get("target").and_then(|t| t.as_str()) != Some(SENDS_TARGET) {
            continue;
        }
        let fields = v.get("fields").unwrap_or(&v);
        if fields.get("message").and_then(|m| m.as_str()) != Some("admitted") {
            continue;
        }
        let key = fields.get("key").and_then(|k| k.as_str());
        let at = fields.get("at_unix_us").and_then(|a| a.as_u64());
        if let (Some(key), Some(at)) = (key, at) {
            out.push((key.to_owned(), at));
        }
    }
    Ok(out)
}

/// Writes `admitted_unix_us,arrived_unix_us` per pair of [`pairs`], in arrival order.
pub fn write_pairs(path: &Path, pairs: &[(u64, u64)]) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut csv = String::from("admitted_unix_us,arrived_unix_us\n");
    for (arr, adm) in pairs {
        let _ = writeln!(csv, "{adm},{arr}");
    }
    std::fs::write(path, csv).with_context(|| format!("cannot write {}", path.display()))
}

/// `(arrival µs, admission µs)` of every paired request, in arrival order.
pub fn pairs(admitted: &[(String, u64)], arrivals: &[RequestRecord]) -> Vec<(u64, u64)> {
    let mut by_key: HashMap<&str, VecDeque<u64>> = HashMap::new();
    for (key, at) in admitted {
        by_key.entry(key.as_str()).or_default().push_back(*at);
    }
    let mut pairs: Vec<(u64, u64)> = Vec::with_capacity(arrivals.len());
    for r in arrivals.iter().filter(|r| r.at_unix_us > 0) {
        if let Some(at) = by_key.get_mut(r.idempotency_key.as_str()).and_then(VecDeque::pop_front) {
            pairs.push((r.at_unix_us, at));
        }
    }
    pairs.sort_unstable();
    pairs
}

/// Pairs admissions with arrivals and measures the transit.
pub fn analyse(admitted: &[(String, u64)], arrivals: &[RequestRecord]) -> Transit {
    analyse_pairs(admitted, &pairs(admitted, arrivals))
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
    let mut delays: Vec<(i64, u64)> =
        pairs.iter().map(|&(arr, adm)| (arr as i64 - adm as i64, adm)).collect();
    let (max_delay, max_at) = delays.iter().copied().max().unwrap_or_default();
    t.delay_ms_max = max_delay as f64 / 1000.0;
    t.delay_max_at_s = max_at.saturating_sub(first) as f64 / 1e6;
    delays.sort_unstable();
    let q = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize].0 as f64 / 1000.0;
    t.delay_ms_min = q(0.0);
    t.delay_ms_p50 = q(0.5);
    t.delay_ms_p99 = q(0.99);
    t.delay_ms_p999 = q(0.999);

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
    fn only_admission_lines_count_as_admissions() {
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
        let read = admissions(&log);
        std::fs::remove_file(&log).unwrap();
        assert_eq!(read.unwrap(), vec![("k1".to_owned(), 100)]);
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
