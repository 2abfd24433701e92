//! A simulated Money server ("money-sim") that implements `shared/spec/money-api.md` exactly,
//! records every effective grant, and can inject the faults payoutd must survive (latency, 5xx,
//! timeouts with unknown outcome, outages, Money's own rate limit).
//!
//! Tests start it in-process with [`MoneySim::start`]; scripts run the `money-sim` binary and use
//! the admin endpoints under `/_sim/`. Both views read the same state.
//!
//! # Grant request pipeline
//! Checks run in this order; the first that fails answers and nothing is stored:
//! 0. log the request ([`RequestRecord`]: key and arrival time now, the answer when it is ready);
//! 1. record the arrival (feeds `max_requests_in_any_second`; every grant request counts);
//! 2. rate limit: `429 rate_limited` with `Retry-After: 1` when more than `rate_limit_per_sec`
//!    requests were already *admitted* in the last second (rejected requests do not use up the
//!    budget, so a client that backs off recovers after one second);
//! 3. `X-Api-Key` (`401 unauthorized`);
//! 4. `Idempotency-Key`: exactly one header of 1..=128 printable ASCII characters
//!    (`400 invalid_request`);
//! 5. body: the exact fields of the endpoint, unknown fields rejected (`400 invalid_request`);
//! 6. idempotency store: a key stored with the same body replays (`200`, `"replayed": true`), with
//!    another body answers `422 idempotency_key_reused`;
//! 7. latency, then faults: active outage, `fail_5xx_share`, `timeout_share`;
//! 8. business checks (`404 customer_not_found`, `409 voucher_already_issued`) and the grant.
//!
//! Step 8 re-checks the key under the same lock that inserts it, so two concurrent requests with
//! one key never both grant: the later one answers as a replay of the first. The simulator
//! therefore never answers `409 request_in_progress`.

mod body;
mod http;
mod listener;
mod state;
mod window;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use self::listener::{ConnHandle, SimListener};
use self::state::Shared;

/// How long [`MoneySim::shutdown`] waits for open connections before aborting the server task.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Start-up configuration. The fault fields are also the baseline that `POST /_sim/reset`
/// restores.
#[derive(Clone)]
pub struct SimConfig {
    /// The `X-Api-Key` value every grant request must carry.
    pub api_key: String,
    /// Grant requests admitted per sliding one-second window; beyond it `429`. 0 = unlimited.
    pub rate_limit_per_sec: u32,
    /// Mean latency added to each grant request that passes the idempotency check.
    pub latency_ms: u64,
    /// Uniform jitter of +-`latency_jitter_ms` around `latency_ms`, clamped at 0.
    pub latency_jitter_ms: u64,
    /// Probability in [0, 1] that a request answers `503 unavailable` without granting.
    pub fail_5xx_share: f64,
    /// Probability in [0, 1] that a request hangs for `hang_ms`. A fair coin decides whether it
    /// grants before hanging (an unknown outcome that did commit) or hangs without granting.
    pub timeout_share: f64,
    /// How long a hanging request (timeout share, `hang` outage) waits before answering.
    pub hang_ms: u64,
    /// A `customer_uid` starting with this prefix answers `404 customer_not_found`.
    pub not_found_prefix: Option<String>,
    /// Grants the idempotency store makes room for up front. Growing a large map rehashes it
    /// under the store's lock, which stalls every request for tens of milliseconds and bunches
    /// arrivals (seen as a one-second window above the limit); benchmarks set their row count.
    pub expected_grants: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            api_key: "sim-key".to_owned(),
            rate_limit_per_sec: 0,
            latency_ms: 0,
            latency_jitter_ms: 0,
            fail_5xx_share: 0.0,
            timeout_share: 0.0,
            hang_ms: 10_000,
            not_found_prefix: Some("missing-".to_owned()),
            expected_grants: 0,
        }
    }
}

impl fmt::Debug for SimConfig {
    // The API key is a secret even in tests: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("api_key", &"<redacted>")
            .field("rate_limit_per_sec", &self.rate_limit_per_sec)
            .field("latency_ms", &self.latency_ms)
            .field("latency_jitter_ms", &self.latency_jitter_ms)
            .field("fail_5xx_share", &self.fail_5xx_share)
            .field("timeout_share", &self.timeout_share)
            .field("hang_ms", &self.hang_ms)
            .field("not_found_prefix", &self.not_found_prefix)
            .finish()
    }
}

impl SimConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.api_key.is_empty(), "api_key must not be empty");
        for (name, share) in
            [("fail_5xx_share", self.fail_5xx_share), ("timeout_share", self.timeout_share)]
        {
            anyhow::ensure!(
                (0.0..=1.0).contains(&share),
                "{name} must be within [0, 1], got {share}"
            );
        }
        Ok(())
    }
}

/// One effective (not replayed) grant, in grant order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub idempotency_key: String,
    /// `"vouchers"` or `"points"`.
    pub endpoint: String,
    pub campaign_id: i64,
    pub customer_uid: String,
    pub transaction_id: String,
    /// The request body as granted, with every field.
    pub body: serde_json::Value,
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
}

/// One grant request as it arrived (`GET /_sim/requests`), whatever its answer: the request log
/// tests use to see *when* each key was asked for (retry spacing, stop latency) and that a key
/// was never asked for at all (rows that must not reach Money).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The `Idempotency-Key` header as sent; empty when it was missing or not text.
    pub idempotency_key: String,
    /// `"vouchers"` or `"points"`.
    pub endpoint: String,
    /// Arrival, in milliseconds since the simulator started (the clock of [`MoneySim::now_ms`]).
    pub at_ms: u64,
    /// Arrival on the wall clock, in microseconds since the Unix epoch: comparable with the
    /// daemon's `payoutd::sends` trace lines (both processes read the same system clock).
    #[serde(default)]
    pub at_unix_us: u64,
    /// When the answer was ready; `None` while the request is still being handled, when its
    /// connection was dropped without an answer, or when the client went away first.
    pub answered_ms: Option<u64>,
    /// The answer's HTTP status; `None` in the same cases as `answered_ms`.
    pub status: Option<u16>,
    /// A `200` that replayed an earlier grant.
    pub replayed: bool,
}

/// What the simulator has seen since start or the last reset (`GET /_sim/ledger`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSummary {
    /// Every request to a grant endpoint, whatever its answer.
    pub requests_total: u64,
    /// Effective grants (replays excluded).
    pub grants_total: u64,
    /// `200` answers with `"replayed": true`.
    pub replays_total: u64,
    /// Non-200 answers by status (including `429` and the `503` after a hang).
    pub rejected_by_status: BTreeMap<u16, u64>,
    /// `429` answers.
    pub rate_limited_total: u64,
    /// The most grant requests arriving within any half-open one-second window.
    pub max_requests_in_any_second: u64,
    /// `duplicate_keys + duplicate_bodies`: extra effective grants of one logical row.
    pub duplicate_grants: u64,
    /// Extra grants under an already granted idempotency key. The store never forgets a key, so
    /// this is 0 unless the simulator itself is wrong; it is reported so the oracle is explicit.
    pub duplicate_keys: u64,
    /// Extra grants under different keys whose canonical body (endpoint and all fields) is
    /// identical to an earlier grant: the signature of a client that changed a row's key.
    pub duplicate_bodies: u64,
    pub first_grant_ms: Option<u64>,
    pub last_grant_ms: Option<u64>,
    /// Requests that hung (timeout share or `hang` outage), whether or not they granted.
    #[serde(default)]
    pub hangs_total: u64,
    /// Connections closed without an answer (`reset` outage).
    #[serde(default)]
    pub connections_dropped_total: u64,
    /// Connections clients opened (since the start or the last reset).
    #[serde(default)]
    pub connections_accepted_total: u64,
    /// Connections open when the ledger was read.
    #[serde(default)]
    pub connections_open: u64,
    /// The most connections open at once (since the start or the last reset).
    #[serde(default)]
    pub connections_open_peak: u64,
}

/// A change to the fault settings (`POST /_sim/faults`); `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    #[serde(default)]
    pub fail_5xx_share: Option<f64>,
    #[serde(default)]
    pub timeout_share: Option<f64>,
    #[serde(default)]
    pub latency_ms: Option<u64>,
    #[serde(default)]
    pub latency_jitter_ms: Option<u64>,
    #[serde(default)]
    pub rate_limit_per_sec: Option<u32>,
    /// Starts an outage window now, replacing any current one; `duration_ms: 0` ends it.
    #[serde(default)]
    pub outage: Option<Outage>,
}

impl FaultUpdate {
    fn validate(&self) -> Result<(), String> {
        for (name, share) in
            [("fail_5xx_share", self.fail_5xx_share), ("timeout_share", self.timeout_share)]
        {
            match share {
                Some(share) if !(0.0..=1.0).contains(&share) => {
                    return Err(format!("{name} must be within [0, 1], got {share}"));
                }
                Some(_) | None => {}
            }
        }
        Ok(())
    }
}

/// A window during which every grant request that reaches the fault stage fails the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    pub mode: OutageMode,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutageMode {
    /// Answer `503 unavailable`.
    Error503,
    /// Hang for `hang_ms`, then answer `503 unavailable`; nothing is granted.
    Hang,
    /// Close the TCP connection without an answer; nothing is granted.
    Reset,
}

/// The fault settings in force (`GET /_sim/faults`, and the answer to `POST /_sim/faults`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultState {
    pub fail_5xx_share: f64,
    pub timeout_share: f64,
    pub latency_ms: u64,
    pub latency_jitter_ms: u64,
    pub rate_limit_per_sec: u32,
    pub hang_ms: u64,
    pub outage: Option<ActiveOutageState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveOutageState {
    pub mode: OutageMode,
    pub remaining_ms: u64,
}

/// A running simulator. Dropping it stops the server too, without waiting.
pub struct MoneySim {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for MoneySim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MoneySim").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl MoneySim {
    /// Binds `addr` (port 0 picks a free port) and serves on a spawned task of the current
    /// tokio runtime.
    pub async fn start(addr: SocketAddr, cfg: SimConfig) -> anyhow::Result<MoneySim> {
        cfg.validate().context("invalid money-sim configuration")?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("money-sim could not bind {addr}"))?;
        let local_addr = tcp.local_addr().context("money-sim could not read its bound address")?;
        let shared = Arc::new(Shared::new(&cfg));
        let app =
            http::router(Arc::clone(&shared)).into_make_service_with_connect_info::<ConnHandle>();
        let mut stop = shared.subscribe_shutdown();
        let server = axum::serve(SimListener::new(tcp, shared.connections()), app)
            .with_graceful_shutdown(async move {
                // An error means the sender is gone, which is a shutdown as well.
                let _ = stop.wait_for(|stopping| *stopping).await;
            });
        let task = tokio::spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(%error, "money-sim server stopped with an error");
            }
        });
        tracing::info!(%local_addr, config = ?cfg, "money-sim started");
        Ok(MoneySim { shared, local_addr, task: Some(task) })
    }

    /// `http://IP:PORT`; an unspecified bind address (`0.0.0.0`, `::`) is given as loopback.
    pub fn base_url(&self) -> String {
        let ip = match self.local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.local_addr.port()))
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The same data `GET /_sim/ledger` serves.
    pub fn ledger(&self) -> LedgerSummary {
        self.shared.ledger()
    }

    /// Every effective grant, in grant order (`GET /_sim/grants`).
    pub fn grants(&self) -> Vec<GrantRecord> {
        self.shared.grant_records()
    }

    /// Every grant request since start or the last reset, in arrival order
    /// (`GET /_sim/requests`).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.request_records()
    }

    /// Milliseconds since the simulator started: the clock of every `at_ms`.
    pub fn now_ms(&self) -> u64 {
        self.shared.elapsed_ms()
    }

    /// Like `POST /_sim/faults`, except that shares outside [0, 1] are clamped instead of
    /// rejected.
    pub fn set_faults(&self, f: FaultUpdate) {
        self.shared.apply_faults(&f);
    }

    /// The fault settings in force (`GET /_sim/faults`).
    pub fn faults(&self) -> FaultState {
        self.shared.fault_state()
    }

    /// Like `POST /_sim/reset`: forgets all grants, keys and counters and restores the start-up
    /// fault settings. Requests in flight during a reset answer `503` instead of granting.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stops accepting, ends hanging requests, and waits (bounded) for open connections.
    pub async fn shutdown(mut self) {
        self.shared.begin_shutdown();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await.is_err() {
                tracing::warn!(
                    grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
                    "money-sim connections did not close in time; aborting the server task"
                );
                task.abort();
            }
        }
    }
}

impl Drop for MoneySim {
    fn drop(&mut self) {
        self.shared.begin_shutdown();
    }
}
