//! The simulator's state: idempotency store and grant log, arrival windows, fault settings and
//! answer counters.
//!
//! Locks are `std::sync::Mutex`es held only for map look-ups and inserts, never across an
//! `.await`. Each has one job, so the hot path takes each at most twice per request.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::body::{Endpoint, GrantBody};
use super::listener::Connections;
use super::window::{Admission, Windows};
use super::{
    ActiveOutageState, FaultState, FaultUpdate, GrantRecord, LedgerSummary, OutageMode,
    RequestRecord, SimConfig,
};

/// Outage windows longer than this are cut to it (keeps `Instant` arithmetic in range).
const MAX_OUTAGE: Duration = Duration::from_secs(365 * 24 * 3600);
/// Status counters cover every valid HTTP status code.
const STATUS_SLOTS: usize = 600;
/// The furthest back a kernel receive time may date an arrival: beyond it, the time is taken as
/// wrong (the wall clock stepped) and the arrival counts as received this long ago.
const MAX_RECEIVE_LAG: Duration = Duration::from_millis(500);

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections cannot panic half-way through an update, so a poisoned lock still
    // guards consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Faults {
    pub(crate) fail_5xx_share: f64,
    pub(crate) timeout_share: f64,
    pub(crate) latency_ms: u64,
    pub(crate) latency_jitter_ms: u64,
    pub(crate) outage: Option<(OutageMode, Instant)>,
}

impl Faults {
    fn from_config(cfg: &SimConfig) -> Self {
        Faults {
            fail_5xx_share: clamp_share(cfg.fail_5xx_share),
            timeout_share: clamp_share(cfg.timeout_share),
            latency_ms: cfg.latency_ms,
            latency_jitter_ms: cfg.latency_jitter_ms,
            outage: None,
        }
    }

    pub(crate) fn active_outage(&self, now: Instant) -> Option<OutageMode> {
        self.outage.and_then(|(mode, until)| (now < until).then_some(mode))
    }
}

fn clamp_share(share: f64) -> f64 {
    if share.is_nan() { 0.0 } else { share.clamp(0.0, 1.0) }
}

/// One effective grant. The transaction id is derived from the grant's position.
#[derive(Debug, Clone)]
struct Grant {
    key: Arc<str>,
    canonical: Arc<str>,
    endpoint: Endpoint,
    campaign_id: i64,
    at_ms: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Store {
    /// Bumped by every reset, so a request that started before it cannot grant after it.
    generation: u64,
    grants: Vec<Grant>,
    /// Idempotency key -> index into `grants`.
    keys: HashMap<Arc<str>, usize>,
    /// Canonical bodies granted so far (duplicate-body detection).
    bodies: HashSet<Arc<str>>,
    /// campaign_id -> voucher_number -> index into `grants`.
    vouchers: HashMap<i64, HashMap<Box<str>, usize>>,
    replays_total: u64,
    /// Grants made before the last reset: transaction ids stay unique across resets.
    tx_base: u64,
}

/// The idempotency store's answer for a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyState {
    /// Unknown key: go on, and grant only if the store is still at this generation.
    Fresh {
        generation: u64,
    },
    Replay {
        transaction_id: String,
    },
    Reused,
}

/// The outcome of the business checks and grant.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Commit {
    Granted {
        transaction_id: String,
    },
    /// A concurrent request with the same key granted first.
    Replay {
        transaction_id: String,
    },
    Reused,
    VoucherAlreadyIssued,
    /// The simulator was reset while this request was in flight.
    Stale,
}

fn transaction_id(tx_base: u64, index: usize) -> String {
    format!("tx-{}", tx_base + index as u64 + 1)
}

impl Grant {
    fn record(&self, transaction_id: String) -> GrantRecord {
        let body: serde_json::Value = serde_json::from_str(&self.canonical)
            .unwrap_or_else(|_| serde_json::Value::String(self.canonical.to_string()));
        let customer_uid = body
            .get("customer_uid")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        GrantRecord {
            idempotency_key: self.key.to_string(),
            endpoint: self.endpoint.as_str().to_owned(),
            campaign_id: self.campaign_id,
            customer_uid,
            transaction_id,
            body,
            at_ms: self.at_ms,
        }
    }
}

impl Store {
    /// A store with room for `n` grants, its memory touched once now (see [`Store::prefault`]).
    fn with_capacity(n: usize) -> Store {
        let mut store = Store {
            grants: Vec::with_capacity(n),
            keys: HashMap::with_capacity(n),
            bodies: HashSet::with_capacity(n),
            ..Store::default()
        };
        store.prefault(n);
        store
    }

    /// Fills the pre-sized tables with `n` placeholder entries and empties them again, which
    /// keeps their memory. Without it the kernel zeroed that memory while the first requests
    /// came in: the two hash tables' inserts land all over them, and at 2,250,000 grants some
    /// 170 MB were faulted in (as huge pages) during the first second of a campaign, which took
    /// money-sim 0.6 s of CPU and had it answer up to 0.5 s late (Money p99 as the daemon saw it
    /// 370-520 ms against 39 ms at 100,000 rows), and the daemon opened 371 connections for it.
    fn prefault(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let placeholder: Arc<str> = Arc::from("");
        for i in 0..n {
            let key: Arc<str> = Arc::from(i.to_string());
            self.grants.push(Grant {
                key: placeholder.clone(),
                canonical: placeholder.clone(),
                endpoint: Endpoint::Points,
                campaign_id: 0,
                at_ms: 0,
            });
            self.bodies.insert(key.clone());
            self.keys.insert(key, i);
        }
        self.grants.clear();
        self.keys.clear();
        self.bodies.clear();
    }

    fn transaction_id(&self, index: usize) -> String {
        transaction_id(self.tx_base, index)
    }

    fn check_key(&mut self, key: &str, canonical: &str) -> Option<KeyState> {
        let &index = self.keys.get(key)?;
        let same_body = self.grants.get(index).is_some_and(|g| &*g.canonical == canonical);
        if same_body {
            self.replays_total += 1;
            Some(KeyState::Replay { transaction_id: self.transaction_id(index) })
        } else {
            Some(KeyState::Reused)
        }
    }

    pub(crate) fn lookup(&mut self, key: &str, body: &GrantBody<'_>) -> KeyState {
        self.check_key(key, &body.canonical)
            .unwrap_or(KeyState::Fresh { generation: self.generation })
    }

    pub(crate) fn commit(
        &mut self,
        generation: u64,
        key: &str,
        endpoint: Endpoint,
        body: &GrantBody<'_>,
        at_ms: u64,
    ) -> Commit {
        if generation != self.generation {
            return Commit::Stale;
        }
        match self.check_key(key, &body.canonical) {
            Some(KeyState::Replay { transaction_id }) => return Commit::Replay { transaction_id },
            Some(KeyState::Reused) => return Commit::Reused,
            Some(KeyState::Fresh { .. }) | None => {}
        }
        let index = self.grants.len();
        if let Some(number) = &body.voucher_number {
            let issued = self.vouchers.entry(body.campaign_id).or_default();
            if issued.contains_key(number.as_ref()) {
                return Commit::VoucherAlreadyIssued;
            }
            issued.insert(Box::from(number.as_ref()), index);
        }
        let key: Arc<str> = Arc::from(key);
        let canonical: Arc<str> = Arc::from(body.canonical.as_str());
        self.keys.insert(Arc::clone(&key), index);
        self.bodies.insert(Arc::clone(&canonical));
        self.grants.push(Grant { key, canonical, endpoint, campaign_id: body.campaign_id, at_ms });
        Commit::Granted { transaction_id: self.transaction_id(index) }
    }
}

/// One logged grant request (see [`RequestRecord`]).
#[derive(Debug)]
struct Arrival {
    key: Box<str>,
    endpoint: Endpoint,
    at_ms: u64,
    at_unix_us: u64,
    answered_ms: Option<u64>,
    status: Option<u16>,
    replayed: bool,
}

/// The request log: one entry per grant request, in the order they were handled (which may
/// differ a little from the order they arrived in).
#[derive(Debug, Default)]
struct RequestLog {
    /// Bumped by every reset, so an answer to a request logged before it is not filed after it.
    generation: u64,
    arrivals: Vec<Arrival>,
}

impl RequestLog {
    /// A log with room for `n` requests, its memory touched once now (as [`Store::prefault`]).
    fn with_capacity(n: usize) -> RequestLog {
        let mut arrivals = Vec::with_capacity(n);
        arrivals.resize_with(n, || Arrival {
            key: Box::from(""),
            endpoint: Endpoint::Points,
            at_ms: 0,
            at_unix_us: 0,
            answered_ms: None,
            status: None,
            replayed: false,
        });
        arrivals.clear();
        RequestLog { arrivals, ..RequestLog::default() }
    }
}

/// Where a request's log entry is, to file its answer there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogTicket {
    generation: u64,
    index: usize,
}

/// Counts answers per status without a lock.
#[derive(Debug)]
struct StatusCounters(Box<[AtomicU64]>);

impl StatusCounters {
    fn new() -> Self {
        StatusCounters((0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect())
    }

    fn record(&self, status: u16) {
        if let Some(slot) = self.0.get(usize::from(status)) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn get(&self, status: u16) -> u64 {
        self.0.get(usize::from(status)).map_or(0, |slot| slot.load(Ordering::Relaxed))
    }

    fn clear(&self) {
        for slot in self.0.iter() {
            slot.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    api_key: Box<[u8]>,
    not_found_prefix: Option<String>,
    hang: Duration,
    baseline_faults: Faults,
    baseline_rate_limit_per_sec: u32,
    started: Instant,
    /// `started` on the wall clock (µs since the Unix epoch), for `RequestRecord::at_unix_us`.
    started_unix_us: u64,
    windows: Mutex<Windows>,
    faults: Mutex<Faults>,
    store: Mutex<Store>,
    statuses: StatusCounters,
    requests: Mutex<RequestLog>,
    hangs_total: AtomicU64,
    dropped_total: AtomicU64,
    connections: Arc<Connections>,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn new(cfg: &SimConfig) -> Self {
        let baseline_faults = Faults::from_config(cfg);
        // Made (and their memory touched) before the clock starts: a child process's clock is
        // taken by its parent when it reports it listens.
        let store = Mutex::new(Store::with_capacity(cfg.expected_grants));
        let requests = Mutex::new(RequestLog::with_capacity(cfg.expected_grants));
        Shared {
            api_key: cfg.api_key.as_bytes().into(),
            not_found_prefix: cfg.not_found_prefix.clone(),
            hang: Duration::from_millis(cfg.hang_ms),
            baseline_faults,
            baseline_rate_limit_per_sec: cfg.rate_limit_per_sec,
            started: Instant::now(),
            started_unix_us: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(0))
                .unwrap_or(0),
            windows: Mutex::new(Windows::new(cfg.rate_limit_per_sec)),
            faults: Mutex::new(baseline_faults),
            store,
            statuses: StatusCounters::new(),
            requests,
            hangs_total: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
            connections: Arc::default(),
            shutdown: watch::Sender::new(false),
        }
    }

    /// When a request arrived, as time since the start: when the kernel received it, if the
    /// connection knows (see `listener`), else now. A kernel time is trusted up to
    /// [`MAX_RECEIVE_LAG`] back.
    pub(crate) fn arrival(&self, received: Option<std::time::SystemTime>) -> Duration {
        let now = self.started.elapsed();
        let lag = received
            .and_then(|at| std::time::SystemTime::now().duration_since(at).ok())
            .unwrap_or_default()
            .min(MAX_RECEIVE_LAG);
        now.saturating_sub(lag)
    }

    /// Logs a grant request that arrived at `arrived` (see [`Shared::arrival`]); the answer is
    /// filed with [`Shared::log_answer`].
    pub(crate) fn log_arrival(
        &self,
        key: Option<&str>,
        endpoint: Endpoint,
        arrived: Duration,
    ) -> LogTicket {
        let key: Box<str> = Box::from(key.unwrap_or_default());
        let at_ms = u64::try_from(arrived.as_millis()).unwrap_or(u64::MAX);
        let at_unix_us = self.started_unix_us
            + u64::try_from(arrived.as_micros()).unwrap_or(u64::MAX - self.started_unix_us);
        let mut log = lock(&self.requests);
        log.arrivals.push(Arrival {
            key,
            endpoint,
            at_ms,
            at_unix_us,
            answered_ms: None,
            status: None,
            replayed: false,
        });
        LogTicket { generation: log.generation, index: log.arrivals.len() - 1 }
    }

    /// Files the answer of a logged request; `status` `None` means no answer was sent.
    pub(crate) fn log_answer(&self, ticket: LogTicket, status: Option<u16>, replayed: bool) {
        let answered_ms = self.elapsed_ms();
        let mut log = lock(&self.requests);
        if log.generation != ticket.generation {
            return;
        }
        if let Some(entry) = log.arrivals.get_mut(ticket.index) {
            entry.answered_ms = status.map(|_| answered_ms);
            entry.status = status;
            entry.replayed = replayed;
        }
    }

    /// The request log in arrival order.
    pub(crate) fn request_records(&self) -> Vec<RequestRecord> {
        let log = lock(&self.requests);
        let mut records: Vec<RequestRecord> = log
            .arrivals
            .iter()
            .map(|a| RequestRecord {
                idempotency_key: a.key.to_string(),
                endpoint: a.endpoint.as_str().to_owned(),
                at_ms: a.at_ms,
                at_unix_us: a.at_unix_us,
                answered_ms: a.answered_ms,
                status: a.status,
                replayed: a.replayed,
            })
            .collect();
        drop(log);
        records.sort_by_key(|r| r.at_unix_us);
        records
    }

    /// Counts a grant request that arrived at `arrived` (see [`Shared::arrival`]) against the
    /// rate limit.
    pub(crate) fn arrive(&self, arrived: Duration) -> Admission {
        lock(&self.windows).arrive(arrived)
    }

    pub(crate) fn api_key_matches(&self, presented: Option<&[u8]>) -> bool {
        presented == Some(&*self.api_key)
    }

    pub(crate) fn customer_unknown(&self, customer_uid: &str) -> bool {
        self.not_found_prefix.as_deref().is_some_and(|prefix| customer_uid.starts_with(prefix))
    }

    pub(crate) fn hang_duration(&self) -> Duration {
        self.hang
    }

    pub(crate) fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn lookup(&self, key: &str, body: &GrantBody<'_>) -> KeyState {
        lock(&self.store).lookup(key, body)
    }

    pub(crate) fn commit(
        &self,
        generation: u64,
        key: &str,
        endpoint: Endpoint,
        body: &GrantBody<'_>,
    ) -> Commit {
        let at_ms = self.elapsed_ms();
        lock(&self.store).commit(generation, key, endpoint, body, at_ms)
    }

    pub(crate) fn current_faults(&self) -> Faults {
        *lock(&self.faults)
    }

    pub(crate) fn record_status(&self, status: u16) {
        self.statuses.record(status);
    }

    pub(crate) fn record_hang(&self) {
        self.hangs_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_dropped(&self) {
        self.dropped_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn subscribe_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Sleeps for `duration` unless the simulator shuts down first.
    pub(crate) async fn sleep_unless_shutdown(&self, duration: Duration) {
        let mut stop = self.shutdown.subscribe();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = stop.wait_for(|stopping| *stopping) => {}
        }
    }

    pub(crate) fn apply_faults(&self, update: &FaultUpdate) {
        let now = Instant::now();
        {
            let mut faults = lock(&self.faults);
            if let Some(share) = update.fail_5xx_share {
                faults.fail_5xx_share = clamp_share(share);
            }
            if let Some(share) = update.timeout_share {
                faults.timeout_share = clamp_share(share);
            }
            if let Some(ms) = update.latency_ms {
                faults.latency_ms = ms;
            }
            if let Some(ms) = update.latency_jitter_ms {
                faults.latency_jitter_ms = ms;
            }
            if let Some(outage) = update.outage {
                let duration = Duration::from_millis(outage.duration_ms).min(MAX_OUTAGE);
                faults.outage = match now.checked_add(duration) {
                    Some(until) if !duration.is_zero() => Some((outage.mode, until)),
                    Some(_) | None => None,
                };
            }
        }
        if let Some(limit) = update.rate_limit_per_sec {
            lock(&self.windows).set_limit_per_sec(limit);
        }
    }

    pub(crate) fn fault_state(&self) -> FaultState {
        let now = Instant::now();
        let faults = self.current_faults();
        let outage = faults.outage.and_then(|(mode, until)| {
            (now < until).then(|| ActiveOutageState {
                mode,
                remaining_ms: u64::try_from(until.duration_since(now).as_millis())
                    .unwrap_or(u64::MAX),
            })
        });
        FaultState {
            fail_5xx_share: faults.fail_5xx_share,
            timeout_share: faults.timeout_share,
            latency_ms: faults.latency_ms,
            latency_jitter_ms: faults.latency_jitter_ms,
            rate_limit_per_sec: lock(&self.windows).limit_per_sec(),
            hang_ms: u64::try_from(self.hang.as_millis()).unwrap_or(u64::MAX),
            outage,
        }
    }

    pub(crate) fn reset(&self) {
        *lock(&self.faults) = self.baseline_faults;
        {
            let mut windows = lock(&self.windows);
            windows.clear();
            windows.set_limit_per_sec(self.baseline_rate_limit_per_sec);
        }
        {
            let mut store = lock(&self.store);
            let fresh = Store {
                generation: store.generation + 1,
                tx_base: store.tx_base + store.grants.len() as u64,
                ..Store::with_capacity(store.keys.capacity())
            };
            *store = fresh;
        }
        self.statuses.clear();
        {
            let mut log = lock(&self.requests);
            log.generation += 1;
            log.arrivals = Vec::new();
        }
        self.hangs_total.store(0, Ordering::Relaxed);
        self.dropped_total.store(0, Ordering::Relaxed);
        self.connections.reset();
    }

    /// The listener's connection counts, which the ledger reports.
    pub(crate) fn connections(&self) -> Arc<Connections> {
        Arc::clone(&self.connections)
    }

    pub(crate) fn ledger(&self) -> LedgerSummary {
        let (requests_total, max_requests_in_any_second) = {
            let windows = lock(&self.windows);
            (windows.requests_total(), windows.max_in_window())
        };
        let (grants_total, replays_total, duplicate_keys, duplicate_bodies, first, last) = {
            let store = lock(&self.store);
            let grants = store.grants.len();
            (
                grants as u64,
                store.replays_total,
                grants.saturating_sub(store.keys.len()) as u64,
                grants.saturating_sub(store.bodies.len()) as u64,
                store.grants.first().map(|g| g.at_ms),
                store.grants.last().map(|g| g.at_ms),
            )
        };
        let rejected_by_status = (0..STATUS_SLOTS)
            .filter_map(|status| u16::try_from(status).ok())
            .filter(|&status| status != 200)
            .filter_map(|status| {
                let count = self.statuses.get(status);
                (count > 0).then_some((status, count))
            })
            .collect();
        LedgerSummary {
            requests_total,
            grants_total,
            replays_total,
            rejected_by_status,
            rate_limited_total: self.statuses.get(429),
            max_requests_in_any_second,
            duplicate_grants: duplicate_keys + duplicate_bodies,
            duplicate_keys,
            duplicate_bodies,
            first_grant_ms: first,
            last_grant_ms: last,
            hangs_total: self.hangs_total.load(Ordering::Relaxed),
            connections_dropped_total: self.dropped_total.load(Ordering::Relaxed),
            connections_accepted_total: self.connections.accepted_total(),
            connections_open: self.connections.open_now(),
            connections_open_peak: self.connections.peak_open(),
        }
    }

    pub(crate) fn grant_records(&self) -> Vec<GrantRecord> {
        // Copy the (reference-counted) log under the lock; build the JSON outside it so a big
        // export does not stall grant requests.
        let (tx_base, grants) = {
            let store = lock(&self.store);
            (store.tx_base, store.grants.clone())
        };
        grants
            .iter()
            .enumerate()
            .map(|(index, grant)| grant.record(transaction_id(tx_base, index)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money_sim::SimConfig;
    use std::time::SystemTime;

    fn near(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_millis(30)
    }

    #[test]
    fn an_arrival_is_dated_by_the_kernel_receive_time_within_a_bound() {
        let sim = Shared::new(&SimConfig::default());
        std::thread::sleep(Duration::from_millis(700));
        let now = sim.started.elapsed();
        let at = |back_ms: i64| {
            let t = if back_ms >= 0 {
                SystemTime::now() - Duration::from_millis(back_ms as u64)
            } else {
                SystemTime::now() + Duration::from_millis(back_ms.unsigned_abs())
            };
            sim.arrival(Some(t))
        };
        assert!(near(sim.arrival(None), now));
        assert!(near(at(100), now - Duration::from_millis(100)));
        // A time further back than the bound, or in the future, is not believed.
        assert!(near(at(5_000), now - MAX_RECEIVE_LAG));
        assert!(near(at(-1_000), now));
    }

    #[test]
    fn a_request_handled_out_of_order_keeps_its_arrival_time_and_place() {
        let sim = Shared::new(&SimConfig::default());
        let ms = Duration::from_millis;
        let first = sim.log_arrival(Some("a"), Endpoint::Points, ms(50));
        let second = sim.log_arrival(Some("b"), Endpoint::Points, ms(40));
        assert_eq!((first.index, second.index), (0, 1));
        sim.log_answer(first, Some(200), false);
        let log = sim.request_records();
        let keys: Vec<_> = log.iter().map(|r| (r.idempotency_key.as_str(), r.at_ms)).collect();
        assert_eq!(keys, vec![("b", 40), ("a", 50)]);
        assert_eq!((log[0].status, log[1].status), (None, Some(200)));
    }
}
