//! `payoutd campaign ...`: operator commands and progress reports.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::Utc;
use payout_core::db::{DbPool, conn};
use payout_core::domain::OperatorCommand;
use payout_core::repo::{self, CampaignRow};
use payout_core::{CampaignId, KindRegistry, TargetStatus};
use serde::Serialize;

/// Applies `command` to campaign `id` and reports the change on stdout.
pub(crate) async fn command(
    pool: &DbPool,
    id: i64,
    command: OperatorCommand,
    actor: &str,
) -> anyhow::Result<()> {
    let mut c = conn(pool).await.context("cannot reach the database")?;
    let (from, to) = repo::apply_command(&mut c, CampaignId(id), command, actor).await?;
    println!("campaign {id}: {from} -> {to}");
    Ok(())
}

/// A campaign's progress, as `campaign status` prints it.
#[derive(Debug, Serialize)]
pub(crate) struct Progress {
    pub(crate) id: i64,
    pub(crate) kind: String,
    pub(crate) name: String,
    pub(crate) status: String,
    pub(crate) status_reason: Option<String>,
    pub(crate) rows: u64,
    pub(crate) counts: BTreeMap<&'static str, u64>,
    /// (FAILED + DEAD) / all rows × 100.
    pub(crate) failure_rate_pct: f64,
    /// Rows finished (SUCCEEDED or DEAD) per second since the campaign started.
    pub(crate) rows_per_sec: Option<f64>,
    pub(crate) rows_left: u64,
    pub(crate) eta_secs: Option<f64>,
    pub(crate) partitions: Option<i16>,
    pub(crate) started_at: Option<String>,
    pub(crate) completed_at: Option<String>,
}

async fn progress(
    pool: &DbPool,
    kinds: &KindRegistry,
    row: CampaignRow,
) -> anyhow::Result<Progress> {
    let mut counts: BTreeMap<&'static str, u64> =
        TargetStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    if let Some(kind) = kinds.get(&row.kind) {
        let mut c = conn(pool).await.context("cannot reach the database")?;
        for (status, n) in repo::count_by_status(&mut c, kind.table(), row.id()).await? {
            counts.insert(status.as_str(), n);
        }
    }
    let get = |s: TargetStatus| counts.get(s.as_str()).copied().unwrap_or(0);
    let rows: u64 = counts.values().sum();
    let done = get(TargetStatus::Succeeded) + get(TargetStatus::Dead);
    let failed = get(TargetStatus::Failed) + get(TargetStatus::Dead);
    let rows_left = rows - done;
    let failure_rate_pct = if rows == 0 { 0.0 } else { failed as f64 * 100.0 / rows as f64 };
    let end = row.completed_at.unwrap_or_else(|| Utc::now().naive_utc());
    let rows_per_sec = row.started_at.and_then(|s| {
        let secs = (end - s).num_milliseconds() as f64 / 1000.0;
        (secs > 0.0).then(|| done as f64 / secs)
    });
    let eta_secs = match rows_per_sec {
        _ if rows_left == 0 => Some(0.0),
        Some(r) if r > 0.0 => Some(rows_left as f64 / r),
        _ => None,
    };
    let fmt = |t: Option<chrono::NaiveDateTime>| {
        t.map(|t| format!("{}Z", t.format("%Y-%m-%dT%H:%M:%S%.3f")))
    };
    Ok(Progress {
        id: row.id,
        kind: row.kind.clone(),
        name: row.name.clone(),
        status: row.status.clone(),
        status_reason: row.status_reason.clone(),
        rows,
        counts,
        failure_rate_pct,
        rows_per_sec,
        rows_left,
        eta_secs,
        partitions: row.partition_count,
        started_at: fmt(row.started_at),
        completed_at: fmt(row.completed_at),
    })
}

/// `campaign status [ID]`: one campaign, or every campaign not yet COMPLETED.
pub(crate) async fn status(
    pool: &DbPool,
    kinds: &KindRegistry,
    id: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    let mut c = conn(pool).await.context("cannot reach the database")?;
    let rows = match id {
        Some(id) => vec![
            repo::campaign(&mut c, CampaignId(id))
                .await?
                .with_context(|| format!("campaign {id} does not exist"))?,
        ],
        None => {
            repo::campaigns(&mut c).await?.into_iter().filter(|r| r.status != "COMPLETED").collect()
        }
    };
    drop(c);
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(progress(pool, kinds, row).await?);
    }
    if json {
        let text = match (id, out.as_slice()) {
            (Some(_), [one]) => serde_json::to_string_pretty(one)?,
            _ => serde_json::to_string_pretty(&out)?,
        };
        println!("{text}");
        return Ok(());
    }
    if out.is_empty() {
        println!("no campaign is READY, RUNNING, PAUSED or STOPPED");
    }
    for p in &out {
        print_progress(p);
    }
    Ok(())
}

fn print_progress(p: &Progress) {
    println!("campaign {} ({}) {:?}: {}", p.id, p.kind, p.name, p.status);
    if let Some(reason) = &p.status_reason {
        println!("  reason: {reason}");
    }
    let counts: Vec<String> = p.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  rows {}: {}", p.rows, counts.join(", "));
    println!("  failure rate {:.2} % ((FAILED + DEAD) / all rows)", p.failure_rate_pct);
    let rate = p.rows_per_sec.map(|r| format!("{r:.1} rows/s")).unwrap_or_else(|| "-".to_owned());
    let eta = p.eta_secs.map(|s| format!("{s:.0} s")).unwrap_or_else(|| "-".to_owned());
    println!("  throughput {rate} (average since start), {} rows left, ETA {eta}", p.rows_left);
    if let Some(n) = p.partitions {
        println!("  partitions {n}");
    }
}

/// `campaign list`: every campaign with its status and progress.
pub(crate) async fn list(pool: &DbPool, kinds: &KindRegistry, json: bool) -> anyhow::Result<()> {
    let mut c = conn(pool).await.context("cannot reach the database")?;
    let rows = repo::campaigns(&mut c).await?;
    drop(c);
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(progress(pool, kinds, row).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:>10}  {:<8} {:<10} {:>10} {:>7}  name", "id", "kind", "status", "rows", "done");
    for p in &out {
        let done =
            if p.rows == 0 { 100.0 } else { (p.rows - p.rows_left) as f64 * 100.0 / p.rows as f64 };
        println!(
            "{:>10}  {:<8} {:<10} {:>10} {:>6.1}%  {}",
            p.id, p.kind, p.status, p.rows, done, p.name
        );
    }
    Ok(())
}
