//! `payout-bench`: an end-to-end benchmark of payoutd on this machine.
//!
//! One run: make sure a MariaDB answers, create a fresh database, `payoutd migrate`, load N rows
//! of one kind with the loader's INSERTs (campaign 1), start money-sim with a latency
//! distribution and a rate limit, start `payoutd run`, set the campaign RUNNING and time it until
//! COMPLETED, then stop the daemon and collect what money-sim, the daemon's final log line,
//! `/proc` and the database say. The result is printed and written as JSON ([`BenchReport`]).
//!
//! Optionally the database-only ceiling ([`db_only`]) runs first on a second campaign of the
//! same size (`db_ceiling`), or alone (`db_only`). `status_only` ([`status`]) instead times
//! `payoutd campaign status` on the loaded campaign set up as under way, with no daemon.
//!
//! `BENCHMARKS.md` at the repository root explains every field and holds measured figures.

pub mod daemon;
pub mod db;
pub mod db_only;
pub mod procfs;
pub mod sim;
pub mod status;
pub mod transit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::Utc;
use mysql_async::prelude::Queryable;
use payout_core::plan::{PartitionRule, slices};
use serde::{Deserialize, Serialize};

use crate::money_sim::{LedgerSummary, SimConfig};

/// The campaign the end-to-end run pays.
pub const CAMPAIGN: i64 = 1;
/// The campaign the database-only ceiling uses when it runs beside the end-to-end run.
pub const CEILING_CAMPAIGN: i64 = 2;
/// The API key money-sim expects and the daemon sends.
pub const SIM_API_KEY: &str = "bench-key";
/// `money.rate_limit_per_sec` given to the daemon for `--limit 0` (no limit).
pub const UNLIMITED_RATE: u32 = 1_000_000;
/// Above this many rows the per-second request histogram is not fetched (money-sim's request
/// log is then tens of megabytes of JSON).
pub const HISTOGRAM_MAX_ROWS: u64 = 500_000;

/// The kind of target rows to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Point,
    Voucher,
}

/// How the bench schedules a money-sim child process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SimPriority {
    /// Every thread at nice −10 (where allowed).
    #[default]
    Nice,
    /// Every thread under SCHED_FIFO priority 10 (where allowed; else nice −10).
    Fifo,
    /// As started.
    Normal,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Point => "point",
            Kind::Voucher => "voucher",
        }
    }

    /// `campaigns.kind`.
    pub fn campaign_kind(self) -> &'static str {
        match self {
            Kind::Point => "POINT",
            Kind::Voucher => "VOUCHER",
        }
    }

    pub fn table(self) -> &'static str {
        match self {
            Kind::Point => "point_targets",
            Kind::Voucher => "voucher_targets",
        }
    }
}

/// Everything a run can be told.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub rows: u64,
    pub kind: Kind,
    /// The daemon's `money.rate_limit_per_sec`; 0 = no limit (the daemon gets
    /// [`UNLIMITED_RATE`], money-sim 0).
    pub limit: u32,
    /// money-sim's own limit (429 above it); `None` = `limit`.
    pub sim_limit: Option<u32>,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    /// Force a partition count (1..=8); `None` = the daemon's rule.
    pub partitions: Option<u16>,
    /// `payoutd run` processes sharing the campaign (partition leases); 1 = one daemon.
    pub instances: u16,
    /// `money.max_in_flight`; `None` = the daemon's default.
    pub max_in_flight: Option<usize>,
    /// `executor.batch_size`; `None` = the daemon's default.
    pub batch_size: Option<u32>,
    /// Run money-sim as a child process (its CPU measured apart).
    pub sim_process: bool,
    /// How a money-sim child process is scheduled.
    pub sim_priority: SimPriority,
    /// Only the database-only ceiling, no daemon and no HTTP.
    pub db_only: bool,
    /// The database-only ceiling on a second campaign first, then the end-to-end run.
    pub db_ceiling: bool,
    /// Only time `payoutd campaign status` and the status queries on the loaded campaign.
    pub status_only: bool,
    /// Log every admission in the daemon and pair it with money-sim's arrival ([`transit`]).
    pub transit: bool,
    pub keep_db: bool,
    /// Server URL without a database; `None`: `PAYOUTD_TEST_DATABASE_URL`, else
    /// `scripts/ensure-mariadb.sh`. Never serialised (it may hold a password).
    #[serde(skip)]
    pub db_url: Option<String>,
    /// `None`: `payoutd` beside the running executable (same target directory).
    pub payoutd: Option<PathBuf>,
    /// `None`: `money-sim` beside the running executable.
    pub money_sim: Option<PathBuf>,
    /// `None`: `bench-results/<timestamp>.json`. Logs go beside it.
    pub out: Option<PathBuf>,
    /// `log.throughput_interval` of the daemon (one `throughput` line per interval).
    pub throughput_interval: String,
    /// Extra `PAYOUTD_*` variables for the daemon (they win over the bench's).
    pub daemon_env: Vec<(String, String)>,
    /// Connections the loader uses in parallel.
    pub load_connections: usize,
    /// Give up after this long from RUNNING; `None`: derived from rows and limit.
    pub timeout_secs: Option<u64>,
    /// No progress lines on stderr.
    pub quiet: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            rows: 200_000,
            kind: Kind::Point,
            limit: 1000,
            sim_limit: None,
            latency_ms: 20,
            jitter_ms: 10,
            partitions: None,
            instances: 1,
            max_in_flight: None,
            batch_size: None,
            sim_process: false,
            sim_priority: SimPriority::default(),
            db_only: false,
            db_ceiling: false,
            status_only: false,
            transit: false,
            keep_db: false,
            db_url: None,
            payoutd: None,
            money_sim: None,
            out: None,
            throughput_interval: "1s".to_owned(),
            daemon_env: Vec::new(),
            load_connections: 4,
            timeout_secs: None,
            quiet: false,
        }
    }
}

impl BenchConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.rows == 0 {
            bail!("--rows must be at least 1");
        }
        if let Some(p) = self.partitions {
            if !(1..=8).contains(&p) {
                bail!("--partitions must be 1 to 8, got {p}");
            }
            if p == 8 && self.rows < 2 {
                bail!("--partitions 8 needs at least 2 rows");
            }
        }
        if self.batch_size.is_some_and(|b| !(1..=5000).contains(&b)) {
            bail!("--batch-size must be 1 to 5000");
        }
        if self.status_only && (self.db_only || self.db_ceiling) {
            bail!("--status-only runs no campaign: not with --db-only or --db-ceiling");
        }
        if self.max_in_flight == Some(0) {
            bail!("--max-in-flight must be at least 1");
        }
        for (k, _) in &self.daemon_env {
            // The daemon's configuration, and the runtime's and allocator's own knobs
            // (`_RJEM_MALLOC_CONF`: the daemon's jemalloc, whose symbols are prefixed).
            if !["PAYOUTD_", "TOKIO_", "MALLOC_", "_RJEM_MALLOC_", "GLIBC_TUNABLES"]
                .iter()
                .any(|p| k.starts_with(p))
            {
                bail!(
                    "--daemon-env {k}: only PAYOUTD_*, TOKIO_*, MALLOC_*, _RJEM_MALLOC_* and GLIBC_TUNABLES variables"
                );
            }
        }
        Ok(())
    }

    fn sim_limit(&self) -> u32 {
        self.sim_limit.unwrap_or(self.limit)
    }

    fn daemon_rate(&self) -> u32 {
        if self.limit == 0 { UNLIMITED_RATE } else { self.limit }
    }

    fn timeout(&self) -> Duration {
        let expected = match self.limit {
            0 => self.rows / 1000,
            limit => self.rows / u64::from(limit),
        };
        Duration::from_secs(self.timeout_secs.unwrap_or(120 + 3 * expected))
    }
}

/// How the partition count was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Partitioning {
    /// The daemon's rule with its defaults.
    Rule,
    /// The rule, with thresholds set through the environment so that it yields the count.
    RuleThresholds { medium_from: u64, large_from: u64 },
    /// A stored plan written before the campaign starts (counts the rule cannot give).
    StoredPlan(u16),
}

impl Partitioning {
    fn for_config(cfg: &BenchConfig) -> Partitioning {
        match cfg.partitions {
            None => Partitioning::Rule,
            Some(4) => {
                Partitioning::RuleThresholds { medium_from: cfg.rows + 1, large_from: cfg.rows + 2 }
            }
            Some(6) => Partitioning::RuleThresholds { medium_from: 1, large_from: cfg.rows + 1 },
            Some(8) => Partitioning::RuleThresholds { medium_from: 1, large_from: 2 },
            Some(n) => Partitioning::StoredPlan(n),
        }
    }

    /// The count the daemon will use.
    fn count(&self, rows: u64) -> u16 {
        match *self {
            Partitioning::Rule => PartitionRule::default().partitions_for(rows),
            Partitioning::RuleThresholds { medium_from, large_from } => {
                PartitionRule { medium_from, large_from, fixed: None }.partitions_for(rows)
            }
            Partitioning::StoredPlan(n) => n,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        match *self {
            Partitioning::RuleThresholds { medium_from, large_from } => vec![
                ("PAYOUTD_EXECUTOR__PARTITIONS_MEDIUM_FROM".to_owned(), medium_from.to_string()),
                ("PAYOUTD_EXECUTOR__PARTITIONS_LARGE_FROM".to_owned(), large_from.to_string()),
            ],
            // The daemon's re-plan check would move a stored plan to the rule's count once the
            // remaining rows are counted (1 → 4 after 30 s at 200,000 rows): a forced count
            // holds for the whole run unless `--daemon-env` sets the check again.
            Partitioning::StoredPlan(_) => {
                vec![("PAYOUTD_EXECUTOR__REPLAN_CHECK".to_owned(), "0s".to_owned())]
            }
            Partitioning::Rule => Vec::new(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Partitioning::Rule => "the daemon's rule (defaults)".to_owned(),
            Partitioning::RuleThresholds { .. } => {
                "the daemon's rule, thresholds set by PAYOUTD_EXECUTOR__PARTITIONS_*".to_owned()
            }
            Partitioning::StoredPlan(n) => format!(
                "a stored plan of {n} written by the bench before RUNNING \
                 (the rule only gives 4, 6 or 8), re-planning off"
            ),
        }
    }
}

/// The machine the run happened on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: Option<u64>,
    pub cpu_model: Option<String>,
    /// 1/5/15-minute load averages when the run started and ended: other work on the machine.
    pub loadavg_start: Option<[f64; 3]>,
    pub loadavg_end: Option<[f64; 3]>,
}

/// The MariaDB server's version and the settings that move the database's cost per row (read
/// once at the start of a run): a run on a server with the default 128 MiB buffer pool and
/// 96 MiB redo log is not comparable with one on a tuned server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerSettings {
    pub version: String,
    pub innodb_buffer_pool_mib: u64,
    pub innodb_log_file_mib: u64,
    pub innodb_flush_log_at_trx_commit: u32,
}

impl ServerSettings {
    async fn read(db: &db::BenchDb) -> anyhow::Result<ServerSettings> {
        let (version, pool, log, flush): (String, u64, u64, u32) = db
            .first(
                "SELECT @@version, @@innodb_buffer_pool_size, @@innodb_log_file_size, \
                 @@innodb_flush_log_at_trx_commit",
            )
            .await?
            .context("the server settings query returned no row")?;
        Ok(ServerSettings {
            version,
            innodb_buffer_pool_mib: pool / 1_048_576,
            innodb_log_file_mib: log / 1_048_576,
            innodb_flush_log_at_trx_commit: flush,
        })
    }
}

/// The result of one run: what is printed and written as JSON. Times are wall-clock; rates are
/// rows per second. Fields of the end-to-end run are absent with `db_only`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    pub date: String,
    pub git_commit: Option<String>,
    pub machine: Machine,
    pub mariadb: ServerSettings,
    pub config: Option<BenchConfig>,
    /// The server, password masked.
    pub server: String,
    pub database: String,
    /// The daemon's configuration environment (secrets masked).
    pub daemon_env: BTreeMap<String, String>,
    pub partitioning: String,
    pub out: Option<PathBuf>,
    pub daemon_log: Option<PathBuf>,

    pub kind: String,
    pub rows: u64,
    pub load_secs: f64,
    pub load_rows_per_sec: f64,

    /// UPDATE … RUNNING → COMPLETED (`campaigns.completed_at`, the database's clock).
    pub seconds: Option<f64>,
    /// The same on the bench's monotonic clock, to the poll that saw COMPLETED (up to 100 ms
    /// late). Well below `seconds` when the whole machine was frozen meanwhile: the wall clock
    /// counts such a pause, `CLOCK_MONOTONIC` (and so every rate window here) does not.
    pub seconds_monotonic: Option<f64>,
    pub rows_per_sec: Option<f64>,
    /// The daemon's limit; `None` when unlimited.
    pub limit: Option<u32>,
    pub achieved_rate_over_limit: Option<f64>,
    pub partitions: Option<u16>,
    pub succeeded_per_partition: BTreeMap<String, i64>,
    pub rows_per_sec_per_partition: BTreeMap<String, f64>,
    /// Rows per final status.
    pub final_counts: BTreeMap<String, i64>,

    pub max_requests_in_any_second: Option<u64>,
    pub rate_limited_429s: Option<u64>,
    pub duplicate_grants: Option<u64>,
    pub grants_total: Option<u64>,
    pub requests_total: Option<u64>,
    pub sim_ledger: Option<LedgerSummary>,
    pub first_grant_after_running_ms: Option<i64>,
    pub completed_after_last_grant_ms: Option<i64>,
    /// `campaigns.queued_at` − RUNNING: when discovery saw the campaign.
    pub discovered_after_running_ms: Option<i64>,
    /// `campaigns.started_at` − RUNNING: when the plan was in place and the partitions started.
    pub started_after_running_ms: Option<i64>,
    /// Grant requests arriving at money-sim in each second after RUNNING (second 0 first).
    pub requests_per_second: Vec<u64>,
    /// The fewest requests in any second but the first and the last.
    pub min_requests_per_second_steady: Option<u64>,
    /// Admission-to-arrival delays (`--transit` only).
    pub transit: Option<transit::Transit>,

    pub money_p50_ms: Option<f64>,
    pub money_p99_ms: Option<f64>,
    pub daemon_requests_sent: Option<u64>,
    /// `tps` of the daemon's `throughput` lines (rows finished per second per interval).
    pub daemon_throughput_tps: Vec<f64>,
    pub daemon_warnings: Option<u64>,

    pub daemon_peak_rss_mib: Option<f64>,
    /// `payoutd campaign status 1 --json` (the whole CLI process) timed every 5 s while the
    /// campaign ran, in milliseconds.
    pub status_while_running_ms: Vec<f64>,
    /// Daemon CPU seconds from RUNNING to COMPLETED.
    pub daemon_cpu_secs: Option<f64>,
    /// Daemon CPU seconds from its start to COMPLETED (start-up included).
    pub daemon_cpu_secs_total: Option<f64>,
    /// `--instances N`: daemon processes that served the campaign together.
    pub instances: u16,
    /// CPU of the other instances over the run (the first instance's is `daemon_cpu_secs`).
    pub other_instances_cpu_secs: Option<f64>,
    /// Peak RSS of each other instance.
    pub other_instances_peak_rss_mib: Vec<f64>,
    pub mariadb_cpu_secs: Option<f64>,
    /// money-sim's CPU seconds over the run (`sim_process` only).
    pub sim_cpu_secs: Option<f64>,
    /// How money-sim's threads were scheduled (`sim_process` only): "SCHED_FIFO 10",
    /// "nice -10" or "normal".
    pub sim_priority: Option<String>,
    /// The bench process's CPU seconds over the run (includes an in-process money-sim).
    pub bench_cpu_secs: Option<f64>,
    /// Share of all cores busy over the run, whoever used them.
    pub machine_cpu_busy_pct: Option<f64>,
    /// CPU seconds the hypervisor took from this virtual machine over the run (`steal` in
    /// `/proc/stat`): while it does, the daemon, MariaDB and money-sim all stall together.
    pub machine_steal_secs: Option<f64>,
    /// CPU seconds used over the run by processes other than the daemon, MariaDB, money-sim
    /// and the bench: other people's builds and tests.
    pub other_cpu_secs: Option<f64>,

    pub db_only: Option<db_only::DbOnlyReport>,
    /// The status-only mode's timings.
    pub status: Option<status::StatusReport>,
    /// `rows_per_sec` ÷ the database-only ceiling's rows/s.
    pub e2e_over_db_only: Option<f64>,
    pub notes: Vec<String>,
}

/// Runs the benchmark, writes the JSON report (`cfg.out`) and returns it.
pub async fn run(cfg: &BenchConfig) -> anyhow::Result<BenchReport> {
    cfg.validate()?;
    let payoutd = match &cfg.payoutd {
        Some(p) => p.clone(),
        None => beside_exe("payoutd")?,
    };
    let server = db::server_url(cfg.db_url.as_deref())?;
    let now = Utc::now();
    let stamp = now.format("%Y%m%d_%H%M%S").to_string();
    let out =
        cfg.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench-results/{stamp}.json")));
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let name = format!("payoutd_bench_{stamp}_{:04x}", rand::random::<u16>());
    let mut report = BenchReport {
        date: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        git_commit: git_commit(),
        machine: Machine {
            nproc: procfs::nproc(),
            mem_total_mib: procfs::mem_total_mib(),
            cpu_model: procfs::cpu_model(),
            loadavg_start: procfs::loadavg(),
            loadavg_end: None,
        },
        config: Some(cfg.clone()),
        server: db::masked(&server),
        database: name.clone(),
        out: Some(out.clone()),
        kind: cfg.kind.as_str().to_owned(),
        rows: cfg.rows,
        ..BenchReport::default()
    };
    let bench_db = BenchDbGuard(Some(db::BenchDb::create(&server, &name).await?));
    report.mariadb = ServerSettings::read(bench_db.get()?).await?;
    if report.mariadb.innodb_buffer_pool_mib < 1024 || report.mariadb.innodb_log_file_mib < 1024 {
        report.notes.push(format!(
            "MariaDB runs with a {} MiB buffer pool and a {} MiB redo log; BENCHMARKS.md's runs \
             since session 3 had a 1 GiB buffer pool (and since session 15 a 1 GiB redo log): \
             SET GLOBAL innodb_buffer_pool_size = 1073741824, innodb_log_file_size = 1073741824",
            report.mariadb.innodb_buffer_pool_mib, report.mariadb.innodb_log_file_mib
        ));
    }
    let result = run_in(cfg, &mut report, bench_db.get()?, &payoutd, &out).await;
    bench_db.finish(cfg.keep_db, &mut report).await;
    result?;
    report.machine.loadavg_end = procfs::loadavg();
    write_json(&report, &out)?;
    Ok(report)
}

/// Drops the database at the end (also when the run failed), unless it is to be kept.
struct BenchDbGuard(Option<db::BenchDb>);

impl BenchDbGuard {
    fn get(&self) -> anyhow::Result<&db::BenchDb> {
        self.0.as_ref().context("no database")
    }

    async fn finish(mut self, keep: bool, report: &mut BenchReport) {
        let Some(db) = self.0.take() else { return };
        let name = db.name.clone();
        if keep {
            db.close().await;
            report.notes.push(format!("database {name} kept (--keep-db)"));
        } else if let Err(e) = db.drop_db().await {
            eprintln!("payout-bench: could not drop database {name}: {e:#}");
        }
    }
}

pub fn write_json(report: &BenchReport, path: &Path) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// A binary in the same directory as the running executable (the same target directory).
pub fn beside_exe(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable without a directory")?.to_path_buf();
    // Test binaries live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build it (cargo build --release -p payoutd -p payout-tests --bins) \
             or pass its path",
            p.display()
        );
    }
    Ok(p)
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output();
    let head = String::from_utf8(out.ok().filter(|o| o.status.success())?.stdout).ok()?;
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| o.status.success() && !o.stdout.is_empty());
    Some(format!("{}{}", head.trim(), if dirty { "-dirty" } else { "" }))
}

fn log_path(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{stem}.{suffix}"))
}

fn progress(cfg: &BenchConfig, msg: impl AsRef<str>) {
    if !cfg.quiet {
        eprintln!("payout-bench: {}", msg.as_ref());
    }
}

/// Writes a stored partition plan of `n` for `campaign`, the way the engine stores its own, so
/// that the engine uses it instead of the rule.
async fn store_plan(db: &db::BenchDb, campaign: i64, rows: u64, n: u16) -> anyhow::Result<()> {
    let mut c = db.conn().await?;
    c.query_drop(format!(
        "UPDATE campaigns SET partition_count = {n}, planned_rows = {rows} WHERE id = {campaign}"
    ))
    .await?;
    let values: Vec<String> = slices(n)
        .iter()
        .map(|s| {
            format!(
                "({campaign}, {}, {}, {}, {})",
                s.partition_no, s.partition_count, s.bucket_lo, s.bucket_hi
            )
        })
        .collect();
    c.query_drop(format!(
        "INSERT INTO campaign_partitions \
         (campaign_id, partition_no, partition_count, bucket_lo, bucket_hi) VALUES {}",
        values.join(", ")
    ))
    .await?;
    Ok(())
}

/// CPU counters read at one instant.
#[derive(Clone, Copy)]
struct CpuSnapshot {
    daemon: Option<f64>,
    mariadb: Option<f64>,
    sim: Option<f64>,
    bench: Option<f64>,
    system: Option<procfs::SystemCpu>,
}

impl CpuSnapshot {
    fn now(daemon: Option<u32>, mariadb: Option<u32>, sim: Option<u32>) -> CpuSnapshot {
        CpuSnapshot {
            daemon: daemon.and_then(procfs::cpu_secs),
            mariadb: mariadb.and_then(procfs::cpu_secs),
            sim: sim.and_then(procfs::cpu_secs),
            bench: procfs::self_cpu_secs(),
            system: procfs::SystemCpu::now(),
        }
    }
}

/// completed, queued and started (µs after RUNNING) and the stored partition count.
type CampaignTimes = (Option<i64>, Option<i64>, Option<i64>, Option<i16>);

fn delta(after: Option<f64>, before: Option<f64>) -> Option<f64> {
    after.zip(before).map(|(a, b)| round3(a - b))
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

async fn run_in(
    cfg: &BenchConfig,
    report: &mut BenchReport,
    db: &db::BenchDb,
    payoutd: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    progress(cfg, format!("database {} on {}", db.name, report.server));
    daemon::migrate(payoutd, &db.url).await?;

    progress(
        cfg,
        format!("loading {} {} rows into campaign {CAMPAIGN}", cfg.rows, cfg.kind.as_str()),
    );
    let load = db.load(cfg.kind, CAMPAIGN, cfg.rows, cfg.load_connections).await?;
    report.load_secs = round3(load.as_secs_f64());
    report.load_rows_per_sec = round3(cfg.rows as f64 / load.as_secs_f64().max(1e-9));
    progress(
        cfg,
        format!("loaded in {:.2} s ({:.0} rows/s)", report.load_secs, report.load_rows_per_sec),
    );

    if cfg.status_only {
        report.partitioning = format!(
            "a stored plan of {} written by the bench (status only: no daemon runs)",
            status::PARTITIONS
        );
        progress(cfg, "status only: setting the campaign under way, then timing the status");
        let r = status::run(db, payoutd, cfg.kind, cfg.rows).await?;
        progress(
            cfg,
            format!(
                "payoutd campaign status: median {:.1} ms; view {:.1} ms; GROUP BY {:.1} ms",
                r.cli.median_ms, r.view.median_ms, r.naive_group_by.median_ms
            ),
        );
        report.status = Some(r);
        return Ok(());
    }

    let partitioning = Partitioning::for_config(cfg);
    report.partitioning = partitioning.describe();
    if let Partitioning::StoredPlan(n) = partitioning {
        store_plan(db, CAMPAIGN, cfg.rows, n).await?;
    }

    if cfg.db_only || cfg.db_ceiling {
        let campaign = if cfg.db_only { CAMPAIGN } else { CEILING_CAMPAIGN };
        if campaign != CAMPAIGN {
            progress(cfg, format!("loading campaign {campaign} for the database-only ceiling"));
            db.load(cfg.kind, campaign, cfg.rows, cfg.load_connections).await?;
        }
        let n = partitioning.count(cfg.rows);
        if !matches!(partitioning, Partitioning::StoredPlan(_)) || campaign != CAMPAIGN {
            store_plan(db, campaign, cfg.rows, n).await?;
        }
        progress(cfg, format!("database-only ceiling: campaign {campaign}, {n} partitions"));
        let history_before = db.undo_history().await?;
        let mut r = db_only::run(
            &db.url,
            cfg.kind,
            campaign,
            cfg.rows,
            n,
            cfg.batch_size.unwrap_or(default_batch_size()),
        )
        .await?;
        progress(cfg, format!("database-only: {:.2} s, {:.0} rows/s", r.seconds, r.rows_per_sec));
        r.undo_history_before = history_before;
        r.undo_history_after = db.undo_history().await?;
        if !cfg.db_only {
            let waited = wait_for_purge(db, history_before).await?;
            progress(cfg, format!("purge caught up with the database-only pass in {waited:.1} s"));
            r.purge_wait_secs = Some(round3(waited));
        }
        report.db_only = Some(r);
        if cfg.db_only {
            return Ok(());
        }
    }

    // money-sim
    let sim_cfg = SimConfig {
        api_key: SIM_API_KEY.to_owned(),
        rate_limit_per_sec: cfg.sim_limit(),
        latency_ms: cfg.latency_ms,
        latency_jitter_ms: cfg.jitter_ms,
        // Room for every row and the retries, so no rehash stalls the measurement.
        expected_grants: cfg.rows as usize + cfg.rows as usize / 8,
        ..SimConfig::default()
    };
    let sim = if cfg.sim_process {
        let path = match &cfg.money_sim {
            Some(p) => p.clone(),
            None => beside_exe("money-sim")?,
        };
        sim::Sim::process(&path, &sim_cfg, cfg.sim_priority, &log_path(out, "money-sim.log"))
            .await?
    } else {
        sim::Sim::in_process(sim_cfg).await?
    };

    // payoutd run
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PAYOUTD_DATABASE__URL".into(), db.url.clone());
    env.insert("PAYOUTD_MONEY__BASE_URL".into(), sim.base_url());
    env.insert("PAYOUTD_MONEY__API_KEY".into(), SIM_API_KEY.into());
    env.insert("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC".into(), cfg.daemon_rate().to_string());
    env.insert("PAYOUTD_LOG__FORMAT".into(), "json".into());
    env.insert("PAYOUTD_LOG__THROUGHPUT_INTERVAL".into(), cfg.throughput_interval.clone());
    if cfg.transit {
        env.insert("PAYOUTD_LOG__FILTER".into(), format!("info,{}=trace", transit::SENDS_TARGET));
    }
    for (k, v) in partitioning.env() {
        env.insert(k, v);
    }
    if let Some(n) = cfg.max_in_flight {
        env.insert("PAYOUTD_MONEY__MAX_IN_FLIGHT".into(), n.to_string());
    }
    if let Some(n) = cfg.batch_size {
        env.insert("PAYOUTD_EXECUTOR__BATCH_SIZE".into(), n.to_string());
    }
    for (k, v) in &cfg.daemon_env {
        env.insert(k.clone(), v.clone());
    }
    report.daemon_env = env
        .iter()
        .map(|(k, v)| {
            let shown = match k.as_str() {
                "PAYOUTD_DATABASE__URL" => db::masked(v),
                "PAYOUTD_MONEY__API_KEY" => "***".to_owned(),
                _ => v.clone(),
            };
            (k.clone(), shown)
        })
        .collect();
    let env: Vec<(String, String)> = env.into_iter().collect();
    let daemon_log = log_path(out, "daemon.log");
    report.daemon_log = Some(daemon_log.clone());
    let mut daemon = daemon::Daemon::start(payoutd, &env, &daemon_log).await?;
    daemon.wait_ready(Duration::from_secs(60)).await?;
    report.instances = cfg.instances.max(1);
    let mut others = Vec::new();
    for i in 2..=cfg.instances {
        let log = log_path(out, &format!("daemon-{i}.log"));
        let mut d = daemon::Daemon::start(payoutd, &env, &log).await?;
        d.wait_ready(Duration::from_secs(60)).await?;
        others.push(d);
    }
    let others_cpu0: Vec<Option<f64>> = others.iter().map(|d| procfs::cpu_secs(d.pid)).collect();
    let mariadb = procfs::mariadb_pid();
    if mariadb.is_none() {
        report.notes.push("no local mariadbd/mysqld process: MariaDB CPU not measured".into());
    }

    // RUNNING
    let mut conn = db.conn().await?;
    let cpu0 = CpuSnapshot::now(Some(daemon.pid), mariadb, sim.pid());
    let running_db: String =
        conn.query_first("SELECT CAST(UTC_TIMESTAMP(6) AS CHAR)").await?.context("no clock")?;
    let running_sim_ms = sim.now_ms();
    let running = Instant::now();
    conn.query_drop(format!("UPDATE campaigns SET status = 'RUNNING' WHERE id = {CAMPAIGN}"))
        .await?;
    progress(
        cfg,
        format!(
            "campaign {CAMPAIGN} RUNNING: limit {}, money-sim {} ms ± {} ms{}",
            if cfg.limit == 0 { "none".to_owned() } else { format!("{}/s", cfg.limit) },
            cfg.latency_ms,
            cfg.jitter_ms,
            if cfg.sim_process { " (child process)" } else { " (in process)" }
        ),
    );

    let timeout = cfg.timeout();
    let mut peak_rss = None;
    let mut last_progress = Instant::now();
    let mut last_status = Instant::now();
    let seen_completed = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status: Option<String> =
            conn.query_first(format!("SELECT status FROM campaigns WHERE id = {CAMPAIGN}")).await?;
        peak_rss = procfs::peak_rss_mib(daemon.pid).or(peak_rss);
        match status.as_deref() {
            Some("COMPLETED") => break running.elapsed(),
            Some("RUNNING") => {}
            other => {
                let reason: Option<Option<String>> = conn
                    .query_first(format!(
                        "SELECT status_reason FROM campaigns WHERE id = {CAMPAIGN}"
                    ))
                    .await?;
                bail!(
                    "campaign {CAMPAIGN} became {other:?} ({}); daemon log tail:\n{}",
                    reason.flatten().unwrap_or_default(),
                    daemon.log_tail(20)
                );
            }
        }
        daemon.check_alive()?;
        for d in &mut others {
            d.check_alive()?;
        }
        if running.elapsed() > timeout {
            bail!("campaign {CAMPAIGN} not COMPLETED after {timeout:?} (--timeout-secs)");
        }
        if last_status.elapsed() >= Duration::from_secs(5) {
            last_status = Instant::now();
            let t = Instant::now();
            if daemon::cli(payoutd, &db.url, &["campaign", "status", "1", "--json"]).await.is_ok() {
                report
                    .status_while_running_ms
                    .push((t.elapsed().as_secs_f64() * 10_000.0).round() / 10.0);
            }
        }
        if !cfg.quiet && last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let done: Option<i64> = conn
                .query_first(format!(
                    "SELECT CAST(COALESCE(SUM(succeeded + dead), 0) AS SIGNED) \
                     FROM campaign_counters WHERE campaign_id = {CAMPAIGN}"
                ))
                .await?;
            let secs = running.elapsed().as_secs_f64();
            let done = done.unwrap_or(0);
            progress(
                cfg,
                format!("  {secs:6.1} s: {done} rows done ({:.0} rows/s)", done as f64 / secs),
            );
        }
    };
    let cpu1 = CpuSnapshot::now(Some(daemon.pid), mariadb, sim.pid());
    let daemon_cpu_total = procfs::cpu_secs(daemon.pid);
    if !others.is_empty() {
        let mut sum = 0.0;
        for (d, before) in others.iter().zip(&others_cpu0) {
            if let (Some(b), Some(a)) = (procfs::cpu_secs(d.pid), before) {
                sum += b - a;
            }
            if let Some(m) = procfs::peak_rss_mib(d.pid) {
                report.other_instances_peak_rss_mib.push((m * 10.0).round() / 10.0);
            }
        }
        report.other_instances_cpu_secs = Some(round3(sum));
    }
    peak_rss = procfs::peak_rss_mib(daemon.pid).or(peak_rss);

    // The run, on the database's clock.
    let times: Option<CampaignTimes> = conn
        .query_first(format!(
            "SELECT TIMESTAMPDIFF(MICROSECOND, '{running_db}', completed_at), \
             TIMESTAMPDIFF(MICROSECOND, '{running_db}', queued_at), \
             TIMESTAMPDIFF(MICROSECOND, '{running_db}', started_at), partition_count \
             FROM campaigns WHERE id = {CAMPAIGN}"
        ))
        .await?;
    let (completed_us, queued_us, started_us, partition_count) =
        times.context("campaign vanished")?;
    let seconds =
        completed_us.map(|us| us as f64 / 1e6).unwrap_or_else(|| running.elapsed().as_secs_f64());
    report.seconds = Some(round3(seconds));
    let mono = seen_completed.as_secs_f64();
    report.seconds_monotonic = Some(round3(mono));
    let frozen = seconds - mono;
    if frozen > 1.0 {
        let share = if cfg.limit > 0 {
            format!(", {:.2} % of the limit", cfg.rows as f64 / mono / f64::from(cfg.limit) * 100.0)
        } else {
            String::new()
        };
        report.notes.push(format!(
            "the wall clock counted {frozen:.1} s more than the monotonic clock: the machine was \
             frozen that long (see machine_steal_secs); on the monotonic clock the run took \
             {mono:.2} s{share}"
        ));
    }
    report.rows_per_sec = Some(round3(cfg.rows as f64 / seconds.max(1e-9)));
    if cfg.limit > 0 {
        report.limit = Some(cfg.limit);
        report.achieved_rate_over_limit = Some(
            (cfg.rows as f64 / seconds.max(1e-9) / f64::from(cfg.limit) * 10_000.0).round()
                / 10_000.0,
        );
    }
    report.discovered_after_running_ms = queued_us.map(|us| us / 1000);
    report.started_after_running_ms = started_us.map(|us| us / 1000);
    report.partitions = partition_count.and_then(|n| u16::try_from(n).ok());
    let shards: Vec<(i16, i64)> = conn
        .query(format!(
            "SELECT shard, succeeded FROM campaign_counters WHERE campaign_id = {CAMPAIGN} \
             ORDER BY shard"
        ))
        .await?;
    for (shard, succeeded) in shards {
        report.succeeded_per_partition.insert(shard.to_string(), succeeded);
        report
            .rows_per_sec_per_partition
            .insert(shard.to_string(), round3(succeeded as f64 / seconds.max(1e-9)));
    }
    let counts: Vec<(String, i64)> = conn
        .query(format!(
            "SELECT status, COUNT(*) FROM {} WHERE event_id = {CAMPAIGN} GROUP BY status",
            cfg.kind.table()
        ))
        .await?;
    report.final_counts = counts.into_iter().collect();
    drop(conn);

    // money-sim's view.
    let ledger = sim.ledger().await?;
    report.max_requests_in_any_second = Some(ledger.max_requests_in_any_second);
    report.rate_limited_429s = Some(ledger.rate_limited_total);
    report.duplicate_grants = Some(ledger.duplicate_grants);
    report.grants_total = Some(ledger.grants_total);
    report.requests_total = Some(ledger.requests_total);
    report.first_grant_after_running_ms =
        ledger.first_grant_ms.map(|ms| ms as i64 - running_sim_ms as i64);
    report.completed_after_last_grant_ms = ledger
        .last_grant_ms
        .map(|ms| (running_sim_ms as f64 + seconds * 1000.0 - ms as f64).round() as i64);
    report.sim_ledger = Some(ledger);
    if cfg.rows <= HISTOGRAM_MAX_ROWS {
        let mut per_second: Vec<u64> = Vec::new();
        for r in sim.requests().await? {
            let Some(since) = r.at_ms.checked_sub(running_sim_ms) else { continue };
            let sec = (since / 1000) as usize;
            if per_second.len() <= sec {
                per_second.resize(sec + 1, 0);
            }
            per_second[sec] += 1;
        }
        if per_second.len() >= 3 {
            report.min_requests_per_second_steady =
                per_second[1..per_second.len() - 1].iter().copied().min();
        }
        report.requests_per_second = per_second;
    } else {
        report
            .notes
            .push(format!("requests_per_second not collected above {HISTOGRAM_MAX_ROWS} rows"));
    }

    // CPU and memory over the run.
    report.daemon_peak_rss_mib = peak_rss.map(|m| (m * 10.0).round() / 10.0);
    report.daemon_cpu_secs = delta(cpu1.daemon, cpu0.daemon);
    report.daemon_cpu_secs_total = daemon_cpu_total.map(round3);
    report.mariadb_cpu_secs = delta(cpu1.mariadb, cpu0.mariadb);
    report.sim_cpu_secs = delta(cpu1.sim, cpu0.sim);
    report.sim_priority = sim.priority().map(str::to_owned);
    report.bench_cpu_secs = delta(cpu1.bench, cpu0.bench);
    if let (Some(s1), Some(s0)) = (cpu1.system, cpu0.system) {
        report.machine_cpu_busy_pct = Some((s1.busy_pct_since(&s0) * 10.0).round() / 10.0);
        report.machine_steal_secs = Some(round3(s1.steal_secs_since(&s0)));
        let ours = [
            report.daemon_cpu_secs,
            report.other_instances_cpu_secs,
            report.mariadb_cpu_secs,
            report.sim_cpu_secs,
            report.bench_cpu_secs,
        ]
        .iter()
        .flatten()
        .sum::<f64>();
        report.other_cpu_secs = Some(round3((s1.busy_secs_since(&s0) - ours).max(0.0)));
    }

    // Stop the daemons: the first one's last line carries the latency it saw.
    for d in others {
        d.terminate(Duration::from_secs(30)).await?;
    }
    let log = daemon.terminate(Duration::from_secs(30)).await?;
    report.money_p50_ms = log.stopped_number("money_p50_ms");
    report.money_p99_ms = log.stopped_number("money_p99_ms");
    report.daemon_requests_sent = log.stopped_number("requests_sent").map(|n| n as u64);
    report.daemon_throughput_tps = log.throughput_tps.clone();
    report.daemon_warnings = Some(log.warnings);
    if log.stopped.is_none() {
        report.notes.push("the daemon's `payoutd stopped` line was not found".into());
    }
    if cfg.transit
        && let Some(path) = report.daemon_log.as_ref()
    {
        let sends = transit::sends(path)?;
        let trips = transit::trips(&sends, &sim.requests().await?);
        transit::write_trips(&log_path(out, "transit.csv"), &trips)?;
        report.transit = Some(transit::analyse_trips(&sends, &trips));
    }
    sim.stop().await;

    if let (Some(r), Some(d)) = (report.rows_per_sec, report.db_only.as_ref()) {
        report.e2e_over_db_only = Some(round3(r / d.rows_per_sec.max(1e-9)));
    }
    Ok(())
}

/// Waits until InnoDB's undo history is back to about `before` (at most [`PURGE_WAIT_MAX`]),
/// and returns the seconds waited. Every row the database-only pass paid left old versions of
/// its row and index entries behind; purge removes them in the background, and an end-to-end
/// run started at once would share the cores with that clean-up. (Measured at 200,000 rows:
/// purge caught up within 0.3 s, so it is not what makes the end-to-end pass slower after the
/// database-only one.)
async fn wait_for_purge(db: &db::BenchDb, before: Option<u64>) -> anyhow::Result<f64> {
    let started = Instant::now();
    let Some(before) = before else { return Ok(0.0) };
    while started.elapsed() < PURGE_WAIT_MAX {
        match db.undo_history().await? {
            Some(n) if n > before + PURGE_SLACK => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            _ => break,
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Undo history above the level before the pass that still counts as caught up (a few
/// transactions of other work on the server).
const PURGE_SLACK: u64 = 64;
const PURGE_WAIT_MAX: Duration = Duration::from_secs(120);

/// The daemon's default `executor.batch_size`, which the database-only pass uses too.
fn default_batch_size() -> u32 {
    payout_core::engine::EngineSettings::new("bench").batch_size
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_owned())
}

fn opt1(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".to_owned())
}

fn opt2(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".to_owned())
}

/// The human summary of a run.
pub fn summary(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let cfg = r.config.clone().unwrap_or_default();
    let _ = writeln!(
        s,
        "payout-bench {}  commit {}  {} cores, {} MiB, load avg {} → {}",
        r.date,
        opt(r.git_commit.as_deref()),
        r.machine.nproc,
        opt(r.machine.mem_total_mib),
        r.machine.loadavg_start.map(|l| format!("{:.2}", l[0])).unwrap_or_default(),
        r.machine.loadavg_end.map(|l| format!("{:.2}", l[0])).unwrap_or_default(),
    );
    let m = &r.mariadb;
    let _ = writeln!(
        s,
        "  MariaDB {}: buffer pool {} MiB, redo log {} MiB, flush_log_at_trx_commit {}",
        m.version,
        m.innodb_buffer_pool_mib,
        m.innodb_log_file_mib,
        m.innodb_flush_log_at_trx_commit
    );
    if let Some(st) = &r.status {
        let _ = writeln!(
            s,
            "  {} {} rows; status only (campaign under way, no daemon); {} partitions",
            r.rows, r.kind, st.partitions,
        );
    } else if cfg.db_only {
        let _ = writeln!(
            s,
            "  {} {} rows; database only (no daemon, no HTTP); partitions: {}",
            r.rows, r.kind, r.partitioning,
        );
    } else {
        let _ = writeln!(
            s,
            "  {} {} rows; limit {}; money-sim limit {}, {} ± {} ms{}; partitions: {}",
            r.rows,
            r.kind,
            if cfg.limit == 0 { "none".to_owned() } else { format!("{}/s", cfg.limit) },
            match cfg.sim_limit() {
                0 => "none".to_owned(),
                n => format!("{n}/s"),
            },
            cfg.latency_ms,
            cfg.jitter_ms,
            match &r.sim_priority {
                Some(p) => format!(" (child process, {p})"),
                None => " (in process)".to_owned(),
            },
            r.partitioning,
        );
    }
    let _ = writeln!(
        s,
        "  load                  {:>10.2} s   {:>10.0} rows/s",
        r.load_secs, r.load_rows_per_sec
    );
    if let Some(st) = &r.status {
        let counts: Vec<String> = st.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            s,
            "  rows                  {} (setup {:.2} s)",
            counts.join(", "),
            st.setup_secs
        );
        for (what, t) in [
            ("payoutd campaign status --json", &st.cli),
            ("SELECT * FROM campaign_progress", &st.view),
            ("naive GROUP BY status", &st.naive_group_by),
        ] {
            let _ = writeln!(
                s,
                "  {what:<34} min {:>9.1} ms  median {:>9.1} ms  max {:>9.1} ms  ({} calls)",
                t.min_ms,
                t.median_ms,
                t.max_ms,
                t.samples_ms.len()
            );
        }
        let _ = writeln!(
            s,
            "  CLI counts match the rows: {}; buffer pool {} MiB, table {} MiB",
            st.cli_counts_match,
            opt1(st.innodb_buffer_pool_mib),
            opt1(st.table_mib)
        );
        for line in &st.view_plan {
            let _ = writeln!(s, "    plan: {line}");
        }
    }
    if let Some(d) = &r.db_only {
        let _ = writeln!(
            s,
            "  database-only         {:>10.2} s   {:>10.0} rows/s  ({} partitions, batch {})",
            d.seconds, d.rows_per_sec, d.partitions, d.batch_size,
        );
        let batches = d.claim_batches.max(1) as f64;
        let _ = writeln!(
            s,
            "    per batch           claim+validate {:.0} ms, write back {:.0} ms ({} batches, {} retries, {} empty claims with rows left)",
            d.claim_secs_total * 1000.0 / batches,
            d.write_secs_total * 1000.0 / batches,
            d.claim_batches,
            d.retries,
            d.skipped_claims,
        );
        let _ = writeln!(
            s,
            "    CPU                 MariaDB {} s, bench {} s, others {} s; machine {} % busy",
            opt2(d.mariadb_cpu_secs),
            opt2(d.bench_cpu_secs),
            opt2(d.other_cpu_secs),
            opt1(d.machine_cpu_busy_pct),
        );
    }
    if let (Some(secs), Some(rate)) = (r.seconds, r.rows_per_sec) {
        let _ = writeln!(s, "  RUNNING → COMPLETED   {secs:>10.2} s   {rate:>10.1} rows/s");
        if let Some(ratio) = r.achieved_rate_over_limit {
            let _ = writeln!(s, "  achieved ÷ limit      {:>10.2} %", ratio * 100.0);
        }
        if let Some(ratio) = r.e2e_over_db_only {
            let _ = writeln!(s, "  end-to-end ÷ db-only  {:>10.2} %", ratio * 100.0);
        }
        let _ = writeln!(
            s,
            "  money-sim             max {} requests in a second, {} × 429, {} duplicate grants, {} grants / {} requests",
            opt(r.max_requests_in_any_second),
            opt(r.rate_limited_429s),
            opt(r.duplicate_grants),
            opt(r.grants_total),
            opt(r.requests_total),
        );
        if let Some(l) = &r.sim_ledger {
            let _ = writeln!(
                s,
                "  connections           {} opened to money-sim, at most {} open at once, {} open at the end",
                l.connections_accepted_total, l.connections_open_peak, l.connections_open,
            );
        }
        if let Some(t) = &r.transit {
            let _ = writeln!(
                s,
                "  transit               delay p50 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms (at {:.1} s); densest second: {} arrived, {} admitted at most, span of its admissions {:.1} ms",
                t.delay_ms_p50,
                t.delay_ms_p99,
                t.delay_ms_p999,
                t.delay_ms_max,
                t.delay_max_at_s,
                t.max_arrived_in_any_second,
                t.max_admitted_in_any_second,
                t.densest_second_admission_span_ms,
            );
            let _ = writeln!(
                s,
                "  transit from counted  p99.9 {:.2} / max {:.2} ms; {} later than the slack ({} ms), at most {} in one second",
                t.counted_delay_ms_p999,
                t.counted_delay_ms_max,
                t.late_over_slack,
                opt(t.slack_ms),
                t.max_late_in_any_second,
            );
        }
        let _ = writeln!(
            s,
            "  timing                first grant {} ms after RUNNING (discovered {} ms, started {} ms); COMPLETED {} ms after the last grant",
            opt(r.first_grant_after_running_ms),
            opt(r.discovered_after_running_ms),
            opt(r.started_after_running_ms),
            opt(r.completed_after_last_grant_ms),
        );
        if let Some(min) = r.min_requests_per_second_steady {
            let _ = writeln!(
                s,
                "  requests per second   steady min {min}, first second {}, last second {}",
                r.requests_per_second.first().copied().unwrap_or(0),
                r.requests_per_second.last().copied().unwrap_or(0),
            );
        }
        let _ = writeln!(
            s,
            "  Money latency (daemon) p50 {} ms, p99 {} ms",
            opt1(r.money_p50_ms),
            opt1(r.money_p99_ms)
        );
        let parts: Vec<String> =
            r.rows_per_sec_per_partition.iter().map(|(k, v)| format!("{k}: {v:.0}")).collect();
        let _ = writeln!(
            s,
            "  partitions            {} → rows/s {}",
            opt(r.partitions),
            parts.join(", ")
        );
        let _ = writeln!(
            s,
            "  daemon                peak RSS {} MiB, CPU {} s over the run ({} s since start)",
            opt1(r.daemon_peak_rss_mib),
            opt2(r.daemon_cpu_secs),
            opt2(r.daemon_cpu_secs_total),
        );
        if let Some(max) = r.status_while_running_ms.iter().copied().reduce(f64::max) {
            let _ = writeln!(
                s,
                "  campaign status       {} calls while running, max {max:.1} ms",
                r.status_while_running_ms.len()
            );
        }
        if r.instances > 1 {
            let _ = writeln!(
                s,
                "  other instances       {}: CPU {} s over the run, peak RSS {:?} MiB",
                r.instances - 1,
                opt2(r.other_instances_cpu_secs),
                r.other_instances_peak_rss_mib,
            );
        }
        let _ = writeln!(
            s,
            "  CPU over the run      MariaDB {} s, money-sim {} s, bench {} s, others {} s; machine {} % busy, {} s stolen by the hypervisor",
            opt2(r.mariadb_cpu_secs),
            opt2(r.sim_cpu_secs),
            opt2(r.bench_cpu_secs),
            opt2(r.other_cpu_secs),
            opt1(r.machine_cpu_busy_pct),
            opt2(r.machine_steal_secs),
        );
        let counts: Vec<String> = r.final_counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "  rows                  {}", counts.join(", "));
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    if let Some(out) = &r.out {
        let _ = writeln!(s, "  JSON: {}", out.display());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_partition_counts_come_out_of_the_rule() {
        for rows in [2u64, 3_000, 200_000, 5_000_000] {
            for n in [4u16, 6, 8] {
                let cfg = BenchConfig { rows, partitions: Some(n), ..BenchConfig::default() };
                let p = Partitioning::for_config(&cfg);
                assert_eq!(p.count(rows), n, "rows {rows}, {n} partitions");
                let Partitioning::RuleThresholds { medium_from, large_from } = p else {
                    panic!("{n} should go through the rule")
                };
                assert!(medium_from >= 1 && large_from > medium_from, "daemon would refuse");
            }
        }
        let cfg = BenchConfig { partitions: Some(2), ..BenchConfig::default() };
        assert_eq!(Partitioning::for_config(&cfg), Partitioning::StoredPlan(2));
        let replan_off = ("PAYOUTD_EXECUTOR__REPLAN_CHECK".to_owned(), "0s".to_owned());
        assert_eq!(Partitioning::StoredPlan(2).env(), vec![replan_off]);
        assert!(Partitioning::Rule.env().is_empty());
        assert_eq!(Partitioning::for_config(&BenchConfig::default()).count(200_000), 4);
    }

    #[test]
    fn configs_are_checked() {
        assert!(BenchConfig { rows: 0, ..BenchConfig::default() }.validate().is_err());
        assert!(BenchConfig { partitions: Some(9), ..BenchConfig::default() }.validate().is_err());
        assert!(
            BenchConfig { daemon_env: vec![("HOME".into(), "x".into())], ..BenchConfig::default() }
                .validate()
                .is_err()
        );
        assert!(BenchConfig::default().validate().is_ok());
    }
}
