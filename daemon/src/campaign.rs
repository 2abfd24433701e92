//! `payoutd campaign ...`: operator commands and progress reports.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::Utc;
use diesel_async::AsyncMysqlConnection;
use payout_core::db::{DbPool, conn};
use payout_core::domain::OperatorCommand;
use payout_core::repo::{self, CampaignRow};
use payout_core::{CampaignId, TargetStatus};
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
    /// Rows finished (SUCCEEDED or DEAD) per second over the daemon's last throughput interval.
    pub(crate) current_rows_per_sec: Option<f64>,
    /// Rows finished per second since the campaign started.
    pub(crate) rows_per_sec: Option<f64>,
    pub(crate) rows_left: u64,
    /// Seconds to go at the current rate (at the average rate when there is no current one).
    pub(crate) eta_secs: Option<f64>,
    pub(crate) partitions: Option<i16>,
    /// Each partition of the stored plan: its bucket range, which daemon instance holds it, and
    /// that instance's rate share and current rate.
    pub(crate) holders: Vec<payout_core::lease::Holder>,
    pub(crate) started_at: Option<String>,
    pub(crate) completed_at: Option<String>,
}

async fn progress(c: &mut AsyncMysqlConnection, row: CampaignRow) -> anyhow::Result<Progress> {
    let p = repo::progress(c, row.id())
        .await?
        .with_context(|| format!("campaign {} does not exist", row.id))?;
    let holders = payout_core::lease::holders(c, row.id()).await?;
    let n = |v: i64| v.max(0) as u64;
    let counts: BTreeMap<&'static str, u64> = [
        (TargetStatus::Pending, n(p.pending)),
        (TargetStatus::InFlight, n(p.in_flight)),
        (TargetStatus::Succeeded, n(p.succeeded)),
        (TargetStatus::Failed, n(p.failed)),
        (TargetStatus::Dead, n(p.dead)),
    ]
    .into_iter()
    .map(|(s, v)| (s.as_str(), v))
    .collect();
    let rows = n(p.total_rows);
    let done = n(p.succeeded) + n(p.dead);
    let rows_left = rows.saturating_sub(done);
    let end = row.completed_at.unwrap_or_else(|| Utc::now().naive_utc());
    let rows_per_sec = row.started_at.and_then(|s| {
        let secs = (end - s).num_milliseconds() as f64 / 1000.0;
        (secs > 0.0).then(|| done as f64 / secs)
    });
    let current = p.current_rows_per_sec.filter(|_| row.status == "RUNNING");
    let eta_secs = match current.filter(|r| *r > 0.0).or(rows_per_sec) {
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
        failure_rate_pct: p.failure_rate_pct,
        current_rows_per_sec: current,
        rows_per_sec,
        rows_left,
        eta_secs,
        partitions: row.partition_count,
        holders,
        started_at: fmt(row.started_at),
        completed_at: fmt(row.completed_at),
    })
}

/// `campaign status [ID]`: one campaign, or every campaign not yet COMPLETED. Runs on one
/// connection, made for it: operators call it while a daemon keeps the machine busy, and there
/// every round trip to the database waits its turn for a CPU.
pub(crate) async fn status(
    c: &mut AsyncMysqlConnection,
    id: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    let rows = match id {
        Some(id) => vec![
            repo::campaign(c, CampaignId(id))
                .await?
                .with_context(|| format!("campaign {id} does not exist"))?,
        ],
        None => repo::campaigns(c).await?.into_iter().filter(|r| r.status != "COMPLETED").collect(),
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(progress(c, row).await?);
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
    let rate =
        |r: Option<f64>| r.map(|r| format!("{r:.1} rows/s")).unwrap_or_else(|| "-".to_owned());
    println!(
        "  throughput {} now, {} on average since start",
        rate(p.current_rows_per_sec),
        rate(p.rows_per_sec)
    );
    println!("  {} rows left, ETA {}", p.rows_left, eta(p.eta_secs));
    if let Some(n) = p.partitions {
        println!("  partitions {n}");
    }
    for h in &p.holders {
        let holder = match (&h.owner, h.lease_expires_in_ms) {
            (None, _) => "free".to_owned(),
            (Some(o), Some(ms)) if ms <= 0 => {
                format!("{o} (lease ran out {:.1} s ago)", -ms as f64 / 1000.0)
            }
            (Some(o), _) => {
                let rate = |r: Option<f64>| {
                    r.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "-".to_owned())
                };
                format!(
                    "{o}: share {}, doing {}",
                    rate(h.owner_rate_limit_per_sec),
                    rate(h.owner_rows_per_sec)
                )
            }
        };
        println!(
            "    partition {} (buckets {}..{}): {holder}",
            h.partition_no, h.bucket_lo, h.bucket_hi
        );
    }
}

fn eta(secs: Option<f64>) -> String {
    match secs {
        Some(s) if s >= 3600.0 => {
            format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
        }
        Some(s) if s >= 60.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!("{s:.0}s"),
        None => "-".to_owned(),
    }
}

/// `campaign status ID --watch`: one progress line a second (a bar on a terminal) until the
/// campaign is COMPLETED. Takes a pooled connection each second, so it rides out a database
/// restart.
pub(crate) async fn watch(pool: &DbPool, id: Option<i64>, json: bool) -> anyhow::Result<()> {
    let id = id.context("--watch needs a campaign id")?;
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal() && !json;
    loop {
        let p = {
            let mut c = conn(pool).await.context("cannot reach the database")?;
            let row = repo::campaign(&mut c, CampaignId(id))
                .await?
                .with_context(|| format!("campaign {id} does not exist"))?;
            progress(&mut c, row).await?
        };
        let done = p.rows - p.rows_left;
        let share = if p.rows == 0 { 1.0 } else { done as f64 / p.rows as f64 };
        if json {
            println!("{}", serde_json::to_string(&p)?);
        } else {
            const WIDTH: usize = 30;
            let filled = ((share * WIDTH as f64) as usize).min(WIDTH);
            let rate = p.current_rows_per_sec.or(p.rows_per_sec).unwrap_or(0.0);
            let line = format!(
                "campaign {id} {:<9} [{}{}] {:5.1}% {done}/{} rows  {rate:.0} rows/s  failed {:.2}%  ETA {}",
                p.status,
                "#".repeat(filled),
                ".".repeat(WIDTH - filled),
                share * 100.0,
                p.rows,
                p.failure_rate_pct,
                eta(p.eta_secs)
            );
            if tty {
                print!("\r{line}\x1b[K");
                std::io::stdout().flush()?;
            } else {
                println!("{line}");
            }
        }
        if p.status == "COMPLETED" {
            if tty {
                println!();
            }
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => {
                if tty {
                    println!();
                }
                return Ok(());
            }
        }
    }
}

/// `campaign list`: every campaign with its status and progress (on one connection, as
/// [`status`]).
pub(crate) async fn list(c: &mut AsyncMysqlConnection, json: bool) -> anyhow::Result<()> {
    let rows = repo::campaigns(c).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(progress(c, row).await?);
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
