//! money-sim for the benchmark: in this process, or as a `money-sim` child process so that its
//! CPU time can be told apart from the bench's.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::AsyncBufReadExt as _;

use crate::money_sim::{LedgerSummary, MoneySim, RequestRecord, SimConfig};

pub enum Sim {
    InProcess(MoneySim),
    Process {
        child: tokio::process::Child,
        base_url: String,
        /// When the child announced its address: its clock (`at_ms`) started a little earlier,
        /// so times converted with it err on the late side by a few milliseconds.
        started: Instant,
        http: reqwest::Client,
    },
}

impl Sim {
    pub async fn in_process(cfg: SimConfig) -> anyhow::Result<Sim> {
        Ok(Sim::InProcess(MoneySim::start("127.0.0.1:0".parse()?, cfg).await?))
    }

    /// Starts the `money-sim` binary at `path` on a free loopback port; its log goes to `log`.
    pub async fn process(path: &Path, cfg: &SimConfig, log: &Path) -> anyhow::Result<Sim> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = tokio::process::Command::new(path)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--rate-limit-per-sec")
            .arg(cfg.rate_limit_per_sec.to_string())
            .arg("--latency-ms")
            .arg(cfg.latency_ms.to_string())
            .arg("--latency-jitter-ms")
            .arg(cfg.latency_jitter_ms.to_string())
            .arg("--expected-grants")
            .arg(cfg.expected_grants.to_string())
            .env("MONEY_SIM_API_KEY", &cfg.api_key)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        // money-sim stands in for Money, a service on hosts of its own. Sharing two cores with
        // the daemon and MariaDB, it was most likely starved for ~0.1 s while they worked off a
        // database stall, and the requests that queued up meanwhile were then time-stamped
        // together, as if sent in a burst (1,095 in one second, 99 answered 429, at a limit
        // the daemon's own send log had kept). Raising its priority keeps the measurement about
        // the daemon; where renice is not allowed, it runs at normal priority.
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("renice")
                .args(["-n", "-10", "-p", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let stdout = child.stdout.take().context("money-sim has no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("money-sim did not announce its address within 20 s")??
            .context("money-sim exited before announcing its address")?;
        let started = Instant::now();
        let Some(base_url) = line.strip_prefix("money-sim listening on ") else {
            bail!("unexpected first line from money-sim: {line}");
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
        Ok(Sim::Process { child, base_url: base_url.trim().to_owned(), started, http })
    }

    pub fn base_url(&self) -> String {
        match self {
            Sim::InProcess(sim) => sim.base_url(),
            Sim::Process { base_url, .. } => base_url.clone(),
        }
    }

    /// Now on the simulator's clock (milliseconds since it started), the clock of `at_ms`,
    /// `first_grant_ms` and `last_grant_ms`.
    pub fn now_ms(&self) -> u64 {
        match self {
            Sim::InProcess(sim) => sim.now_ms(),
            Sim::Process { started, .. } => started.elapsed().as_millis() as u64,
        }
    }

    /// The child's process id (`None` in process).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Sim::InProcess(_) => None,
            Sim::Process { child, .. } => child.id(),
        }
    }

    pub async fn ledger(&self) -> anyhow::Result<LedgerSummary> {
        match self {
            Sim::InProcess(sim) => Ok(sim.ledger()),
            Sim::Process { base_url, http, .. } => Ok(http
                .get(format!("{base_url}/_sim/ledger"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?),
        }
    }

    /// Every grant request in arrival order.
    pub async fn requests(&self) -> anyhow::Result<Vec<RequestRecord>> {
        match self {
            Sim::InProcess(sim) => Ok(sim.requests()),
            Sim::Process { base_url, http, .. } => Ok(http
                .get(format!("{base_url}/_sim/requests"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?),
        }
    }

    pub async fn stop(self) {
        match self {
            Sim::InProcess(sim) => sim.shutdown().await,
            Sim::Process { mut child, .. } => {
                if let Some(pid) = child.id() {
                    let _ = std::process::Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status();
                }
                if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
    }
}
