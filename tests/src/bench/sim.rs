//! money-sim for the benchmark: in this process, or as a `money-sim` child process so that its
//! CPU time can be told apart from the bench's.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::AsyncBufReadExt as _;

use super::SimPriority;
use crate::money_sim::{LedgerSummary, MoneySim, RequestRecord, SimConfig};

pub enum Sim {
    InProcess(MoneySim),
    Process {
        child: Box<tokio::process::Child>,
        base_url: String,
        /// When the child announced its address: its clock (`at_ms`) started a little earlier,
        /// so times converted with it err on the late side by a few milliseconds.
        started: Instant,
        http: reqwest::Client,
        /// The scheduling the child got (see [`raise_priority`]).
        priority: &'static str,
    },
}

/// Puts every thread of `pid` under `SCHED_FIFO` priority 10 (`chrt --all-tasks`) when asked
/// and allowed, else at nice −10 thread by thread (nice is per thread on Linux: renicing the
/// process id alone reaches only its main thread). Says what it got.
fn raise_priority(pid: u32, priority: SimPriority) -> &'static str {
    let quiet = |cmd: &mut std::process::Command| {
        cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    };
    let pid = pid.to_string();
    if priority == SimPriority::Fifo
        && quiet(std::process::Command::new("chrt").args([
            "--fifo",
            "--all-tasks",
            "--pid",
            "10",
            &pid,
        ]))
    {
        return "SCHED_FIFO 10";
    }
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let reniced = tasks
        .iter()
        .filter(|tid| quiet(std::process::Command::new("renice").args(["-n", "-10", "-p", tid])))
        .count();
    if reniced > 0 && reniced == tasks.len() { "nice -10" } else { "normal" }
}

impl Sim {
    pub async fn in_process(cfg: SimConfig) -> anyhow::Result<Sim> {
        Ok(Sim::InProcess(MoneySim::start("127.0.0.1:0".parse()?, cfg).await?))
    }

    /// Starts the `money-sim` binary at `path` on a free loopback port; its log goes to `log`.
    pub async fn process(
        path: &Path,
        cfg: &SimConfig,
        priority: SimPriority,
        log: &Path,
    ) -> anyhow::Result<Sim> {
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
        let stdout = child.stdout.take().context("money-sim has no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("money-sim did not announce its address within 20 s")??
            .context("money-sim exited before announcing its address")?;
        let started = Instant::now();
        // money-sim stands in for Money, a service on hosts of its own, and stamps each arrival
        // when its handler runs. Sharing two cores with the daemon and MariaDB, its threads can
        // wait for a core while requests queue on its sockets, which are then stamped together
        // as if sent in a burst; a raised priority of all its threads (they all exist once it
        // has announced its address) keeps the stamps about the daemon.
        let priority = match child.id() {
            Some(pid) if priority != SimPriority::Normal => raise_priority(pid, priority),
            _ => "normal",
        };
        let Some(base_url) = line.strip_prefix("money-sim listening on ") else {
            bail!("unexpected first line from money-sim: {line}");
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
        Ok(Sim::Process {
            child: Box::new(child),
            base_url: base_url.trim().to_owned(),
            started,
            http,
            priority,
        })
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

    /// How the child's threads are scheduled (`None` in process).
    pub fn priority(&self) -> Option<&str> {
        match self {
            Sim::InProcess(_) => None,
            Sim::Process { priority, .. } => Some(priority),
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
