//! `payoutd` as a child process: `migrate`, and `run` configured through the environment only,
//! logging JSON lines to a file the bench reads afterwards.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A `payoutd` command with no inherited `PAYOUTD_*` configuration and no systemd credentials.
fn command(payoutd: &Path, env: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(payoutd);
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYOUTD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("CREDENTIALS_DIRECTORY").env_remove("NOTIFY_SOCKET").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// `payoutd migrate` against `db_url`.
pub async fn migrate(payoutd: &Path, db_url: &str) -> anyhow::Result<()> {
    let env = [
        ("PAYOUTD_DATABASE__URL".to_owned(), db_url.to_owned()),
        ("PAYOUTD_LOG__FORMAT".to_owned(), "text".to_owned()),
    ];
    let out = command(payoutd, &env)
        .arg("migrate")
        .output()
        .await
        .with_context(|| format!("cannot run {} migrate", payoutd.display()))?;
    if !out.status.success() {
        bail!("payoutd migrate failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A running `payoutd run`.
pub struct Daemon {
    child: tokio::process::Child,
    pub pid: u32,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `payoutd run` with exactly `env` as its configuration; stdout and stderr go to
    /// `log`.
    pub async fn start(
        payoutd: &Path,
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Daemon> {
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = command(payoutd, env)
            .arg("run")
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {} run", payoutd.display()))?;
        let pid = child.id().context("payoutd exited at once")?;
        Ok(Daemon { child, pid, log: log.to_path_buf() })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails (with the end of the log) if the daemon has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("payoutd exited early with {status}; log tail:\n{}", self.log_tail(20));
        }
        Ok(())
    }

    /// Waits for the `payoutd ready` line (migrations checked, jobs started).
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.log_text().contains("payoutd ready") {
                return Ok(());
            }
            self.check_alive()?;
            if start.elapsed() > within {
                bail!("payoutd was not ready within {within:?}; log tail:\n{}", self.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `within`).
    pub async fn terminate(mut self, within: Duration) -> anyhow::Result<DaemonLog> {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("payoutd did not exit within {within:?} of SIGTERM; log tail:\n{}", {
                    self.log_tail(20)
                });
            }
        }
        Ok(DaemonLog::parse(&self.log_text()))
    }
}

/// What the bench takes from the daemon's JSON log.
#[derive(Debug, Clone, Default)]
pub struct DaemonLog {
    /// The fields of the last `payoutd stopped` line.
    pub stopped: Option<serde_json::Value>,
    /// `tps` of every per-campaign `throughput` line, in order.
    pub throughput_tps: Vec<f64>,
    /// WARN and ERROR lines.
    pub warnings: u64,
}

impl DaemonLog {
    pub fn parse(text: &str) -> DaemonLog {
        let mut out = DaemonLog::default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let message = v.get("message").and_then(|m| m.as_str()).unwrap_or_default();
            match message {
                "payoutd stopped" => out.stopped = Some(v.clone()),
                "throughput" => {
                    if let Some(tps) = number(&v, "tps") {
                        out.throughput_tps.push(tps);
                    }
                }
                _ => {}
            }
            if matches!(v.get("level").and_then(|l| l.as_str()), Some("WARN" | "ERROR")) {
                out.warnings += 1;
            }
        }
        out
    }

    /// A number field of the `payoutd stopped` line (numbers may be logged as strings).
    pub fn stopped_number(&self, key: &str) -> Option<f64> {
        self.stopped.as_ref().and_then(|v| number(v, key))
    }
}

fn number(v: &serde_json::Value, key: &str) -> Option<f64> {
    match v.get(key)? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Runs a `payoutd` command (`campaign status 1 --json`, …) against `db_url` and returns its
/// output; fails when it exits unsuccessfully.
pub async fn cli(
    payoutd: &Path,
    db_url: &str,
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    let env = [
        ("PAYOUTD_DATABASE__URL".to_owned(), db_url.to_owned()),
        ("PAYOUTD_LOG__FORMAT".to_owned(), "text".to_owned()),
    ];
    let out = command(payoutd, &env)
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run {} {}", payoutd.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!("payoutd {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stopped_line_and_throughput_lines_are_read() {
        let log = DaemonLog::parse(
            "{\"level\":\"INFO\",\"message\":\"throughput\",\"tps\":\"990.5\"}\n\
             not json\n\
             {\"level\":\"WARN\",\"message\":\"x\"}\n\
             {\"level\":\"INFO\",\"message\":\"payoutd stopped\",\"requests_sent\":3000,\
             \"money_p50_ms\":\"21.5\",\"money_p99_ms\":\"\"}\n",
        );
        assert_eq!(log.throughput_tps, vec![990.5]);
        assert_eq!(log.warnings, 1);
        assert_eq!(log.stopped_number("requests_sent"), Some(3000.0));
        assert_eq!(log.stopped_number("money_p50_ms"), Some(21.5));
        assert_eq!(log.stopped_number("money_p99_ms"), None);
    }
}
