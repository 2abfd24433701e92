//! The partitioned executor: serves RUNNING campaigns one at a time, first come first served.
//!
//! For the campaign at the head of the queue, [`Engine::run_campaign`]:
//!
//! 1. loads (or decides and stores) the partition plan and puts rows a dead process left
//!    IN_FLIGHT back to PENDING;
//! 2. starts one **worker** per partition: it claims a batch of its PENDING rows (marking them
//!    IN_FLIGHT), loads them, lets the kind validate and build each request, and queues the
//!    requests; it claims the next batch as soon as the last one is queued (streaming), so memory
//!    stays bounded by `partitions × batch` whatever the campaign's size;
//! 3. one **dispatcher** takes a permit of the global rate limiter and a slot of the in-flight
//!    bound for each queued request, checks the **gate** (the campaign was RUNNING at the last
//!    poll, at most `gate_poll` ago), and hands the request to a sender task;
//! 4. each partition's **writer** collects outcomes and commits them in batches; a row counts as
//!    done only once its outcome is committed;
//! 5. when every worker has found nothing to claim and no outcome is outstanding, the campaign
//!    is marked COMPLETED by a statement that checks no row is left PENDING, IN_FLIGHT or FAILED.
//!
//! When the campaign stops being RUNNING (operator, breaker), the process shuts down, or Money
//! rejects the API key, the gate closes: nothing new is sent, queued and claimed-but-unsent rows
//! go back to PENDING, requests in flight finish and their outcomes are committed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{FixedOffset, Utc};
use rand::Rng;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, trace, warn};

use crate::breaker::{Admission, Breaker, BreakerSettings, Signal, Transition};
use crate::db::{DbError, DbPool, conn};
use crate::domain::{CampaignId, TargetId};
use crate::kind::{ErasedKind, GrantRequest, KindRegistry, Prepared, ValidationContext};
use crate::lease::{self, LeaseView};
use crate::money::{Disposition, MoneyClient, MoneyError};
use crate::plan::{PartitionRule, PartitionSlice};
use crate::rate::RateLimiter;
use crate::repo::{self, CampaignRow, Outcome, RowOutcome};
use crate::retry::RetryPolicy;

/// How the executor works; built by the daemon from its configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// This process's name in `claimed_by` and the audit trail.
    pub instance_id: String,
    /// Rows per claim.
    pub batch_size: u32,
    /// Grant requests in flight at once (all partitions together).
    pub max_in_flight: usize,
    /// Wait before claiming again after an empty claim.
    pub idle_poll: Duration,
    /// How often the gate re-reads the campaign's status (at most 1 s).
    pub gate_poll: Duration,
    /// Longest time an outcome waits before its batch is committed.
    pub flush_interval: Duration,
    /// Outcomes per commit at most.
    pub flush_rows: usize,
    /// After shutdown is asked, how long to keep trying to commit outcomes.
    pub drain_timeout: Duration,
    pub partition_rule: PartitionRule,
    pub retry: RetryPolicy,
    pub breaker: BreakerSettings,
    pub max_point_amount: i64,
    pub expiry_offset: FixedOffset,
    /// A partition lease not renewed for this long may be taken over by another instance.
    pub lease_time: Duration,
    /// How often leases are renewed and the partitions rebalanced between instances.
    pub lease_check: Duration,
    /// How often the remaining row count is checked against the partition rule (re-planning);
    /// zero turns re-planning off.
    pub replan_check: Duration,
    /// Whether the process behind a run id is known to be gone (an earlier life of a daemon on
    /// this host). Its leases are taken at once instead of after `lease_time`, so a restarted
    /// daemon resumes without waiting for its own old leases to expire.
    pub owner_gone: fn(&str) -> bool,
}

impl EngineSettings {
    pub fn new(instance_id: impl Into<String>) -> EngineSettings {
        EngineSettings {
            instance_id: instance_id.into(),
            batch_size: 250,
            max_in_flight: 512,
            idle_poll: Duration::from_millis(200),
            gate_poll: Duration::from_millis(200),
            flush_interval: Duration::from_millis(50),
            flush_rows: 1000,
            drain_timeout: Duration::from_secs(10),
            partition_rule: PartitionRule::default(),
            retry: RetryPolicy::default(),
            breaker: BreakerSettings::default(),
            max_point_amount: 1_000_000,
            expiry_offset: FixedOffset::east_opt(9 * 3600).unwrap_or(Utc.fix()),
            lease_time: Duration::from_secs(15),
            lease_check: Duration::from_secs(1),
            replan_check: Duration::from_secs(30),
            owner_gone: |_| false,
        }
    }
}

use chrono::Offset;

/// Process-wide counters, read by the throughput log and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Grant requests handed to Money.
    pub sent: AtomicU64,
    pub granted: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub released: AtomicU64,
    /// Money round-trip times as the daemon saw them.
    pub money_latency: LatencyHistogram,
}

/// A lock-free histogram of durations: four buckets per power of two of microseconds (each
/// bucket ≈ 19 % wide), up to about 17 minutes.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

const LATENCY_BUCKETS: usize = 120;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: (0..LATENCY_BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl LatencyHistogram {
    fn bucket(us: u64) -> usize {
        if us <= 1 {
            return 0;
        }
        let idx = ((us as f64).log2() * 4.0).floor() as usize;
        idx.min(LATENCY_BUCKETS - 1)
    }

    /// The upper bound of a bucket, in microseconds.
    fn upper_us(idx: usize) -> f64 {
        2f64.powf((idx as f64 + 1.0) / 4.0)
    }

    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) in milliseconds, as the upper bound of its bucket.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Self::upper_us(i) / 1000.0);
            }
        }
        None
    }
}

/// Why a campaign run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Every row is SUCCEEDED or DEAD; the campaign is COMPLETED.
    Completed,
    /// The campaign is no longer RUNNING (paused, stopped, completed elsewhere or gone).
    NotRunning(String),
    /// The process is shutting down; the campaign stays RUNNING.
    Shutdown,
    /// Money rejected the API key; the campaign was paused.
    Unauthorized,
    /// The circuit breaker opened; the campaign was paused (by the breaker).
    BreakerOpen,
    /// The campaign's status could not be read; it will be tried again.
    DatabaseUnavailable,
    /// The campaign cannot be run by this daemon (e.g. unknown kind); it was paused.
    Unrunnable(String),
}

/// Why the gate closed, first reason wins.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StopReason {
    NotRunning(String),
    BreakerOpen(String),
    Shutdown,
    Unauthorized,
    DatabaseUnavailable,
    Completed,
}

#[derive(Clone)]
struct Gate {
    token: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
}

impl Gate {
    fn new() -> Gate {
        Gate { token: CancellationToken::new(), reason: Arc::new(Mutex::new(None)) }
    }

    fn close(&self, why: StopReason) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(why);
        }
        self.token.cancel();
    }

    fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    fn reason(&self) -> Option<StopReason> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
}

/// A request on its way to the dispatcher.
struct Job {
    request: GrantRequest,
    /// The claim's token (fences the outcome write).
    claim: repo::ClaimToken,
    /// Which attempt of the row's current retry budget this is.
    budget_attempt: i32,
    outcomes: mpsc::UnboundedSender<RowOutcome>,
    /// Cancelled when this instance stops serving the row's partition (lease given up or lost,
    /// or the gate closed): the request is then released instead of sent.
    stop: CancellationToken,
}

impl Job {
    fn release(self) {
        let _ = self.outcomes.send(RowOutcome {
            target: self.request.target,
            claim: self.claim,
            outcome: Outcome::Released,
        });
    }
}

/// The executor.
pub struct Engine {
    pool: DbPool,
    kinds: KindRegistry,
    money: MoneyClient,
    limiter: RateLimiter,
    settings: EngineSettings,
    stats: Arc<Stats>,
    breaker: Arc<Mutex<Breaker>>,
    /// `<instance>#<nonce>`: the prefix of every claim token of this process.
    run_id: String,
    /// Probe claims made so far (for unique claim tokens).
    probes: AtomicU64,
    /// `money.rate_limit_per_sec` for all instances together; this process's limiter gets the
    /// share that follows the partitions it holds.
    global_limit: std::num::NonZeroU32,
}

fn lock_breaker(b: &Mutex<Breaker>) -> std::sync::MutexGuard<'_, Breaker> {
    match b.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Engine {
    pub fn new(
        pool: DbPool,
        kinds: KindRegistry,
        money: MoneyClient,
        limiter: RateLimiter,
        settings: EngineSettings,
    ) -> Engine {
        let breaker = Arc::new(Mutex::new(Breaker::new(settings.breaker)));
        // Claim tokens start with the instance id and a nonce of this process's life, so two
        // runs of a daemon (a pid reused after a restart) never share one.
        let run_id = format!("{}#{:08x}", settings.instance_id, rand::rng().random::<u32>());
        let global_limit = limiter.limit_per_sec();
        Engine {
            global_limit,
            pool,
            kinds,
            money,
            limiter,
            settings,
            stats: Arc::new(Stats::default()),
            breaker,
            run_id,
            probes: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// `<instance>#<nonce>`: this process in claim tokens, `daemon_instances` and leases.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Serves the queue published by campaign discovery until `shutdown`.
    ///
    /// After each run the queue is re-read directly, so the next campaign starts without waiting
    /// for the next discovery tick.
    pub async fn run(
        &self,
        mut queue: watch::Receiver<Vec<CampaignRow>>,
        shutdown: CancellationToken,
    ) {
        let mut fresh: Option<Vec<CampaignRow>> = None;
        self.restore_breaker().await;
        self.forget_dead_instances().await;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if !lock_breaker(&self.breaker).is_closed() {
                self.probe_cycle(&shutdown).await;
                fresh = self.reread_queue().await;
                continue;
            }
            let current = fresh.take().unwrap_or_else(|| queue.borrow_and_update().clone());
            let Some(head) = current.into_iter().next() else {
                // Idle: take discovery's next publication, or look for ourselves every
                // `IDLE_LOOK` (at most `gate_poll`), so a campaign set RUNNING starts within a
                // tenth of a second: the look is one indexed read of `campaigns`.
                tokio::select! {
                    _ = queue.changed() => continue,
                    _ = tokio::time::sleep(IDLE_LOOK.min(self.settings.gate_poll)) => {
                        fresh = self.look_for_running().await;
                        continue;
                    }
                    _ = shutdown.cancelled() => break,
                }
            };
            let id = head.id();
            let end = self.run_campaign(head, &shutdown).await;
            info!(campaign.id = %id, end = ?end, "campaign run ended");
            match end {
                RunEnd::Shutdown => break,
                RunEnd::Completed
                | RunEnd::Unauthorized
                | RunEnd::Unrunnable(_)
                | RunEnd::BreakerOpen => {
                    fresh = self.reread_queue().await;
                }
                RunEnd::NotRunning(_) | RunEnd::DatabaseUnavailable => {
                    // Wait for discovery to publish a newer queue (or shutdown).
                    tokio::select! {
                        _ = queue.changed() => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        // Leave at once, so other instances take this one's share without waiting for expiry
        // (once its last requests have left Money's window).
        if let Ok(mut c) = conn(&self.pool).await
            && let Err(e) = lease::retire(
                &mut c,
                &self.run_id,
                &self.settings.instance_id,
                self.limiter.recent_sends(),
            )
            .await
        {
            warn!(error = %e, "cannot deregister this instance; its leases expire by themselves");
        }
    }

    /// At start: forgets the instances that died without deregistering a day ago or more.
    async fn forget_dead_instances(&self) {
        let Ok(mut c) = conn(&self.pool).await else { return };
        match lease::forget_dead_instances(&mut c, DEAD_INSTANCES_KEPT).await {
            Ok(0) => {}
            Ok(n) => info!(
                instances = n,
                "forgot daemon instances whose heartbeat expired a day ago or more"
            ),
            Err(e) => warn!(error = %e, "cannot forget long-dead daemon instances"),
        }
    }

    /// The breaker lives in memory; campaigns it paused are in the database. At start, if any
    /// campaign is paused by the breaker, the breaker starts open and probes at once (else such a
    /// campaign would wait for a breaker that no longer exists).
    async fn restore_breaker(&self) {
        let Ok(mut c) = conn(&self.pool).await else { return };
        let Ok(candidates) = repo::breaker_candidates(&mut c).await else { return };
        if candidates
            .iter()
            .any(|c| c.status == "PAUSED" && c.paused_by.as_deref() == Some("BREAKER"))
        {
            warn!("campaigns paused by the circuit breaker before this start: probing Money first");
            lock_breaker(&self.breaker).force_open(Instant::now());
        }
    }

    /// While the breaker is not closed: waits out the open period, then sends exactly one probe
    /// with a row of the first campaign that may use one (RUNNING, or paused by the breaker).
    /// A healthy answer closes the breaker and resumes the campaigns it paused; a failure opens
    /// it again. Returns after one probe, or on shutdown.
    async fn probe_cycle(&self, shutdown: &CancellationToken) {
        let state = lock_breaker(&self.breaker).state();
        if let crate::breaker::BreakerState::Open { until } = state {
            let until = tokio::time::Instant::from_std(until);
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let actor = format!("daemon:{}", self.settings.instance_id);
        let probe = match self.claim_probe_row().await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot pick a row for the breaker probe; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => {}
                }
                return;
            }
        };
        let Some((campaign, kind, claimed, request)) = probe else {
            // Nothing is left to send: no request can hurt, so close and let campaigns finish.
            let closed = {
                let mut b = lock_breaker(&self.breaker);
                b.admit_probe(Instant::now());
                b.close_unprobed()
            };
            if closed.is_some() {
                info!("circuit breaker closed: no row is left to probe with");
                self.after_breaker_closed(None, "nothing left to probe with", &actor).await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            return;
        };
        let admitted = lock_breaker(&self.breaker).admit_probe(Instant::now());
        if admitted != Admission::Probe && admitted != Admission::Send {
            self.write_one(
                &kind,
                campaign,
                claimed.target,
                claimed.claim.clone(),
                Outcome::Released,
            )
            .await;
            return;
        }
        self.limiter.acquire().await;
        let admitted = self.limiter.admit().await;
        info!(campaign.id = %campaign, "circuit breaker half-open: sending one probe request");
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        let limiter = self.limiter.clone();
        let departed = Box::new(move |at| limiter.departed(admitted, at));
        let result = self.money.grant_noting_departure(&request, departed).await;
        let signal = Signal::of(&result);
        let error = result.as_ref().err().map(|e| e.to_string());
        let outcome = decide(
            result,
            claimed.budget_attempt(),
            &self.settings.retry,
            rand::rng().random::<f64>(),
        );
        self.write_one(&kind, campaign, claimed.target, claimed.claim.clone(), outcome).await;
        let transition = lock_breaker(&self.breaker).record_probe(signal, Instant::now());
        match transition {
            Some(Transition::Closed) => {
                info!(campaign.id = %campaign, "circuit breaker closed: the probe succeeded");
                self.after_breaker_closed(Some(campaign), "the probe succeeded", &actor).await;
            }
            Some(Transition::Reopened) => {
                let error = error.unwrap_or_default();
                warn!(campaign.id = %campaign, error = %error, "breaker probe failed: open for another {} s", self.settings.breaker.open_for.as_secs());
                if let Ok(mut c) = conn(&self.pool).await {
                    let detail = serde_json::json!({ "error": error }).to_string();
                    let _ = repo::record_event(
                        &mut c,
                        Some(campaign),
                        "BREAKER_PROBE_FAILED",
                        None,
                        &actor,
                        Some(&detail),
                    )
                    .await;
                }
            }
            Some(Transition::Opened) | None => {}
        }
    }

    /// Claims one sendable row for a probe, writing invalid rows off as it goes.
    async fn claim_probe_row(
        &self,
    ) -> Result<Option<(CampaignId, Arc<dyn ErasedKind>, repo::Claimed, GrantRequest)>, DbError>
    {
        let mut c = conn(&self.pool).await?;
        let token = self.claim_token("probe");
        for campaign in repo::breaker_candidates(&mut c).await? {
            let Some(kind) = self.kinds.get(&campaign.kind) else { continue };
            let id = campaign.id();
            while let Some(claimed) = repo::claim_probe(&mut c, kind.table(), id, &token).await? {
                let ctx = self.validation_context();
                let mut prepared = kind.prepare(&mut c, id, &[claimed.target], &ctx).await?;
                match prepared.pop().map(|p| p.request) {
                    Some(Ok(request)) => return Ok(Some((id, kind, claimed, request))),
                    Some(Err(invalid)) => {
                        let dead =
                            Outcome::Invalid { code: invalid.code, message: invalid.message };
                        let row = RowOutcome {
                            target: claimed.target,
                            claim: claimed.claim.clone(),
                            outcome: dead,
                        };
                        repo::write_outcomes(
                            &mut c,
                            kind.table(),
                            kind.kind(),
                            id,
                            repo::PROBE_SHARD,
                            &[row],
                        )
                        .await?;
                    }
                    None => break,
                }
            }
        }
        Ok(None)
    }

    /// Records the breaker closing and resumes the campaigns it paused.
    async fn after_breaker_closed(&self, campaign: Option<CampaignId>, why: &str, actor: &str) {
        let Ok(mut c) = conn(&self.pool).await else { return };
        let detail = serde_json::json!({ "reason": why }).to_string();
        if let Err(e) =
            repo::record_event(&mut c, campaign, "BREAKER_CLOSED", None, actor, Some(&detail)).await
        {
            warn!(error = %e, "cannot record the breaker closing");
        }
        match repo::resume_breaker_paused(&mut c, actor).await {
            Ok(ids) if !ids.is_empty() => {
                info!(campaigns = ?ids, "campaigns paused by the breaker resume")
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot resume the campaigns the breaker paused; the next probe cycle retries")
            }
        }
    }

    /// Commits one row's outcome, trying a few times.
    async fn write_one(
        &self,
        kind: &Arc<dyn ErasedKind>,
        campaign: CampaignId,
        target: TargetId,
        claim: repo::ClaimToken,
        outcome: Outcome,
    ) {
        let row = [RowOutcome { target, claim, outcome }];
        for attempt in 0..10u64 {
            let done = async {
                let mut c = conn(&self.pool).await?;
                repo::write_outcomes(
                    &mut c,
                    kind.table(),
                    kind.kind(),
                    campaign,
                    repo::PROBE_SHARD,
                    &row,
                )
                .await
                .map_err(DbError::from)
            };
            match done.await {
                Ok(()) => return,
                Err(e) => {
                    warn!(campaign.id = %campaign, error = %e, "cannot commit the probe's outcome yet");
                    tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                }
            }
        }
        error!(campaign.id = %campaign, row = %target, "probe outcome not committed; the row stays IN_FLIGHT and is resent with its key when the campaign runs");
    }

    fn claim_token(&self, what: &str) -> repo::ClaimToken {
        let seq = self.probes.fetch_add(1, Ordering::Relaxed);
        format!("{}/{what}/{seq}", self.run_id).into()
    }

    fn validation_context(&self) -> ValidationContext {
        ValidationContext {
            now: Utc::now(),
            max_point_amount: self.settings.max_point_amount,
            expiry_offset: self.settings.expiry_offset,
        }
    }

    /// The queue if any campaign is RUNNING (an empty one if none is); `None` if the database
    /// cannot be read.
    async fn look_for_running(&self) -> Option<Vec<CampaignRow>> {
        let mut c = conn(&self.pool).await.ok()?;
        if repo::any_running(&mut c).await.ok()? {
            repo::running_queue(&mut c).await.ok()
        } else {
            Some(Vec::new())
        }
    }

    async fn reread_queue(&self) -> Option<Vec<CampaignRow>> {
        let mut c = conn(&self.pool).await.ok()?;
        repo::running_queue(&mut c).await.ok()
    }

    /// Runs one campaign until it completes, stops being RUNNING, or `shutdown`.
    #[tracing::instrument(skip_all, fields(campaign.id = %campaign.id, campaign.kind = %campaign.kind))]
    pub async fn run_campaign(
        &self,
        campaign: CampaignRow,
        shutdown: &CancellationToken,
    ) -> RunEnd {
        let id = campaign.id();
        let actor = format!("daemon:{}", self.settings.instance_id);
        let Some(kind) = self.kinds.get(&campaign.kind) else {
            let reason = format!("unknown campaign kind {:?}", campaign.kind);
            error!(campaign.id = %id, "{reason}; pausing the campaign");
            if let Ok(mut c) = conn(&self.pool).await {
                let _ = repo::pause_by_daemon(&mut c, id, "DAEMON", &reason, &actor).await;
            }
            return RunEnd::Unrunnable(reason);
        };
        let plan = match self.prepare_run(id, kind.as_ref(), &actor).await {
            Ok(Some(plan)) => plan,
            Ok(None) => return RunEnd::NotRunning("not RUNNING at start".to_owned()),
            Err(e) => {
                warn!(campaign.id = %id, error = %e, "cannot start the campaign run");
                return RunEnd::DatabaseUnavailable;
            }
        };
        info!(campaign.id = %id, partitions = plan.len(), "serving campaign");

        let gate = Gate::new();
        // Outcome commits may outlive the gate (they must land) but not the drain deadline.
        let give_up = CancellationToken::new();

        let mut tasks = JoinSet::new();
        tasks.spawn(gate_loop(
            self.pool.clone(),
            id,
            self.settings.gate_poll,
            gate.clone(),
            shutdown.clone(),
        ));

        let (job_tx, job_rx) = mpsc::channel::<Job>(self.settings.max_in_flight.max(64) * 2);
        let dispatcher = Dispatcher {
            money: self.money.clone(),
            limiter: self.limiter.clone(),
            in_flight: Arc::new(Semaphore::new(self.settings.max_in_flight.max(1))),
            max_in_flight: self.settings.max_in_flight.max(1),
            retry: self.settings.retry,
            gate: gate.clone(),
            stats: self.stats.clone(),
            breaker: self.breaker.clone(),
        };
        let dispatch = tokio::spawn(dispatcher.run(job_rx).in_current_span());

        let mut held = Held {
            kind: kind.clone(),
            campaign: id,
            plan,
            parts: std::collections::BTreeMap::new(),
            jobs: Some(job_tx),
            gate: gate.clone(),
            give_up: give_up.clone(),
            last_replan_check: Instant::now(),
            actor: actor.clone(),
            last_done: (
                Instant::now(),
                self.stats.granted.load(Ordering::Relaxed)
                    + self.stats.dead.load(Ordering::Relaxed),
            ),
            replanning: false,
            others: 0,
            capped: false,
            settled: Arc::new(Notify::new()),
        };
        let settled = held.settled.clone();

        // Take partitions at once, then keep leases renewed and shares balanced; watch for
        // completion while the gate is open.
        let mut lease_tick = tokio::time::interval(self.settings.lease_check);
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(self.settings.idle_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = gate.token.cancelled() => break,
                _ = lease_tick.tick() => {
                    if let Err(e) = self.lease_step(&mut held).await {
                        warn!(campaign.id = %id, error = %e, "cannot renew or balance partition leases; retrying");
                    } else if held.in_transition() || self.share_settling() {
                        lease_tick.reset_after(TRANSITION_STEP.min(self.settings.lease_check));
                    }
                    if held.serving() == 0 {
                        // Nothing held here: another instance may have finished the last rows.
                        self.complete_check(&held, &gate, &actor).await;
                    }
                }
                // Every `idle_poll`, and at once when a partition may have finished (its worker
                // found nothing to claim, or its last outcomes were committed).
                _ = tick.tick() => {
                    if held.serving() > 0 && held.all_idle() {
                        self.complete_check(&held, &gate, &actor).await;
                    }
                }
                _ = settled.notified() => {
                    if held.serving() > 0 && held.all_idle() {
                        self.complete_check(&held, &gate, &actor).await;
                    }
                }
            }
        }

        // Drain: workers stop claiming and release what they hold, the dispatcher releases what
        // is queued and waits for requests in flight, writers commit everything.
        let drain_started = Instant::now();
        held.jobs = None;
        for part in held.parts.values() {
            part.stop.cancel();
        }
        for part in held.parts.values_mut() {
            if let Some(w) = part.worker.take() {
                let _ = w.await;
            }
        }
        if let Err(e) = dispatch.await {
            error!(campaign.id = %id, error = %e, "dispatcher task failed");
        }
        let deadline = self.settings.drain_timeout;
        let shutdown_for_writers = shutdown.clone();
        let give_up_guard = give_up.clone();
        let watchdog = tokio::spawn(async move {
            // While the process keeps running, writers keep retrying; on shutdown they get
            // `drain_timeout` to commit before giving up (rows stay IN_FLIGHT and are recovered
            // with the same idempotency key by whoever takes the partition next).
            shutdown_for_writers.cancelled().await;
            tokio::time::sleep(deadline).await;
            give_up_guard.cancel();
        });
        for part in held.parts.values_mut() {
            if let Some(w) = part.writer.take() {
                let _ = w.await;
            }
        }
        watchdog.abort();
        self.leave_campaign(&mut held).await;
        tasks.abort_all();
        let reason = gate.reason();
        debug!(campaign.id = %id, drain_ms = drain_started.elapsed().as_millis() as u64, "drained");
        match reason {
            Some(StopReason::Completed) => {
                info!(campaign.id = %id, "campaign completed");
                RunEnd::Completed
            }
            Some(StopReason::NotRunning(s)) => RunEnd::NotRunning(s),
            Some(StopReason::BreakerOpen(last_error)) => {
                let reason = format!(
                    "circuit breaker opened after {} consecutive failures of Money (last: {last_error}); \
                     it probes Money again in {} s and resumes the campaign when Money answers",
                    self.settings.breaker.failure_threshold,
                    self.settings.breaker.open_for.as_secs()
                );
                error!(campaign.id = %id, "{reason}; pausing the campaign");
                if let Ok(mut c) = conn(&self.pool).await {
                    let paused =
                        repo::pause_by_daemon(&mut c, id, "BREAKER", &reason, &actor).await;
                    let detail =
                        serde_json::json!({ "last_error": last_error, "urgent": true }).to_string();
                    let event = repo::record_event(
                        &mut c,
                        Some(id),
                        "BREAKER_OPENED",
                        None,
                        &actor,
                        Some(&detail),
                    )
                    .await;
                    if let Err(e) = paused.and(event) {
                        error!(campaign.id = %id, error = %e, "could not record the breaker pause");
                    }
                }
                RunEnd::BreakerOpen
            }
            Some(StopReason::Shutdown) | None => RunEnd::Shutdown,
            Some(StopReason::DatabaseUnavailable) => RunEnd::DatabaseUnavailable,
            Some(StopReason::Unauthorized) => {
                let reason =
                    "Money rejected the API key (HTTP 401): fix money.api_key, then resume";
                error!(campaign.id = %id, "{reason}; pausing the campaign");
                if let Ok(mut c) = conn(&self.pool).await {
                    if let Err(e) =
                        repo::pause_by_daemon(&mut c, id, "DAEMON", reason, &actor).await
                    {
                        error!(campaign.id = %id, error = %e, "could not pause the campaign");
                    }
                    let detail =
                        serde_json::json!({ "reason": reason, "http_status": 401 }).to_string();
                    if let Err(e) = repo::record_event(
                        &mut c,
                        Some(id),
                        "CONFIG_FAULT",
                        None,
                        &actor,
                        Some(&detail),
                    )
                    .await
                    {
                        error!(campaign.id = %id, error = %e, "could not record the configuration fault");
                    }
                }
                RunEnd::Unauthorized
            }
        }
    }

    /// Confirms the campaign is RUNNING and stores its plan (rows left IN_FLIGHT are recovered
    /// per partition, by whoever acquires its lease).
    async fn prepare_run(
        &self,
        id: CampaignId,
        kind: &dyn ErasedKind,
        actor: &str,
    ) -> Result<Option<Vec<PartitionSlice>>, DbError> {
        let mut c = conn(&self.pool).await?;
        if repo::campaign_status(&mut c, id).await?.as_deref() != Some("RUNNING") {
            return Ok(None);
        }
        // Counting a large campaign is the longest step before its first grant (0.7 s at
        // 2,000,000 rows in one scan), so the first plan counts disjoint index ranges at once.
        let counted = match repo::stored_partition_count(&mut c, id).await? {
            Some(_) => None,
            None => Some(self.count_rows(kind.table(), id).await?),
        };
        let plan = repo::ensure_plan_counted(
            &mut c,
            kind.table(),
            id,
            self.settings.partition_rule,
            actor,
            counted,
        )
        .await?;
        repo::mark_started(&mut c, id).await?;
        Ok(Some(plan))
    }

    /// The campaign's rows, counted over [`repo::count_ranges`] on several connections at once.
    async fn count_rows(&self, table: &str, id: CampaignId) -> Result<i64, DbError> {
        let counts = futures::future::try_join_all(
            repo::count_ranges(PLAN_COUNT_SLICES).into_iter().map(|range| async move {
                let mut c = conn(&self.pool).await?;
                Ok::<i64, DbError>(repo::count_target_range(&mut c, table, id, &range).await?)
            }),
        )
        .await?;
        Ok(counts.into_iter().sum())
    }

    async fn try_complete(
        &self,
        table: &str,
        id: CampaignId,
        actor: &str,
    ) -> Result<bool, DbError> {
        let mut c = conn(&self.pool).await?;
        Ok(repo::complete_if_done(&mut c, table, id, actor).await?)
    }

    /// Marks the campaign COMPLETED if no row is left to do (in any instance's partitions).
    async fn complete_check(&self, held: &Held, gate: &Gate, actor: &str) {
        match self.try_complete(held.kind.table(), held.campaign, actor).await {
            Ok(true) => gate.close(StopReason::Completed),
            Ok(false) => {}
            Err(e) => warn!(campaign.id = %held.campaign, error = %e, "completion check failed"),
        }
    }

    /// One round of lease keeping, every `lease_check`:
    ///
    /// 1. partitions given up and drained are released, so another instance takes them at once;
    /// 2. the leases still held are renewed; one renewed by nobody (taken over after this
    ///    instance failed to renew in time) stops at once;
    /// 3. a pending re-plan makes every instance give up its partitions, and the last one to do
    ///    so swaps the plan; otherwise the fair share is recomputed from the live participants,
    ///    partitions beyond it are given up and free or expired ones taken up to it (a taken
    ///    partition's rows left IN_FLIGHT go back to PENDING first);
    /// 4. the rate limiter gets this instance's share of the global limit, which follows the
    ///    partitions it serves, lowered before a partition is given up and raised one window
    ///    (1 s + slack) after a taken one was last sent in elsewhere, so the instances' shares
    ///    never add up to more than the limit, not even in a window that still counts the
    ///    previous holder's last requests;
    /// 5. the heartbeat says which campaign this instance serves at what rate.
    async fn lease_step(&self, held: &mut Held) -> Result<(), DbError> {
        let id = held.campaign;
        let lease_time = self.settings.lease_time;
        let mut c = conn(&self.pool).await?;
        let done =
            self.stats.granted.load(Ordering::Relaxed) + self.stats.dead.load(Ordering::Relaxed);
        let (then, done_then) = std::mem::replace(&mut held.last_done, (Instant::now(), done));
        let secs = then.elapsed().as_secs_f64();
        let rows_per_sec = (secs > 0.0).then(|| done.saturating_sub(done_then) as f64 / secs);
        let share = if held.serving() > 0 { self.limiter.limit_per_sec().get() } else { 0 };
        lease::heartbeat(
            &mut c,
            &lease::Heartbeat {
                run_id: &self.run_id,
                instance_id: &self.settings.instance_id,
                campaign: Some(id),
                lease_time,
                rate_limit_per_sec: f64::from(share),
                current_rows_per_sec: rows_per_sec,
                recent_sends: self.limiter.recent_sends(),
            },
        )
        .await?;
        held.others = lease::others_rate(&mut c, &self.run_id).await?.ceil() as u64;

        // 1. Given up and drained: release.
        let drained: Vec<u16> = held
            .parts
            .iter()
            .filter(|(_, p)| p.state == PartState::Shedding && p.drained())
            .map(|(n, _)| *n)
            .collect();
        for n in drained {
            lease::release(&mut c, id, &self.run_id, n).await?;
            held.parts.remove(&n);
            info!(campaign.id = %id, partition = n, "partition handed back");
        }
        // Lost partitions are forgotten once drained (their lease is someone else's).
        held.parts.retain(|_, p| !(p.state == PartState::Lost && p.drained()));

        // 2. Renew.
        let mine: Vec<u16> = held
            .parts
            .iter()
            .filter(|(_, p)| p.state != PartState::Lost)
            .map(|(n, _)| *n)
            .collect();
        let renewed = lease::renew(&mut c, id, &self.run_id, &mine, lease_time).await?;
        for n in mine.iter().filter(|n| !renewed.contains(n)) {
            if let Some(part) = held.parts.get_mut(n) {
                error!(campaign.id = %id, partition = n, "partition lease lost (not renewed in time and taken over): stopping its sends at once");
                part.state = PartState::Lost;
                part.stop.cancel();
            }
        }

        // 3. Re-plan or balance.
        held.replanning = lease::pending_replan(&mut c, id).await?.is_some();
        if held.replanning {
            for (n, part) in held.parts.iter_mut() {
                if part.state == PartState::Serving {
                    info!(campaign.id = %id, partition = n, "re-plan pending: giving the partition up");
                    part.state = PartState::Shedding;
                    part.stop.cancel();
                }
            }
            self.apply_share(held);
            if held.parts.is_empty()
                && let Some(plan) = lease::apply_replan(&mut c, id, &held.actor).await?
            {
                info!(campaign.id = %id, partitions = plan.len(), "campaign re-planned");
                held.plan = plan;
            } else if held.parts.is_empty() {
                // Swapped by another instance meanwhile?
                held.follow_plan(&lease::leases(&mut c, id).await?);
            }
        } else {
            let mut views = lease::leases(&mut c, id).await?;
            let mut participants = lease::participants(&mut c, id).await?;
            let gone: std::collections::BTreeSet<String> = views
                .iter()
                .filter_map(|v| v.owner.clone())
                .chain(participants.iter().cloned())
                .filter(|o| o != &self.run_id && (self.settings.owner_gone)(o))
                .collect();
            if !gone.is_empty() {
                for owner in &gone {
                    warn!(campaign.id = %id, owner = %owner, "an earlier daemon process on this host is gone: taking its partitions now");
                    lease::deregister(&mut c, owner).await?;
                }
                views = lease::leases(&mut c, id).await?;
                participants = lease::participants(&mut c, id).await?;
            }
            held.follow_plan(&views);
            // Leases this process still holds from an earlier run of the campaign that could
            // not hand them back (the database was unreachable when it ended): that run has
            // drained, so they are taken up again, once renewed (nobody took them meanwhile).
            let orphans: Vec<PartitionSlice> = views
                .iter()
                .filter(|v| {
                    v.owner.as_deref() == Some(self.run_id.as_str())
                        && !held.parts.contains_key(&v.partition_no)
                        && held.plan.contains(&v.slice)
                })
                .map(|v| v.slice)
                .collect();
            for slice in orphans {
                let n = slice.partition_no;
                if lease::renew(&mut c, id, &self.run_id, &[n], lease_time).await?.contains(&n) {
                    let recovered =
                        repo::recover_in_flight(&mut c, held.kind.table(), id, &slice).await?;
                    info!(campaign.id = %id, partition = n, recovered, "partition still leased to this process from its previous run: serving it again");
                    // Its earlier sends were this process's own: the send log counts them.
                    self.start_partition(held, slice, Instant::now());
                }
            }
            self.apply_share(held);
            // Partitions being given up or lost are neither kept nor taken: leave them out.
            let serving: Vec<LeaseView> = views
                .into_iter()
                .filter(|v| {
                    held.parts.get(&v.partition_no).is_none_or(|p| p.state == PartState::Serving)
                })
                .collect();
            let plan =
                lease::plan_balance(&serving, &participants, &self.run_id, held.plan.len() as u16);
            for n in &plan.shed {
                if let Some(part) = held.parts.get_mut(n) {
                    info!(campaign.id = %id, partition = n, share = plan.target, instances = plan.participants, "more than a fair share: giving the partition up");
                    part.state = PartState::Shedding;
                    part.stop.cancel();
                }
            }
            // Lower the share before anything is taken.
            self.apply_share(held);
            let mut serving_now = held.serving();
            // Partitions taken in this step start together once all are taken, with the share
            // raised once: started one by one, each acquisition waited behind the claims of the
            // partitions already started, and a campaign of 8 partitions ran for a second at
            // 1/8, 2/8, … of its rate.
            let mut taken: Vec<(PartitionSlice, Instant)> = Vec::new();
            for n in plan.candidates {
                if serving_now >= usize::from(plan.target) || held.gate.is_closed() {
                    break;
                }
                if held.parts.contains_key(&n) {
                    continue;
                }
                let Some(slice) = held.plan.iter().find(|s| s.partition_no == n).copied() else {
                    continue;
                };
                let Some(acquired) =
                    lease::try_acquire(&mut c, id, &self.run_id, &slice, lease_time).await?
                else {
                    continue;
                };
                let recovered =
                    repo::recover_in_flight(&mut c, held.kind.table(), id, &slice).await?;
                let counts_from = self.counts_from(acquired.quiet_for);
                let share_in_ms = counts_from.saturating_duration_since(Instant::now()).as_millis();
                if share_in_ms > 0 {
                    info!(campaign.id = %id, partition = n, share_in_ms, "partition last sent in elsewhere within a window: it counts in this instance's rate share once that window has passed");
                }
                match acquired.previous_owner {
                    Some(prev) => {
                        warn!(campaign.id = %id, partition = n, previous_owner = %prev, recovered, "took over a partition whose lease ran out; its rows left IN_FLIGHT are resent with their idempotency keys")
                    }
                    None if recovered > 0 => {
                        warn!(campaign.id = %id, partition = n, recovered, "rows left IN_FLIGHT by an earlier run go back to PENDING; they are resent with their idempotency keys")
                    }
                    None => info!(campaign.id = %id, partition = n, "partition taken"),
                }
                taken.push((slice, counts_from));
                serving_now += 1;
            }
            for (slice, counts_from) in taken {
                self.start_partition(held, slice, counts_from);
            }
            self.apply_share(held);
        }
        self.maybe_replan(&mut c, held).await;
        Ok(())
    }

    /// The last window holds more sends than the share now allows (it was just lowered): the
    /// heartbeat then comes every [`TRANSITION_STEP`], so instances held down by those sends
    /// (see [`Engine::apply_share`]) see them age out within a step.
    fn share_settling(&self) -> bool {
        let (recent, _) = self.limiter.recent_sends();
        recent > self.limiter.capacity().get() as usize
    }

    /// When a partition taken now may count in this instance's share: one window of the rate
    /// limiter (1 s + slack) after anybody last sent in it. The previous holder's last requests
    /// still count at Money until then, and this instance's send log does not know them; a share
    /// raised at once, with three instances sharing 2,000/s and one of them stopped, put 2,006
    /// requests into one second at Money (the two others took its partitions, raised their
    /// shares and started their bursts while its last second was still counting).
    fn counts_from(&self, quiet_for: Option<Duration>) -> Instant {
        let window = self.limiter.pacing().window;
        Instant::now() + quiet_for.map_or(Duration::ZERO, |q| window.saturating_sub(q))
    }

    /// This instance's share of the global limit: `limit × counted / partitions`, at least 1,
    /// where `counted` is the partitions served here whose previous holder's requests have left
    /// Money's window (see [`Engine::counts_from`]), and at most the limit less what the other
    /// instances may still have in Money's window (`held.others`). Lowered at once when a
    /// partition is given up; raised one window after a taken partition was last sent in.
    ///
    /// Leases keep the shares of one campaign within the limit; the cap covers what they cannot
    /// see. Instances move to the next campaign, or notice a pause, each on its own tick: one
    /// that got there first took every partition of the next campaign at the whole limit while
    /// another still sent, or had sent within the last second, at its share in the campaign
    /// before (`scaleout::a_campaign_switch_never_doubles_the_rate`).
    fn apply_share(&self, held: &mut Held) {
        let limit = u64::from(self.global_limit.get());
        let partitions = held.plan.len().max(1) as u64;
        let counted = held.counted(Instant::now()) as u64;
        let worth = limit * counted / partitions;
        let cap = limit.saturating_sub(held.others);
        let capped = cap < worth;
        let share = worth.min(cap);
        let share = std::num::NonZeroU32::new(u32::try_from(share.max(1)).unwrap_or(u32::MAX))
            .unwrap_or(std::num::NonZeroU32::MIN);
        if capped != held.capped {
            held.capped = capped;
            if capped {
                info!(campaign.id = %held.campaign, limit_per_sec = share.get(), worth, others = held.others, "rate share held down: other instances' requests of the last window still count at Money");
            }
        }
        if self.limiter.limit_per_sec() != share {
            info!(campaign.id = %held.campaign, limit_per_sec = share.get(), partitions = held.serving(), of = partitions, others = held.others, "rate share");
            self.limiter.set_limit(share);
        }
    }

    /// The first participant (by run id) checks the remaining row count every `replan_check`
    /// and asks for a re-plan when the partition rule gives another count for it.
    async fn maybe_replan(&self, c: &mut diesel_async::AsyncMysqlConnection, held: &mut Held) {
        let every = self.settings.replan_check;
        if every.is_zero() || held.last_replan_check.elapsed() < every {
            return;
        }
        held.last_replan_check = Instant::now();
        let first = match lease::participants(c, held.campaign).await {
            Ok(p) => p.first().is_none_or(|f| f == &self.run_id),
            Err(_) => false,
        };
        if !first {
            return;
        }
        let remaining = match lease::remaining_rows(c, held.kind.table(), held.campaign).await {
            Ok(n) => n,
            Err(e) => {
                warn!(campaign.id = %held.campaign, error = %e, "cannot count the remaining rows");
                return;
            }
        };
        let current = held.plan.len() as u16;
        if let Some(to) = lease::replan_decision(
            current,
            remaining,
            self.settings.partition_rule,
            REPLAN_HYSTERESIS,
        ) {
            match lease::request_replan(c, held.campaign, to, &held.actor).await {
                Ok(true) => {
                    held.replanning = true;
                    info!(campaign.id = %held.campaign, remaining, from = current, to, "re-plan requested")
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(campaign.id = %held.campaign, error = %e, "cannot request a re-plan")
                }
            }
        }
    }

    /// Starts serving a partition whose lease this instance just took; it counts in the rate
    /// share from `counts_from`.
    fn start_partition(&self, held: &mut Held, slice: PartitionSlice, counts_from: Instant) {
        let Some(jobs) = held.jobs.clone() else { return };
        let stop = held.gate.token.child_token();
        let idle = Arc::new(AtomicBool::new(false));
        let outstanding = Arc::new(AtomicUsize::new(0));
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let n = slice.partition_no;
        let writer = Writer {
            pool: self.pool.clone(),
            kind: held.kind.clone(),
            campaign: held.campaign,
            shard: n as i16,
            flush_interval: self.settings.flush_interval,
            flush_rows: self.settings.flush_rows,
            outstanding: outstanding.clone(),
            stats: self.stats.clone(),
            give_up: held.give_up.clone(),
            settled: held.settled.clone(),
        };
        let writer =
            tokio::spawn(writer.run(out_rx).instrument(info_span!("writer", partition = n)));
        let worker = Worker {
            pool: self.pool.clone(),
            kind: held.kind.clone(),
            campaign: held.campaign,
            slice,
            settings: self.settings.clone(),
            owner: format!("{}/p{}", self.run_id, n),
            claims: AtomicU64::new(0),
            jobs,
            outcomes: out_tx,
            stop: stop.clone(),
            outstanding: outstanding.clone(),
            idle: idle.clone(),
            cursor: Mutex::new(repo::ClaimCursor::start()),
            rescanned: Mutex::new(Instant::now()),
            settled: held.settled.clone(),
        };
        let worker = tokio::spawn(worker.run().instrument(info_span!("worker", partition = n)));
        held.parts.insert(
            n,
            PartRun {
                state: PartState::Serving,
                counts_from,
                stop,
                idle,
                outstanding,
                worker: Some(worker),
                writer: Some(writer),
            },
        );
    }

    /// After a run: gives back every lease still held (another instance can take them at once)
    /// and says this instance serves no campaign.
    async fn leave_campaign(&self, held: &mut Held) {
        let Ok(mut c) = conn(&self.pool).await else {
            warn!(campaign.id = %held.campaign, "cannot reach the database to hand the partitions back; their leases expire by themselves");
            return;
        };
        for (n, part) in &held.parts {
            if part.state != PartState::Lost
                && let Err(e) = lease::release(&mut c, held.campaign, &self.run_id, *n).await
            {
                warn!(campaign.id = %held.campaign, partition = n, error = %e, "cannot hand the partition back; its lease expires by itself");
            }
        }
        held.parts.clear();
        // Idle now, but this process's last requests still count at Money for a window.
        let _ = lease::heartbeat(
            &mut c,
            &lease::Heartbeat {
                run_id: &self.run_id,
                instance_id: &self.settings.instance_id,
                campaign: None,
                lease_time: self.settings.lease_time,
                rate_limit_per_sec: 0.0,
                current_rows_per_sec: None,
                recent_sends: self.limiter.recent_sends(),
            },
        )
        .await;
    }
}

/// PENDING bucket slices counted in parallel when a campaign is first planned (plus two ranges
/// for the other statuses): four keep both cores of a small database server busy.
const PLAN_COUNT_SLICES: u16 = 4;

/// How long the row of a daemon process that died without deregistering is kept (for whoever
/// looks into what happened) before a starting daemon forgets it.
const DEAD_INSTANCES_KEPT: Duration = Duration::from_secs(24 * 3600);

/// How often an idle engine looks for a RUNNING campaign itself (besides discovery's queue).
const IDLE_LOOK: Duration = Duration::from_millis(50);

/// Rows of a partition's first claim (see [`Worker::step`]).
const FIRST_CLAIM: u32 = 100;

/// Batches a campaign may hold claimed and not yet committed, shared out over its partitions
/// (see [`outstanding_bound`]).
const CAMPAIGN_OUTSTANDING_BATCHES: usize = 8;

/// Rows one partition may hold claimed and not yet committed: its share of
/// [`CAMPAIGN_OUTSTANDING_BATCHES`], and never less than one batch. The bound is per campaign so
/// that the daemon's memory does not grow with the partition count (4 partitions get two
/// batches each, 8 get one, 1 gets all 8).
fn outstanding_bound(batch_size: u32, partitions: u16) -> usize {
    let batch = batch_size.max(1) as usize;
    (CAMPAIGN_OUTSTANDING_BATCHES * batch / usize::from(partitions.max(1))).max(batch)
}

/// The lease step's period while partitions change hands (see [`Held::in_transition`]).
const TRANSITION_STEP: Duration = Duration::from_millis(100);

/// How far past a partition-rule threshold the remaining row count must be before a re-plan.
const REPLAN_HYSTERESIS: f64 = 0.05;

/// What this instance does with one partition of the campaign it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartState {
    /// Held and served.
    Serving,
    /// Being given up: no new request is sent; the lease is released once drained.
    Shedding,
    /// The lease was taken over: no new request is sent; nothing to release.
    Lost,
}

struct PartRun {
    state: PartState,
    /// From when the partition counts in this instance's share of the limit.
    counts_from: Instant,
    /// Stops the worker claiming and the dispatcher sending this partition's requests.
    stop: CancellationToken,
    idle: Arc<AtomicBool>,
    /// Rows claimed and not yet committed.
    outstanding: Arc<AtomicUsize>,
    worker: Option<tokio::task::JoinHandle<()>>,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl PartRun {
    /// Nothing claimed is left uncommitted and the worker has stopped.
    fn drained(&self) -> bool {
        self.outstanding.load(Ordering::SeqCst) == 0
            && self.worker.as_ref().is_none_or(|w| w.is_finished())
    }
}

/// The partitions this instance serves for one campaign run.
struct Held {
    kind: Arc<dyn ErasedKind>,
    campaign: CampaignId,
    /// The campaign's stored plan (all partitions, held here or not).
    plan: Vec<PartitionSlice>,
    parts: std::collections::BTreeMap<u16, PartRun>,
    /// Where workers queue requests; dropped to end the dispatcher.
    jobs: Option<mpsc::Sender<Job>>,
    gate: Gate,
    give_up: CancellationToken,
    last_replan_check: Instant,
    actor: String,
    /// Rows this process had finished at the last lease step (for its rate in the heartbeat).
    last_done: (Instant, u64),
    /// The last lease step saw a re-plan pending or just applied.
    replanning: bool,
    /// What the other live instances may still have in Money's window, together, as of the last
    /// lease step ([`lease::others_rate`]); this instance's share never goes above the global
    /// limit less this.
    others: u64,
    /// The share is held below what the partitions served here are worth because of `others`.
    capped: bool,
    /// Woken when a partition may have finished: its worker found nothing to claim, or its
    /// writer committed the last outstanding outcome. The completion check then runs at once
    /// instead of at the next `idle_poll` tick.
    settled: Arc<Notify>,
}

impl Held {
    /// Partitions are changing hands (given up, lost, or a re-plan under way): lease steps then
    /// come every [`TRANSITION_STEP`] instead of every `lease_check`, so a hand-over or a re-plan
    /// stops sending for a fraction of a second instead of two lease checks.
    /// A partition taken here waiting to count in the share is a transition too: the share is
    /// raised within a step of its time; so is a share held down by what other instances may
    /// still have in Money's window.
    fn in_transition(&self) -> bool {
        let now = Instant::now();
        self.replanning
            || self.capped
            || self.parts.values().any(|p| p.state != PartState::Serving || p.counts_from > now)
    }

    fn serving(&self) -> usize {
        self.parts.values().filter(|p| p.state == PartState::Serving).count()
    }

    /// Partitions served here that count in the share at `now`.
    fn counted(&self, now: Instant) -> usize {
        self.parts
            .values()
            .filter(|p| p.state == PartState::Serving && p.counts_from <= now)
            .count()
    }

    /// Every partition served here found nothing to claim last time, and nothing is in flight.
    fn all_idle(&self) -> bool {
        self.parts.values().all(|p| {
            p.outstanding.load(Ordering::SeqCst) == 0
                && (p.state != PartState::Serving || p.idle.load(Ordering::SeqCst))
        })
    }

    /// Takes the stored plan as it is now, if another instance applied a re-plan.
    fn follow_plan(&mut self, views: &[LeaseView]) {
        if !views.is_empty() && views.iter().any(|v| !self.plan.contains(&v.slice)) {
            self.plan = views.iter().map(|v| v.slice).collect();
        }
    }
}

/// Re-reads the campaign's status every `every`; closes the gate when it is not RUNNING, when
/// shutdown is asked, or when the status could not be confirmed for a whole second.
async fn gate_loop(
    pool: DbPool,
    id: CampaignId,
    every: Duration,
    gate: Gate,
    shutdown: CancellationToken,
) {
    let mut last_confirmed = Instant::now();
    let mut tick = tokio::time::interval(every.min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => { gate.close(StopReason::Shutdown); return; }
            _ = gate.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let read = async {
            let mut c = conn(&pool).await?;
            Ok::<_, DbError>(repo::campaign_status(&mut c, id).await?)
        };
        match tokio::time::timeout(Duration::from_secs(1), read).await {
            Ok(Ok(Some(s))) if s == "RUNNING" => last_confirmed = Instant::now(),
            Ok(Ok(Some(s))) => {
                info!(campaign.id = %id, status = %s, "campaign is no longer RUNNING: stopping sends");
                gate.close(StopReason::NotRunning(s));
                return;
            }
            Ok(Ok(None)) => {
                gate.close(StopReason::NotRunning("deleted".to_owned()));
                return;
            }
            Ok(Err(e)) => warn!(campaign.id = %id, error = %e, "cannot read the campaign status"),
            Err(_) => warn!(campaign.id = %id, "reading the campaign status timed out"),
        }
        if last_confirmed.elapsed() > Duration::from_secs(1) {
            warn!(campaign.id = %id, "campaign status unconfirmed for over 1 s: stopping sends until the database answers");
            gate.close(StopReason::DatabaseUnavailable);
            return;
        }
    }
}

struct Worker {
    pool: DbPool,
    kind: Arc<dyn ErasedKind>,
    campaign: CampaignId,
    slice: PartitionSlice,
    settings: EngineSettings,
    owner: String,
    /// Claims made so far by this worker (for unique claim tokens).
    claims: AtomicU64,
    jobs: mpsc::Sender<Job>,
    outcomes: mpsc::UnboundedSender<RowOutcome>,
    /// Cancelled when the gate closes or this instance stops serving the partition.
    stop: CancellationToken,
    /// Rows of this partition claimed and not yet committed.
    outstanding: Arc<AtomicUsize>,
    /// The last claim found nothing.
    idle: Arc<AtomicBool>,
    /// Where the next claim starts.
    cursor: Mutex<repo::ClaimCursor>,
    /// When a claim last started from the beginning of the partition.
    rescanned: Mutex<Instant>,
    /// Told when the worker becomes idle (see [`Held::settled`]).
    settled: Arc<Notify>,
}

/// After an empty claim while the partition still counts PENDING rows, the worker claims again
/// after `SKIPPED_WAIT`, up to `SKIPPED_RETRIES` times in a row, before it waits `idle_poll`.
const SKIPPED_WAIT: Duration = Duration::from_millis(20);
const SKIPPED_RETRIES: u32 = 25;

/// The longest a worker claims onwards from its cursor before starting over from the beginning
/// of its partition, so rows that became PENDING again behind the cursor (a retry swept back, a
/// released row) wait at most about this long.
const RESCAN_EVERY: Duration = Duration::from_secs(5);

impl Worker {
    async fn run(self) {
        let mut failures: u32 = 0;
        // Empty claims in a row while the partition still counted PENDING rows.
        let mut skipped: u32 = 0;
        while !self.stop.is_cancelled() {
            match self.step().await {
                Ok(0) if skipped < SKIPPED_RETRIES && self.pending_left().await => {
                    // `SKIP LOCKED` passed over rows that are still PENDING: claim again soon
                    // rather than calling the partition idle for a whole `idle_poll`.
                    skipped += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(SKIPPED_WAIT) => {}
                        _ = self.stop.cancelled() => {}
                    }
                }
                Ok(0) => {
                    failures = 0;
                    skipped = 0;
                    if !self.idle.swap(true, Ordering::SeqCst) {
                        self.settled.notify_one();
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(self.settings.idle_poll) => {}
                        _ = self.stop.cancelled() => {}
                    }
                }
                Ok(_) => {
                    failures = 0;
                    skipped = 0;
                }
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(100 * u64::from(failures.min(10)));
                    if failures == 1 || failures % 20 == 0 {
                        warn!(campaign.id = %self.campaign, error = %e, failures, "claiming failed; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => {}
                    }
                }
            }
        }
    }

    /// Whether the partition still has PENDING rows (a claim just came back empty). A failed
    /// count says no: the partition then waits `idle_poll` as after any empty claim.
    async fn pending_left(&self) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        let Ok(mut c) = conn(&self.pool).await else { return false };
        matches!(
            repo::pending_in_slice(&mut c, self.kind.table(), self.campaign, &self.slice).await,
            Ok(n) if n > 0
        )
    }

    /// Claims one batch and queues its requests. Returns the number of rows claimed.
    async fn step(&self) -> Result<usize, DbError> {
        // Flow control: claim again only while this partition's share of the campaign's bound
        // waits for its outcomes to be committed. Without it, sends outrunning the write-back
        // (no rate limit, a slow database) piled outcomes up in memory without bound.
        let most = outstanding_bound(self.settings.batch_size, self.slice.partition_count);
        while self.outstanding.load(Ordering::SeqCst) >= most {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = self.stop.cancelled() => return Ok(0),
            }
        }
        let claimed = {
            let mut c = conn(&self.pool).await?;
            let mut cursor = self.cursor.lock().map(|g| *g).unwrap_or_default();
            if self.rescanned.lock().map(|t| t.elapsed() >= RESCAN_EVERY).unwrap_or(true) {
                cursor = repo::ClaimCursor::start();
            }
            if cursor.at_start()
                && let Ok(mut t) = self.rescanned.lock()
            {
                *t = Instant::now();
            }
            // A partition's first claim is small: when all partitions start at once their first
            // claims compete for the database, and small ones get the first grants out sooner.
            let size = if self.claims.load(Ordering::Relaxed) == 0 {
                self.settings.batch_size.min(FIRST_CLAIM)
            } else {
                self.settings.batch_size
            };
            let ctx = ValidationContext {
                now: Utc::now(),
                max_point_amount: self.settings.max_point_amount,
                expiry_offset: self.settings.expiry_offset,
            };
            let token = self.next_token();
            let spec = repo::ClaimSpec {
                campaign: self.campaign,
                slice: &self.slice,
                limit: size,
                token: &token,
            };
            let claimed = claim_with_retry(&mut c, &*self.kind, spec, &mut cursor, &ctx).await;
            if let Ok(mut g) = self.cursor.lock() {
                // A failed claim starts over next time.
                *g = if claimed.is_ok() { cursor } else { repo::ClaimCursor::start() };
            }
            let claimed = claimed?;
            if claimed.is_empty() {
                return Ok(0);
            }
            self.idle.store(false, Ordering::SeqCst);
            self.outstanding.fetch_add(claimed.len(), Ordering::SeqCst);
            claimed
        };
        let count = claimed.len();
        for (claimed, p) in claimed {
            let claim = claimed.claim.clone();
            match p.request {
                Err(invalid) => self.emit(
                    p.target,
                    claim,
                    Outcome::Invalid { code: invalid.code, message: invalid.message },
                ),
                Ok(request) => {
                    let job = Job {
                        request,
                        claim: claim.clone(),
                        budget_attempt: claimed.budget_attempt(),
                        outcomes: self.outcomes.clone(),
                        stop: self.stop.clone(),
                    };
                    if self.stop.is_cancelled() {
                        job.release();
                        continue;
                    }
                    tokio::select! {
                        sent = self.jobs.send(job) => {
                            if let Err(mpsc::error::SendError(job)) = sent {
                                job.release();
                            }
                        }
                        _ = self.stop.cancelled() => {
                            self.emit(p.target, claim, Outcome::Released);
                        }
                    }
                }
            }
        }
        Ok(count)
    }

    fn emit(&self, target: TargetId, claim: repo::ClaimToken, outcome: Outcome) {
        let _ = self.outcomes.send(RowOutcome { target, claim, outcome });
    }

    /// A token unique to the next claim: `<instance>#<nonce>/p<partition>/<sequence>`.
    fn next_token(&self) -> repo::ClaimToken {
        let seq = self.claims.fetch_add(1, Ordering::Relaxed);
        format!("{}/{seq}", self.owner).into()
    }
}

/// Claims the next batch from the worker's cursor and prepares its requests; an empty claim
/// that did not start at the beginning of the partition starts over once (rows may have come
/// back behind the cursor).
async fn claim_with_retry(
    c: &mut diesel_async::AsyncMysqlConnection,
    kind: &dyn ErasedKind,
    spec: repo::ClaimSpec<'_>,
    cursor: &mut repo::ClaimCursor,
    ctx: &ValidationContext,
) -> Result<Vec<(repo::Claimed, Prepared)>, DbError> {
    let mut tries = 0;
    loop {
        let from_start = cursor.at_start();
        match kind.claim_prepared(c, spec, cursor, ctx).await {
            Ok(v) if v.is_empty() && !from_start => continue,
            Ok(v) => return Ok(v),
            Err(e) => {
                let e = DbError::from(e);
                tries += 1;
                if tries < 5 && e.is_retryable_lock() {
                    tokio::time::sleep(Duration::from_millis(10 * tries)).await;
                    continue;
                }
                return Err(e);
            }
        }
    }
}

struct Dispatcher {
    breaker: Arc<Mutex<Breaker>>,
    money: MoneyClient,
    limiter: RateLimiter,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    retry: RetryPolicy,
    gate: Gate,
    stats: Arc<Stats>,
}

impl Dispatcher {
    async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(job) = jobs.recv().await {
            if self.gate.is_closed() || job.stop.is_cancelled() {
                job.release();
                continue;
            }
            let permit = tokio::select! {
                p = self.in_flight.clone().acquire_owned() => p,
                _ = self.gate.token.cancelled() => { job.release(); continue; }
            };
            let Ok(permit) = permit else {
                job.release();
                continue;
            };
            tokio::select! {
                _ = self.limiter.acquire() => {}
                _ = self.gate.token.cancelled() => { job.release(); continue; }
            }
            // The gate and the partition's lease, checked right before the request leaves.
            if self.gate.is_closed() || job.stop.is_cancelled() {
                job.release();
                continue;
            }
            if lock_breaker(&self.breaker).admit() != Admission::Send {
                job.release();
                self.gate.close(StopReason::BreakerOpen(
                    "Money failed while the breaker was closing".to_owned(),
                ));
                continue;
            }
            let money = self.money.clone();
            let limiter = self.limiter.clone();
            let retry = self.retry;
            let gate = self.gate.clone();
            let stats = self.stats.clone();
            let breaker = self.breaker.clone();
            tokio::spawn(async move {
                // The send log can hold a sender back for up to a second when the share was just
                // lowered (a partition given up, a re-plan): a request of a partition stopped
                // meanwhile is released instead of waiting, so the partition drains at once.
                let admitted = tokio::select! {
                    admitted = limiter.admit() => admitted,
                    _ = job.stop.cancelled() => {
                        job.release();
                        drop(permit);
                        return;
                    }
                };
                stats.sent.fetch_add(1, Ordering::Relaxed);
                // Admission on the wall clock, to line up with Money's arrival log when
                // measuring how unevenly requests travel (`log.filter` `payoutd::sends=trace`).
                trace!(
                    target: "payoutd::sends",
                    key = %job.request.idempotency_key,
                    at_unix_us = unix_micros(),
                    "admitted"
                );
                let started = Instant::now();
                // A request that leaves late counts in the send log from when it left.
                let traced = tracing::enabled!(target: "payoutd::sends", tracing::Level::TRACE)
                    .then(|| job.request.idempotency_key.to_string());
                let departed = Box::new(move |at: Instant| {
                    limiter.departed(admitted, at);
                    if let Some(key) = traced {
                        let ago = u64::try_from(at.elapsed().as_micros()).unwrap_or(0);
                        trace!(
                            target: "payoutd::sends",
                            key = %key,
                            at_unix_us = unix_micros().saturating_sub(ago),
                            after_admission_us = at.saturating_duration_since(admitted).as_micros() as u64,
                            "departed"
                        );
                    }
                });
                let result = money.grant_noting_departure(&job.request, departed).await;
                stats.money_latency.record(started.elapsed());
                if let Err(MoneyError::Unauthorized) = &result {
                    gate.close(StopReason::Unauthorized);
                }
                {
                    // Close the gate while holding the breaker, so the dispatcher (which checks
                    // the breaker under the same lock) never closes it first with a vaguer reason.
                    let mut b = lock_breaker(&breaker);
                    if b.record(Signal::of(&result), Instant::now()) == Some(Transition::Opened) {
                        let last = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                        warn!(error = %last, "circuit breaker opened: Money looks down");
                        gate.close(StopReason::BreakerOpen(last));
                    }
                }
                let outcome =
                    decide(result, job.budget_attempt, &retry, rand::rng().random::<f64>());
                let _ = job.outcomes.send(RowOutcome {
                    target: job.request.target,
                    claim: job.claim,
                    outcome,
                });
                drop(permit);
            });
        }
        // Every request in flight has answered once all permits are back.
        let all = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        let _ = self.in_flight.acquire_many(all).await;
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a Money answer means for the row, given which attempt of its retry budget this was
/// (1 = the first; a requeue starts a fresh budget).
pub fn decide(
    result: Result<crate::money::Granted, MoneyError>,
    attempts: i32,
    retry: &RetryPolicy,
    unit: f64,
) -> Outcome {
    let err = match result {
        Ok(g) => {
            return Outcome::Granted { transaction_id: g.transaction_id };
        }
        Err(e) => e,
    };
    let attempts_u = u32::try_from(attempts.max(1)).unwrap_or(1);
    let retry_after = match err.disposition() {
        Disposition::Permanent => {
            return Outcome::Dead { code: err.code(), message: err.to_string() };
        }
        // Money did not process the request: it was never attempted as far as Money knows.
        Disposition::Configuration => return Outcome::Released,
        Disposition::RetryAfter(after) => after,
        Disposition::Transient | Disposition::UnknownOutcome => None,
    };
    if retry.may_retry(attempts_u) {
        Outcome::Retry {
            after: retry.delay(attempts_u, unit, retry_after),
            error: format!("{}: {err}", err.code()),
        }
    } else {
        let unknown = matches!(err.disposition(), Disposition::UnknownOutcome);
        Outcome::Dead {
            code: err.code(),
            message: format!(
                "gave up after {attempts} attempts: {err}{}",
                if unknown {
                    " (the last outcome is unknown: a requeue resends the same key, and Money replays an earlier grant)"
                } else {
                    ""
                }
            ),
        }
    }
}

struct Writer {
    pool: DbPool,
    kind: Arc<dyn ErasedKind>,
    campaign: CampaignId,
    /// The partition number: this writer's `campaign_counters` shard.
    shard: i16,
    flush_interval: Duration,
    flush_rows: usize,
    outstanding: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    give_up: CancellationToken,
    /// Told when the last outstanding outcome of the partition is committed.
    settled: Arc<Notify>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<RowOutcome>) {
        let mut buf: Vec<RowOutcome> = Vec::with_capacity(self.flush_rows);
        let mut open = true;
        while open {
            // Wait for the first outcome, then give the batch `flush_interval` to fill.
            if buf.is_empty() && rx.recv_many(&mut buf, self.flush_rows).await == 0 {
                break;
            }
            let deadline = tokio::time::Instant::now() + self.flush_interval;
            while buf.len() < self.flush_rows {
                let room = self.flush_rows - buf.len();
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut buf, room)).await {
                    Ok(0) => {
                        open = false;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            if !self.flush(&mut buf).await {
                break;
            }
        }
    }

    /// Commits the buffer, retrying until it lands or the drain deadline passes.
    async fn flush(&self, buf: &mut Vec<RowOutcome>) -> bool {
        let mut failures = 0u32;
        loop {
            let attempt = async {
                let mut c = conn(&self.pool).await?;
                repo::write_outcomes(
                    &mut c,
                    self.kind.table(),
                    self.kind.kind(),
                    self.campaign,
                    self.shard,
                    buf,
                )
                .await
                .map_err(DbError::from)
            };
            match attempt.await {
                Ok(()) => {
                    for o in buf.iter() {
                        let counter = match o.outcome {
                            Outcome::Granted { .. } => &self.stats.granted,
                            Outcome::Retry { .. } => &self.stats.retried,
                            Outcome::Dead { .. } | Outcome::Invalid { .. } => &self.stats.dead,
                            Outcome::Released => &self.stats.released,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    if self.outstanding.fetch_sub(buf.len(), Ordering::SeqCst) == buf.len() {
                        self.settled.notify_one();
                    }
                    if failures > 0 {
                        info!(campaign.id = %self.campaign, "outcomes committed again after {failures} failed tries");
                    }
                    buf.clear();
                    return true;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 10 == 0 {
                        warn!(campaign.id = %self.campaign, rows = buf.len(), error = %e, failures, "cannot commit outcomes yet; holding them and retrying");
                    }
                    let wait = Duration::from_millis(100 * u64::from(failures.min(10)));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.give_up.cancelled() => {
                            error!(campaign.id = %self.campaign, rows = buf.len(), "drain deadline passed with outcomes uncommitted; their rows stay IN_FLIGHT and are resent with the same keys at the next start");
                            return false;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Granted;

    #[test]
    fn rows_in_hand_are_shared_out_over_the_partitions() {
        assert_eq!(outstanding_bound(250, 4), 500);
        assert_eq!(outstanding_bound(250, 8), 250);
        assert_eq!(outstanding_bound(250, 6), 333);
        assert_eq!(outstanding_bound(250, 1), 2000);
        assert_eq!(outstanding_bound(1000, 16), 1000, "never less than one batch");
        assert_eq!(outstanding_bound(250, 0), 2000);
        assert_eq!(outstanding_bound(0, 4), 2);
        for n in 1..=8u16 {
            assert!(outstanding_bound(250, n) * usize::from(n) <= 2000, "{n} partitions");
        }
    }

    #[test]
    fn latency_quantiles_come_within_a_bucket() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((50.0..=60.0).contains(&p50), "{p50}");
        assert!((99.0..=120.0).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn answers_become_row_outcomes() {
        let p = RetryPolicy::default();
        let ok = decide(Ok(Granted { transaction_id: "t".into(), replayed: false }), 1, &p, 0.5);
        assert_eq!(ok, Outcome::Granted { transaction_id: "t".into() });

        let rejected = MoneyError::Rejected {
            status: 404,
            code: "customer_not_found".into(),
            message: String::new(),
        };
        assert!(
            matches!(decide(Err(rejected), 1, &p, 0.5), Outcome::Dead { code, .. } if code == "customer_not_found")
        );

        let first = decide(Err(MoneyError::Timeout), 1, &p, 0.5);
        assert!(matches!(first, Outcome::Retry { after, .. } if after == Duration::from_secs(3)));
        let fifth =
            decide(Err(MoneyError::Server { status: 503, code: String::new() }), 5, &p, 0.5);
        assert!(matches!(fifth, Outcome::Retry { after, .. } if after == Duration::from_secs(48)));
        let sixth = decide(Err(MoneyError::Timeout), 6, &p, 0.5);
        assert!(matches!(sixth, Outcome::Dead { code, .. } if code == "timeout"));

        assert_eq!(decide(Err(MoneyError::Unauthorized), 1, &p, 0.5), Outcome::Released);
        let limited =
            MoneyError::RateLimited { status: 429, retry_after: Some(Duration::from_secs(10)) };
        assert!(
            matches!(decide(Err(limited), 1, &p, 0.5), Outcome::Retry { after, .. } if after == Duration::from_secs(10))
        );
    }
}
