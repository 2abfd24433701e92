//! `money-sim`: the simulated Money server as a process, for scripts and manual runs.
//!
//! Prints exactly one line to stdout once it accepts connections,
//! `money-sim listening on http://ADDR`, and stops on SIGINT or SIGTERM. Logs go to stderr
//! (`RUST_LOG`, default `info`). Admin endpoints are under `/_sim/` (see `payout_tests::money_sim`).

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use payout_tests::money_sim::{MoneySim, SimConfig};
use tracing_subscriber::EnvFilter;

/// money-sim stands in for Money, which runs on hosts of its own; on the benchmark machine it
/// shares two cores with payoutd and MariaDB, and glibc's allocator cost it about a fifth of its
/// CPU at high request rates. mimalloc is a drop-in replacement (money-sim has no memory goal).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Simulated Money server implementing the Money API contract, with fault injection.
#[derive(Debug, Parser)]
#[command(name = "money-sim", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The X-Api-Key value grant requests must carry.
    #[arg(long, env = "MONEY_SIM_API_KEY", default_value = "sim-key", hide_env_values = true)]
    api_key: String,
    /// Grant requests admitted per sliding second before answering 429 (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    rate_limit_per_sec: u32,
    /// Mean latency added to each grant request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Uniform jitter (+-) around the mean latency, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_jitter_ms: u64,
    /// Share [0, 1] of grant requests answered 503 without granting.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    fail_5xx_share: f64,
    /// Share [0, 1] of grant requests that hang for --hang-ms (half of them grant first).
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    timeout_share: f64,
    /// How long a hanging request waits before answering, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    hang_ms: u64,
    /// customer_uid prefix answered 404 customer_not_found (empty disables).
    #[arg(long, default_value = "missing-")]
    not_found_prefix: String,
    /// Grants to make room for up front (a large map's rehash stalls every request).
    #[arg(long, default_value_t = 0)]
    expected_grants: usize,
    /// Threads serving requests. 1 (the default) runs everything on one thread, which needs a
    /// tenth (16,000 requests/s) to a fifth (8,000/s) less CPU per request than two threads
    /// handing connections to each other; more threads serve more than one core can.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
}

fn parse_share(value: &str) -> Result<f64, String> {
    let share: f64 = value.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!("must be within [0, 1], got {share}"))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.threads))
            .enable_all()
            .build()
    }
    .context("money-sim could not start its runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let cfg = SimConfig {
        api_key: args.api_key,
        rate_limit_per_sec: args.rate_limit_per_sec,
        latency_ms: args.latency_ms,
        latency_jitter_ms: args.latency_jitter_ms,
        fail_5xx_share: args.fail_5xx_share,
        timeout_share: args.timeout_share,
        hang_ms: args.hang_ms,
        not_found_prefix: Some(args.not_found_prefix).filter(|prefix| !prefix.is_empty()),
        expected_grants: args.expected_grants,
    };
    let sim = MoneySim::start(args.listen, cfg).await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "money-sim listening on {}", sim.base_url())
            .and_then(|()| stdout.flush())
            .context("money-sim could not announce its address on stdout")?;
    }
    wait_for_stop_signal().await?;
    tracing::info!("money-sim received a stop signal; shutting down");
    sim.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).context("money-sim could not listen for SIGTERM")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("money-sim could not listen for SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await.context("money-sim could not listen for Ctrl-C")
}
