//! `--status-only`: how long `payoutd campaign status` takes on a large campaign.
//!
//! After the load, campaign 1 is put into the state of a campaign under way, as the engine would
//! leave it: `RUNNING` with a stored plan of 8 partitions (`planned_rows` = N), a third of the
//! rows `SUCCEEDED` (`id % 3 = 0`) with the matching per-shard `campaign_counters`, up to 500
//! rows `IN_FLIGHT` and 200 `FAILED`. No daemon runs. Then, each [`CALLS`] times: the real
//! `payoutd campaign status 1 --json` (wall time of the whole process: start, configuration,
//! connection, query, output), the raw `SELECT * FROM campaign_progress WHERE campaign_id = 1`
//! on one open connection, and for comparison the naive `SELECT status, COUNT(*) … GROUP BY
//! status` over the campaign's rows.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mysql_async::prelude::Queryable;
use serde::Serialize;

use super::{CAMPAIGN, Kind, daemon, db, round3, store_plan};

/// Calls per measured statement.
pub const CALLS: usize = 10;
/// The stored plan's partition count (the counters get one shard per partition).
pub const PARTITIONS: u16 = 8;

/// Wall times of repeated calls, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
    /// Every call in order (the first one may be cold).
    pub samples_ms: Vec<f64>,
}

impl Timing {
    fn of(samples: &[Duration]) -> Timing {
        let ms: Vec<f64> = samples.iter().map(|d| round3(d.as_secs_f64() * 1000.0)).collect();
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => 0.0,
            n if n % 2 == 1 => sorted[n / 2],
            n => round3((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
        };
        Timing {
            min_ms: sorted.first().copied().unwrap_or(0.0),
            median_ms: median,
            max_ms: sorted.last().copied().unwrap_or(0.0),
            samples_ms: ms,
        }
    }
}

/// What the status-only mode measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusReport {
    pub campaign_id: i64,
    pub rows: u64,
    pub partitions: u16,
    /// Rows per status as set up (naive count, taken once before the timings).
    pub counts: std::collections::BTreeMap<String, i64>,
    /// Putting the campaign into its under-way state (UPDATEs, counters, plan).
    pub setup_secs: f64,
    /// `payoutd campaign status 1 --json`, the whole process.
    pub cli: Timing,
    /// `SELECT * FROM campaign_progress WHERE campaign_id = 1` on one open connection.
    pub view: Timing,
    /// `SELECT status, COUNT(*) FROM <table> WHERE event_id = 1 GROUP BY status`.
    pub naive_group_by: Timing,
    /// The CLI's counts equal the naive counts.
    pub cli_counts_match: bool,
    /// The first call's JSON.
    pub cli_output: serde_json::Value,
    /// `EXPLAIN SELECT * FROM campaign_progress WHERE campaign_id = 1`, one line per row:
    /// id, select_type, table, type, key, ref, rows, Extra.
    pub view_plan: Vec<String>,
    /// `@@innodb_buffer_pool_size` in MiB.
    pub innodb_buffer_pool_mib: Option<f64>,
    /// The target table's data + indexes (information_schema, after the setup), in MiB.
    pub table_mib: Option<f64>,
}

async fn chunked_update(c: &mut mysql_async::Conn, sql: &str, max_id: i64) -> anyhow::Result<()> {
    // 100,000 ids per transaction: no single huge undo log.
    let mut lo = 0i64;
    while lo <= max_id {
        let hi = lo + 100_000;
        c.query_drop(format!("{sql} AND id > {lo} AND id <= {hi}")).await?;
        lo = hi;
    }
    Ok(())
}

/// Sets campaign 1 under way and times the status queries. `db` holds the loaded campaign.
pub async fn run(
    db: &db::BenchDb,
    payoutd: &Path,
    kind: Kind,
    rows: u64,
) -> anyhow::Result<StatusReport> {
    let table = kind.table();
    let mut c = db.conn().await?;
    let setup = Instant::now();
    let max_id: i64 = c
        .query_first(format!(
            "SELECT COALESCE(MAX(id), 0) FROM {table} WHERE event_id = {CAMPAIGN}"
        ))
        .await?
        .unwrap_or(0);
    chunked_update(
        &mut c,
        &format!(
            "UPDATE {table} SET status = 'SUCCEEDED', attempts = 1, updated_at = NOW(3) \
             WHERE event_id = {CAMPAIGN} AND id % 3 = 0"
        ),
        max_id,
    )
    .await?;
    let in_flight = (rows / 10).min(500);
    let failed = (rows / 20).min(200);
    c.query_drop(format!(
        "UPDATE {table} SET status = 'IN_FLIGHT', claimed_by = 'bench', attempts = 1 \
         WHERE event_id = {CAMPAIGN} AND status = 'PENDING' LIMIT {in_flight}"
    ))
    .await?;
    c.query_drop(format!(
        "UPDATE {table} SET status = 'FAILED', attempts = 1, \
         next_attempt_at = NOW(3) + INTERVAL 1 HOUR \
         WHERE event_id = {CAMPAIGN} AND status = 'PENDING' LIMIT {failed}"
    ))
    .await?;
    store_plan(db, CAMPAIGN, rows, PARTITIONS).await?;
    let succeeded: i64 = c
        .query_first(format!(
            "SELECT COUNT(*) FROM {table} WHERE event_id = {CAMPAIGN} AND status = 'SUCCEEDED'"
        ))
        .await?
        .unwrap_or(0);
    let shards = i64::from(PARTITIONS);
    let values: Vec<String> = (0..shards)
        .map(|s| {
            let n = succeeded / shards + i64::from(s < succeeded % shards);
            format!("({CAMPAIGN}, {s}, {n}, 0)")
        })
        .collect();
    c.query_drop(format!(
        "INSERT INTO campaign_counters (campaign_id, shard, succeeded, dead) VALUES {}",
        values.join(", ")
    ))
    .await?;
    c.query_drop(format!(
        "UPDATE campaigns SET status = 'RUNNING', queued_at = NOW(3) - INTERVAL 10 MINUTE, \
         started_at = NOW(3) - INTERVAL 10 MINUTE, current_rows_per_sec = 1000 \
         WHERE id = {CAMPAIGN}"
    ))
    .await?;
    let setup_secs = round3(setup.elapsed().as_secs_f64());

    let counts: Vec<(String, i64)> = c
        .query(format!(
            "SELECT status, COUNT(*) FROM {table} WHERE event_id = {CAMPAIGN} GROUP BY status"
        ))
        .await?;
    let counts: std::collections::BTreeMap<String, i64> = counts.into_iter().collect();

    let plan: Vec<mysql_async::Row> = c
        .query(format!("EXPLAIN SELECT * FROM campaign_progress WHERE campaign_id = {CAMPAIGN}"))
        .await?;
    let view_plan = plan
        .iter()
        .map(|r| {
            ["id", "select_type", "table", "type", "key", "ref", "rows", "Extra"]
                .iter()
                .map(|col| {
                    r.columns_ref()
                        .iter()
                        .position(|k| k.name_str() == *col)
                        .and_then(|i| r.as_ref(i))
                        .map(|v| match v {
                            mysql_async::Value::NULL => "NULL".to_owned(),
                            mysql_async::Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
                            other => other.as_sql(true).trim_matches('\'').to_owned(),
                        })
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect();
    let pool: Option<u64> = c.query_first("SELECT @@innodb_buffer_pool_size").await?;
    let size: Option<Option<u64>> = c
        .query_first(format!(
            "SELECT CAST(data_length + index_length AS UNSIGNED) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = '{table}'"
        ))
        .await?;

    // The real CLI, as an operator runs it.
    let id = CAMPAIGN.to_string();
    let args = ["campaign", "status", id.as_str(), "--json"];
    let mut cli = Vec::with_capacity(CALLS);
    let mut cli_output = serde_json::Value::Null;
    for i in 0..CALLS {
        let t = Instant::now();
        let out = daemon::cli(payoutd, &db.url, &args).await?;
        cli.push(t.elapsed());
        if i == 0 {
            cli_output = serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "payoutd campaign status printed no JSON: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })?;
        }
    }
    let cli_counts = cli_output.get("counts").cloned().unwrap_or_default();
    let cli_counts_match =
        ["PENDING", "IN_FLIGHT", "SUCCEEDED", "FAILED", "DEAD"].iter().all(|s| {
            cli_counts.get(s).and_then(serde_json::Value::as_i64).unwrap_or(0)
                == counts.get(*s).copied().unwrap_or(0)
        });
    if cli_output.get("rows").and_then(serde_json::Value::as_u64) != Some(rows) {
        bail!("payoutd campaign status reported other rows than {rows}: {cli_output}");
    }

    let mut view = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        let r: Vec<mysql_async::Row> = c
            .query(format!("SELECT * FROM campaign_progress WHERE campaign_id = {CAMPAIGN}"))
            .await?;
        view.push(t.elapsed());
        if r.len() != 1 {
            bail!("campaign_progress returned {} rows for campaign {CAMPAIGN}", r.len());
        }
    }
    let mut naive = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        let _: Vec<(String, i64)> = c
            .query(format!(
                "SELECT status, COUNT(*) FROM {table} WHERE event_id = {CAMPAIGN} GROUP BY status"
            ))
            .await?;
        naive.push(t.elapsed());
    }

    Ok(StatusReport {
        campaign_id: CAMPAIGN,
        rows,
        partitions: PARTITIONS,
        counts,
        setup_secs,
        cli: Timing::of(&cli),
        view: Timing::of(&view),
        naive_group_by: Timing::of(&naive),
        cli_counts_match,
        cli_output,
        view_plan,
        innodb_buffer_pool_mib: pool.map(|b| round3(b as f64 / 1048576.0)),
        table_mib: size.flatten().map(|b| round3(b as f64 / 1048576.0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_have_a_median() {
        let t = Timing::of(&[
            Duration::from_millis(30),
            Duration::from_millis(10),
            Duration::from_millis(20),
        ]);
        assert_eq!((t.min_ms, t.median_ms, t.max_ms), (10.0, 20.0, 30.0));
        assert_eq!(t.samples_ms, vec![30.0, 10.0, 20.0]);
        let t = Timing::of(&[Duration::from_millis(10), Duration::from_millis(20)]);
        assert_eq!(t.median_ms, 15.0);
    }
}
