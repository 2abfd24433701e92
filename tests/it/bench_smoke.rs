//! Issue 4/5: the benchmark command cannot rot. A small run of `payout-bench`'s library entry
//! point (3,000 rows at 1,000/s against the debug `payoutd`) must finish and write a sane JSON.

use std::time::Duration;

use payout_tests::bench::{self, BenchConfig, Kind};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_small_benchmark_run_writes_sane_figures() -> anyhow::Result<()> {
    let _timing = exclusive().await;
    let dir = std::env::temp_dir().join(format!("payout-bench-smoke-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("smoke.json");
    let cfg = BenchConfig {
        rows: 3000,
        kind: Kind::Point,
        limit: 1000,
        latency_ms: 20,
        jitter_ms: 10,
        db_url: Some(server_url()),
        payoutd: Some(payoutd_path()?),
        out: Some(out.clone()),
        timeout_secs: Some(60),
        quiet: true,
        // CI's shared cores, loaded by the other tests and running the debug build, stall the
        // processes by 10-30 ms now and then (`payout-bench --transit` measures 7-20 ms on a
        // quiet machine), more than the 4 ms default slack is made for; one CI run saw 1,003
        // arrivals in a second with 30 ms. This run checks the command, not the slack.
        daemon_env: vec![("PAYOUTD_MONEY__RATE_SLACK".to_owned(), "60ms".to_owned())],
        // The daemon logs each request's admission and departure; the bench pairs admissions
        // with money-sim's arrivals.
        transit: true,
        ..BenchConfig::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(90), bench::run(&cfg)).await??;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let summary = bench::summary(&report);
    let num = |key: &str| json[key].as_f64().unwrap_or(f64::NAN);

    assert_eq!(json["rows"], 3000, "{summary}");
    assert_eq!(json["final_counts"]["SUCCEEDED"], 3000, "{summary}");
    assert_eq!(json["grants_total"], 3000, "{summary}");
    assert_eq!(json["duplicate_grants"], 0, "{summary}");
    assert!(num("max_requests_in_any_second") <= 1000.0, "{summary}");
    assert!(num("max_requests_in_any_second") > 0.0, "{summary}");
    assert!(num("seconds") > 0.0, "{summary}");
    // 3,000 rows at 1,000/s cannot take less than ~3 s.
    assert!(num("seconds") >= 2.9, "{summary}");
    // The monotonic time is read at the 100 ms poll that saw COMPLETED.
    assert!(num("seconds_monotonic") >= 2.9, "{summary}");
    assert!((num("seconds_monotonic") - num("seconds")).abs() < 1.0, "{summary}");
    assert!(num("rows_per_sec") > 0.0 && num("rows_per_sec") <= 1000.0, "{summary}");
    assert!(num("achieved_rate_over_limit") > 0.0, "{summary}");
    assert!(num("load_secs") > 0.0, "{summary}");
    assert!(num("first_grant_after_running_ms") >= 0.0, "{summary}");
    assert!(num("completed_after_last_grant_ms") >= 0.0, "{summary}");
    assert!(num("daemon_peak_rss_mib") > 0.0, "{summary}");
    assert!(num("daemon_cpu_secs") >= 0.0, "{summary}");
    assert!(num("money_p50_ms") > 0.0, "{summary}");
    assert!(num("money_p99_ms") >= num("money_p50_ms"), "{summary}");
    assert_eq!(json["partitions"], 4, "{summary}");
    let per_partition = json["rows_per_sec_per_partition"].as_object().cloned().unwrap_or_default();
    assert_eq!(per_partition.len(), 4, "{summary}");
    assert!(json["machine"]["nproc"].as_u64().unwrap_or(0) >= 1, "{summary}");
    assert!(json["mariadb"]["innodb_buffer_pool_mib"].as_u64().unwrap_or(0) > 0, "{summary}");
    assert!(json["mariadb"]["innodb_log_file_mib"].as_u64().unwrap_or(0) > 0, "{summary}");
    assert!(json["mariadb"]["version"].as_str().is_some_and(|v| !v.is_empty()), "{summary}");
    assert!(json["config"]["rows"] == 3000, "{summary}");
    let connections = |field: &str| json["sim_ledger"][field].as_u64().unwrap_or(0);
    assert!(connections("connections_open_peak") > 0, "{summary}");
    assert!(
        connections("connections_accepted_total") >= connections("connections_open_peak"),
        "{summary}"
    );
    assert!(summary.contains("opened to money-sim"), "{summary}");
    // Every request was admitted once, arrived, and noted when it left; a departure line is not
    // an admission.
    let requests = json["requests_total"].as_u64().unwrap_or(0);
    assert!(requests >= 3000, "{summary}");
    assert_eq!(json["transit"]["admitted"].as_u64(), Some(requests), "{summary}");
    assert_eq!(json["transit"]["paired"].as_u64(), Some(requests), "{summary}");
    assert!(json["transit"]["max_admitted_in_any_second"].as_u64().unwrap_or(0) <= 1000);
    let log = std::fs::read_to_string(json["daemon_log"].as_str().unwrap_or_default())?;
    let departed = log.lines().filter(|l| l.contains(r#""message":"departed""#)).count();
    assert_eq!(departed as u64, requests, "{summary}");
    assert_eq!(json["transit"]["departed"].as_u64(), Some(requests), "{summary}");
    // The slack is read off the daemon's start line.
    assert_eq!(json["transit"]["slack_ms"].as_f64(), Some(60.0), "{summary}");
    let late = json["transit"]["max_late_in_any_second"].as_u64();
    assert!(late <= json["transit"]["late_over_slack"].as_u64(), "{summary}");
    // The database is gone afterwards.
    let admin = mysql_async::Pool::new(server_url().as_str());
    let mut c = admin.get_conn().await?;
    let left: Vec<String> = mysql_async::prelude::Queryable::query(
        &mut c,
        format!("SHOW DATABASES LIKE '{}'", report.database),
    )
    .await?;
    assert!(left.is_empty(), "database {} was not dropped", report.database);
    drop(c);
    admin.disconnect().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
