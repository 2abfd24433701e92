//! Issue 2/5 item 3: the circuit breaker, and the 401 configuration fault.

use std::time::Duration;

use payout_tests::money_sim::{FaultUpdate, SimConfig};

use crate::support::*;

const LONG: Duration = Duration::from_secs(90);

async fn events(db: &TestDb, campaign: i64, event: &str) -> anyhow::Result<i64> {
    let n: Vec<i64> = db
        .query(&format!(
            "SELECT COUNT(*) FROM campaign_events WHERE campaign_id = {campaign} AND event = '{event}'"
        ))
        .await?;
    Ok(n.first().copied().unwrap_or(0))
}

async fn paused_by(db: &TestDb, campaign: i64) -> anyhow::Result<Option<String>> {
    let v: Vec<Option<String>> =
        db.query(&format!("SELECT paused_by FROM campaigns WHERE id = {campaign}")).await?;
    Ok(v.into_iter().next().flatten())
}

fn breaker_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("PAYOUTD_BREAKER__OPEN_FOR", "2s"),
        ("PAYOUTD_MONEY__MAX_IN_FLIGHT", "4"),
        ("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "100"),
        ("PAYOUTD_RETRY__BASE_DELAY", "100ms"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_breaker_opens_after_ten_failures_pauses_probes_once_and_resumes() -> anyhow::Result<()>
{
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { fail_5xx_share: 1.0, ..sim_config() }).await?;
    db.campaign(43, "POINT", "outage").await?;
    db.load_points(43, &point_rows(300)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let daemon = Daemon::start(&db, &sim.base_url(), &breaker_env()).await?;

    wait_status(&db, 43, "PAUSED", LONG).await?;
    assert_eq!(paused_by(&db, 43).await?.as_deref(), Some("BREAKER"));
    assert_eq!(events(&db, 43, "BREAKER_OPENED").await?, 1);
    let reason: Vec<Option<String>> =
        db.query("SELECT status_reason FROM campaigns WHERE id = 43").await?;
    let reason = reason.into_iter().next().flatten().unwrap_or_default();
    assert!(reason.contains("circuit breaker opened after 10 consecutive failures"), "{reason}");
    // Ten failures opened it; the few already in flight (at most 4) finished.
    let at_open = sim.ledger().requests_total;
    assert!((10..=14).contains(&at_open), "{at_open} requests before the breaker opened");

    // The first probe fails (Money still down): exactly one request, then open again.
    eventually(LONG, "a failed probe", || async {
        Ok((events(&db, 43, "BREAKER_PROBE_FAILED").await? >= 1).then_some(()))
    })
    .await?;
    assert_eq!(sim.ledger().requests_total, at_open + 1, "exactly one probe per half-open period");
    assert_eq!(db.status(43).await?, "PAUSED");

    // Money recovers: the next probe succeeds, the breaker closes and the campaign resumes by itself.
    sim.set_faults(FaultUpdate { fail_5xx_share: Some(0.0), ..FaultUpdate::default() });
    wait_status(&db, 43, "COMPLETED", LONG).await?;
    assert_eq!(events(&db, 43, "BREAKER_CLOSED").await?, 1);
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 300);
    assert_eq!(ledger.duplicate_grants, 0);
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_paused_campaign_does_not_resume_when_the_breaker_closes() -> anyhow::Result<()>
{
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { fail_5xx_share: 1.0, ..sim_config() }).await?;
    db.campaign(1, "POINT", "paused by the operator").await?;
    db.campaign(2, "VOUCHER", "next in line").await?;
    db.load_points(1, &point_rows(200)).await?;
    db.load_vouchers(2, &voucher_rows(2, 200)).await?;
    let (ok, _, err) = cli(&db, &["campaign", "start", "1"]).await?;
    assert!(ok, "{err}");
    let daemon = Daemon::start(&db, &sim.base_url(), &breaker_env()).await?;
    wait_status(&db, 1, "PAUSED", LONG).await?;
    assert_eq!(paused_by(&db, 1).await?.as_deref(), Some("BREAKER"));
    // The operator takes over the pause, and starts another campaign.
    let (ok, _, err) = cli(&db, &["campaign", "pause", "1"]).await?;
    assert!(ok, "{err}");
    assert_eq!(paused_by(&db, 1).await?.as_deref(), Some("OPERATOR"));
    let (ok, _, err) = cli(&db, &["campaign", "start", "2"]).await?;
    assert!(ok, "{err}");
    sim.set_faults(FaultUpdate { fail_5xx_share: Some(0.0), ..FaultUpdate::default() });

    // The probe uses campaign 2's rows; the breaker closes; campaign 2 completes.
    wait_status(&db, 2, "COMPLETED", LONG).await?;
    assert_eq!(db.status(1).await?, "PAUSED", "an operator's pause is never lifted by the daemon");
    assert_eq!(paused_by(&db, 1).await?.as_deref(), Some("OPERATOR"));
    let pending: Vec<i64> =
        db.query("SELECT COUNT(*) FROM point_targets WHERE event_id = 1 AND status IN ('PENDING', 'FAILED')").await?;
    assert!(pending[0] > 150, "campaign 1 keeps its unpaid rows: {pending:?}");
    assert!(sim.grants().iter().all(|g| g.campaign_id == 2));
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_pauses_the_campaign_with_a_clear_reason_and_sends_nothing_more() -> anyhow::Result<()>
{
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { api_key: "the-right-key".into(), ..SimConfig::default() }).await?;
    db.campaign(43, "POINT", "misconfigured").await?;
    db.load_points(43, &point_rows(500)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let daemon =
        Daemon::start(&db, &sim.base_url(), &[("PAYOUTD_MONEY__MAX_IN_FLIGHT", "8")]).await?;
    wait_status(&db, 43, "PAUSED", LONG).await?;
    let reason: Vec<(Option<String>, Option<String>)> =
        db.query("SELECT paused_by, status_reason FROM campaigns WHERE id = 43").await?;
    let (by, reason) = reason.into_iter().next().unwrap_or_default();
    assert_eq!(by.as_deref(), Some("DAEMON"));
    assert!(reason.unwrap_or_default().contains("HTTP 401"));
    let sent = sim.ledger().requests_total;
    assert!(sent <= 8 + 2, "sending stopped at once: {sent} requests");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sim.ledger().requests_total, sent, "nothing more is sent");
    // No row was attempted as far as Money is concerned: all PENDING, no attempt counted.
    assert_eq!(db.counts("point_targets", 43).await?.get("PENDING"), Some(&500));
    let attempts: Vec<i64> = db
        .query("SELECT CAST(SUM(attempts) AS SIGNED) FROM point_targets WHERE event_id = 43")
        .await?;
    assert_eq!(attempts, vec![0]);
    let log = daemon.log_text();
    assert!(!log.contains(SIM_KEY) && !log.contains("the-right-key"), "keys stay out of logs");
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}
