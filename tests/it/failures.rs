//! Issue 3 (2/5), failure handling: emergency stop, crash safety, database outages, bad rows,
//! retries, unknown outcomes, graceful shutdown, and a randomized soak of all of them.
//!
//! Every test ends by checking the two invariants against money-sim's own records: no row was
//! granted twice, and no row was lost (every row Money granted is SUCCEEDED with the transaction
//! id Money gave for its key, and every row ended SUCCEEDED or DEAD).
//!
//! Tests that draw random numbers print their seed; rerun one with `PAYOUTD_TEST_SEED=<seed>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use mysql_async::prelude::Queryable;
use payout_tests::money_sim::{
    FaultUpdate, MoneySim, Outage, OutageMode, RequestRecord, SimConfig,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::dbproxy::DbProxy;
use crate::support::*;

const LONG: Duration = Duration::from_secs(120);

/// For tests that inject Money failures on purpose but do not test the circuit breaker: a
/// threshold no test reaches, so the campaign is never paused by it.
const NO_BREAKER: (&str, &str) = ("PAYOUTD_BREAKER__FAILURE_THRESHOLD", "1000000");

/// How long the database is unreachable in the outage test, as the issue asks: the gate closes
/// after 1 s unconfirmed, every reconnect fails for far longer than the 5 s
/// `database.connect_timeout`, and outcomes are held and retried until the database is back.
const DB_OUTAGE: Duration = Duration::from_secs(30);

/// Upper bound on how late a retry may come after its delay: the retry sweep runs once a second
/// (tokio-cron-scheduler looks for due jobs every 500 ms), then the row is claimed (idle poll
/// 50 ms), dispatched and its FAILED outcome was committed up to one flush (50 ms) late.
const SWEEP_SLACK_MS: i64 = 1_600;
/// How much earlier than its delay a retry may arrive (clock reading noise).
const EARLY_MS: i64 = 50;

/// Default soak length in CI; `PAYOUTD_SOAK_SECS` runs it longer.
const SOAK_SECS: u64 = 90;

/// A target table and the idempotency keys of its rows.
#[derive(Debug, Clone, Copy)]
struct Kind {
    table: &'static str,
    prefix: &'static str,
}

const POINT: Kind = Kind { table: "point_targets", prefix: "point" };
const VOUCHER: Kind = Kind { table: "voucher_targets", prefix: "voucher" };

impl Kind {
    fn key(self, campaign: i64, id: i64) -> String {
        format!("{}-{campaign}-{id}", self.prefix)
    }
}

/// id, status, attempts, transaction_id, last_error
type Row = (i64, String, i32, Option<String>, Option<String>);
/// customer_uid, amount, expiry_at, reason (as `TestDb::load_points` takes them)
type PointRow = (String, i64, String, String);
/// customer_uid, voucher_number, reason (as `TestDb::load_vouchers` takes them)
type VoucherRow = (String, String, String);

async fn target_rows(db: &TestDb, kind: Kind, campaign: i64) -> anyhow::Result<Vec<Row>> {
    db.query(&format!(
        "SELECT id, status, attempts, transaction_id, last_error FROM {} \
         WHERE event_id = {campaign} ORDER BY id",
        kind.table
    ))
    .await
}

fn grants_by_key(sim: &MoneySim) -> HashMap<String, String> {
    sim.grants().into_iter().map(|g| (g.idempotency_key, g.transaction_id)).collect()
}

fn requests_by_key(sim: &MoneySim) -> HashMap<String, Vec<RequestRecord>> {
    let mut by_key: HashMap<String, Vec<RequestRecord>> = HashMap::new();
    for r in sim.requests() {
        by_key.entry(r.idempotency_key.clone()).or_default().push(r);
    }
    by_key
}

/// The seed of a randomized test: `PAYOUTD_TEST_SEED` or a fresh one, printed either way so a
/// failing run can be repeated.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("PAYOUTD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: seed {seed} (rerun with PAYOUTD_TEST_SEED={seed})");
    seed
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The invariants at any moment the daemon is not writing (dead, stopped or drained): Money
/// granted no row twice, and every SUCCEEDED row carries the transaction id Money granted under
/// its key. Returns the number of SUCCEEDED rows.
async fn check_no_duplicate_and_no_invented_success(
    db: &TestDb,
    sim: &MoneySim,
    campaigns: &[(Kind, i64)],
) -> anyhow::Result<usize> {
    let ledger = sim.ledger();
    ensure!(ledger.duplicate_grants == 0, "money-sim granted a row twice: {ledger:?}");
    let grants = grants_by_key(sim);
    let mut succeeded = 0;
    for &(kind, campaign) in campaigns {
        for (id, status, _, tx, _) in target_rows(db, kind, campaign).await? {
            if status == "SUCCEEDED" {
                let key = kind.key(campaign, id);
                ensure!(
                    tx.is_some() && tx.as_ref() == grants.get(&key),
                    "row {key} is SUCCEEDED with transaction {tx:?}, but Money granted {:?}",
                    grants.get(&key)
                );
                succeeded += 1;
            }
        }
    }
    Ok(succeeded)
}

/// The end state of a finished test: every row SUCCEEDED or DEAD, no duplicate grant, each
/// SUCCEEDED row with Money's transaction id for its key, exactly as many grants as SUCCEEDED
/// rows (so nothing Money granted is missing from the database), and one unresolved dead letter
/// per DEAD row whose `error_code` starts the row's `last_error`. Returns the rows per campaign.
async fn check_end_state(
    db: &TestDb,
    sim: &MoneySim,
    campaigns: &[(Kind, i64)],
) -> anyhow::Result<Vec<Vec<Row>>> {
    let succeeded = check_no_duplicate_and_no_invented_success(db, sim, campaigns).await?;
    let grants = grants_by_key(sim);
    let requests = requests_by_key(sim);
    let mut all = Vec::new();
    let mut granted_not_succeeded = Vec::new();
    for &(kind, campaign) in campaigns {
        let rows = target_rows(db, kind, campaign).await?;
        let mut dead: BTreeMap<i64, (i32, String)> = BTreeMap::new();
        for (id, status, attempts, _, last_error) in &rows {
            let key = kind.key(campaign, *id);
            if status != "SUCCEEDED" && grants.contains_key(&key) {
                let seen: Vec<Option<u16>> = requests
                    .get(&key)
                    .map(|r| r.iter().map(|r| r.status).collect())
                    .unwrap_or_default();
                granted_not_succeeded.push(format!(
                    "{key}: {status} after {attempts} attempts ({last_error:?}); Money saw {} requests, answered {seen:?}",
                    seen.len()
                ));
            }
            match status.as_str() {
                "SUCCEEDED" => {}
                "DEAD" => {
                    dead.insert(*id, (*attempts, last_error.clone().unwrap_or_default()));
                }
                other => bail!("row {key} is {other}, not SUCCEEDED or DEAD"),
            }
        }
        let letters: Vec<(i64, String, i32)> = db
            .query(&format!(
                "SELECT target_id, error_code, attempts FROM dead_letters \
                 WHERE campaign_id = {campaign} AND resolved_at IS NULL ORDER BY target_id"
            ))
            .await?;
        let letter_ids: Vec<i64> = letters.iter().map(|l| l.0).collect();
        let dead_ids: Vec<i64> = dead.keys().copied().collect();
        ensure!(
            letter_ids == dead_ids,
            "campaign {campaign}: dead letters for rows {letter_ids:?}, DEAD rows {dead_ids:?}"
        );
        for (id, code, attempts) in letters {
            let (row_attempts, last_error) = &dead[&id];
            ensure!(
                last_error.starts_with(&code) && *row_attempts == attempts,
                "row {}: dead letter ({code}, {attempts} attempts) does not match the row ({last_error:?}, {row_attempts} attempts)",
                kind.key(campaign, id)
            );
        }
        all.push(rows);
    }
    ensure!(
        granted_not_succeeded.is_empty() && grants.len() == succeeded,
        "Money granted {} rows but {succeeded} are SUCCEEDED; {} granted rows are not, first: {:#?}",
        grants.len(),
        granted_not_succeeded.len(),
        &granted_not_succeeded[..granted_not_succeeded.len().min(8)]
    );
    Ok(all)
}

/// Fails unless every key in `keys` was requested from Money exactly once.
fn check_each_requested_once(
    sim: &MoneySim,
    keys: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    let log = requests_by_key(sim);
    let mut wrong = Vec::new();
    for key in keys {
        let n = log.get(&key).map_or(0, Vec::len);
        if n != 1 {
            wrong.push((key, n));
        }
    }
    wrong.sort();
    ensure!(
        wrong.is_empty(),
        "{} rows were not requested exactly once (key, requests), first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    Ok(())
}

fn all_keys(kind: Kind, campaign: i64, rows: &[Row]) -> Vec<String> {
    rows.iter().map(|r| kind.key(campaign, r.0)).collect()
}

async fn in_flight(db: &TestDb, kind: Kind, campaign: i64) -> anyhow::Result<i64> {
    Ok(db.counts(kind.table, campaign).await?.get("IN_FLIGHT").copied().unwrap_or(0))
}

/// Rows still IN_FLIGHT under a claim of the daemon process `pid`: `claimed_by` starts with
/// the instance id `<host>-<pid>`, followed by the rest of the claim's name.
async fn claimed_in_flight(
    db: &TestDb,
    kind: Kind,
    campaign: i64,
    pid: u32,
) -> anyhow::Result<i64> {
    let n: Option<i64> = db
        .conn()
        .await?
        .query_first(format!(
            "SELECT COUNT(*) FROM {} WHERE event_id = {campaign} AND status = 'IN_FLIGHT' \
             AND claimed_by REGEXP '-{pid}([^0-9]|$)'",
            kind.table
        ))
        .await?;
    Ok(n.unwrap_or(0))
}

async fn wait_grants(sim: &MoneySim, at_least: u64) -> anyhow::Result<()> {
    eventually(LONG, &format!("{at_least} grants"), || async {
        Ok((sim.ledger().grants_total >= at_least).then_some(()))
    })
    .await
}

async fn wait_completed(db: &TestDb, daemon: &Daemon, campaign: i64) -> anyhow::Result<()> {
    wait_status(db, campaign, "COMPLETED", LONG)
        .await
        .with_context(|| format!("campaign {campaign}; daemon log tail:\n{}", daemon.log_tail(40)))
}

// ---------------------------------------------------------------------------------------------
// 4. Emergency stop

/// How the campaign is taken out of RUNNING.
#[derive(Debug, Clone, Copy)]
enum Halt {
    /// `UPDATE campaigns SET status = 'STOPPED'`, then `UPDATE … 'RUNNING'`.
    StoppedInTheDatabase,
    /// `payoutd campaign pause`, then `payoutd campaign resume`.
    PausedByTheCli,
}

/// Runs a campaign at 500 requests/s with 50 ms Money latency, halts it once a few hundred rows
/// are granted, checks that Money sees no request arriving later than 1 s after the halt and
/// that the database is left with SUCCEEDED rows (Money's transaction ids) and PENDING rows
/// (attempt not counted), then resumes it and checks every row is granted exactly once.
async fn halt_and_resume(halt: Halt, campaign: i64, rows: usize) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { latency_ms: 50, ..sim_config() }).await?;
    db.campaign(campaign, "POINT", "emergency").await?;
    db.load_points(campaign, &point_rows(rows)).await?;
    db.exec(&format!("UPDATE campaigns SET status = 'RUNNING' WHERE id = {campaign}")).await?;
    let mut daemon =
        Daemon::start(&db, &sim.base_url(), &[("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "500")])
            .await?;
    wait_grants(&sim, 300).await?;

    let halted_at = match halt {
        Halt::StoppedInTheDatabase => {
            db.exec(&format!("UPDATE campaigns SET status = 'STOPPED' WHERE id = {campaign}"))
                .await?;
            sim.now_ms()
        }
        Halt::PausedByTheCli => {
            let (ok, _, err) = cli(&db, &["campaign", "pause", &campaign.to_string()]).await?;
            ensure!(ok, "payoutd campaign pause failed: {err}");
            // The change is committed before the command exits: measure from its exit.
            sim.now_ms()
        }
    };
    let want = match halt {
        Halt::StoppedInTheDatabase => "STOPPED",
        Halt::PausedByTheCli => "PAUSED",
    };

    // The run ends once requests in flight have answered and every outcome is committed.
    eventually(Duration::from_secs(15), "the campaign run to end after the halt", || async {
        Ok(daemon.log_text().contains("campaign run ended").then_some(()))
    })
    .await
    .with_context(|| daemon.log_tail(30))?;
    daemon.assert_alive()?;
    assert_eq!(db.status(campaign).await?, want);

    let log = sim.requests();
    let last_arrival = log.iter().map(|r| r.at_ms).max().context("no request at all")?;
    let latency_ms = last_arrival as i64 - halted_at as i64;
    eprintln!(
        "{halt:?}: last request arrived {latency_ms} ms after the halt; {} requests before",
        log.len()
    );
    ensure!(
        latency_ms <= 1_000,
        "a request arrived {latency_ms} ms after the campaign was {want} (at most 1000 ms allowed)"
    );
    ensure!(
        log.iter().all(|r| r.status.is_some()),
        "requests in flight were abandoned instead of finished"
    );

    // Nothing left IN_FLIGHT: SUCCEEDED rows carry Money's ids, the rest are PENDING untouched.
    let granted =
        check_no_duplicate_and_no_invented_success(&db, &sim, &[(POINT, campaign)]).await?;
    assert_eq!(granted as u64, sim.ledger().grants_total, "every answered grant is recorded");
    let state = target_rows(&db, POINT, campaign).await?;
    let mut statuses: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, status, attempts, tx, _) in &state {
        *statuses.entry(status.as_str()).or_default() += 1;
        match status.as_str() {
            "SUCCEEDED" => assert_eq!(*attempts, 1, "row {id}"),
            "PENDING" => {
                assert_eq!(
                    (*attempts, tx),
                    (0, &None),
                    "row {id}: the unsent attempt is not counted"
                )
            }
            other => bail!("row {id} is {other} after the {halt:?}"),
        }
    }
    eprintln!("{halt:?}: rows after the halt {statuses:?}");
    ensure!(statuses.get("PENDING").is_some_and(|&n| n > 0), "the halt came too late to test");

    match halt {
        Halt::StoppedInTheDatabase => {
            db.exec(&format!("UPDATE campaigns SET status = 'RUNNING' WHERE id = {campaign}"))
                .await?;
        }
        Halt::PausedByTheCli => {
            let (ok, _, err) = cli(&db, &["campaign", "resume", &campaign.to_string()]).await?;
            ensure!(ok, "payoutd campaign resume failed: {err}");
        }
    }
    wait_completed(&db, &daemon, campaign).await?;
    let rows_after = check_end_state(&db, &sim, &[(POINT, campaign)]).await?;
    assert_eq!(sim.ledger().grants_total, rows as u64);
    assert_eq!(sim.ledger().replays_total, 0, "rows granted before the halt were not resent");
    check_each_requested_once(&sim, all_keys(POINT, campaign, &rows_after[0]))?;
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_campaign_sends_nothing_new_within_a_second_and_resumes_with_the_rest()
-> anyhow::Result<()> {
    let _timing = exclusive().await;
    halt_and_resume(Halt::StoppedInTheDatabase, 31, 5_000).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_paused_by_the_cli_sends_nothing_new_within_a_second_and_resumes()
-> anyhow::Result<()> {
    let _timing = exclusive().await;
    halt_and_resume(Halt::PausedByTheCli, 32, 2_000).await
}

// ---------------------------------------------------------------------------------------------
// 5. Crash safety

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let _timing = shared().await;
    let mut rng = StdRng::seed_from_u64(seed("kill_9"));
    let db = TestDb::new().await?;
    // 2 % of requests hang past the daemon's timeout; half of those grant first (unknown
    // outcomes that did commit).
    let sim = sim(SimConfig {
        latency_ms: 20,
        latency_jitter_ms: 15,
        timeout_share: 0.02,
        hang_ms: 1_000,
        ..sim_config()
    })
    .await?;
    const ROWS: usize = 6_000;
    db.campaign(41, "POINT", "crashing").await?;
    db.load_points(41, &point_rows(ROWS)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 41").await?;
    let env =
        [("PAYOUTD_MONEY__TIMEOUT", "500ms"), ("PAYOUTD_RETRY__BASE_DELAY", "300ms"), NO_BREAKER];

    let mut recovered_runs = 0;
    for round in 1..=5 {
        let mut daemon = Daemon::start(&db, &sim.base_url(), &env).await?;
        // One kill in four lands while the daemon starts up (migration, discovery, recovery,
        // the first claims); the others while requests are flowing.
        let requests_before = sim.ledger().requests_total;
        let moment = if rng.random_bool(0.25) {
            let after = rng.random_range(0..=600);
            tokio::time::sleep(ms(after)).await;
            format!("{after} ms after start")
        } else {
            eventually(LONG, "the restarted daemon to send", || async {
                Ok((sim.ledger().requests_total > requests_before).then_some(()))
            })
            .await
            .with_context(|| daemon.log_tail(30))?;
            let after = rng.random_range(0..=1_200);
            tokio::time::sleep(ms(after)).await;
            format!("{after} ms into sending")
        };
        let pid = daemon.pid();
        daemon.kill().await?;
        if daemon.log_text().contains("rows left IN_FLIGHT by an earlier run") {
            recovered_runs += 1;
        }
        let in_flight = in_flight(&db, POINT, 41).await?;
        let granted = check_no_duplicate_and_no_invented_success(&db, &sim, &[(POINT, 41)]).await?;
        let ledger = sim.ledger();
        eprintln!(
            "kill {round} (pid {pid:?}) {moment}: {granted} SUCCEEDED, {in_flight} IN_FLIGHT; \
             Money: {} requests, {} grants, {} replays, {} hangs",
            ledger.requests_total, ledger.grants_total, ledger.replays_total, ledger.hangs_total
        );
    }
    let mut daemon = Daemon::start(&db, &sim.base_url(), &env).await?;
    wait_completed(&db, &daemon, 41).await?;
    daemon.assert_alive()?;
    if daemon.log_text().contains("rows left IN_FLIGHT by an earlier run") {
        recovered_runs += 1;
    }
    ensure!(recovered_runs > 0, "no restart found rows to recover: the kills tested nothing");

    let rows = check_end_state(&db, &sim, &[(POINT, 41)]).await?;
    let mut attempts: BTreeMap<(String, i32), usize> = BTreeMap::new();
    for (_, status, n, _, _) in &rows[0] {
        *attempts.entry((status.clone(), *n)).or_default() += 1;
    }
    eprintln!("rows by (status, attempts): {attempts:?}; ledger {:?}", sim.ledger());
    // Kills are not Money failures: they must not use up a row's attempts.
    let requests = requests_by_key(&sim);
    let dead: Vec<String> = rows[0]
        .iter()
        .filter(|r| r.1 == "DEAD")
        .map(|(id, _, attempts, _, last_error)| {
            let key = POINT.key(41, *id);
            let sent = requests.get(&key).map_or(0, Vec::len);
            format!("{key}: DEAD after {attempts} attempts, {sent} requests sent ({last_error:?})")
        })
        .collect();
    ensure!(
        dead.is_empty(),
        "{} rows ended DEAD, first: {:#?}",
        dead.len(),
        &dead[..dead.len().min(5)]
    );
    assert_eq!(sim.ledger().grants_total, ROWS as u64);
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

/// A kill -9 may land while the circuit breaker holds a campaign PAUSED (paused_by BREAKER). The
/// breaker's state lives in the dead process; the campaign must not stay paused for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_the_breaker_paused_resumes_after_a_kill_9_and_restart() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { fail_5xx_share: 1.0, ..sim_config() }).await?;
    db.campaign(42, "POINT", "breaker then crash").await?;
    db.load_points(42, &point_rows(200)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 42").await?;
    let env = [("PAYOUTD_BREAKER__OPEN_FOR", "1s"), ("PAYOUTD_RETRY__BASE_DELAY", "200ms")];
    let mut daemon = Daemon::start(&db, &sim.base_url(), &env).await?;
    eventually(Duration::from_secs(30), "the breaker to pause the campaign", || async {
        let paused: Vec<(String, Option<String>)> =
            db.query("SELECT status, paused_by FROM campaigns WHERE id = 42").await?;
        Ok((paused == vec![("PAUSED".to_owned(), Some("BREAKER".to_owned()))]).then_some(()))
    })
    .await
    .with_context(|| daemon.log_tail(30))?;
    daemon.kill().await?;
    // Money is healthy again by the time the daemon is back.
    sim.set_faults(FaultUpdate { fail_5xx_share: Some(0.0), ..FaultUpdate::default() });
    let requests_before = sim.ledger().requests_total;
    let daemon = Daemon::start(&db, &sim.base_url(), &env).await?;
    let completed = wait_status(&db, 42, "COMPLETED", Duration::from_secs(30)).await;
    if let Err(e) = completed {
        let state: Vec<(String, Option<String>, Option<String>)> = db
            .query("SELECT status, paused_by, status_reason FROM campaigns WHERE id = 42")
            .await?;
        bail!(
            "{e}: campaign {state:?}, rows {:?}, {} requests to Money since the restart; log tail:\n{}",
            db.counts(POINT.table, 42).await?,
            sim.ledger().requests_total - requests_before,
            daemon.log_tail(20)
        );
    }
    let rows = check_end_state(&db, &sim, &[(POINT, 42)]).await?;
    assert!(rows[0].iter().all(|r| r.1 == "SUCCEEDED"));
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// 6. Database faults

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_rides_out_a_database_outage_mid_run() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let proxy = DbProxy::start().await?;
    let url = proxy.url(&db)?;
    let sim = sim(SimConfig { latency_ms: 20, latency_jitter_ms: 10, ..sim_config() }).await?;
    const ROWS: usize = 5_000;
    db.campaign(51, "POINT", "outage").await?;
    db.load_points(51, &point_rows(ROWS)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 51").await?;
    let mut daemon = Daemon::start(
        &db,
        &sim.base_url(),
        &[("PAYOUTD_DATABASE__URL", &url), ("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "1000")],
    )
    .await?;
    wait_grants(&sim, 1_500).await?;

    proxy.cut();
    let cut_at = sim.now_ms();
    eprintln!("cut at {cut_at} ms with {} grants", sim.ledger().grants_total);
    tokio::time::sleep(DB_OUTAGE).await;
    daemon.assert_alive()?;
    let during = sim.requests().iter().filter(|r| r.at_ms > cut_at + 2_000).count();
    proxy.restore();
    let mut per_second: BTreeMap<i64, usize> = BTreeMap::new();
    for r in sim.requests() {
        *per_second.entry((r.at_ms as i64 - cut_at as i64).div_euclid(1000)).or_default() += 1;
    }
    eprintln!("requests per second relative to the cut: {per_second:?}");
    eprintln!(
        "database cut for {DB_OUTAGE:?}: {} reconnects refused, {during} requests sent more than 2 s into the cut",
        proxy.refused_total()
    );

    wait_completed(&db, &daemon, 51).await?;
    daemon.assert_alive()?;
    let rows = check_end_state(&db, &sim, &[(POINT, 51)]).await?;
    assert!(rows[0].iter().all(|r| r.1 == "SUCCEEDED"));
    assert_eq!(sim.ledger().grants_total, ROWS as u64);
    check_each_requested_once(&sim, all_keys(POINT, 51, &rows[0]))?;
    ensure!(proxy.refused_total() > 0, "the daemon never tried the database during the cut");
    ensure!(proxy.accepted_total() > 0, "the daemon never went through the proxy");
    let log = daemon.log_text();
    ensure!(
        log.contains("campaign status unconfirmed")
            || log.contains("cannot commit outcomes yet")
            || log.contains("claiming failed"),
        "the outage was not logged; log tail:\n{}",
        daemon.log_tail(40)
    );
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// 7. Bad rows

async fn insert_voucher(
    c: &mut mysql_async::Conn,
    campaign: i64,
    uid: &str,
    number: &str,
    reason: &str,
) -> anyhow::Result<i64> {
    c.exec_drop(
        "INSERT INTO voucher_targets (event_id, customer_uid, voucher_number, reason) \
         VALUES (?, ?, ?, ?)",
        (campaign, uid, number, reason),
    )
    .await?;
    Ok(i64::try_from(c.last_insert_id().context("no insert id")?)?)
}

async fn insert_point(
    c: &mut mysql_async::Conn,
    campaign: i64,
    uid: &str,
    amount: i64,
    expiry: &str,
    reason: &str,
) -> anyhow::Result<i64> {
    c.exec_drop(
        "INSERT INTO point_targets (event_id, customer_uid, amount, expiry_at, reason) \
         VALUES (?, ?, ?, ?, ?)",
        (campaign, uid, amount, expiry, reason),
    )
    .await?;
    Ok(i64::try_from(c.last_insert_id().context("no insert id")?)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_invalid_row_class_becomes_dead_naming_its_field() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    db.campaign(61, "VOUCHER", "bad vouchers").await?;
    db.campaign(62, "POINT", "bad points").await?;
    let (uid64, uid65) = ("u".repeat(64), "u".repeat(65));
    let (v64, v65) = ("V".repeat(64), "V".repeat(65));
    let (r255, r256) = ("r".repeat(255), "r".repeat(256));
    let good = "20991231235959";

    // (id, expected error code or None for a valid row)
    let mut vouchers: Vec<(i64, Option<&str>)> = Vec::new();
    let mut points: Vec<(i64, Option<&str>)> = Vec::new();
    let mut c = db.conn().await?;
    for i in 0..10 {
        let id = insert_voucher(&mut c, 61, &format!("u-{i}"), &format!("V-{i}"), "sale").await?;
        vouchers.push((id, None));
    }
    for (uid, number, reason, code) in [
        ("", "V-a", "sale", Some("invalid_customer_uid")),
        (uid65.as_str(), "V-b", "sale", Some("invalid_customer_uid")),
        ("u-c", "", "sale", Some("invalid_voucher_number")),
        ("u-d", v65.as_str(), "sale", Some("invalid_voucher_number")),
        ("u-e", "V-e", "", Some("invalid_reason")),
        ("u-f", "V-f", r256.as_str(), Some("invalid_reason")),
        // The longest valid values.
        (uid64.as_str(), v64.as_str(), r255.as_str(), None),
    ] {
        vouchers.push((insert_voucher(&mut c, 61, uid, number, reason).await?, code));
    }
    for i in 10..20 {
        let id = insert_voucher(&mut c, 61, &format!("u-{i}"), &format!("V-{i}"), "sale").await?;
        vouchers.push((id, None));
    }
    for i in 0..10 {
        points.push((
            insert_point(&mut c, 62, &format!("u-{i}"), 100 + i, good, "sale").await?,
            None,
        ));
    }
    for (uid, amount, expiry, reason, code) in [
        ("u-a", 0, good, "sale", Some("invalid_amount")),
        ("u-b", -1, good, "sale", Some("invalid_amount")),
        ("u-c", 5_001, good, "sale", Some("invalid_amount")),
        ("u-d", 10, "2027123123595", "sale", Some("invalid_expiry_at")),
        ("u-e", 10, "20270231000000", "sale", Some("invalid_expiry_at")),
        ("u-f", 10, "20200101000000", "sale", Some("invalid_expiry_at")),
        ("u-g", 10, "2027ab31235959", "sale", Some("invalid_expiry_at")),
        ("", 10, good, "sale", Some("invalid_customer_uid")),
        ("u-h", 10, good, "", Some("invalid_reason")),
        // The per-row maximum itself is allowed.
        ("u-i", 5_000, good, "sale", None),
    ] {
        points.push((insert_point(&mut c, 62, uid, amount, expiry, reason).await?, code));
    }
    for i in 10..20 {
        points.push((
            insert_point(&mut c, 62, &format!("u-{i}"), 100 + i, good, "sale").await?,
            None,
        ));
    }
    drop(c);
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id IN (61, 62)").await?;

    let daemon =
        Daemon::start(&db, &sim.base_url(), &[("PAYOUTD_PAYOUT__MAX_POINT_AMOUNT", "5000")])
            .await?;
    wait_completed(&db, &daemon, 61).await?;
    wait_completed(&db, &daemon, 62).await?;

    let rows = check_end_state(&db, &sim, &[(VOUCHER, 61), (POINT, 62)]).await?;
    let requested = requests_by_key(&sim);
    for ((kind, campaign, expected), rows) in
        [(VOUCHER, 61, &vouchers), (POINT, 62, &points)].into_iter().zip(&rows)
    {
        let by_id: HashMap<i64, &Row> = rows.iter().map(|r| (r.0, r)).collect();
        let letters: HashMap<i64, String> = db
            .query::<(i64, String)>(&format!(
                "SELECT target_id, error_code FROM dead_letters WHERE campaign_id = {campaign}"
            ))
            .await?
            .into_iter()
            .collect();
        for (id, code) in expected {
            let key = kind.key(campaign, *id);
            let (_, status, _, _, last_error) = by_id[id];
            match code {
                None => assert_eq!(status, "SUCCEEDED", "valid row {key}"),
                Some(code) => {
                    assert_eq!(status, "DEAD", "row {key} ({code})");
                    let last_error = last_error.as_deref().unwrap_or_default();
                    assert!(
                        last_error.starts_with(code),
                        "row {key}: last_error {last_error:?}, want {code}"
                    );
                    assert_eq!(letters.get(id).map(String::as_str), Some(*code), "row {key}");
                    assert!(!requested.contains_key(&key), "invalid row {key} reached Money");
                }
            }
        }
    }
    let valid = vouchers.iter().chain(&points).filter(|(_, code)| code.is_none()).count();
    assert_eq!(sim.ledger().grants_total, valid as u64);
    assert_eq!(sim.ledger().requests_total, valid as u64, "only valid rows are sent");
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// 1. Persistent retries

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_row_is_retried_on_schedule_and_dead_after_six_attempts() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { fail_5xx_share: 1.0, ..sim_config() }).await?;
    db.campaign(71, "POINT", "always failing").await?;
    db.load_points(71, &point_rows(5)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 71").await?;
    let daemon = Daemon::start(
        &db,
        &sim.base_url(),
        &[("PAYOUTD_RETRY__BASE_DELAY", "300ms"), ("PAYOUTD_RETRY__JITTER", "0"), NO_BREAKER],
    )
    .await?;
    wait_completed(&db, &daemon, 71).await?;

    let rows = check_end_state(&db, &sim, &[(POINT, 71)]).await?;
    let log = requests_by_key(&sim);
    let delays_ms: [i64; 5] = [300, 600, 1_200, 2_400, 4_800];
    for (id, status, attempts, _, last_error) in &rows[0] {
        let key = POINT.key(71, *id);
        assert_eq!((status.as_str(), *attempts), ("DEAD", 6), "row {key}");
        let last_error = last_error.as_deref().unwrap_or_default();
        assert!(last_error.starts_with("http_503"), "row {key}: {last_error}");
        let requests = log.get(&key).map(Vec::as_slice).unwrap_or_default();
        let arrivals: Vec<i64> = requests.iter().map(|r| r.at_ms as i64).collect();
        assert_eq!(arrivals.len(), 6, "row {key}: requests at {arrivals:?} ms");
        assert!(requests.iter().all(|r| r.status == Some(503)));
        let gaps: Vec<i64> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
        eprintln!("{key}: gaps {gaps:?} ms for delays {delays_ms:?}");
        for (gap, delay) in gaps.iter().zip(delays_ms) {
            assert!(
                (delay - EARLY_MS..=delay + SWEEP_SLACK_MS).contains(gap),
                "row {key}: a retry {gap} ms after the last attempt, the delay is {delay} ms (all gaps {gaps:?})"
            );
        }
    }
    let letters: Vec<(String, i32)> =
        db.query("SELECT error_code, attempts FROM dead_letters WHERE campaign_id = 71").await?;
    assert_eq!(letters, vec![("http_503".to_owned(), 6); 5]);
    assert_eq!(sim.ledger().grants_total, 0);
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_that_failed_twice_is_granted_once_on_its_third_attempt() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { fail_5xx_share: 1.0, ..sim_config() }).await?;
    db.campaign(72, "POINT", "recovering").await?;
    db.load_points(72, &point_rows(5)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 72").await?;
    // A 1 s first delay and 2 s second delay: every row's second attempt (spread by at most
    // one sweep period) comes before any row's third, so "2 failures each" is exact.
    let daemon = Daemon::start(
        &db,
        &sim.base_url(),
        &[("PAYOUTD_RETRY__BASE_DELAY", "1s"), ("PAYOUTD_RETRY__JITTER", "0"), NO_BREAKER],
    )
    .await?;
    let keys: Vec<String> =
        target_rows(&db, POINT, 72).await?.iter().map(|r| POINT.key(72, r.0)).collect();
    eventually(LONG, "two failed attempts of every row", || async {
        let log = requests_by_key(&sim);
        Ok(keys
            .iter()
            .all(|k| {
                log.get(k).is_some_and(|r| r.len() >= 2 && r.iter().all(|r| r.status.is_some()))
            })
            .then_some(()))
    })
    .await?;
    sim.set_faults(FaultUpdate { fail_5xx_share: Some(0.0), ..FaultUpdate::default() });
    wait_completed(&db, &daemon, 72).await?;

    let rows = check_end_state(&db, &sim, &[(POINT, 72)]).await?;
    let log = requests_by_key(&sim);
    for (id, status, attempts, _, _) in &rows[0] {
        let key = POINT.key(72, *id);
        assert_eq!((status.as_str(), *attempts), ("SUCCEEDED", 3), "row {key}");
        let statuses: Vec<Option<u16>> = log[&key].iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![Some(503), Some(503), Some(200)], "row {key}");
    }
    assert_eq!(sim.ledger().grants_total, 5);
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn money_s_retry_after_is_the_floor_of_the_next_attempt() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    // Money admits 5 requests a second and answers 429 with Retry-After: 1 beyond that; the
    // daemon is (mis)configured for 100/s and retries after 100 ms on its own.
    let sim = sim(SimConfig { rate_limit_per_sec: 5, ..sim_config() }).await?;
    db.campaign(73, "POINT", "throttled").await?;
    db.load_points(73, &point_rows(20)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 73").await?;
    let daemon = Daemon::start(
        &db,
        &sim.base_url(),
        &[
            ("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "100"),
            ("PAYOUTD_RETRY__BASE_DELAY", "100ms"),
            ("PAYOUTD_RETRY__JITTER", "0"),
        ],
    )
    .await?;
    wait_completed(&db, &daemon, 73).await?;

    let rows = check_end_state(&db, &sim, &[(POINT, 73)]).await?;
    assert!(rows[0].iter().all(|r| r.1 == "SUCCEEDED"));
    let log = requests_by_key(&sim);
    let mut limited = 0;
    for requests in log.values() {
        for pair in requests.windows(2) {
            if pair[0].status == Some(429) {
                limited += 1;
                let gap = pair[1].at_ms as i64 - pair[0].at_ms as i64;
                assert!(
                    gap >= 1_000 - EARLY_MS,
                    "{}: retried {gap} ms after a 429 with Retry-After: 1",
                    pair[0].idempotency_key
                );
            }
        }
    }
    ensure!(limited > 0, "Money never answered 429: the test tested nothing");
    assert_eq!(sim.ledger().grants_total, 20);
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// Unknown outcomes

#[tokio::test(flavor = "multi_thread")]
async fn a_timed_out_grant_is_replayed_not_repeated() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    // Every request hangs 1.5 s; a fair coin decides whether Money granted before hanging.
    let sim = sim(SimConfig { timeout_share: 1.0, hang_ms: 1_500, ..sim_config() }).await?;
    db.campaign(81, "POINT", "timing out").await?;
    db.load_points(81, &point_rows(20)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 81").await?;
    let daemon = Daemon::start(
        &db,
        &sim.base_url(),
        &[
            ("PAYOUTD_MONEY__TIMEOUT", "300ms"),
            ("PAYOUTD_RETRY__BASE_DELAY", "1s"),
            ("PAYOUTD_RETRY__JITTER", "0"),
            NO_BREAKER,
        ],
    )
    .await?;
    let keys: Vec<String> =
        target_rows(&db, POINT, 81).await?.iter().map(|r| POINT.key(81, r.0)).collect();
    eventually(LONG, "the first attempt of every row", || async {
        let log = requests_by_key(&sim);
        Ok(keys.iter().all(|k| log.contains_key(k)).then_some(()))
    })
    .await?;
    sim.set_faults(FaultUpdate { timeout_share: Some(0.0), ..FaultUpdate::default() });
    wait_completed(&db, &daemon, 81).await?;

    let rows = check_end_state(&db, &sim, &[(POINT, 81)]).await?;
    let log = requests_by_key(&sim);
    let grants: HashMap<String, u64> =
        sim.grants().into_iter().map(|g| (g.idempotency_key, g.at_ms)).collect();
    let mut granted_during_hang = 0;
    for (id, status, attempts, _, _) in &rows[0] {
        let key = POINT.key(81, *id);
        assert_eq!((status.as_str(), *attempts), ("SUCCEEDED", 2), "row {key}");
        let requests = &log[&key];
        assert_eq!(requests.len(), 2, "row {key}: {requests:?}");
        let second = &requests[1];
        assert_eq!(second.status, Some(200), "row {key}");
        if grants[&key] < second.at_ms {
            // Money granted during the hang: the retry must be answered as a replay.
            granted_during_hang += 1;
            assert!(second.replayed, "row {key}: granted during the hang, then granted again");
        } else {
            assert!(!second.replayed, "row {key}");
        }
    }
    let ledger = sim.ledger();
    eprintln!("{granted_during_hang} of 20 rows were granted during their hang; {ledger:?}");
    ensure!(granted_during_hang > 0, "no grant happened during a hang: the test tested nothing");
    assert_eq!(ledger.replays_total, granted_during_hang);
    assert_eq!(ledger.grants_total, 20);
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// 8. Graceful shutdown

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_zero() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { latency_ms: 800, ..sim_config() }).await?;
    const ROWS: usize = 1_500;
    db.campaign(91, "POINT", "shutting down").await?;
    db.load_points(91, &point_rows(ROWS)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 91").await?;
    let daemon = Daemon::start(&db, &sim.base_url(), &[]).await?;
    wait_grants(&sim, 300).await?;

    let log_path = daemon.log.clone();
    let status = daemon.terminate(Duration::from_secs(5)).await?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    ensure!(status.success(), "payoutd exited with {status} after SIGTERM; log:\n{log}");
    let requests = sim.requests();
    let unanswered = requests.iter().filter(|r| r.status.is_none()).count();
    ensure!(unanswered == 0, "{unanswered} requests in flight were abandoned at exit");
    assert_eq!(db.status(91).await?, "RUNNING", "shutdown leaves the campaign RUNNING");
    assert_eq!(in_flight(&db, POINT, 91).await?, 0, "no row left IN_FLIGHT");
    // Every grant Money acknowledged is in the database.
    let granted = check_no_duplicate_and_no_invented_success(&db, &sim, &[(POINT, 91)]).await?;
    assert_eq!(granted as u64, sim.ledger().grants_total, "an acknowledged grant was lost");
    eprintln!("SIGTERM after {} requests: {granted} SUCCEEDED", requests.len());
    ensure!(granted < ROWS, "the campaign finished before SIGTERM: the test tested nothing");

    let daemon = Daemon::start(&db, &sim.base_url(), &[]).await?;
    wait_completed(&db, &daemon, 91).await?;
    let rows = check_end_state(&db, &sim, &[(POINT, 91)]).await?;
    assert_eq!(sim.ledger().grants_total, ROWS as u64);
    check_each_requested_once(&sim, all_keys(POINT, 91, &rows[0]))?;
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// Soak

fn soak_secs() -> u64 {
    std::env::var("PAYOUTD_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(SOAK_SECS)
}

/// The soak's rows: point rows of campaign 101 and voucher rows of campaign 102. Every 97th
/// customer is unknown to Money (404, DEAD `customer_not_found`) and every 331st point row has
/// amount 0 (DEAD `invalid_amount`, never sent).
fn soak_rows(n: usize) -> (Vec<PointRow>, Vec<VoucherRow>) {
    let uid = |i: usize| {
        if i % 97 == 13 { format!("missing-{i:06}") } else { format!("u-{i:06}") }
    };
    let points = (0..n * 2 / 3)
        .map(|i| {
            let amount = if i % 331 == 7 { 0 } else { 100 + (i % 1000) as i64 };
            (uid(i), amount, "20991231235959".to_owned(), "soak".to_owned())
        })
        .collect();
    let vouchers =
        (0..n / 3).map(|i| (uid(i), format!("V-102-{i:06}"), "soak".to_owned())).collect();
    (points, vouchers)
}

/// Does what systemd's `Restart=on-failure` does for the soak (daemon/systemd/payoutd.service):
/// a daemon started while the database was cut exits at once ("cannot reach the database") and
/// is started again. Any other exit is a failure. Returns whether it restarted the daemon.
async fn restart_after_failed_start(
    daemon: &mut Daemon,
    starts: &mut Vec<u64>,
    db: &TestDb,
    sim: &MoneySim,
    env: &[(&str, &str)],
) -> anyhow::Result<bool> {
    let Some(status) = daemon.child.try_wait()? else {
        return Ok(false);
    };
    ensure!(
        !status.success() && daemon.log_text().contains("cannot reach the database"),
        "payoutd exited with {status}; log:\n{}",
        daemon.log_tail(40)
    );
    starts.push(sim.now_ms());
    *daemon = Daemon::start(db, &sim.base_url(), env).await?;
    Ok(true)
}

/// The most requests in any one-second window `[t, t + 1 s)` that starts at a request and
/// contains no process start: the windows in which a single daemon process was sending.
fn max_per_second_within_one_process(sim: &MoneySim, starts: &[u64]) -> (usize, u64) {
    let mut arrivals: Vec<u64> = sim.requests().iter().map(|r| r.at_ms).collect();
    arrivals.sort_unstable();
    let (mut best, mut best_at, mut end) = (0, 0, 0);
    for (i, &t) in arrivals.iter().enumerate() {
        end = end.max(i);
        while end < arrivals.len() && arrivals[end] < t + 1_000 {
            end += 1;
        }
        let restarted = starts.iter().any(|&s| s >= t && s < t + 1_000);
        if !restarted && end - i > best {
            (best, best_at) = (end - i, t);
        }
    }
    (best, best_at)
}

#[tokio::test(flavor = "multi_thread")]
async fn randomized_faults_and_kills_keep_both_invariants() -> anyhow::Result<()> {
    let _timing = shared().await;
    let seed = seed("soak");
    let mut rng = StdRng::seed_from_u64(seed);
    let total = Duration::from_secs(soak_secs());
    // Two thirds of the time faults are injected; then the faults stop and the campaigns finish.
    let fault_phase = total * 2 / 3;
    const RATE: u64 = 150;
    let started = Instant::now();

    let db = TestDb::new().await?;
    let proxy = DbProxy::start().await?;
    let url = proxy.url(&db)?;
    let sim =
        sim(SimConfig { latency_ms: 15, latency_jitter_ms: 10, hang_ms: 1_200, ..sim_config() })
            .await?;
    // About half of the fault phase's capacity: the campaigns are still running when it ends.
    let (points, vouchers) = soak_rows((RATE * fault_phase.as_secs() / 2) as usize);
    db.campaign(101, "POINT", "soak points").await?;
    db.campaign(102, "VOUCHER", "soak vouchers").await?;
    db.load_points(101, &points).await?;
    db.load_vouchers(102, &vouchers).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id IN (101, 102)").await?;
    let campaigns = [(POINT, 101), (VOUCHER, 102)];
    let rate = RATE.to_string();
    // The soak checks the invariants, not the retry budget (it has its own test): with the
    // default 6 attempts a row whose last attempt times out after Money granted it ends DEAD by
    // design, which would blur "nothing lost". A larger budget keeps transient faults from
    // killing rows; only the permanent rejections above end DEAD.
    let env: Vec<(&str, &str)> = vec![
        ("PAYOUTD_DATABASE__URL", &url),
        ("PAYOUTD_DATABASE__CONNECT_TIMEOUT", "2s"),
        ("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", &rate),
        ("PAYOUTD_MONEY__TIMEOUT", "600ms"),
        ("PAYOUTD_RETRY__BASE_DELAY", "250ms"),
        ("PAYOUTD_RETRY__MAX_DELAY", "2s"),
        ("PAYOUTD_RETRY__MAX_RETRIES", "15"),
        ("PAYOUTD_BREAKER__OPEN_FOR", "1s"),
    ];
    eprintln!(
        "soak: {:?} total, faults for {fault_phase:?}, {} point and {} voucher rows",
        total,
        points.len(),
        vouchers.len()
    );

    // When each daemon process started, on money-sim's clock.
    let mut starts = vec![sim.now_ms()];
    let mut daemon = Daemon::start(&db, &sim.base_url(), &env).await?;
    let mut step = 0;
    let mut supervisor_restarts = 0;
    while started.elapsed() < fault_phase {
        step += 1;
        let t = started.elapsed().as_secs_f64();
        let dice = rng.random_range(0..100);
        let action = match dice {
            0..=17 => {
                let share = rng.random_range(0.3..=1.0);
                let hold = rng.random_range(500..=4_000);
                sim.set_faults(FaultUpdate {
                    fail_5xx_share: Some(share),
                    ..FaultUpdate::default()
                });
                tokio::time::sleep(ms(hold)).await;
                sim.set_faults(FaultUpdate { fail_5xx_share: Some(0.0), ..FaultUpdate::default() });
                format!("5xx share {share:.2} for {hold} ms")
            }
            18..=31 => {
                let share = rng.random_range(0.05..=0.4);
                let hold = rng.random_range(1_000..=4_000);
                sim.set_faults(FaultUpdate {
                    timeout_share: Some(share),
                    ..FaultUpdate::default()
                });
                tokio::time::sleep(ms(hold)).await;
                sim.set_faults(FaultUpdate { timeout_share: Some(0.0), ..FaultUpdate::default() });
                format!("timeout share {share:.2} for {hold} ms")
            }
            32..=45 => {
                let mode = [OutageMode::Error503, OutageMode::Hang, OutageMode::Reset]
                    [rng.random_range(0..3)];
                let duration_ms = rng.random_range(500..=3_000);
                sim.set_faults(FaultUpdate {
                    outage: Some(Outage { mode, duration_ms }),
                    ..FaultUpdate::default()
                });
                tokio::time::sleep(ms(duration_ms)).await;
                format!("Money outage {mode:?} for {duration_ms} ms")
            }
            46..=53 => {
                let latency = rng.random_range(0..=120);
                sim.set_faults(FaultUpdate { latency_ms: Some(latency), ..FaultUpdate::default() });
                format!("Money latency {latency} ms")
            }
            54..=65 => {
                daemon.kill().await?;
                check_no_duplicate_and_no_invented_success(&db, &sim, &campaigns).await?;
                let down = rng.random_range(0..=500);
                tokio::time::sleep(ms(down)).await;
                starts.push(sim.now_ms());
                daemon = Daemon::start(&db, &sim.base_url(), &env).await?;
                format!("kill -9, restart after {down} ms")
            }
            66..=73 => {
                // A SIGTERM before the handlers are installed ends the process by the signal's
                // default action; that is not the drain under test.
                eventually(LONG, "payoutd to be ready", || async {
                    Ok(daemon.log_text().contains("payoutd ready").then_some(()))
                })
                .await
                .with_context(|| daemon.log_tail(30))?;
                let pid = daemon.pid().context("no pid")?;
                let status = daemon.terminate(Duration::from_secs(20)).await?;
                ensure!(status.success(), "payoutd exited with {status} after SIGTERM");
                check_no_duplicate_and_no_invented_success(&db, &sim, &campaigns).await?;
                // Rows an earlier kill left IN_FLIGHT wait for their campaign's next run; the
                // process that drained must have left none of its own.
                let mut stuck = 0;
                for (kind, campaign) in campaigns {
                    stuck += claimed_in_flight(&db, kind, campaign, pid).await?;
                }
                ensure!(stuck == 0, "{stuck} rows left IN_FLIGHT by pid {pid} after SIGTERM");
                starts.push(sim.now_ms());
                daemon = Daemon::start(&db, &sim.base_url(), &env).await?;
                "SIGTERM, restart".to_owned()
            }
            74..=85 => {
                let hold = rng.random_range(500..=3_000);
                proxy.cut();
                tokio::time::sleep(ms(hold)).await;
                proxy.restore();
                format!("database cut for {hold} ms")
            }
            _ => {
                let hold = rng.random_range(300..=2_000);
                tokio::time::sleep(ms(hold)).await;
                format!("quiet {hold} ms")
            }
        };
        if restart_after_failed_start(&mut daemon, &mut starts, &db, &sim, &env)
            .await
            .with_context(|| format!("after step {step} ({action})"))?
        {
            supervisor_restarts += 1;
        }
        let ledger = sim.ledger();
        ensure!(ledger.duplicate_grants == 0, "after step {step} ({action}): {ledger:?}");
        eprintln!(
            "soak {t:6.1}s step {step}: {action}; {} grants, {} requests",
            ledger.grants_total, ledger.requests_total
        );
    }

    // Faults off; let both campaigns finish.
    sim.set_faults(FaultUpdate {
        fail_5xx_share: Some(0.0),
        timeout_share: Some(0.0),
        latency_ms: Some(10),
        outage: Some(Outage { mode: OutageMode::Error503, duration_ms: 0 }),
        ..FaultUpdate::default()
    });
    proxy.restore();
    if restart_after_failed_start(&mut daemon, &mut starts, &db, &sim, &env).await? {
        supervisor_restarts += 1;
    }
    let left = total.saturating_sub(started.elapsed()) + Duration::from_secs(60);
    let finished = eventually(left, "both soak campaigns to complete", || async {
        Ok((db.status(101).await? == "COMPLETED" && db.status(102).await? == "COMPLETED")
            .then_some(()))
    })
    .await;
    if let Err(e) = finished {
        let states: Vec<(i64, String, Option<String>, Option<String>)> =
            db.query("SELECT id, status, paused_by, status_reason FROM campaigns").await?;
        bail!(
            "{e}: campaigns {states:?}, points {:?}, vouchers {:?}; log tail:\n{}",
            db.counts(POINT.table, 101).await?,
            db.counts(VOUCHER.table, 102).await?,
            daemon.log_tail(40)
        );
    }
    daemon.assert_alive()?;

    let rows = check_end_state(&db, &sim, &campaigns).await?;
    // Exactly the permanently bad rows are DEAD, with the right code, and the invalid ones were
    // never sent.
    let requested: HashSet<String> =
        sim.requests().into_iter().map(|r| r.idempotency_key).collect();
    let mut dead_by_code: BTreeMap<String, usize> = BTreeMap::new();
    for (&(kind, campaign), rows) in campaigns.iter().zip(&rows) {
        let uids: HashMap<i64, String> = db
            .query::<(i64, String)>(&format!(
                "SELECT id, customer_uid FROM {} WHERE event_id = {campaign}",
                kind.table
            ))
            .await?
            .into_iter()
            .collect();
        let amounts: HashMap<i64, i64> = if kind.table == POINT.table {
            db.query::<(i64, i64)>(&format!(
                "SELECT id, amount FROM point_targets WHERE event_id = {campaign}"
            ))
            .await?
            .into_iter()
            .collect()
        } else {
            HashMap::new()
        };
        for (id, status, _, _, last_error) in rows {
            let key = kind.key(campaign, *id);
            let last_error = last_error.as_deref().unwrap_or_default();
            // Validation comes first: an invalid row is never sent, whoever its customer.
            let expected = if amounts.get(id) == Some(&0) {
                Some("invalid_amount")
            } else if uids[id].starts_with("missing-") {
                Some("customer_not_found")
            } else {
                None
            };
            match expected {
                None => ensure!(status == "SUCCEEDED", "row {key} is {status}: {last_error}"),
                Some(code) => {
                    ensure!(
                        status == "DEAD" && last_error.starts_with(code),
                        "row {key} is {status} ({last_error}), expected DEAD {code}"
                    );
                    *dead_by_code.entry(code.to_owned()).or_default() += 1;
                    if code.starts_with("invalid_") {
                        ensure!(!requested.contains(&key), "invalid row {key} reached Money");
                    }
                }
            }
        }
    }
    // For information only: measured at money-sim under the load of parallel tests, transit
    // jitter moves a few requests between windows (the rate test measures it exclusively).
    let (peak, peak_at) = max_per_second_within_one_process(&sim, &starts);
    let ledger = sim.ledger();
    eprintln!(
        "soak done in {:.1}s after {step} steps ({supervisor_restarts} restarts after a failed start): dead {dead_by_code:?}; peak {peak}/s in one process (second from {peak_at} ms, limit {RATE}/s); {ledger:?}",
        started.elapsed().as_secs_f64()
    );
    daemon.terminate(Duration::from_secs(20)).await?;
    sim.shutdown().await;
    db.drop_db().await
}
