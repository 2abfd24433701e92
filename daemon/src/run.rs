//! `payoutd run`: the daemon.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::FixedOffset;
use payout_core::KindRegistry;
use payout_core::db::{self, DbPool, DbSettings};
use payout_core::engine::{Engine, EngineSettings};
use payout_core::money::{MoneyClient, MoneySettings};
use payout_core::plan::PartitionRule;
use payout_core::rate::RateLimiter;
use payout_core::retry::RetryPolicy;
use payout_core::sweep::{Discovery, RetrySweeper};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::schedule::Jobs;

/// The kinds this daemon serves: one line per kind.
pub(crate) fn kinds() -> KindRegistry {
    let mut kinds = KindRegistry::new();
    kinds.register::<payout_voucher::Voucher>();
    kinds.register::<payout_point::Point>();
    kinds
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
        partition_rule: PartitionRule {
            medium_from: e.partitions_medium_from,
            large_from: e.partitions_large_from,
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
    let instance_id = crate::ident::instance_id();
    let pool = pool(&settings)?;
    db::check(&pool).await.context("cannot reach the database (database.url)")?;
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
        pool_size: settings.money.max_in_flight,
    })?;
    let limiter = RateLimiter::new(settings.money.rate_limit_per_sec);
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
    let stats = engine.stats();
    let interval_secs = settings.log.throughput_interval.as_secs().clamp(1, 59) as u32;
    let last = Arc::new(std::sync::Mutex::new((Instant::now(), 0u64)));
    jobs.every("throughput-log", interval_secs, move || {
        let stats = stats.clone();
        let last = last.clone();
        async move {
            let sent = stats.sent.load(Ordering::Relaxed);
            let Ok(mut l) = last.lock() else { return };
            let secs = l.0.elapsed().as_secs_f64().max(0.001);
            let tps = (sent - l.1) as f64 / secs;
            *l = (Instant::now(), sent);
            info!(
                rows_sent = sent,
                tps = format!("{tps:.1}"),
                granted = stats.granted.load(Ordering::Relaxed),
                retried = stats.retried.load(Ordering::Relaxed),
                dead = stats.dead.load(Ordering::Relaxed),
                "throughput"
            );
        }
    })
    .await?;
    jobs.start().await?;

    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    tokio::spawn(watchdog(jobs.health.clone(), shutdown.clone()));
    notify(&[sd_notify::NotifyState::Ready]);
    info!("payoutd ready");

    engine.run(queue, shutdown.clone()).await;
    notify(&[sd_notify::NotifyState::Stopping]);
    jobs.shutdown().await;
    info!("payoutd stopped");
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
