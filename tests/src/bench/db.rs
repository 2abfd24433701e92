//! The benchmark's database: finding a server, a fresh database per run, the loader's INSERTs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mysql_async::prelude::Queryable;

use super::Kind;

/// The server every other default falls back to (how CI machines come).
pub const DEFAULT_SERVER_URL: &str = "mysql://root@127.0.0.1:3306";

/// Rows per INSERT statement, as the loader writes them.
pub const LOAD_CHUNK: u64 = 1000;

/// The server URL (no database): `explicit` (`--db-url`), else `PAYOUTD_TEST_DATABASE_URL`, else
/// what `scripts/ensure-mariadb.sh` prints (it starts or installs a local server if needed), else
/// [`DEFAULT_SERVER_URL`].
pub fn server_url(explicit: Option<&str>) -> anyhow::Result<String> {
    if let Some(url) = explicit.filter(|u| !u.is_empty()) {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    if let Ok(url) = std::env::var("PAYOUTD_TEST_DATABASE_URL") {
        if !url.is_empty() {
            return Ok(url.trim_end_matches('/').to_owned());
        }
    }
    if let Some(script) = ensure_script() {
        eprintln!("payout-bench: no --db-url: running {}", script.display());
        let out = std::process::Command::new("bash")
            .arg(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        if !out.status.success() {
            bail!("{} failed ({}): no MariaDB to benchmark against", script.display(), out.status);
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if url.starts_with("mysql://") {
            return Ok(url.trim_end_matches('/').to_owned());
        }
        bail!("{} printed no server URL", script.display());
    }
    Ok(DEFAULT_SERVER_URL.to_owned())
}

/// `scripts/ensure-mariadb.sh` of this checkout: under the working directory, or beside the
/// crate this binary was built from.
fn ensure_script() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from("scripts/ensure-mariadb.sh"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-mariadb.sh"),
    ];
    candidates.into_iter().find(|p| p.is_file())
}

/// `mysql://user:***@host:port/...`: the URL without its password, for output.
pub fn masked(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A database created for one benchmark run.
pub struct BenchDb {
    pub name: String,
    /// The database's URL (server URL + `/name`).
    pub url: String,
    pub pool: mysql_async::Pool,
    admin: mysql_async::Pool,
}

impl BenchDb {
    /// Creates `name` on the server.
    pub async fn create(server: &str, name: &str) -> anyhow::Result<BenchDb> {
        let admin = mysql_async::Pool::new(server);
        {
            let mut c = admin.get_conn().await.with_context(|| {
                format!("cannot reach MariaDB at {} (--db-url)", masked(server))
            })?;
            c.query_drop(format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4")).await?;
        }
        let url = format!("{server}/{name}");
        let pool = mysql_async::Pool::new(url.as_str());
        Ok(BenchDb { name: name.to_owned(), url, pool, admin })
    }

    pub async fn conn(&self) -> anyhow::Result<mysql_async::Conn> {
        Ok(self.pool.get_conn().await?)
    }

    pub async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        self.conn().await?.query_drop(sql).await?;
        Ok(())
    }

    pub async fn first<T: mysql_async::prelude::FromRow + Send + 'static>(
        &self,
        sql: &str,
    ) -> anyhow::Result<Option<T>> {
        Ok(self.conn().await?.query_first(sql).await?)
    }

    pub async fn query<T: mysql_async::prelude::FromRow + Send + 'static>(
        &self,
        sql: &str,
    ) -> anyhow::Result<Vec<T>> {
        Ok(self.conn().await?.query(sql).await?)
    }

    /// InnoDB's undo history (`trx_rseg_history_len`: committed transactions whose old row
    /// versions purge has not yet removed), server-wide; `None` where the metric is off.
    pub async fn undo_history(&self) -> anyhow::Result<Option<u64>> {
        let n: Option<(i64, i64)> = self
            .first(
                "SELECT `COUNT`, `ENABLED` FROM information_schema.INNODB_METRICS \
                 WHERE `NAME` = 'trx_rseg_history_len'",
            )
            .await?;
        Ok(n.filter(|(_, on)| *on != 0).map(|(count, _)| count.max(0) as u64))
    }

    /// Drops the database and closes the pools.
    pub async fn drop_db(self) -> anyhow::Result<()> {
        let _ = self.pool.disconnect().await;
        let mut c = self.admin.get_conn().await?;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name)).await?;
        drop(c);
        let _ = self.admin.disconnect().await;
        Ok(())
    }

    /// Closes the pools and leaves the database in place (`--keep-db`).
    pub async fn close(self) {
        let _ = self.pool.disconnect().await;
        let _ = self.admin.disconnect().await;
    }

    /// Inserts campaign `id` and `rows` target rows of `kind` exactly as the loader does
    /// (`shared/spec/contract.md`): one `INSERT INTO campaigns`, then multi-row INSERTs of 1,000
    /// rows each, spread over `connections` connections. Returns the time it took.
    pub async fn load(
        &self,
        kind: Kind,
        id: i64,
        rows: u64,
        connections: usize,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.exec(&format!(
            "INSERT INTO campaigns (id, kind, name) VALUES ({id}, '{}', 'bench {}')",
            kind.campaign_kind(),
            kind.as_str()
        ))
        .await?;
        let chunks = rows.div_ceil(LOAD_CHUNK);
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..connections.clamp(1, 16) {
            let pool = self.pool.clone();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = pool.get_conn().await?;
                loop {
                    let chunk = next.fetch_add(1, Ordering::Relaxed);
                    if chunk >= chunks {
                        return anyhow::Ok(());
                    }
                    let from = chunk * LOAD_CHUNK;
                    let to = (from + LOAD_CHUNK).min(rows);
                    c.query_drop(insert_sql(kind, id, from, to)).await?;
                }
            }));
        }
        for t in tasks {
            t.await.context("a loader task panicked")??;
        }
        Ok(started.elapsed())
    }
}

/// One loader statement for rows `from..to` of campaign `id`.
pub fn insert_sql(kind: Kind, id: i64, from: u64, to: u64) -> String {
    let mut sql = String::with_capacity(64 * (to - from) as usize + 128);
    match kind {
        Kind::Point => sql.push_str(
            "INSERT INTO point_targets (event_id, customer_uid, amount, expiry_at, reason) VALUES ",
        ),
        Kind::Voucher => sql.push_str(
            "INSERT INTO voucher_targets (event_id, customer_uid, voucher_number, reason) VALUES ",
        ),
    }
    for i in from..to {
        if i > from {
            sql.push_str(", ");
        }
        match kind {
            Kind::Point => sql.push_str(&format!(
                "({id}, 'u-{i:07}', {}, '20991231235959', 'bench points')",
                100 + i % 9_900
            )),
            Kind::Voucher => {
                sql.push_str(&format!("({id}, 'u-{i:07}', 'V-{id}-{i:07}', 'bench vouchers')"))
            }
        }
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_statements_look_like_the_contract() {
        assert_eq!(
            insert_sql(Kind::Point, 1, 0, 2),
            "INSERT INTO point_targets (event_id, customer_uid, amount, expiry_at, reason) VALUES \
             (1, 'u-0000000', 100, '20991231235959', 'bench points'), \
             (1, 'u-0000001', 101, '20991231235959', 'bench points')"
        );
        assert_eq!(
            insert_sql(Kind::Voucher, 2, 5, 6),
            "INSERT INTO voucher_targets (event_id, customer_uid, voucher_number, reason) VALUES \
             (2, 'u-0000005', 'V-2-0000005', 'bench vouchers')"
        );
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(masked("mysql://u:secret@h:3306/db"), "mysql://u:***@h:3306/db");
        assert_eq!(masked("mysql://root@h:3306"), "mysql://root@h:3306");
    }
}
