//! Shared test machinery: a fresh MariaDB database per test, the simulated Money server, the
//! real `payoutd` binary as a child process, and polling helpers.

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use mysql_async::prelude::Queryable;
use payout_tests::money_sim::{MoneySim, SimConfig};

/// Tests measuring time take this exclusively; every other test shares it. On a 2-core machine
/// a dozen daemons, MariaDB and money-sims running at once delay requests by tens of
/// milliseconds, which is noise for correctness tests but not for a rate measurement.
static TIMING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub async fn shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    TIMING.read().await
}

pub async fn exclusive() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    TIMING.write().await
}

/// Server URL without a database; override with `PAYOUTD_TEST_DATABASE_URL`.
pub fn server_url() -> String {
    std::env::var("PAYOUTD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned())
}

/// Databases older than this are leftovers of crashed runs and are dropped.
const LEFTOVER_AGE_SECS: u64 = 3600;

/// A freshly created, migrated database that belongs to one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: mysql_async::Pool,
    admin: mysql_async::Pool,
}

impl TestDb {
    pub async fn new() -> anyhow::Result<TestDb> {
        let admin = mysql_async::Pool::new(server_url().as_str());
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let name = format!("payoutd_t_{now}_{:08x}", rand::random::<u32>());
        {
            let mut c = admin
                .get_conn()
                .await
                .context("cannot reach the test MariaDB (PAYOUTD_TEST_DATABASE_URL)")?;
            let existing: Vec<String> = c.query("SHOW DATABASES LIKE 'payoutd\\_t\\_%'").await?;
            for db in existing {
                let born = db.split('_').nth(2).and_then(|s| s.parse::<u64>().ok()).unwrap_or(now);
                if now.saturating_sub(born) > LEFTOVER_AGE_SECS {
                    let _ = c.query_drop(format!("DROP DATABASE IF EXISTS `{db}`")).await;
                }
            }
            c.query_drop(format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4")).await?;
        }
        let url = format!("{}/{name}", server_url().trim_end_matches('/'));
        let db = TestDb { pool: mysql_async::Pool::new(url.as_str()), url, name, admin };
        let out = payoutd(&db, None).args(["migrate"]).output().await?;
        if !out.status.success() {
            bail!("payoutd migrate failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(db)
    }

    pub async fn conn(&self) -> anyhow::Result<mysql_async::Conn> {
        Ok(self.pool.get_conn().await?)
    }

    pub async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        self.conn().await?.query_drop(sql).await?;
        Ok(())
    }

    pub async fn query<T: mysql_async::prelude::FromRow + Send + 'static>(
        &self,
        sql: &str,
    ) -> anyhow::Result<Vec<T>> {
        Ok(self.conn().await?.query(sql).await?)
    }

    /// Inserts a campaign exactly as the loader does.
    pub async fn campaign(&self, id: i64, kind: &str, name: &str) -> anyhow::Result<()> {
        self.exec(&format!(
            "INSERT INTO campaigns (id, kind, name) VALUES ({id}, '{kind}', '{name}')"
        ))
        .await
    }

    /// Loads voucher rows with the loader's multi-row INSERT, in chunks of 1,000.
    pub async fn load_vouchers(
        &self,
        event: i64,
        rows: &[(String, String, String)],
    ) -> anyhow::Result<()> {
        for chunk in rows.chunks(1000) {
            let values: Vec<String> = chunk
                .iter()
                .map(|(uid, number, reason)| format!("({event}, '{uid}', '{number}', '{reason}')"))
                .collect();
            self.exec(&format!(
                "INSERT INTO voucher_targets (event_id, customer_uid, voucher_number, reason) VALUES {}",
                values.join(", ")
            ))
            .await?;
        }
        Ok(())
    }

    /// Loads point rows with the loader's multi-row INSERT, in chunks of 1,000.
    pub async fn load_points(
        &self,
        event: i64,
        rows: &[(String, i64, String, String)],
    ) -> anyhow::Result<()> {
        for chunk in rows.chunks(1000) {
            let values: Vec<String> = chunk
                .iter()
                .map(|(uid, amount, expiry, reason)| {
                    format!("({event}, '{uid}', {amount}, '{expiry}', '{reason}')")
                })
                .collect();
            self.exec(&format!(
                "INSERT INTO point_targets (event_id, customer_uid, amount, expiry_at, reason) VALUES {}",
                values.join(", ")
            ))
            .await?;
        }
        Ok(())
    }

    pub async fn status(&self, campaign: i64) -> anyhow::Result<String> {
        let s: Option<String> = self
            .conn()
            .await?
            .query_first(format!("SELECT status FROM campaigns WHERE id = {campaign}"))
            .await?;
        s.context("no such campaign")
    }

    /// Rows of a campaign per status.
    pub async fn counts(
        &self,
        table: &str,
        campaign: i64,
    ) -> anyhow::Result<std::collections::BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = self
            .query(&format!(
                "SELECT status, COUNT(*) FROM {table} WHERE event_id = {campaign} GROUP BY status"
            ))
            .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn drop_db(self) -> anyhow::Result<()> {
        self.pool.disconnect().await?;
        let mut c = self.admin.get_conn().await?;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name)).await?;
        drop(c);
        self.admin.disconnect().await?;
        Ok(())
    }
}

/// Voucher rows `u-<i>` / `V-<event>-<i>`.
pub fn voucher_rows(event: i64, n: usize) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| (format!("u-{i:06}"), format!("V-{event}-{i:06}"), "winter sale".to_owned()))
        .collect()
}

/// Point rows `u-<i>` with distinct amounts.
pub fn point_rows(n: usize) -> Vec<(String, i64, String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("u-{i:06}"),
                100 + i as i64,
                "20991231235959".to_owned(),
                "winter sale".to_owned(),
            )
        })
        .collect()
}

/// Starts money-sim on a free loopback port.
pub async fn sim(cfg: SimConfig) -> anyhow::Result<MoneySim> {
    MoneySim::start("127.0.0.1:0".parse()?, cfg).await
}

pub const SIM_KEY: &str = "sim-key";

/// The `payoutd` binary built beside this test binary.
pub fn payoutd_path() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("PAYOUTD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|d| d.parent()).context("no target dir")?;
    let p = dir.join("payoutd");
    if !p.exists() {
        bail!("{} is missing: run `cargo build --workspace --bins` before the tests", p.display());
    }
    Ok(p)
}

/// A `payoutd` command configured for `db` (and Money, when given) through the environment only.
pub fn payoutd(db: &TestDb, money_url: Option<&str>) -> tokio::process::Command {
    let mut cmd =
        tokio::process::Command::new(payoutd_path().unwrap_or_else(|_| PathBuf::from("payoutd")));
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYOUTD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("PAYOUTD_DATABASE__URL", &db.url)
        .env("PAYOUTD_LOG__FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = money_url {
        cmd.env("PAYOUTD_MONEY__BASE_URL", url).env("PAYOUTD_MONEY__API_KEY", SIM_KEY);
    }
    cmd
}

/// A `payoutd run` child process whose output goes to a log file.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Daemon {
    pub async fn start(
        db: &TestDb,
        money_url: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Daemon> {
        let dir = std::env::temp_dir().join("payoutd-it");
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("{}-{}.log", db.name, rand::random::<u16>()));
        let file = std::fs::File::create(&log)?;
        let mut cmd = payoutd(db, Some(money_url));
        cmd.arg("run")
            .env("PAYOUTD_EXECUTOR__IDLE_POLL", "50ms")
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("cannot start payoutd run")?;
        Ok(Daemon { child, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for the exit (at most `within`).
    pub async fn terminate(mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        }
        let status =
            tokio::time::timeout(within, self.child.wait()).await.with_context(|| {
                format!("payoutd did not exit within {within:?}; log:\n{}", self.log_text())
            })??;
        Ok(status)
    }

    /// Fails if the daemon has exited (with its log).
    pub fn assert_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("payoutd exited early with {status}; log:\n{}", self.log_text());
        }
        Ok(())
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the campaign has the given status.
pub async fn wait_status(
    db: &TestDb,
    campaign: i64,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    eventually(timeout, &format!("campaign {campaign} to be {want}"), || async {
        Ok((db.status(campaign).await? == want).then_some(()))
    })
    .await
}

/// Runs a payoutd CLI command and returns (success, stdout, stderr).
pub async fn cli(db: &TestDb, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = payoutd(db, None).args(args).output().await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub fn sim_config() -> SimConfig {
    SimConfig { api_key: SIM_KEY.to_owned(), ..SimConfig::default() }
}

// Failure-handling tests (issue 3): killing the daemon, reading its logs.

impl Daemon {
    /// The process id while the child runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `kill -9`: no drain, no clean-up. Waits until the process is gone. Fails if the daemon
    /// had already exited by itself (with its log), since then there was nothing to kill.
    pub async fn kill(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.assert_alive()?;
        self.child.start_kill().context("cannot SIGKILL payoutd")?;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .context("payoutd survived SIGKILL for 10 s")??;
        Ok(status)
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
