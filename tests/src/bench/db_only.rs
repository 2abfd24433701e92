//! The database-only ceiling: the engine's database work for every row (claim and read,
//! validate, write the outcome back, complete the campaign) with the HTTP call replaced by an
//! immediate grant. It uses the engine's own repository functions, so it measures the same SQL.
//!
//! Per partition, one task claims batches (`kind.claim_prepared`: the engine's claim, which
//! reads the rows' columns as it locks them, and the kind's validation) and hands each batch's
//! outcomes to a writer task (`repo::write_outcomes` into the partition's counter shard), so
//! claiming the next batch overlaps writing the previous one, as in the engine. Then
//! `repo::complete_if_done`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::Utc;
use payout_core::db::{self, DbPool, DbSettings};
use payout_core::kind::ErasedKind;
use payout_core::plan::{PartitionRule, PartitionSlice};
use payout_core::repo::{self, Outcome, RowOutcome};
use payout_core::{CampaignId, KindRegistry, ValidationContext};
use secrecy::SecretString;
use serde::Serialize;

use super::Kind;

/// What the database-only pass measured.
#[derive(Debug, Clone, Serialize)]
pub struct DbOnlyReport {
    pub campaign_id: i64,
    pub rows: u64,
    pub partitions: u16,
    pub batch_size: u32,
    /// From the start of the pass (plan included) to the campaign being COMPLETED.
    pub seconds: f64,
    pub rows_per_sec: f64,
    /// Wall time summed over the partitions' claims, validation included
    /// (`kind.claim_prepared`).
    pub claim_secs_total: f64,
    /// Wall time summed over the outcome transactions (`repo::write_outcomes`).
    pub write_secs_total: f64,
    /// The final `repo::complete_if_done`.
    pub complete_ms: f64,
    pub claim_batches: u64,
    /// Transactions retried after a deadlock or lock wait timeout.
    pub retries: u64,
    /// Claims that came back empty while their partition still counted PENDING rows (`SKIP
    /// LOCKED` passed over them) and were made again.
    pub skipped_claims: u64,
    /// CPU seconds of the bench process during the pass (it plays the daemon's part).
    pub bench_cpu_secs: Option<f64>,
    /// CPU seconds of the MariaDB server during the pass.
    pub mariadb_cpu_secs: Option<f64>,
    /// Share of all cores busy during the pass, whoever used them.
    pub machine_cpu_busy_pct: Option<f64>,
    /// CPU seconds used during the pass by processes other than MariaDB and the bench.
    pub other_cpu_secs: Option<f64>,
    /// InnoDB's undo history (`trx_rseg_history_len`) before the pass and right after it:
    /// the old row versions the pass left for purge to remove.
    pub undo_history_before: Option<u64>,
    pub undo_history_after: Option<u64>,
    /// How long the bench then waited for purge to catch up (`--db-ceiling`), so that the
    /// end-to-end run does not pay for this pass's clean-up.
    pub purge_wait_secs: Option<f64>,
}

#[derive(Default)]
struct Timers {
    claim_ns: AtomicU64,
    write_ns: AtomicU64,
    batches: AtomicU64,
    retries: AtomicU64,
    /// Empty claims made while the partition still counted PENDING rows.
    skipped: AtomicU64,
}

fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn add(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

fn kinds() -> KindRegistry {
    let mut kinds = KindRegistry::new();
    kinds.register::<payout_voucher::Voucher>();
    kinds.register::<payout_point::Point>();
    kinds
}

/// Runs the pass over campaign `campaign` (loaded, READY, with a stored `partitions` plan).
pub async fn run(
    db_url: &str,
    kind: Kind,
    campaign: i64,
    rows: u64,
    partitions: u16,
    batch_size: u32,
) -> anyhow::Result<DbOnlyReport> {
    let kind_impl = kinds().get(kind.campaign_kind()).context("kind not registered")?;
    let pool = db::pool(&DbSettings {
        url: SecretString::from(db_url.to_owned()),
        pool_size: 2 * usize::from(partitions) + 2,
        connect_timeout: Duration::from_secs(10),
    })?;
    db::check(&pool).await?;
    let id = CampaignId(campaign);
    {
        let mut c = db::conn(&pool).await?;
        diesel_async::RunQueryDsl::execute(
            diesel::sql_query("UPDATE campaigns SET status = 'RUNNING' WHERE id = ?")
                .bind::<diesel::sql_types::BigInt, _>(campaign),
            &mut c,
        )
        .await?;
    }
    let mariadb = super::procfs::mariadb_pid();
    let db_cpu0 = mariadb.and_then(super::procfs::cpu_secs);
    let self_cpu0 = super::procfs::self_cpu_secs();
    let system0 = super::procfs::SystemCpu::now();
    let started = Instant::now();
    let plan = {
        let mut c = db::conn(&pool).await?;
        // The stored plan (set by the bench) wins over the rule.
        repo::ensure_plan(&mut c, kind_impl.table(), id, PartitionRule::default(), "bench").await?
    };
    let timers = Arc::new(Timers::default());
    let mut tasks = Vec::new();
    for slice in plan.clone() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<RowOutcome>>(4);
        tasks.push(tokio::spawn(claimer(
            pool.clone(),
            kind_impl.clone(),
            id,
            slice,
            batch_size,
            timers.clone(),
            tx,
        )));
        tasks.push(tokio::spawn(writer(
            pool.clone(),
            kind_impl.clone(),
            id,
            slice.partition_no as i16,
            timers.clone(),
            rx,
        )));
    }
    for t in tasks {
        t.await.context("a database-only task panicked")??;
    }
    let complete_started = Instant::now();
    let completed = {
        let mut c = db::conn(&pool).await?;
        repo::complete_if_done(&mut c, kind_impl.table(), id, "bench").await?
    };
    let complete_ms = complete_started.elapsed().as_secs_f64() * 1000.0;
    let seconds = started.elapsed().as_secs_f64();
    let db_cpu = mariadb.and_then(super::procfs::cpu_secs).zip(db_cpu0).map(|(b, a)| b - a);
    let self_cpu = super::procfs::self_cpu_secs().zip(self_cpu0).map(|(b, a)| b - a);
    let system = super::procfs::SystemCpu::now().zip(system0);
    let busy_pct = system.map(|(b, a)| (b.busy_pct_since(&a) * 10.0).round() / 10.0);
    let other = system.map(|(b, a)| {
        let ours = db_cpu.unwrap_or(0.0) + self_cpu.unwrap_or(0.0);
        ((b.busy_secs_since(&a) - ours).max(0.0) * 1000.0).round() / 1000.0
    });
    if !completed {
        bail!("the database-only pass left rows of campaign {campaign} unfinished");
    }
    pool.close();
    let ns = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / 1e9;
    Ok(DbOnlyReport {
        campaign_id: campaign,
        rows,
        partitions: plan.len() as u16,
        batch_size,
        seconds: r3(seconds),
        rows_per_sec: r3(rows as f64 / seconds.max(1e-9)),
        claim_secs_total: r3(ns(&timers.claim_ns)),
        write_secs_total: r3(ns(&timers.write_ns)),
        complete_ms: r3(complete_ms),
        claim_batches: timers.batches.load(Ordering::Relaxed),
        retries: timers.retries.load(Ordering::Relaxed),
        skipped_claims: timers.skipped.load(Ordering::Relaxed),
        bench_cpu_secs: self_cpu.map(r3),
        mariadb_cpu_secs: db_cpu.map(r3),
        machine_cpu_busy_pct: busy_pct,
        other_cpu_secs: other,
        undo_history_before: None,
        undo_history_after: None,
        purge_wait_secs: None,
    })
}

/// Whether a failed step should be tried again (at most 4 retries, as the engine does for
/// deadlocks and lock wait timeouts); sleeps before the next try.
async fn retry_after(timers: &Timers, tries: &mut u64, error: &diesel::result::Error) -> bool {
    if *tries >= 4 {
        return false;
    }
    *tries += 1;
    timers.retries.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%error, "database-only step failed; retrying");
    tokio::time::sleep(Duration::from_millis(10 * *tries)).await;
    true
}

async fn claimer(
    pool: DbPool,
    kind: Arc<dyn ErasedKind>,
    id: CampaignId,
    slice: PartitionSlice,
    batch_size: u32,
    timers: Arc<Timers>,
    out: tokio::sync::mpsc::Sender<Vec<RowOutcome>>,
) -> anyhow::Result<()> {
    let owner = format!("bench-db-only/{}", slice.partition_no);
    let ctx = ValidationContext {
        now: Utc::now(),
        max_point_amount: 1_000_000,
        expiry_offset: chrono::FixedOffset::east_opt(9 * 3600).context("offset")?,
    };
    let mut c = db::conn(&pool).await?;
    let mut seq = 0u64;
    let mut cursor = repo::ClaimCursor::start();
    let mut skipped = 0u32;
    loop {
        seq += 1;
        let token: repo::ClaimToken = format!("{owner}/{seq}").into();
        let t = Instant::now();
        let mut tries = 0;
        let spec =
            repo::ClaimSpec { campaign: id, slice: &slice, limit: batch_size, token: &token };
        let claimed = loop {
            let from_start = cursor.at_start();
            match kind.claim_prepared(&mut c, spec, &mut cursor, &ctx).await {
                // The end of the partition: start over once before calling it done.
                Ok(v) if v.is_empty() && !from_start => {}
                Ok(v) => break v,
                Err(e) if retry_after(&timers, &mut tries, &e).await => {}
                Err(e) => return Err(e.into()),
            }
        };
        add(&timers.claim_ns, t);
        if claimed.is_empty() {
            // An empty claim is not the end while the partition still counts PENDING rows
            // (`SKIP LOCKED` can pass over one): claim again shortly, as the engine does.
            let left = repo::pending_in_slice(&mut c, kind.table(), id, &slice).await?;
            if left > 0 && skipped < 100 {
                skipped += 1;
                timers.skipped.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            return Ok(());
        }
        skipped = 0;
        timers.batches.fetch_add(1, Ordering::Relaxed);
        let outcomes: Vec<RowOutcome> = claimed
            .into_iter()
            .map(|(_, p)| RowOutcome {
                target: p.target,
                claim: token.clone(),
                outcome: match p.request {
                    Ok(_) => Outcome::Granted { transaction_id: format!("bench-{}", p.target.0) },
                    Err(invalid) => {
                        Outcome::Invalid { code: invalid.code, message: invalid.message }
                    }
                },
            })
            .collect();
        if out.send(outcomes).await.is_err() {
            bail!("the writer of partition {} stopped", slice.partition_no);
        }
    }
}

async fn writer(
    pool: DbPool,
    kind: Arc<dyn ErasedKind>,
    id: CampaignId,
    shard: i16,
    timers: Arc<Timers>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<RowOutcome>>,
) -> anyhow::Result<()> {
    let mut c = db::conn(&pool).await?;
    while let Some(batch) = rx.recv().await {
        let t = Instant::now();
        let mut tries = 0;
        loop {
            match repo::write_outcomes(&mut c, kind.table(), kind.kind(), id, shard, &batch).await {
                Ok(()) => break,
                Err(e) if retry_after(&timers, &mut tries, &e).await => {}
                Err(e) => return Err(e.into()),
            }
        }
        add(&timers.write_ns, t);
    }
    Ok(())
}
