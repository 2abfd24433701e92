//! payoutd as a systemd service: the sd_notify protocol observed on a socket this test binds,
//! the shipped unit file, secrets from a credentials directory, and exit statuses.

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use mysql_async::prelude::Queryable;
use payout_tests::money_sim::SimConfig;

use crate::support::*;

/// The repository's `daemon/systemd/` folder.
fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/systemd")
}

/// A fresh path under the temporary directory (short enough for a Unix socket address).
fn scratch_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "payoutd-it-{what}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// A directory removed again when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(what: &str) -> anyhow::Result<ScratchDir> {
        let path = scratch_path(what);
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What systemd's end of `NOTIFY_SOCKET` sees: a bound Unix datagram socket whose messages
/// (one `KEY=VALUE` line each) a reader thread forwards in arrival order.
struct NotifySocket {
    path: PathBuf,
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    stop: Arc<AtomicBool>,
}

impl NotifySocket {
    fn bind() -> anyhow::Result<NotifySocket> {
        let path = scratch_path("notify");
        let socket =
            UnixDatagram::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        for line in String::from_utf8_lossy(&buf[..n]).lines() {
                            if tx.send(line.to_owned()).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(NotifySocket { path, rx, stop })
    }

    /// Waits for the message `want` and returns the messages received before it.
    async fn until(&mut self, want: &str, within: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut before = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if m == want => return Ok(before),
                Ok(Some(m)) => before.push(m),
                Ok(None) => bail!("the notify socket reader stopped; received {before:?}"),
                Err(_) => bail!("no {want} within {within:?}; received before: {before:?}"),
            }
        }
    }

    /// Every message not yet taken, after waiting `settle` for stragglers.
    async fn rest(&mut self, settle: Duration) -> Vec<String> {
        tokio::time::sleep(settle).await;
        let mut rest = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            rest.push(m);
        }
        rest
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An empty configuration file, so that an installed `/etc/payoutd/payoutd.toml` stays out of
/// these tests (`PAYOUTD_CONFIG` is `--config`).
fn empty_config() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join("payoutd-it");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("empty.toml");
    std::fs::write(&path, "")?;
    Ok(path)
}

/// `payoutd` configured by nothing but defaults: no file, no database, no Money.
fn bare_payoutd() -> anyhow::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(payoutd_path()?);
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYOUTD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("PAYOUTD_CONFIG", empty_config()?)
        .env("PAYOUTD_LOG__FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

/// Runs `cmd` to its end: (exit status code, stdout, stderr).
async fn outcome(
    cmd: &mut tokio::process::Command,
) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = cmd.output().await?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `cmd` through `sh`, which exports `WATCHDOG_PID=$$` and then `exec`s it: the daemon
/// keeps the shell's process id, so it finds its own pid in `WATCHDOG_PID`, as systemd sets it.
/// (sd-notify 0.4 enables the watchdog only when `WATCHDOG_PID` equals the process id.)
fn with_own_watchdog_pid(cmd: &tokio::process::Command) -> tokio::process::Command {
    let cmd = cmd.as_std();
    let mut sh = tokio::process::Command::new("sh");
    sh.arg("-c")
        .arg("export WATCHDOG_PID=$$; exec \"$0\" \"$@\"")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    sh.stdin(Stdio::null()).kill_on_drop(true);
    sh
}

/// Spawns `cmd` (a `payoutd run`) with its output in a log file, as [`Daemon::start`] does.
fn spawn_daemon(mut cmd: tokio::process::Command, db: &TestDb) -> anyhow::Result<Daemon> {
    let dir = std::env::temp_dir().join("payoutd-it");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join(format!("{}-{}.log", db.name, rand::random::<u16>()));
    let file = std::fs::File::create(&log)?;
    cmd.stdout(file.try_clone()?).stderr(file);
    let child = cmd.spawn().context("cannot start payoutd run")?;
    Ok(Daemon { child, log })
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status =
        std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Tables and views of the database, and the migrations recorded as applied.
async fn schema(db: &TestDb) -> anyhow::Result<(BTreeSet<String>, Vec<String>)> {
    let mut c = db.conn().await?;
    let tables: Vec<String> = c
        .query("SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()")
        .await?;
    let tables: BTreeSet<String> = tables.into_iter().collect();
    let applied = if tables.contains("__diesel_schema_migrations") {
        c.query("SELECT version FROM __diesel_schema_migrations ORDER BY version").await?
    } else {
        Vec::new()
    };
    Ok((tables, applied))
}

/// Drops every table and view, so that `payoutd run` has to migrate before it is ready.
async fn drop_schema(db: &TestDb) -> anyhow::Result<()> {
    let mut c = db.conn().await?;
    let objects: Vec<(String, String)> = c
        .query(
            "SELECT table_name, table_type FROM information_schema.tables \
             WHERE table_schema = DATABASE()",
        )
        .await?;
    c.query_drop("SET FOREIGN_KEY_CHECKS = 0").await?;
    for (name, kind) in objects {
        let what = if kind == "VIEW" { "VIEW" } else { "TABLE" };
        c.query_drop(format!("DROP {what} IF EXISTS `{name}`")).await?;
    }
    c.query_drop("SET FOREIGN_KEY_CHECKS = 1").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_notifies_ready_watchdog_and_stopping() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let (tables, applied) = schema(&db).await?;
    assert!(tables.contains("campaigns") && !applied.is_empty(), "{tables:?} {applied:?}");
    drop_schema(&db).await?;
    assert!(schema(&db).await?.0.is_empty());
    let sim = sim(sim_config()).await?;
    let mut notify = NotifySocket::bind()?;

    let mut cmd = payoutd(&db, Some(&sim.base_url()));
    cmd.arg("run")
        .env("PAYOUTD_CONFIG", empty_config()?)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "2000000")
        .env("PAYOUTD_EXECUTOR__IDLE_POLL", "50ms");
    let mut daemon = spawn_daemon(with_own_watchdog_pid(&cmd), &db)?;
    let pid = daemon.pid().context("no pid")?;

    let before = notify
        .until("READY=1", Duration::from_secs(60))
        .await
        .with_context(|| format!("payoutd log:\n{}", daemon.log_tail(40)))?;
    assert!(before.is_empty(), "messages before READY=1: {before:?}");
    // Freeze the daemon right at READY=1: the schema it migrated must be complete by then.
    signal(pid, "STOP")?;
    let at_ready = schema(&db).await;
    signal(pid, "CONT")?;
    let (tables_at_ready, applied_at_ready) = at_ready?;
    assert_eq!(tables_at_ready, tables, "tables when READY=1 arrived");
    assert_eq!(applied_at_ready, applied, "migrations applied when READY=1 arrived");

    // WATCHDOG_USEC = 2 s: a ping every second while the periodic jobs run.
    for n in 1..=2 {
        let between = notify
            .until("WATCHDOG=1", Duration::from_millis(2500))
            .await
            .with_context(|| format!("watchdog ping {n}; payoutd log:\n{}", daemon.log_tail(40)))?;
        assert!(between.is_empty(), "unexpected messages: {between:?}");
    }
    daemon.assert_alive()?;

    let log = daemon.log.clone();
    let status = daemon.terminate(Duration::from_secs(30)).await?;
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    let before = notify
        .until("STOPPING=1", Duration::from_secs(2))
        .await
        .with_context(|| format!("payoutd log:\n{log}"))?;
    let rest = notify.rest(Duration::from_millis(200)).await;
    for m in before.iter().chain(&rest) {
        assert!(m == "WATCHDOG=1" || m == "STOPPING=1", "unexpected {m:?} around STOPPING=1");
    }
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn no_ready_while_the_database_is_unreachable() -> anyhow::Result<()> {
    let _timing = shared().await;
    let mut notify = NotifySocket::bind()?;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        bare_payoutd()?
            .arg("run")
            .env("PAYOUTD_DATABASE__URL", "mysql://root@127.0.0.1:1/payoutd_nowhere")
            .env("PAYOUTD_DATABASE__CONNECT_TIMEOUT", "1s")
            .env("PAYOUTD_MONEY__BASE_URL", "http://127.0.0.1:9")
            .env("PAYOUTD_MONEY__API_KEY", "k")
            .env("NOTIFY_SOCKET", &notify.path)
            .output(),
    )
    .await
    .context("payoutd run did not give up on an unreachable database within 30 s")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(last.starts_with("payoutd: error: ") && last.contains("database"), "{stderr}");
    let sent = notify.rest(Duration::from_millis(200)).await;
    assert!(sent.is_empty(), "nothing may be notified before the database answers: {sent:?}");
    Ok(())
}

/// `key=value` lines of a unit file, with their section; comments and blank lines dropped.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            entries.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    entries
}

/// The values of every `key=` in `[section]`.
fn values_of<'a>(
    entries: &'a [(String, String, String)],
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

/// Seconds of a systemd time span such as `30s`, `5min` or `1min 30s`.
fn timespan_secs(span: &str) -> Option<u64> {
    let mut total = 0;
    for part in span.split_whitespace() {
        let digits = part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len());
        let n: u64 = part[..digits].parse().ok()?;
        total += match &part[digits..] {
            "" | "s" | "sec" => n,
            "min" | "m" => n * 60,
            "h" => n * 3600,
            _ => return None,
        };
    }
    Some(total)
}

/// A duration as `payoutd config check` prints it in `section`, e.g. `timeout = "3s"`.
fn effective_secs(toml: &str, section: &str, key: &str) -> Option<f64> {
    let start = toml.find(&format!("[{section}]"))?;
    let line = toml[start..].lines().find(|l| l.starts_with(&format!("{key} = ")))?;
    let value = line.split_once(" = ")?.1.trim_matches('"');
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|ms| ms / 1000.0);
    }
    value.strip_suffix('s')?.parse().ok()
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_unit_file_passes_systemd_analyze_verify() -> anyhow::Result<()> {
    let _timing = shared().await;
    let unit_path = systemd_dir().join("payoutd.service");
    let text = std::fs::read_to_string(&unit_path)
        .with_context(|| format!("cannot read {}", unit_path.display()))?;
    let entries = unit_entries(&text);
    let values = |section: &str, key: &str| values_of(&entries, section, key);

    // The keys the service relies on, whether or not systemd-analyze is around to check them.
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStart", "/usr/local/bin/payoutd run --config /etc/payoutd/payoutd.toml"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("RestartSec", "5s"),
        ("LoadCredential", "money-api-key:/etc/payoutd/credentials/money-api-key"),
        ("LoadCredential", "database-url:/etc/payoutd/credentials/database-url"),
        ("Environment", "PAYOUTD_DATABASE__URL_FILE=%d/database-url"),
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("UMask", "0077"),
        ("LimitNOFILE", "65536"),
    ] {
        let found = values("Service", key);
        assert!(found.contains(&want), "[Service] {key}={want} is missing (found {found:?})");
    }
    assert_eq!(values("Install", "WantedBy"), ["multi-user.target"]);
    // ProcSubset=pid would hide /proc/sys/kernel/hostname, which names the instance.
    assert!(values("Service", "ProcSubset").is_empty());

    // Stopping drains: requests in flight get money.timeout, result writes drain_timeout.
    let out = bare_payoutd()?.args(["config", "check"]).output().await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let effective = String::from_utf8_lossy(&out.stdout);
    let money_timeout = effective_secs(&effective, "money", "timeout").context("money.timeout")?;
    let drain = effective_secs(&effective, "executor", "drain_timeout").context("drain_timeout")?;
    let stop = values("Service", "TimeoutStopSec")
        .first()
        .and_then(|v| timespan_secs(v))
        .context("TimeoutStopSec missing or unreadable")?;
    assert!(
        stop as f64 >= money_timeout + drain + 10.0,
        "TimeoutStopSec={stop}s leaves too little room above money.timeout ({money_timeout}s) \
         + executor.drain_timeout ({drain}s)"
    );

    // INSTALL.md tells operators to create the files the unit loads.
    let install = std::fs::read_to_string(systemd_dir().join("INSTALL.md"))?;
    for credential in values("Service", "LoadCredential") {
        let (_, source) = credential.split_once(':').context("LoadCredential=ID:PATH")?;
        assert!(install.contains(source), "INSTALL.md does not mention {source}");
    }

    let Some(analyze) = find_in_path("systemd-analyze") else {
        println!(
            "systemd-analyze not found: checked the unit's keys by parsing it, \
             not with systemd-analyze verify"
        );
        return Ok(());
    };
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = ScratchDir::new("unit")?;
    let copy = dir.0.join("payoutd.service");
    let binary = payoutd_path()?;
    let text = text.replace(
        "ExecStart=/usr/local/bin/payoutd ",
        &format!("ExecStart=\"{}\" ", binary.display()),
    );
    std::fs::write(&copy, text)?;
    let out = tokio::process::Command::new(&analyze).arg("verify").arg(&copy).output().await?;
    let report =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "systemd-analyze verify failed:\n{report}");
    // Other units on the machine may draw warnings; ours may not.
    let ours: Vec<&str> = report.lines().filter(|l| l.contains("payoutd")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify complains:\n{}", ours.join("\n"));
    println!("{} verify: the unit passes", analyze.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_come_from_a_credentials_directory() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let key = format!("credential-key-{:016x}", rand::random::<u64>());
    let sim = sim(SimConfig { api_key: key.clone(), ..SimConfig::default() }).await?;

    // What LoadCredential= makes of the unit's two credentials: files ending with a newline.
    let credentials = ScratchDir::new("credentials")?;
    std::fs::write(credentials.0.join("money-api-key"), format!("{key}\n"))?;
    std::fs::write(credentials.0.join("database-url"), format!("{}\n", db.url))?;
    let credentials_env = credentials.0.to_string_lossy().into_owned();
    let url_file = format!("{credentials_env}/database-url");

    db.campaign(44, "POINT", "credential points").await?;
    db.load_points(44, &point_rows(20)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 44").await?;

    // As the unit runs it: no key or URL in the environment, only the credentials directory
    // and PAYOUTD_DATABASE__URL_FILE=%d/database-url.
    let mut cmd = payoutd(&db, Some(&sim.base_url()));
    cmd.arg("run")
        .env("PAYOUTD_CONFIG", empty_config()?)
        .env_remove("PAYOUTD_MONEY__API_KEY")
        .env_remove("PAYOUTD_DATABASE__URL")
        .env("PAYOUTD_DATABASE__URL_FILE", &url_file)
        .env("CREDENTIALS_DIRECTORY", &credentials_env)
        .env("PAYOUTD_EXECUTOR__IDLE_POLL", "50ms");
    let daemon = spawn_daemon(cmd, &db)?;
    wait_status(&db, 44, "COMPLETED", Duration::from_secs(60))
        .await
        .with_context(|| format!("payoutd log:\n{}", daemon.log_tail(40)))?;
    assert_eq!(db.counts("point_targets", 44).await?.get("SUCCEEDED"), Some(&20));
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 20);
    assert!(!ledger.rejected_by_status.contains_key(&401), "{:?}", ledger.rejected_by_status);
    let log = daemon.log_text();
    let status = daemon.terminate(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!log.contains(&key), "the API key leaked into the log");

    // `config check` names where the key comes from and never prints it.
    let out = payoutd(&db, None)
        .args(["config", "check"])
        .env("PAYOUTD_CONFIG", empty_config()?)
        .env("CREDENTIALS_DIRECTORY", &credentials_env)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let source = format!("# api_key: from systemd credential {credentials_env}/money-api-key");
    assert!(stdout.lines().any(|l| l == source), "{stdout}");
    assert!(!stdout.contains(&key) && !stderr.contains(&key), "the key was printed");

    // A key given explicitly wins over the credential, and prints masked.
    let out = payoutd(&db, None)
        .args(["config", "check"])
        .env("PAYOUTD_CONFIG", empty_config()?)
        .env("CREDENTIALS_DIRECTORY", &credentials_env)
        .env("PAYOUTD_MONEY__API_KEY", "explicit-key-0451")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.lines().any(|l| l == "api_key = \"***\""), "{stdout}");
    assert!(!stdout.contains("explicit-key-0451") && !stdout.contains(&key), "{stdout}");

    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_are_0_on_success_1_on_errors_2_on_usage_errors() -> anyhow::Result<()> {
    let _timing = shared().await;
    let run = outcome;

    // Success.
    for args in [&["--help"][..], &["--version"], &["campaign", "start", "--help"]] {
        let (code, stdout, stderr) = run(bare_payoutd()?.args(args)).await?;
        assert_eq!(code, Some(0), "payoutd {args:?}: {stderr}");
        assert!(!stdout.is_empty());
    }

    // Usage errors: clap's status 2.
    let (code, _, stderr) = run(bare_payoutd()?.arg("frobnicate")).await?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unrecognized subcommand 'frobnicate'"), "{stderr}");
    let (code, _, stderr) = run(bare_payoutd()?.args(["campaign", "start", "abc"])).await?;
    assert_eq!(code, Some(2), "{stderr}");

    // Errors: status 1 and one line on stderr naming what is wrong.
    let one_line = |stderr: &str| {
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].starts_with("payoutd: error: "), "{stderr}");
        lines[0].to_owned()
    };
    let (code, _, stderr) =
        run(bare_payoutd()?.args(["config", "check"]).env("PAYOUTD_MONEY__TIMEOUT", "3 parsecs"))
            .await?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(one_line(&stderr).starts_with("payoutd: error: money.timeout: "), "{stderr}");

    let (code, _, stderr) = run(bare_payoutd()?
        .args(["campaign", "list"])
        .env("PAYOUTD_DATABASE__URL", "mysql://root@127.0.0.1:1/payoutd_nowhere")
        .env("PAYOUTD_DATABASE__CONNECT_TIMEOUT", "1s"))
    .await?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(one_line(&stderr).contains("database"), "{stderr}");

    let db = TestDb::new().await?;
    let cli = || -> anyhow::Result<tokio::process::Command> {
        let mut cmd = payoutd(&db, None);
        cmd.env("PAYOUTD_CONFIG", empty_config()?);
        Ok(cmd)
    };
    let (code, _, stderr) = run(cli()?.args(["campaign", "start", "999"])).await?;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(one_line(&stderr), "payoutd: error: campaign 999 does not exist");

    db.campaign(7, "VOUCHER", "done").await?;
    db.exec("UPDATE campaigns SET status = 'COMPLETED' WHERE id = 7").await?;
    let (code, _, stderr) = run(cli()?.args(["campaign", "start", "7"])).await?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(one_line(&stderr).contains("cannot start a campaign that is COMPLETED"), "{stderr}");

    // The statuses are documented where operators look for them.
    let install = std::fs::read_to_string(systemd_dir().join("INSTALL.md"))?;
    for row in ["| 0 |", "| 1 |", "| 2 |"] {
        assert!(install.contains(row), "INSTALL.md's exit status table lacks {row}");
    }
    db.drop_db().await
}
