//! The command line and configuration as operators use them.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn operator_commands_follow_the_state_machine_and_are_audited() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    db.campaign(42, "VOUCHER", "winter vouchers").await?;

    let (ok, out, _) = cli(&db, &["campaign", "start", "42"]).await?;
    assert!(ok);
    assert_eq!(out.trim(), "campaign 42: READY -> RUNNING");
    let (ok, _, err) = cli(&db, &["campaign", "start", "42"]).await?;
    assert!(!ok);
    assert_eq!(err.trim(), "payoutd: error: campaign 42: cannot start a campaign that is RUNNING");
    for (cmd, want) in
        [("pause", "PAUSED"), ("resume", "RUNNING"), ("stop", "STOPPED"), ("resume", "RUNNING")]
    {
        let (ok, _, err) = cli(&db, &["campaign", cmd, "42"]).await?;
        assert!(ok, "{cmd}: {err}");
        assert_eq!(db.status(42).await?, want);
    }
    db.exec("UPDATE campaigns SET status = 'COMPLETED' WHERE id = 42").await?;
    let (ok, _, err) = cli(&db, &["campaign", "start", "42"]).await?;
    assert!(!ok);
    assert!(err.contains("cannot start a campaign that is COMPLETED"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);
    let (ok, _, err) = cli(&db, &["campaign", "pause", "99"]).await?;
    assert!(!ok);
    assert_eq!(err.trim(), "payoutd: error: campaign 99 does not exist");

    let audit: Vec<(String, String, String)> = db
        .query("SELECT from_status, to_status, actor FROM campaign_events WHERE campaign_id = 42 ORDER BY id")
        .await?;
    assert_eq!(audit.len(), 5);
    assert_eq!((audit[0].0.as_str(), audit[0].1.as_str()), ("READY", "RUNNING"));
    assert!(
        audit.iter().all(|(_, _, actor)| actor.starts_with("cli:") && actor.len() > 4),
        "{audit:?}"
    );
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_counts_failure_rate_and_json() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    db.campaign(43, "POINT", "winter points").await?;
    // 100 rows: 4 unknown customers (404: DEAD) and 2 invalid rows (DEAD without a request).
    let mut rows = point_rows(100);
    for (i, row) in rows.iter_mut().enumerate().take(4) {
        row.0 = format!("missing-{i}");
    }
    rows[10].1 = 0;
    rows[11].2 = "2027023100000".into();
    db.load_points(43, &rows).await?;

    let (ok, out, err) = cli(&db, &["campaign", "status", "43", "--json"]).await?;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!((v["status"].as_str(), v["rows"].as_u64()), (Some("READY"), Some(100)));
    assert_eq!(v["counts"]["PENDING"], 100);

    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let daemon = Daemon::start(&db, &sim.base_url(), &[]).await?;
    wait_status(&db, 43, "COMPLETED", Duration::from_secs(60)).await?;
    let (ok, out, err) = cli(&db, &["campaign", "status", "43", "--json"]).await?;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["id"], 43);
    assert_eq!(v["status"], "COMPLETED");
    assert_eq!(v["rows"], 100);
    assert_eq!(v["counts"]["SUCCEEDED"], 94);
    assert_eq!(v["counts"]["DEAD"], 6);
    assert_eq!(v["counts"]["PENDING"], 0);
    assert_eq!(v["failure_rate_pct"], 6.0);
    assert_eq!(v["rows_left"], 0);
    // The counters agree with the rows themselves.
    assert_eq!(
        db.counts("point_targets", 43).await?,
        std::collections::BTreeMap::from([("DEAD".to_owned(), 6), ("SUCCEEDED".to_owned(), 94)])
    );
    let view: Vec<(i64, i64, i64, i64)> = db
        .query("SELECT CAST(total_rows AS SIGNED), CAST(succeeded AS SIGNED), CAST(dead AS SIGNED), CAST(pending AS SIGNED) FROM campaign_progress WHERE campaign_id = 43")
        .await?;
    assert_eq!(view, vec![(100, 94, 6, 0)]);

    let (ok, out, _) = cli(&db, &["campaign", "status", "43"]).await?;
    assert!(ok);
    assert!(out.contains("failure rate 6.00 %") && out.contains("SUCCEEDED 94"), "{out}");
    let (ok, out, _) = cli(&db, &["campaign", "status", "43", "--watch"]).await?;
    assert!(ok);
    assert!(out.contains("100.0%") && out.contains("COMPLETED"), "{out}");
    let (ok, out, _) = cli(&db, &["campaign", "list"]).await?;
    assert!(ok);
    assert!(out.contains("winter points") && out.contains("COMPLETED"), "{out}");
    let (ok, _, err) = cli(&db, &["campaign", "status", "44"]).await?;
    assert!(!ok);
    assert_eq!(err.trim(), "payoutd: error: campaign 44 does not exist");
    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_bad_key_stops_start_up_naming_it() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    // No Money configured: `run` needs money.base_url.
    let out = payoutd(&db, None).arg("run").output().await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("money.base_url"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = payoutd(&db, Some("http://127.0.0.1:9"))
        .arg("run")
        .env("PAYOUTD_MONEY__TIMEOUT", "3 parsecs")
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("money.timeout"), "{err}");

    let out = payoutd(&db, Some("http://127.0.0.1:9"))
        .arg("run")
        .env("PAYOUTD_MONEY__RATE_LIMT_PER_SEC", "10")
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("money.rate_limt_per_sec"), "{err}");

    // An unreachable database is named, with its password masked, on one line.
    let out = payoutd(&db, None)
        .args(["campaign", "list"])
        .env("PAYOUTD_DATABASE__URL", "mysql://payout:hunter2@127.0.0.1:9/nowhere")
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "cannot reach the database (database.url = mysql://payout:***@127.0.0.1:9/nowhere)"
        ),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = payoutd(&db, None)
        .args(["campaign", "list"])
        .env_remove("PAYOUTD_DATABASE__URL")
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.url"));
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_exits_cleanly_on_sigterm_and_never_logs_the_api_key() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    db.campaign(43, "POINT", "p").await?;
    db.load_points(43, &point_rows(200)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let daemon = Daemon::start(&db, &sim.base_url(), &[("PAYOUTD_LOG__FILTER", "debug")]).await?;
    wait_status(&db, 43, "COMPLETED", Duration::from_secs(60)).await?;
    let log = daemon.log_text();
    let status = daemon.terminate(Duration::from_secs(15)).await?;
    assert!(status.success(), "{status}");
    assert!(!log.contains(SIM_KEY), "the API key leaked into the log");
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_throughput_line_per_running_campaign_carries_tps_counts_and_failure_rate()
-> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    db.campaign(43, "POINT", "logged").await?;
    let mut rows = point_rows(800);
    rows[0].0 = "missing-0".into();
    db.load_points(43, &rows).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let daemon = Daemon::start(
        &db,
        &sim.base_url(),
        &[
            ("PAYOUTD_LOG__FORMAT", "json"),
            ("PAYOUTD_LOG__THROUGHPUT_INTERVAL", "1s"),
            ("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "200"),
        ],
    )
    .await?;
    wait_status(&db, 43, "COMPLETED", Duration::from_secs(60)).await?;
    let log = daemon.log_text();
    daemon.terminate(Duration::from_secs(15)).await?;

    // Every line is JSON; the throughput lines name the campaign and carry the figures.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let throughput: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["message"] == "throughput" && l["campaign.id"] == 43).collect();
    assert!(throughput.len() >= 2, "one line a second while the campaign runs: {throughput:?}");
    for line in &throughput {
        for field in ["tps", "succeeded", "dead", "pending", "failed", "failure_rate_pct", "rows"] {
            assert!(!line[field].is_null(), "{field} missing in {line}");
        }
        assert_eq!(line["rows"], 800);
    }
    // While paying at 200/s, some interval shows a rate near it.
    let best = throughput
        .iter()
        .filter_map(|l| l["tps"].as_str().and_then(|t| t.parse::<f64>().ok()))
        .fold(0.0, f64::max);
    assert!((120.0..=210.0).contains(&best), "best interval {best} rows/s");
    sim.shutdown().await;
    db.drop_db().await
}
