//! `payoutd run`: the daemon.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::FixedOffset;
use diesel_async::AsyncMysqlConnection;
use payout_core::KindRegistry;
use payout_core::alerts::{AlertDelivery, FailureRateWatcher};
use payout_core::db::{self, DbPool, DbSettings};
use payout_core::engine::{Engine, EngineSettings};
use payout_core::money::{MoneyClient, MoneySettings, idle_connections_for};
use payout_core::plan::PartitionRule;
use payout_core::rate::RateLimiter;
use payout_core::retry::RetryPolicy;
use payout_core::sweep::{Discovery, RetrySweeper};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::schedule::Jobs;

/// Discovery runs once a second and looks again this long after each run's start: not later,
/// because tokio-cron-scheduler checks for due jobs every 500 ms and so sometimes starts two
/// runs 500 ms apart, and a run still going then is skipped (with a warning).
const DISCOVERY_SECOND_LOOK: Duration = Duration::from_millis(400);

/// The kinds this daemon serves: one line per kind.
pub(crate) fn kinds() -> KindRegistry {
    let mut kinds = KindRegistry::new();
    kinds.register::<payout_voucher::Voucher>();
    kinds.register::<payout_point::Point>();
    kinds
}

/// Builds the pool and checks the database answers, naming `database.url` (password masked)
/// when it does not.
pub(crate) async fn connect(settings: &Settings) -> anyhow::Result<DbPool> {
    let pool = pool(settings)?;
    db::check(&pool).await.with_context(|| unreachable_database(settings))?;
    Ok(pool)
}

/// One connection for a short command, failing as [`connect`] does when the database cannot be
/// reached, without its check query: the command's own first query follows at once.
pub(crate) async fn connect_one(settings: &Settings) -> anyhow::Result<AsyncMysqlConnection> {
    let url = settings.database_url()?;
    db::connect_one(url.expose(), settings.database.connect_timeout)
        .await
        .with_context(|| unreachable_database(settings))
}

fn unreachable_database(settings: &Settings) -> String {
    let url = settings.database_url().map(|u| u.to_string()).unwrap_or_default();
    format!("cannot reach the database (database.url = {url})")
}

/// Builds the pool from the configuration (only `database.*` is needed).
pub(crate) fn pool(settings: &Settings) -> anyhow::Result<DbPool> {
    let url = settings.database_url()?;
    let pool = db::pool(&DbSettings {
        url: SecretString::from(url.expose().to_owned()),
        pool_size: settings.database.pool_size,
        connect_timeout: settings.database.connect_timeout,
    })?;
    Ok(pool)
}

pub(crate) fn engine_settings(settings: &Settings, instance_id: String) -> EngineSettings {
    let e = &settings.executor;
    EngineSettings {
        instance_id,
        batch_size: e.batch_size,
        max_in_flight: settings.money.max_in_flight,
        idle_poll: e.idle_poll,
        gate_poll: e.gate_poll,
        flush_interval: e.flush_interval,
        flush_rows: e.batch_size as usize,
        drain_timeout: e.drain_timeout,
        lease_time: e.lease_time,
        lease_check: e.lease_check,
        replan_check: e.replan_check,
        owner_gone: if e.local_takeover { crate::ident::owner_gone } else { |_| false },
        partition_rule: PartitionRule {
            medium_from: e.partitions_medium_from,
            large_from: e.partitions_large_from,
            fixed: (e.partitions > 0).then_some(e.partitions),
        },
        retry: RetryPolicy {
            base_delay: settings.retry.base_delay,
            multiplier: settings.retry.multiplier,
            max_delay: settings.retry.max_delay,
            max_retries: settings.retry.max_retries,
            jitter: settings.retry.jitter,
        },
        breaker: payout_core::breaker::BreakerSettings {
            failure_threshold: settings.breaker.failure_threshold,
            open_for: settings.breaker.open_for,
        },
        max_point_amount: settings.payout.max_point_amount,
        expiry_offset: FixedOffset::east_opt(settings.payout.expiry_utc_offset_secs)
            .unwrap_or_else(|| chrono::Utc.fix()),
    }
}

use chrono::Offset;

fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "cannot notify systemd");
    }
}

pub(crate) async fn run(settings: Settings) -> anyhow::Result<()> {
    let run = settings.require_run()?;
    // Signals first: a SIGTERM during start-up must still end in a clean exit.
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let instance_id = crate::ident::instance_id();
    let pool = connect(&settings).await?;
    if settings.database.migrate_on_start {
        let applied = db::migrate(&pool).await?;
        if !applied.is_empty() {
            info!(migrations = ?applied, "applied migrations");
        }
    }
    let money = MoneyClient::new(&MoneySettings {
        base_url: run.money_base_url.clone(),
        api_key: SecretString::from(run.money_api_key.expose().to_owned()),
        timeout: settings.money.timeout,
        idle_connections: idle_connections_for(
            settings.money.rate_limit_per_sec.get(),
            settings.money.max_in_flight,
        ),
    })?;
    let limiter = RateLimiter::new(
        settings.money.rate_limit_per_sec,
        settings.money.rate_slack,
        settings.money.rate_reserve,
    );
    let kinds = kinds();
    let engine = Arc::new(Engine::new(
        pool.clone(),
        kinds.clone(),
        money,
        limiter.clone(),
        engine_settings(&settings, instance_id.clone()),
    ));
    info!(
        instance = %instance_id,
        rate_limit_per_sec = settings.money.rate_limit_per_sec.get(),
        rate_slack_ms = settings.money.rate_slack.as_secs_f64() * 1000.0,
        sends_per_window = limiter.capacity().get(),
        pacing_rate_per_sec = format!("{:.1}", limiter.pacing().rate_per_sec()),
        max_in_flight = settings.money.max_in_flight,
        "payoutd starting"
    );

    let (discovery, queue) = Discovery::new(pool.clone());
    let discovery = Arc::new(discovery);
    if let Err(e) = discovery.tick().await {
        warn!(error = %e, "first campaign discovery failed; the scheduler retries every second");
    }
    let sweeper = Arc::new(RetrySweeper::new(pool.clone(), kinds.clone()));
    let jobs = Jobs::new().await?;
    jobs.every("discovery", 1, move || {
        let d = discovery.clone();
        async move {
            // The scheduler fires jobs at most once a second; a second look in between shortens
            // the wait of a campaign just set RUNNING (its first grant is due within 1 s).
            let second_look = tokio::time::Instant::now() + DISCOVERY_SECOND_LOOK;
            if let Err(e) = d.tick().await {
                warn!(error = %e, "campaign discovery failed");
            }
            tokio::time::sleep_until(second_look).await;
            if let Err(e) = d.tick().await {
                warn!(error = %e, "campaign discovery failed");
            }
        }
    })
    .await?;
    jobs.every("retry-sweep", 1, move || {
        let s = sweeper.clone();
        async move {
            if let Err(e) = s.tick().await {
                warn!(error = %e, "retry sweep failed");
            }
        }
    })
    .await?;
    // Slack alerts: their own job and HTTP client, so a slow or dead Slack never slows payouts.
    let webhook = run.slack_webhook_url.as_ref().map(|u| SecretString::from(u.expose().to_owned()));
    let delivery = Arc::new(AlertDelivery::new(pool.clone(), webhook)?);
    if !delivery.has_webhook() {
        info!("slack.webhook_url is not set: alerts are written to this log only");
    }
    jobs.every("alert-delivery", 1, move || {
        let d = delivery.clone();
        async move {
            if let Err(e) = d.tick().await {
                warn!(error = %e, "alert delivery failed; pending alerts are retried");
            }
        }
    })
    .await?;
    let watcher = Arc::new(FailureRateWatcher::new(
        pool.clone(),
        kinds.clone(),
        settings.alerts.failure_rate_threshold_pct,
        format!("daemon:{instance_id}"),
    ));
    let check_secs = settings.alerts.failure_rate_check_interval.as_secs().clamp(1, 59) as u32;
    jobs.every("failure-rate", check_secs, move || {
        let w = watcher.clone();
        async move {
            if let Err(e) = w.tick().await {
                warn!(error = %e, "failure-rate check failed");
            }
        }
    })
    .await?;
    let throughput = Arc::new(Throughput::new(pool.clone(), engine.stats()));
    let interval_secs = settings.log.throughput_interval.as_secs().clamp(1, 59) as u32;
    jobs.every("throughput-log", interval_secs, move || {
        let t = throughput.clone();
        async move { t.tick().await }
    })
    .await?;
    jobs.start().await?;

    tokio::spawn(watchdog(jobs.health.clone(), shutdown.clone()));
    notify(&[sd_notify::NotifyState::Ready]);
    info!("payoutd ready");

    engine.run(queue, shutdown.clone()).await;
    jobs.shutdown().await;
    let stats = engine.stats();
    let ms =
        |q: f64| stats.money_latency.quantile_ms(q).map(|v| format!("{v:.1}")).unwrap_or_default();
    info!(
        requests_sent = stats.sent.load(Ordering::Relaxed),
        granted = stats.granted.load(Ordering::Relaxed),
        retried = stats.retried.load(Ordering::Relaxed),
        dead = stats.dead.load(Ordering::Relaxed),
        money_p50_ms = ms(0.5),
        money_p99_ms = ms(0.99),
        "payoutd stopped"
    );
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: finishing requests in flight, then exiting"),
        _ = int.recv() => info!("SIGINT: finishing requests in flight, then exiting"),
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
}

/// Pings the systemd watchdog while every periodic job is alive.
async fn watchdog(health: Arc<crate::schedule::JobHealth>, shutdown: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let stale = health.stale();
        if stale.is_empty() {
            notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            warn!(jobs = ?stale, "periodic jobs stalled: withholding the watchdog ping");
        }
    }
}

/// The allocator's own figures, in MiB with two decimals (empty where jemalloc cannot say):
/// `allocated` is what live objects take, `resident` the pages jemalloc holds in RAM for them and
/// for what it keeps to reuse. Resident growing while allocated stays flat is the allocator's
/// keeping, not a leak.
struct Heap {
    allocated: String,
    resident: String,
}

impl Heap {
    fn now() -> Heap {
        use tikv_jemalloc_ctl::{epoch, stats};
        let mib = |v: Result<usize, _>| {
            v.map(|b| format!("{:.2}", b as f64 / (1024.0 * 1024.0))).unwrap_or_default()
        };
        // The statistics are a snapshot taken at the last epoch.
        let _ = epoch::advance();
        Heap { allocated: mib(stats::allocated::read()), resident: mib(stats::resident::read()) }
    }
}

/// The throughput line: every interval, one structured line per RUNNING campaign (rows finished
/// per second over the interval, counts, failure rate) and the process's request rate; the
/// campaign's current rate is also stored for `campaign status`.
struct Throughput {
    pool: DbPool,
    stats: Arc<payout_core::engine::Stats>,
    last: std::sync::Mutex<(Instant, u64, std::collections::HashMap<i64, u64>)>,
}

impl Throughput {
    fn new(pool: DbPool, stats: Arc<payout_core::engine::Stats>) -> Throughput {
        Throughput {
            pool,
            stats,
            last: std::sync::Mutex::new((Instant::now(), 0, Default::default())),
        }
    }

    async fn tick(&self) {
        use payout_core::repo;
        let sent = self.stats.sent.load(Ordering::Relaxed);
        let mut rows = Vec::new();
        if let Ok(mut c) = db::conn(&self.pool).await {
            if let Ok(campaigns) = repo::campaigns(&mut c).await {
                for campaign in campaigns.into_iter().filter(|c| c.status == "RUNNING") {
                    if let Ok(Some(p)) = repo::progress(&mut c, campaign.id()).await {
                        rows.push(p);
                    }
                }
            }
        }
        let (secs, requests_per_sec, previous) = {
            let Ok(mut last) = self.last.lock() else { return };
            let secs = last.0.elapsed().as_secs_f64().max(0.001);
            let rps = sent.saturating_sub(last.1) as f64 / secs;
            let previous = std::mem::take(&mut last.2);
            last.0 = Instant::now();
            last.1 = sent;
            last.2 = rows
                .iter()
                .map(|p| (p.campaign_id, (p.succeeded + p.dead).max(0) as u64))
                .collect();
            (secs, rps, previous)
        };
        let heap = Heap::now();
        for p in &rows {
            let done = (p.succeeded + p.dead).max(0) as u64;
            let rate = previous
                .get(&p.campaign_id)
                .map(|before| done.saturating_sub(*before) as f64 / secs);
            if let (Some(rate), Ok(mut c)) = (rate, db::conn(&self.pool).await) {
                let _ = repo::set_current_rate(&mut c, p.campaign_id(), rate).await;
            }
            info!(
                campaign.id = p.campaign_id,
                tps = format!("{:.1}", rate.unwrap_or(0.0)),
                requests_per_sec = format!("{requests_per_sec:.1}"),
                rows_sent_total = sent,
                rows = p.total_rows,
                succeeded = p.succeeded,
                failed = p.failed,
                dead = p.dead,
                pending = p.pending,
                in_flight = p.in_flight,
                failure_rate_pct = format!("{:.2}", p.failure_rate_pct),
                money_p50_ms = self
                    .stats
                    .money_latency
                    .quantile_ms(0.5)
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_default(),
                money_p99_ms = self
                    .stats
                    .money_latency
                    .quantile_ms(0.99)
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_default(),
                heap_allocated_mib = heap.allocated,
                heap_resident_mib = heap.resident,
                "throughput"
            );
        }
        if rows.is_empty() && sent > 0 {
            info!(
                requests_per_sec = format!("{requests_per_sec:.1}"),
                rows_sent_total = sent,
                "throughput (no RUNNING campaign)"
            );
        }
    }
}
