//! `payout-bench`: loads a campaign, runs payoutd against money-sim until it completes, and
//! reports rate, limit adherence, latency, memory and CPU (see BENCHMARKS.md).

use std::path::PathBuf;

use clap::Parser;
use payout_tests::bench::{self, BenchConfig, Kind, SimPriority};
use tracing_subscriber::EnvFilter;

/// End-to-end benchmark of payoutd against money-sim on a fresh MariaDB database.
#[derive(Debug, Parser)]
#[command(name = "payout-bench", version)]
struct Args {
    /// Target rows to load and pay.
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Kind of rows.
    #[arg(long, value_enum, default_value_t = Kind::Point)]
    kind: Kind,
    /// The daemon's money.rate_limit_per_sec; 0 = no limit.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// money-sim's own limit (429 above it); default: --limit.
    #[arg(long)]
    sim_limit: Option<u32>,
    /// money-sim's mean latency, in milliseconds.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// money-sim's uniform jitter (±), in milliseconds.
    #[arg(long, default_value_t = 10)]
    jitter_ms: u64,
    /// Force the partition count (1-8; 4, 6, 8 through the rule's thresholds, others through a
    /// stored plan).
    #[arg(long)]
    partitions: Option<u16>,
    /// payoutd processes sharing the campaign through partition leases.
    #[arg(long, default_value_t = 1)]
    instances: u16,
    /// The daemon's money.max_in_flight.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// The daemon's executor.batch_size (also the database-only pass's batch).
    #[arg(long)]
    batch_size: Option<u32>,
    /// Run money-sim as a child process (its CPU is measured apart from the bench's).
    #[arg(long)]
    sim_process: bool,
    /// How the money-sim child process is scheduled: every thread at nice -10, under
    /// SCHED_FIFO 10, or as started.
    #[arg(long, value_enum, default_value_t = SimPriority::Nice)]
    sim_priority: SimPriority,
    /// Measure only the database-only ceiling (claim, load, write back, complete; no HTTP).
    #[arg(long, conflicts_with = "db_ceiling")]
    db_only: bool,
    /// Measure the database-only ceiling on a second campaign first, then the end-to-end run.
    #[arg(long)]
    db_ceiling: bool,
    /// Only time `payoutd campaign status` (and the raw status query) on the loaded campaign, set
    /// up as under way (a third SUCCEEDED, 500 IN_FLIGHT, 200 FAILED, 8 partitions); no daemon.
    #[arg(long, conflicts_with_all = ["db_only", "db_ceiling"])]
    status_only: bool,
    /// Log every admission in the daemon and pair it with money-sim's arrival by key: the
    /// delay's spread and where the densest arrival second came from (JSON `transit`).
    #[arg(long, conflicts_with_all = ["db_only", "status_only"])]
    transit: bool,
    /// Keep the database afterwards.
    #[arg(long)]
    keep_db: bool,
    /// MariaDB server URL without a database (default: scripts/ensure-mariadb.sh's answer).
    #[arg(long, env = "PAYOUTD_TEST_DATABASE_URL", hide_env_values = true)]
    db_url: Option<String>,
    /// The payoutd binary (default: beside this binary).
    #[arg(long)]
    payoutd: Option<PathBuf>,
    /// The money-sim binary for --sim-process (default: beside this binary).
    #[arg(long)]
    money_sim: Option<PathBuf>,
    /// Where to write the JSON (default: bench-results/<timestamp>.json); logs go beside it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The daemon's log.throughput_interval.
    #[arg(long, default_value = "1s")]
    throughput_interval: String,
    /// Extra daemon configuration, PAYOUTD_SECTION__KEY=VALUE (repeatable).
    #[arg(long = "daemon-env", value_parser = parse_env)]
    daemon_env: Vec<(String, String)>,
    /// Loader connections in parallel.
    #[arg(long, default_value_t = 4)]
    load_connections: usize,
    /// Give up this many seconds after RUNNING (default: 120 + 3 × the expected time).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// No progress lines.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    let a = Args::parse();
    let cfg = BenchConfig {
        rows: a.rows,
        kind: a.kind,
        limit: a.limit,
        sim_limit: a.sim_limit,
        latency_ms: a.latency_ms,
        jitter_ms: a.jitter_ms,
        partitions: a.partitions,
        instances: a.instances,
        max_in_flight: a.max_in_flight,
        batch_size: a.batch_size,
        sim_process: a.sim_process,
        sim_priority: a.sim_priority,
        db_only: a.db_only,
        db_ceiling: a.db_ceiling,
        status_only: a.status_only,
        transit: a.transit,
        keep_db: a.keep_db,
        db_url: a.db_url,
        payoutd: a.payoutd,
        money_sim: a.money_sim,
        out: a.out,
        throughput_interval: a.throughput_interval,
        daemon_env: a.daemon_env,
        load_connections: a.load_connections,
        timeout_secs: a.timeout_secs,
        quiet: a.quiet,
    };
    match bench::run(&cfg).await {
        Ok(report) => {
            print!("{}", bench::summary(&report));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("payout-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
