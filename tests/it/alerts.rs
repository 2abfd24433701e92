//! Issue 3/5 item 3: Slack alerts through the outbox in `campaign_events`, against a local
//! webhook sink that can answer, fail or hang.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use payout_tests::money_sim::{FaultUpdate, SimConfig};

use crate::support::*;

const LONG: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// The webhook sink

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `200 ok`, as Slack answers.
    Ok,
    /// `500`.
    Fail,
    /// Never answers.
    Hang,
}

#[derive(Debug, Clone)]
struct Post {
    path: String,
    text: String,
    /// How the sink answered it.
    mode: Mode,
}

struct SinkState {
    mode: Mode,
    posts: Vec<Post>,
}

fn lock(state: &Mutex<SinkState>) -> MutexGuard<'_, SinkState> {
    match state.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A Slack incoming-webhook stand-in on 127.0.0.1 that records every POSTed `text`.
struct Sink {
    /// The webhook URL; its last path segment is a distinctive token that must never be logged.
    url: String,
    token: String,
    state: Arc<Mutex<SinkState>>,
    task: tokio::task::JoinHandle<()>,
}

async fn hook(State(state): State<Arc<Mutex<SinkState>>>, uri: Uri, body: Bytes) -> Response {
    let text = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_else(|| format!("<not a Slack message: {}>", String::from_utf8_lossy(&body)));
    let mode = {
        let mut s = lock(&state);
        let mode = s.mode;
        s.posts.push(Post { path: uri.path().to_owned(), text, mode });
        mode
    };
    match mode {
        Mode::Ok => (StatusCode::OK, "ok").into_response(),
        Mode::Fail => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error").into_response(),
        Mode::Hang => std::future::pending::<Response>().await,
    }
}

impl Sink {
    async fn start(mode: Mode) -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let token = format!("hook-secret-{:08x}", rand::random::<u32>());
        let state = Arc::new(Mutex::new(SinkState { mode, posts: Vec::new() }));
        let app = Router::new().fallback(hook).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Sink {
            url: format!("http://127.0.0.1:{port}/services/T0/B0/{token}"),
            token,
            state,
            task,
        })
    }

    fn set_mode(&self, mode: Mode) {
        lock(&self.state).mode = mode;
    }

    fn posts(&self) -> Vec<Post> {
        lock(&self.state).posts.clone()
    }

    /// Texts the sink accepted (answered 200).
    fn delivered(&self) -> Vec<String> {
        self.posts().into_iter().filter(|p| p.mode == Mode::Ok).map(|p| p.text).collect()
    }

    /// Accepted texts starting with `prefix`.
    fn delivered_starting(&self, prefix: &str) -> Vec<String> {
        self.delivered().into_iter().filter(|t| t.starts_with(prefix)).collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// `(campaign_id, alert_state, alert_attempts, last_alert_error)` of every `event`, oldest first.
type AlertRow = (Option<i64>, Option<String>, i64, Option<String>);

async fn alert_rows(db: &TestDb, event: &str) -> anyhow::Result<Vec<AlertRow>> {
    db.query(&format!(
        "SELECT campaign_id, alert_state, alert_attempts, last_alert_error FROM campaign_events \
         WHERE event = '{event}' ORDER BY id"
    ))
    .await
}

/// Waits until `event` has `n` alerts, all in `state`.
async fn wait_alerts(db: &TestDb, event: &str, n: usize, state: &str) -> anyhow::Result<()> {
    eventually(LONG, &format!("{n} {event} alert(s) {state}"), || async {
        let rows = alert_rows(db, event).await?;
        Ok((rows.len() == n && rows.iter().all(|r| r.1.as_deref() == Some(state))).then_some(()))
    })
    .await
}

/// Waits until no alert is PENDING.
async fn wait_no_pending(db: &TestDb) -> anyhow::Result<()> {
    eventually(LONG, "every alert delivered", || async {
        let n: Vec<i64> =
            db.query("SELECT COUNT(*) FROM campaign_events WHERE alert_state = 'PENDING'").await?;
        Ok((n.first() == Some(&0)).then_some(()))
    })
    .await
}

async fn armed(db: &TestDb, campaign: i64) -> anyhow::Result<i64> {
    let v: Vec<i64> = db
        .query(&format!("SELECT failure_alert_armed FROM campaigns WHERE id = {campaign}"))
        .await?;
    v.first().copied().context("no such campaign")
}

/// Point rows whose every `every`-th customer is unknown to Money (404 → DEAD).
fn rows_with_missing(n: usize, every: usize) -> Vec<(String, i64, String, String)> {
    point_rows(n)
        .into_iter()
        .enumerate()
        .map(|(i, mut row)| {
            if i % every == 0 {
                row.0 = format!("missing-{i:06}");
            }
            row
        })
        .collect()
}

/// The daemon's environment with the sink as webhook (`sink: None`: no webhook).
fn env_with<'a>(sink: Option<&'a Sink>, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![("PAYOUTD_ALERTS__FAILURE_RATE_CHECK_INTERVAL", "1s")];
    if let Some(sink) = sink {
        env.push(("PAYOUTD_SLACK__WEBHOOK_URL", sink.url.as_str()));
    }
    env.extend_from_slice(extra);
    env
}

/// The webhook URL (its token, its path) is in no log line.
fn assert_secret_kept(log: &str, sink_url: &str, token: &str) -> anyhow::Result<()> {
    ensure!(!log.contains(token), "the webhook token leaked into the log:\n{log}");
    let path = sink_url.split_once("/services").map(|(_, p)| p).unwrap_or(sink_url);
    ensure!(!log.contains(path), "the webhook path leaked into the log:\n{log}");
    Ok(())
}

async fn wait_ready(daemon: &Daemon) -> anyhow::Result<()> {
    eventually(LONG, "payoutd ready", || async {
        Ok(daemon.log_text().contains("payoutd ready").then_some(()))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread")]
async fn completion_and_a_high_failure_rate_are_each_alerted_once() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    let sink = Sink::start(Mode::Ok).await?;
    db.campaign(43, "POINT", "winter points").await?;
    // 5 % of the customers are unknown to Money: 20 DEAD rows of 400.
    db.load_points(43, &rows_with_missing(400, 20)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let env = env_with(Some(&sink), &[("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "100")]);
    let daemon = Daemon::start(&db, &sim.base_url(), &env).await?;

    wait_status(&db, 43, "COMPLETED", LONG).await?;
    wait_no_pending(&db).await?;
    assert_eq!(db.counts("point_targets", 43).await?.get("DEAD"), Some(&20));
    wait_alerts(&db, "FAILURE_RATE_HIGH", 1, "SENT").await?;
    wait_alerts(&db, "COMPLETED", 1, "SENT").await?;
    assert_eq!(armed(&db, 43).await?, 0, "disarmed until the rate falls back");

    let rate = sink.delivered_starting(":warning: Campaign 43 \"winter points\": failure rate ");
    assert_eq!(rate.len(), 1, "{:?}", sink.delivered());
    assert!(rate[0].contains("above the 1.00 % threshold"), "{}", rate[0]);
    let done =
        sink.delivered_starting(":checkered_flag: Campaign 43 \"winter points\" completed in ");
    assert_eq!(done.len(), 1, "{:?}", sink.delivered());
    assert!(done[0].contains(": 380 succeeded, 20 dead of 400 rows."), "{}", done[0]);
    assert!(done[0].contains("20 dead letters to review"), "{}", done[0]);
    assert_eq!(sink.posts().len(), 2, "nothing else was posted: {:?}", sink.posts());
    assert!(sink.posts().iter().all(|p| p.path == format!("/services/T0/B0/{}", sink.token)));

    let log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    assert_secret_kept(&std::fs::read_to_string(log)?, &sink.url, &sink.token)?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_failure_rate_alert_fires_once_per_crossing() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    let sink = Sink::start(Mode::Ok).await?;
    db.campaign(44, "POINT", "crossing").await?;
    db.load_points(44, &point_rows(1000)).await?;
    // The rate is set by hand: every row done, 50 FAILED with a retry far away (5 %). The engine
    // has nothing to send and cannot complete the campaign, so it stays RUNNING.
    db.exec(
        "UPDATE point_targets SET status = 'SUCCEEDED', transaction_id = CONCAT('t-', id) \
         WHERE event_id = 44",
    )
    .await?;
    let fail = |n: usize| {
        format!(
            "UPDATE point_targets SET status = 'FAILED', \
             next_attempt_at = NOW(3) + INTERVAL 1 HOUR \
             WHERE event_id = 44 AND status = 'SUCCEEDED' ORDER BY id LIMIT {n}"
        )
    };
    db.exec(&fail(50)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 44").await?;
    let daemon = Daemon::start(&db, &sim.base_url(), &env_with(Some(&sink), &[])).await?;

    wait_alerts(&db, "FAILURE_RATE_HIGH", 1, "SENT").await?;
    assert_eq!(armed(&db, 44).await?, 0);
    // Three more checks (every 1 s) find the rate still high: still one alert.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(alert_rows(&db, "FAILURE_RATE_HIGH").await?.len(), 1);

    // Back to 0.5 %: the alert is armed again, without an alert.
    db.exec(
        "UPDATE point_targets SET status = 'SUCCEEDED', next_attempt_at = NULL \
         WHERE event_id = 44 AND status = 'FAILED' ORDER BY id LIMIT 45",
    )
    .await?;
    eventually(LONG, "the alert armed again", || async {
        Ok((armed(&db, 44).await? == 1).then_some(()))
    })
    .await?;
    assert_eq!(alert_rows(&db, "FAILURE_RATE_HIGH").await?.len(), 1);

    // Crossing again: a second alert.
    db.exec(&fail(45)).await?;
    wait_alerts(&db, "FAILURE_RATE_HIGH", 2, "SENT").await?;
    let texts =
        sink.delivered_starting(":warning: Campaign 44 \"crossing\": failure rate 5.00 % is above");
    assert_eq!(texts.len(), 2, "{:?}", sink.delivered());
    assert_eq!(db.status(44).await?, "RUNNING");
    assert_eq!(sim.ledger().requests_total, 0);

    let log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    assert_secret_kept(&std::fs::read_to_string(log)?, &sink.url, &sink.token)?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_breaker_opening_is_an_urgent_alert_and_its_closing_follows() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { fail_5xx_share: 1.0, ..sim_config() }).await?;
    let sink = Sink::start(Mode::Ok).await?;
    db.campaign(43, "POINT", "outage").await?;
    db.load_points(43, &point_rows(300)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let env = env_with(
        Some(&sink),
        &[
            ("PAYOUTD_BREAKER__OPEN_FOR", "2s"),
            ("PAYOUTD_MONEY__MAX_IN_FLIGHT", "4"),
            ("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "100"),
            ("PAYOUTD_RETRY__BASE_DELAY", "100ms"),
        ],
    );
    let daemon = Daemon::start(&db, &sim.base_url(), &env).await?;

    wait_status(&db, 43, "PAUSED", LONG).await?;
    wait_alerts(&db, "BREAKER_OPENED", 1, "SENT").await?;
    let urgent = sink.delivered_starting(":rotating_light: URGENT: ");
    assert_eq!(urgent.len(), 1, "{:?}", sink.delivered());
    assert!(
        urgent[0].starts_with(
            ":rotating_light: URGENT: campaign 43 \"outage\" was paused by the circuit breaker"
        ),
        "{}",
        urgent[0]
    );
    assert!(urgent[0].contains("last error: "), "{}", urgent[0]);

    sim.set_faults(FaultUpdate { fail_5xx_share: Some(0.0), ..FaultUpdate::default() });
    wait_status(&db, 43, "COMPLETED", LONG).await?;
    wait_no_pending(&db).await?;
    wait_alerts(&db, "BREAKER_OPENED", 1, "SENT").await?;
    wait_alerts(&db, "BREAKER_CLOSED", 1, "SENT").await?;
    wait_alerts(&db, "COMPLETED", 1, "SENT").await?;
    assert_eq!(sink.delivered_starting(":rotating_light: URGENT: ").len(), 1);
    let closed =
        sink.delivered_starting(":white_check_mark: Circuit breaker closed: Money answers again");
    assert_eq!(closed.len(), 1, "{:?}", sink.delivered());
    assert!(closed[0].contains("campaign 43 \"outage\""), "{}", closed[0]);
    let done = sink.delivered_starting(":checkered_flag: Campaign 43 \"outage\" completed");
    assert_eq!(done.len(), 1, "{:?}", sink.delivered());
    assert!(done[0].contains(": 300 succeeded of 300 rows. No dead letters."), "{}", done[0]);

    let log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    assert_secret_kept(&std::fs::read_to_string(log)?, &sink.url, &sink.token)?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_is_alerted_once_as_a_configuration_fault() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { api_key: "the-right-key".into(), ..SimConfig::default() }).await?;
    let sink = Sink::start(Mode::Ok).await?;
    db.campaign(43, "POINT", "misconfigured").await?;
    db.load_points(43, &point_rows(500)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let env = env_with(Some(&sink), &[("PAYOUTD_MONEY__MAX_IN_FLIGHT", "8")]);
    let daemon = Daemon::start(&db, &sim.base_url(), &env).await?;

    wait_status(&db, 43, "PAUSED", LONG).await?;
    wait_alerts(&db, "CONFIG_FAULT", 1, "SENT").await?;
    let texts = sink.delivered();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(
        texts[0],
        ":rotating_light: URGENT: campaign 43 \"misconfigured\" was paused: Money rejected the API \
         key (HTTP 401). Fix money.api_key, then resume the campaign (payoutd campaign resume 43)."
    );
    let log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    let log = std::fs::read_to_string(log)?;
    assert_secret_kept(&log, &sink.url, &sink.token)?;
    assert!(!log.contains(SIM_KEY) && !log.contains("the-right-key"), "keys stay out of logs");
    assert_eq!(alert_rows(&db, "CONFIG_FAULT").await?.len(), 1);
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alert_survives_a_failing_sink_and_a_restart_and_arrives_once() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    let sink = Sink::start(Mode::Fail).await?;
    db.campaign(50, "VOUCHER", "restart").await?;
    db.load_vouchers(50, &voucher_rows(50, 50)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 50").await?;
    let env = env_with(Some(&sink), &[]);
    let daemon = Daemon::start(&db, &sim.base_url(), &env).await?;

    wait_status(&db, 50, "COMPLETED", LONG).await?;
    eventually(LONG, "two failed deliveries", || async {
        Ok((sink.posts().len() >= 2).then_some(()))
    })
    .await?;
    let first_log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    let rows = alert_rows(&db, "COMPLETED").await?;
    assert_eq!(rows.len(), 1);
    let (_, state, attempts, error) = rows[0].clone();
    assert_eq!(state.as_deref(), Some("PENDING"), "never dropped");
    assert!(attempts >= 2, "{attempts} attempts");
    let error = error.unwrap_or_default();
    assert!(error.contains("HTTP 500"), "{error}");
    assert!(!error.contains(&sink.token), "{error}");
    assert!(sink.delivered().is_empty());

    // Slack recovers while payoutd is down; the next payoutd delivers the alert, once.
    sink.set_mode(Mode::Ok);
    let daemon = Daemon::start(&db, &sim.base_url(), &env).await?;
    wait_alerts(&db, "COMPLETED", 1, "SENT").await?;
    let texts = sink.delivered();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(
        texts[0].starts_with(":checkered_flag: Campaign 50 \"restart\" completed in "),
        "{}",
        texts[0]
    );
    assert!(texts[0].contains(": 50 succeeded of 50 rows. No dead letters."), "{}", texts[0]);

    let second_log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    assert_eq!(sink.delivered().len(), 1, "delivered exactly once");
    let first = std::fs::read_to_string(first_log)?;
    assert!(first.contains("cannot deliver the alert to Slack"), "{first}");
    assert_secret_kept(&first, &sink.url, &sink.token)?;
    assert_secret_kept(&std::fs::read_to_string(second_log)?, &sink.url, &sink.token)?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn payouts_keep_full_speed_while_the_sink_hangs() -> anyhow::Result<()> {
    // A timing measurement: nothing else runs meanwhile.
    let _timing = exclusive().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    const ROWS: usize = 2000;

    // Without Slack.
    db.campaign(1, "POINT", "no slack").await?;
    db.load_points(1, &rows_with_missing(ROWS, 20)).await?;
    let daemon = Daemon::start(&db, &sim.base_url(), &env_with(None, &[])).await?;
    wait_ready(&daemon).await?;
    let started = Instant::now();
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 1").await?;
    wait_status(&db, 1, "COMPLETED", LONG).await?;
    let without = started.elapsed();
    daemon.terminate(Duration::from_secs(15)).await?;

    // With a Slack that never answers, busy with an alert from before the run starts.
    let sink = Sink::start(Mode::Hang).await?;
    db.exec(
        "INSERT INTO campaign_events \
         (campaign_id, event, actor, detail, alert_state, next_alert_at) \
         VALUES (1, 'BREAKER_CLOSED', 'test', '{}', 'PENDING', NOW(3))",
    )
    .await?;
    db.campaign(2, "POINT", "hanging slack").await?;
    db.load_points(2, &rows_with_missing(ROWS, 20)).await?;
    let daemon = Daemon::start(&db, &sim.base_url(), &env_with(Some(&sink), &[])).await?;
    wait_ready(&daemon).await?;
    eventually(LONG, "the sink to hang on a request", || async {
        Ok((!sink.posts().is_empty()).then_some(()))
    })
    .await?;
    let started = Instant::now();
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 2").await?;
    wait_status(&db, 2, "COMPLETED", LONG).await?;
    let with = started.elapsed();
    assert!(
        with <= without * 2 + Duration::from_secs(1),
        "{ROWS} rows took {with:?} while Slack hung, {without:?} without Slack"
    );
    eprintln!("{ROWS} rows: {without:?} without Slack, {with:?} while Slack hung");
    assert_eq!(sim.ledger().duplicate_grants, 0);

    // The alerts wait, queued, with the timeout as the reason.
    eventually(LONG, "a timed-out delivery recorded", || async {
        let rows = alert_rows(&db, "BREAKER_CLOSED").await?;
        Ok(rows
            .first()
            .filter(|r| {
                r.1.as_deref() == Some("PENDING")
                    && r.3.as_deref().is_some_and(|e| e.contains("timed out"))
            })
            .map(|_| ()))
    })
    .await?;
    assert!(sink.delivered().is_empty());
    let log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    assert_secret_kept(&std::fs::read_to_string(log)?, &sink.url, &sink.token)?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_webhook_alerts_are_logged_and_marked_logged() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    db.campaign(60, "VOUCHER", "quiet").await?;
    db.load_vouchers(60, &voucher_rows(60, 50)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 60").await?;
    let daemon = Daemon::start(&db, &sim.base_url(), &env_with(None, &[])).await?;

    wait_status(&db, 60, "COMPLETED", LONG).await?;
    wait_alerts(&db, "COMPLETED", 1, "LOGGED").await?;
    let alerted: Vec<i64> = db
        .query(
            "SELECT COUNT(*) FROM campaign_events \
             WHERE event = 'COMPLETED' AND alerted_at IS NOT NULL",
        )
        .await?;
    assert_eq!(alerted, vec![1]);
    let log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    let log = std::fs::read_to_string(log)?;
    assert!(
        log.contains("slack.webhook_url is not set: alerts are written to this log only"),
        "{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("alert (slack.webhook_url is not set)"))
        .with_context(|| format!("no alert line in the log:\n{log}"))?;
    assert!(line.contains(":checkered_flag: Campaign 60 \"quiet\" completed in "), "{line}");
    assert!(line.contains(": 50 succeeded of 50 rows. No dead letters."), "{line}");
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_url_never_appears_in_the_log() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(sim_config()).await?;
    // A webhook nobody listens on: every attempt is a connection error, whose reqwest message
    // would name the URL.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = closed.local_addr()?.port();
    drop(closed);
    let token = format!("hook-secret-{:08x}", rand::random::<u32>());
    let url = format!("http://127.0.0.1:{port}/services/T0/B0/{token}");
    db.campaign(70, "VOUCHER", "secret").await?;
    db.load_vouchers(70, &voucher_rows(70, 20)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 70").await?;
    let env = [("PAYOUTD_SLACK__WEBHOOK_URL", url.as_str())];
    let daemon = Daemon::start(&db, &sim.base_url(), &env).await?;

    wait_status(&db, 70, "COMPLETED", LONG).await?;
    eventually(LONG, "two failed deliveries", || async {
        let rows = alert_rows(&db, "COMPLETED").await?;
        Ok(rows.first().filter(|r| r.2 >= 2 && r.3.is_some()).map(|_| ()))
    })
    .await?;
    let rows = alert_rows(&db, "COMPLETED").await?;
    let error = rows.first().and_then(|r| r.3.clone()).unwrap_or_default();
    assert!(!error.contains(&token) && !error.contains("/services/"), "{error}");
    let log = daemon.log.clone();
    daemon.terminate(Duration::from_secs(15)).await?;
    let log = std::fs::read_to_string(log)?;
    assert!(log.contains("cannot deliver the alert to Slack"), "{log}");
    assert_secret_kept(&log, &url, &token)?;
    sim.shutdown().await;
    db.drop_db().await
}
