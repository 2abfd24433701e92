//! Issue 1/5: a whole campaign is paid end to end, once per row, within the rate limit, first
//! come first served, and only while RUNNING.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use payout_tests::money_sim::{GrantRecord, SimConfig};

use crate::support::*;

/// id, status, attempts, transaction_id, last_error
type FreshRow = (i64, String, i32, Option<String>, Option<String>);

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn vouchers_and_points_with_shared_customers_are_each_granted_exactly_once()
-> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    db.campaign(42, "VOUCHER", "winter vouchers").await?;
    db.campaign(43, "POINT", "winter points").await?;
    // The same customers u-000000.. appear in both campaigns.
    db.load_vouchers(42, &voucher_rows(42, 10_000)).await?;
    db.load_points(43, &point_rows(10_000)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id IN (42, 43)").await?;

    let mut daemon =
        Daemon::start(&db, &sim.base_url(), &[("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "5000")])
            .await?;
    wait_status(&db, 42, "COMPLETED", LONG).await?;
    wait_status(&db, 43, "COMPLETED", LONG).await?;
    daemon.assert_alive()?;

    assert_eq!(
        db.counts("voucher_targets", 42).await?,
        BTreeMap::from([("SUCCEEDED".to_owned(), 10_000)])
    );
    assert_eq!(
        db.counts("point_targets", 43).await?,
        BTreeMap::from([("SUCCEEDED".to_owned(), 10_000)])
    );

    // Every row's transaction id is the one Money granted under the row's key, exactly once.
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 20_000);
    assert_eq!(ledger.duplicate_grants, 0);
    assert_eq!(ledger.rate_limited_total, 0);
    let grants: HashMap<String, GrantRecord> =
        sim.grants().into_iter().map(|g| (g.idempotency_key.clone(), g)).collect();
    assert_eq!(grants.len(), 20_000);
    // Each request carried its own row's columns (the claim reads them as it locks the row).
    for (table, prefix, event, field) in [
        ("voucher_targets", "voucher", 42, "voucher_number"),
        ("point_targets", "point", 43, "CAST(amount AS CHAR)"),
    ] {
        let rows: Vec<(i64, Option<String>, i32, String, String, String)> = db
            .query(&format!(
                "SELECT id, transaction_id, attempts, customer_uid, {field}, reason \
                 FROM {table} WHERE event_id = {event}"
            ))
            .await?;
        for (id, tx, attempts, customer_uid, value, reason) in rows {
            let key = format!("{prefix}-{event}-{id}");
            let grant = grants.get(&key);
            assert_eq!(tx.as_ref(), grant.map(|g| &g.transaction_id), "row {key}");
            assert_eq!(attempts, 1, "row {key}");
            let body = grant.map(|g| &g.body);
            let text = |name: &str| {
                body.and_then(|b| b.get(name))
                    .map(|v| v.as_str().map_or(v.to_string(), str::to_owned))
            };
            assert_eq!(text("customer_uid"), Some(customer_uid), "row {key}");
            assert_eq!(text("reason"), Some(reason), "row {key}");
            let name = if prefix == "voucher" { "voucher_number" } else { "amount" };
            assert_eq!(text(name), Some(value), "row {key}");
        }
    }
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn running_campaigns_are_served_first_come_first_served() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    // The later campaign has the smaller id: order must follow RUNNING time, not id.
    db.campaign(7, "POINT", "second").await?;
    db.campaign(9, "VOUCHER", "first").await?;
    db.load_points(7, &point_rows(1_500)).await?;
    db.load_vouchers(9, &voucher_rows(9, 1_500)).await?;
    let (ok, _, err) = cli(&db, &["campaign", "start", "9"]).await?;
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The second is started directly in the database, as operators may.
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 7").await?;

    let daemon =
        Daemon::start(&db, &sim.base_url(), &[("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "1000")])
            .await?;
    wait_status(&db, 7, "COMPLETED", LONG).await?;
    wait_status(&db, 9, "COMPLETED", LONG).await?;

    let grants = sim.grants();
    let last_first = grants.iter().filter(|g| g.campaign_id == 9).map(|g| g.at_ms).max();
    let first_second = grants.iter().filter(|g| g.campaign_id == 7).map(|g| g.at_ms).min();
    let (Some(last_first), Some(first_second)) = (last_first, first_second) else {
        anyhow::bail!("both campaigns must have grants");
    };
    assert!(
        last_first <= first_second,
        "campaign 9 (RUNNING first) must be served before campaign 7: last grant of 9 at {last_first} ms, first of 7 at {first_second} ms"
    );
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_and_paused_campaigns_receive_no_request() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    db.campaign(1, "VOUCHER", "ready").await?;
    db.campaign(2, "POINT", "paused").await?;
    db.campaign(3, "POINT", "running").await?;
    db.load_vouchers(1, &voucher_rows(1, 300)).await?;
    db.load_points(2, &point_rows(300)).await?;
    db.load_points(3, &point_rows(300)).await?;
    db.exec("UPDATE campaigns SET status = 'PAUSED' WHERE id = 2").await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 3").await?;

    let daemon = Daemon::start(&db, &sim.base_url(), &[]).await?;
    wait_status(&db, 3, "COMPLETED", LONG).await?;
    // Give the daemon time to (wrongly) move on to the others.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let ledger = sim.ledger();
    assert_eq!(ledger.requests_total, 300, "only the RUNNING campaign's rows are requested");
    assert!(sim.grants().iter().all(|g| g.campaign_id == 3));
    assert_eq!(
        db.counts("voucher_targets", 1).await?,
        BTreeMap::from([("PENDING".to_owned(), 300)])
    );
    assert_eq!(db.counts("point_targets", 2).await?, BTreeMap::from([("PENDING".to_owned(), 300)]));
    assert_eq!(db.status(1).await?, "READY");
    assert_eq!(db.status(2).await?, "PAUSED");
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

/// Pays `rows` point rows through a daemon limited to 200/s (Money enforcing the same limit, so
/// any excess shows as a 429) with `env` added, and checks every second at Money carried at
/// most `most` and at least `most - 10` requests, that the whole campaign ran at that pace, and
/// nothing was refused. Returns the daemon's log.
async fn paced_at_200(rows: usize, most: usize, env: &[(&str, &str)]) -> anyhow::Result<String> {
    let _timing = exclusive().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig {
        rate_limit_per_sec: 200,
        latency_ms: 5,
        latency_jitter_ms: 3,
        ..sim_config()
    })
    .await?;
    db.campaign(5, "POINT", "paced").await?;
    db.load_points(5, &point_rows(rows)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 5").await?;
    // `money.rate_slack` is the time kept free in every window for uneven delay between the
    // daemon and Money. On a shared 2-core CI machine the test process, the daemon and MariaDB
    // stall each other now and then by 10-20 ms, more than the 4 ms default is made for (a
    // quiet datacentre link): these tests give it 30 ms (3 % of throughput), so that what they
    // check is the limiter, not the machine's scheduler.
    let mut vars =
        vec![("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "200"), ("PAYOUTD_MONEY__RATE_SLACK", "30ms")];
    vars.extend_from_slice(env);
    let daemon = Daemon::start(&db, &sim.base_url(), &vars).await?;
    wait_status(&db, 5, "COMPLETED", LONG).await?;

    let ledger = sim.ledger();
    assert_eq!(ledger.rate_limited_total, 0, "{ledger:?}");
    assert_eq!(ledger.grants_total, rows as u64);
    assert!(ledger.max_requests_in_any_second <= most as u64, "{ledger:?}");
    // The limit is used, not just respected.
    assert!(ledger.max_requests_in_any_second >= most as u64 - 10, "{ledger:?}");
    let (Some(first), Some(last)) = (ledger.first_grant_ms, ledger.last_grant_ms) else {
        anyhow::bail!("no grants");
    };
    let rate = (rows - 1) as f64 / ((last - first) as f64 / 1000.0);
    let most = most as f64;
    assert!((most - 10.0..=most + 0.5).contains(&rate), "achieved {rate:.1}/s");
    let log = daemon.log_text();
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await?;
    Ok(log)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_limit_of_200_per_second_no_second_carries_more_than_200() -> anyhow::Result<()> {
    paced_at_200(1_400, 200, &[]).await.map(drop)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_reserve_keeps_places_of_every_second_free() -> anyhow::Result<()> {
    // 100 places per 1,000 of 200/s: 20 places of every window stay free, 180 are used.
    let log = paced_at_200(700, 180, &[("PAYOUTD_MONEY__RATE_RESERVE", "100")]).await?;
    let started = log.lines().find(|l| l.contains("payoutd starting"));
    assert!(started.is_some_and(|l| l.contains("sends_per_window=180")), "{started:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_partition_plan_follows_the_rule_and_is_stored() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    // Thresholds scaled down (configurable), rows at each boundary.
    for (id, rows) in [(1, 9), (2, 10), (3, 19), (4, 20)] {
        db.campaign(id, "POINT", "sized").await?;
        db.load_points(id, &point_rows(rows)).await?;
    }
    db.exec("UPDATE campaigns SET status = 'RUNNING'").await?;
    let daemon = Daemon::start(
        &db,
        &sim.base_url(),
        &[
            ("PAYOUTD_EXECUTOR__PARTITIONS_MEDIUM_FROM", "10"),
            ("PAYOUTD_EXECUTOR__PARTITIONS_LARGE_FROM", "20"),
        ],
    )
    .await?;
    for id in 1..=4 {
        wait_status(&db, id, "COMPLETED", LONG).await?;
    }
    let plans: Vec<(i64, i64, i64)> =
        db.query("SELECT id, partition_count, planned_rows FROM campaigns ORDER BY id").await?;
    assert_eq!(plans, vec![(1, 4, 9), (2, 6, 10), (3, 6, 19), (4, 8, 20)]);
    let slices: Vec<(i64, i64, i64, i64)> = db
        .query("SELECT campaign_id, COUNT(*), MIN(bucket_lo), MAX(bucket_hi) FROM campaign_partitions GROUP BY campaign_id")
        .await?;
    assert_eq!(slices, vec![(1, 4, 0, 840), (2, 6, 0, 840), (3, 6, 0, 840), (4, 8, 0, 840)]);
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_loader_inserts_of_the_contract_work_unchanged() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    // Verbatim from contract.md ("..." continuation rows dropped).
    db.exec("INSERT INTO campaigns (id, kind, name) VALUES (42, 'VOUCHER', 'winter vouchers');")
        .await?;
    db.exec("INSERT INTO voucher_targets (event_id, customer_uid, voucher_number, reason) VALUES (42, 'u-1', 'V-1', 'winter sale');").await?;
    db.exec("INSERT INTO campaigns (id, kind, name) VALUES (43, 'POINT', 'winter points');")
        .await?;
    db.exec("INSERT INTO point_targets (event_id, customer_uid, amount, expiry_at, reason) VALUES (43, 'u-1', 1500, '20271231235959', 'winter sale');").await?;
    let campaigns: Vec<(i64, String, String, String)> =
        db.query("SELECT id, kind, name, status FROM campaigns ORDER BY id").await?;
    assert_eq!(
        campaigns,
        vec![
            (42, "VOUCHER".into(), "winter vouchers".into(), "READY".into()),
            (43, "POINT".into(), "winter points".into(), "READY".into())
        ]
    );
    for table in ["voucher_targets", "point_targets"] {
        let row: Vec<FreshRow> = db
            .query(&format!("SELECT id, status, attempts, transaction_id, last_error FROM {table}"))
            .await?;
        assert_eq!(row, vec![(1, "PENDING".into(), 0, None, None)], "{table}");
    }
    db.drop_db().await
}
