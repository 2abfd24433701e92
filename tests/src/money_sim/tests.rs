//! The simulator over real HTTP: each test starts its own server on a free loopback port and
//! synchronises on answers and the ledger (polled with deadlines), never on bare sleeps.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::*;

const API_KEY: &str = "test-key";
const VOUCHERS: &str = "/v1/vouchers/grants";
const POINTS: &str = "/v1/points/grants";

fn config() -> SimConfig {
    SimConfig { api_key: API_KEY.to_owned(), ..SimConfig::default() }
}

async fn start(cfg: SimConfig) -> Result<MoneySim> {
    MoneySim::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await
}

fn voucher(campaign_id: i64, customer_uid: &str, voucher_number: &str) -> Value {
    json!({
        "campaign_id": campaign_id,
        "customer_uid": customer_uid,
        "voucher_number": voucher_number,
        "reason": "winter sale",
    })
}

fn point(campaign_id: i64, customer_uid: &str, amount: i64) -> Value {
    json!({
        "campaign_id": campaign_id,
        "customer_uid": customer_uid,
        "amount": amount,
        "expiry_at": "20271231235959",
        "reason": "winter sale",
    })
}

type Headers<'a> = Vec<(&'a str, &'a str)>;

#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    content_type: Option<String>,
    body: Value,
}

impl Answer {
    fn code(&self) -> Option<&str> {
        self.body.get("code").and_then(Value::as_str)
    }

    fn transaction_id(&self) -> Option<&str> {
        self.body.get("transaction_id").and_then(Value::as_str)
    }

    fn replayed(&self) -> Option<bool> {
        self.body.get("replayed").and_then(Value::as_bool)
    }

    /// An error answer in the contract's shape.
    fn is_error(&self, status: u16, code: &str) -> bool {
        self.status == status
            && self.code() == Some(code)
            && self.body.get("message").is_some_and(Value::is_string)
            && self.content_type.as_deref() == Some("application/json")
    }
}

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(sim: &MoneySim) -> Result<Self> {
        Client::with_timeout(sim, Duration::from_secs(10))
    }

    fn with_timeout(sim: &MoneySim, timeout: Duration) -> Result<Self> {
        // reqwest is built without a default TLS provider; plain HTTP still wants one installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .build()
            .context("building the test HTTP client")?;
        Ok(Client { http, base: sim.base_url() })
    }

    async fn send(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> reqwest::Result<Answer> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        read_answer(response).await
    }

    /// A grant request with the right API key.
    async fn grant(&self, path: &str, key: &str, body: &Value) -> Result<Answer> {
        self.send(path, &[("x-api-key", API_KEY), ("idempotency-key", key)], body.to_string())
            .await
            .with_context(|| format!("POST {path} with key {key}"))
    }

    async fn admin_get(&self, path: &str) -> Result<Answer> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        Ok(read_answer(response).await?)
    }

    async fn admin_post(&self, path: &str, body: &Value) -> Result<Answer> {
        Ok(self.send(path, &[], body.to_string()).await?)
    }
}

async fn read_answer(response: reqwest::Response) -> reqwest::Result<Answer> {
    let status = response.status().as_u16();
    let header =
        |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let retry_after = header("retry-after");
    let content_type = header("content-type");
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Answer { status, retry_after, content_type, body })
}

/// Polls `probe` until it yields a value or `within` has passed.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_api_key_is_401() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let body = voucher(1, "u-1", "V-1").to_string();
    let cases: [&[(&str, &str)]; 3] = [
        &[("idempotency-key", "k-1")],
        &[("x-api-key", "wrong"), ("idempotency-key", "k-1")],
        &[("x-api-key", ""), ("idempotency-key", "k-1")],
    ];
    for headers in cases {
        let answer = client.send(VOUCHERS, headers, body.clone()).await?;
        ensure!(answer.is_error(401, "unauthorized"), "{headers:?}: {answer:?}");
    }
    let ledger = sim.ledger();
    assert_eq!(ledger.requests_total, 3);
    assert_eq!(ledger.grants_total, 0);
    assert_eq!(ledger.rejected_by_status, BTreeMap::from([(401, 3)]));
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_replays_with_the_same_transaction_and_counts_once() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let body = point(43, "u-000001", 1500);

    let first = client.grant(POINTS, "row-1", &body).await?;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.replayed(), Some(false));
    let tx = first.transaction_id().context("no transaction id")?.to_owned();

    let again = client.grant(POINTS, "row-1", &body).await?;
    assert_eq!(again.status, 200);
    assert_eq!(again.transaction_id(), Some(tx.as_str()));
    assert_eq!(again.replayed(), Some(true));

    // Same fields in another order and spacing are the same body.
    let reordered = r#"{ "reason":"winter sale", "expiry_at":"20271231235959", "amount":1500,
        "customer_uid":"u-000001", "campaign_id":43 }"#;
    let third = client
        .send(POINTS, &[("x-api-key", API_KEY), ("idempotency-key", "row-1")], reordered.to_owned())
        .await?;
    assert_eq!(third.transaction_id(), Some(tx.as_str()));
    assert_eq!(third.replayed(), Some(true));

    let ledger = sim.ledger();
    assert_eq!(ledger.requests_total, 3);
    assert_eq!(ledger.grants_total, 1);
    assert_eq!(ledger.replays_total, 2);
    assert_eq!(ledger.duplicate_grants, 0);
    assert!(ledger.rejected_by_status.is_empty());
    assert!(ledger.first_grant_ms.is_some());
    assert_eq!(ledger.first_grant_ms, ledger.last_grant_ms);

    let grants = sim.grants();
    assert_eq!(grants.len(), 1);
    let grant = grants.first().context("no grant record")?;
    assert_eq!(grant.idempotency_key, "row-1");
    assert_eq!(grant.endpoint, "points");
    assert_eq!(grant.campaign_id, 43);
    assert_eq!(grant.customer_uid, "u-000001");
    assert_eq!(grant.transaction_id, tx);
    assert_eq!(grant.body, body);

    // The admin endpoints serve the same data.
    let over_http: LedgerSummary =
        serde_json::from_value(client.admin_get("/_sim/ledger").await?.body)?;
    assert_eq!(over_http, sim.ledger());
    let grants_over_http: Vec<GrantRecord> =
        serde_json::from_value(client.admin_get("/_sim/grants").await?.body)?;
    assert_eq!(grants_over_http, grants);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_with_another_body_is_422() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    assert_eq!(client.grant(POINTS, "k", &point(1, "u-1", 10)).await?.status, 200);

    let other_amount = client.grant(POINTS, "k", &point(1, "u-1", 11)).await?;
    ensure!(other_amount.is_error(422, "idempotency_key_reused"), "{other_amount:?}");
    let other_endpoint = client.grant(VOUCHERS, "k", &voucher(1, "u-1", "V-1")).await?;
    ensure!(other_endpoint.is_error(422, "idempotency_key_reused"), "{other_endpoint:?}");

    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 1);
    assert_eq!(ledger.rejected_by_status, BTreeMap::from([(422, 2)]));
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_number_granted_under_another_key_is_409() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    assert_eq!(client.grant(VOUCHERS, "a", &voucher(7, "u-1", "V-1")).await?.status, 200);

    for _ in 0..2 {
        // Failed requests store nothing: the retry is judged again, the same way.
        let taken = client.grant(VOUCHERS, "b", &voucher(7, "u-2", "V-1")).await?;
        ensure!(taken.is_error(409, "voucher_already_issued"), "{taken:?}");
    }
    // The same body under a new key is the same voucher too.
    let same_body = client.grant(VOUCHERS, "c", &voucher(7, "u-1", "V-1")).await?;
    ensure!(same_body.is_error(409, "voucher_already_issued"), "{same_body:?}");
    // Voucher numbers are per campaign.
    assert_eq!(client.grant(VOUCHERS, "d", &voucher(8, "u-2", "V-1")).await?.status, 200);

    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 2);
    assert_eq!(ledger.rejected_by_status, BTreeMap::from([(409, 3)]));
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_with_the_not_found_prefix_is_404() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let missing = client.grant(POINTS, "k", &point(1, "missing-7", 10)).await?;
    ensure!(missing.is_error(404, "customer_not_found"), "{missing:?}");
    // Nothing was stored under the key, so another body is not a reuse.
    let found = client.grant(POINTS, "k", &point(1, "u-7", 10)).await?;
    assert_eq!((found.status, found.replayed()), (200, Some(false)));
    sim.shutdown().await;

    let sim = start(SimConfig { not_found_prefix: None, ..config() }).await?;
    let client = Client::new(&sim)?;
    assert_eq!(client.grant(POINTS, "k", &point(1, "missing-7", 10)).await?.status, 200);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_request_rule_answers_400() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let long_key = "k".repeat(129);
    let point_with = |field: &str, value: Value| {
        let mut body = point(1, "u-1", 10);
        body[field] = value;
        body.to_string()
    };
    let voucher_with = |field: &str, value: Value| {
        let mut body = voucher(1, "u-1", "V-1");
        body[field] = value;
        body.to_string()
    };
    let good = point(1, "u-1", 10).to_string();
    // (what, path, headers besides the API key, body); cases without an Idempotency-Key header
    // get a fresh one unless the case is about its absence.
    let cases: Vec<(&str, &str, Headers<'_>, String)> = vec![
        ("no idempotency key", POINTS, vec![], good.clone()),
        ("empty idempotency key", POINTS, vec![("idempotency-key", "")], good.clone()),
        ("129-char idempotency key", POINTS, vec![("idempotency-key", &long_key)], good.clone()),
        ("tab in idempotency key", POINTS, vec![("idempotency-key", "a\tb")], good.clone()),
        (
            "two idempotency keys",
            POINTS,
            vec![("idempotency-key", "a"), ("idempotency-key", "b")],
            good.clone(),
        ),
        ("malformed JSON", POINTS, vec![], "{\"campaign_id\": 1,".to_owned()),
        ("not an object", POINTS, vec![], "[1, 2]".to_owned()),
        ("empty body", POINTS, vec![], String::new()),
        ("missing field", POINTS, vec![], {
            let mut body = point(1, "u-1", 10);
            body.as_object_mut().map(|o| o.remove("reason"));
            body.to_string()
        }),
        ("unknown field", POINTS, vec![], point_with("note", json!("x"))),
        ("campaign_id as string", POINTS, vec![], point_with("campaign_id", json!("1"))),
        ("amount as float", POINTS, vec![], point_with("amount", json!(10.5))),
        ("amount as string", POINTS, vec![], point_with("amount", json!("10"))),
        ("null customer_uid", POINTS, vec![], point_with("customer_uid", Value::Null)),
        ("empty customer_uid", POINTS, vec![], point_with("customer_uid", json!(""))),
        ("empty reason", POINTS, vec![], point_with("reason", json!(""))),
        ("empty voucher_number", VOUCHERS, vec![], voucher_with("voucher_number", json!(""))),
        ("65-char customer_uid", POINTS, vec![], point_with("customer_uid", json!("u".repeat(65)))),
        (
            "65-char voucher_number",
            VOUCHERS,
            vec![],
            voucher_with("voucher_number", json!("V".repeat(65))),
        ),
        ("256-char reason", POINTS, vec![], point_with("reason", json!("r".repeat(256)))),
        ("zero amount", POINTS, vec![], point_with("amount", json!(0))),
        ("negative amount", POINTS, vec![], point_with("amount", json!(-5))),
        ("13-digit expiry_at", POINTS, vec![], point_with("expiry_at", json!("2027123123595"))),
        ("February 31", POINTS, vec![], point_with("expiry_at", json!("20270231000000"))),
        ("hour 24", POINTS, vec![], point_with("expiry_at", json!("20271231240000"))),
        (
            "expiry_at with separators",
            POINTS,
            vec![],
            point_with("expiry_at", json!("2027-12-31T23:59")),
        ),
        ("expiry_at as number", POINTS, vec![], point_with("expiry_at", json!(20271231235959_i64))),
        ("voucher body on points", POINTS, vec![], voucher(1, "u-1", "V-1").to_string()),
    ];
    let total = cases.len();
    for (index, (what, path, mut headers, body)) in cases.into_iter().enumerate() {
        headers.push(("x-api-key", API_KEY));
        let has_key = headers.iter().any(|(name, _)| *name == "idempotency-key");
        let own_key = format!("case-{index}");
        if !has_key && !what.contains("no idempotency key") {
            headers.push(("idempotency-key", &own_key));
        }
        let answer = client.send(path, &headers, body).await?;
        ensure!(answer.is_error(400, "invalid_request"), "{what}: {answer:?}");
    }

    // The limits themselves are allowed.
    let key_128 = "k".repeat(128);
    let at_limits = [
        (POINTS, key_128.as_str(), point(1, &"u".repeat(64), 1)),
        (POINTS, "a ~!", {
            let mut body = point(2, "u-1", 1);
            body["reason"] = json!("r".repeat(255));
            body
        }),
        (VOUCHERS, "v", voucher(1, "u-1", &"V".repeat(64))),
        (POINTS, "leap-day", {
            let mut body = point(3, "u-1", 1);
            body["expiry_at"] = json!("20280229235959");
            body
        }),
    ];
    for (path, key, body) in &at_limits {
        let answer = client.grant(path, key, body).await?;
        assert_eq!(answer.status, 200, "{key}: {answer:?}");
    }

    let ledger = sim.ledger();
    assert_eq!(ledger.rejected_by_status, BTreeMap::from([(400, total as u64)]));
    assert_eq!(ledger.grants_total, at_limits.len() as u64);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429_with_retry_after_and_the_peak_is_measured() -> Result<()> {
    const SENT: usize = 120;
    const LIMIT: u32 = 50;
    let sim = start(SimConfig { rate_limit_per_sec: LIMIT, ..config() }).await?;
    let client = Client::new(&sim)?;

    let began = Instant::now();
    let mut requests = JoinSet::new();
    for i in 0..SENT {
        let client = client.clone();
        requests.spawn(async move {
            client.grant(POINTS, &format!("burst-{i}"), &point(1, &format!("u-{i}"), 1)).await
        });
    }
    let (mut granted, mut limited) = (0_u64, 0_u64);
    while let Some(answer) = requests.join_next().await {
        let answer = answer??;
        match answer.status {
            200 => granted += 1,
            429 => {
                ensure!(answer.is_error(429, "rate_limited"), "{answer:?}");
                assert_eq!(answer.retry_after.as_deref(), Some("1"));
                limited += 1;
            }
            _ => anyhow::bail!("unexpected answer {answer:?}"),
        }
    }
    let took = began.elapsed();

    let ledger = sim.ledger();
    assert_eq!(granted + limited, SENT as u64);
    assert_eq!(ledger.requests_total, SENT as u64);
    assert_eq!(ledger.grants_total, granted);
    assert_eq!(ledger.rate_limited_total, limited);
    assert_eq!(ledger.rejected_by_status.get(&429).copied().unwrap_or(0), limited);
    if took < Duration::from_secs(1) {
        // Every arrival fell inside one second.
        assert_eq!(granted, u64::from(LIMIT));
        assert_eq!(ledger.max_requests_in_any_second, SENT as u64);
    } else {
        assert!(granted >= u64::from(LIMIT), "{ledger:?}");
        assert!(ledger.max_requests_in_any_second > u64::from(LIMIT), "{ledger:?}");
        assert!(ledger.max_requests_in_any_second <= SENT as u64, "{ledger:?}");
    }
    assert!(limited > 0, "no request was rate limited in {took:?}");
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peak_window_metric_follows_a_spaced_sequence() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let mut n = 0;
    let mut burst = |size: usize| {
        let client = client.clone();
        let first = n;
        n += size;
        async move {
            let began = Instant::now();
            for i in first..first + size {
                // Rejected requests count as arrivals as well.
                let api_key = if i % 3 == 0 { "wrong" } else { API_KEY };
                let key = format!("k-{i}");
                let body = point(1, &format!("u-{i}"), 1).to_string();
                client
                    .send(POINTS, &[("x-api-key", api_key), ("idempotency-key", &key)], body)
                    .await?;
            }
            anyhow::Ok((began, Instant::now()))
        }
    };

    let (a_began, a_done) = burst(6).await?;
    tokio::time::sleep_until((a_done + Duration::from_millis(1100)).into()).await;
    let (b_began, _) = burst(4).await?;
    let (_, c_done) = burst(5).await?;

    let ledger = sim.ledger();
    assert_eq!(ledger.requests_total, 15);
    if a_done - a_began < Duration::from_secs(1) && c_done - b_began < Duration::from_secs(1) {
        // Burst A alone in its second (6), bursts B and C together in theirs (9).
        assert_eq!(ledger.max_requests_in_any_second, 9, "{ledger:?}");
    } else {
        assert!(ledger.max_requests_in_any_second >= 5, "{ledger:?}");
    }
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_5xx_share_answers_503_and_grants_nothing() -> Result<()> {
    let sim = start(SimConfig { fail_5xx_share: 1.0, ..config() }).await?;
    let client = Client::new(&sim)?;
    for i in 0..20 {
        let answer = client.grant(POINTS, &format!("k-{i}"), &point(1, "u-1", i + 1)).await?;
        ensure!(answer.is_error(503, "unavailable"), "{answer:?}");
    }
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 0);
    assert_eq!(ledger.rejected_by_status, BTreeMap::from([(503, 20)]));

    // Failed requests stored nothing: the same keys grant once the fault is gone.
    sim.set_faults(FaultUpdate { fail_5xx_share: Some(0.0), ..FaultUpdate::default() });
    let answer = client.grant(POINTS, "k-0", &point(1, "u-1", 1)).await?;
    assert_eq!((answer.status, answer.replayed()), (200, Some(false)));
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error503_outage_window_fails_requests_until_it_ends() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let began = Instant::now();
    let state = client
        .admin_post("/_sim/faults", &json!({"outage": {"mode": "error503", "duration_ms": 400}}))
        .await?;
    assert_eq!(state.status, 200, "{state:?}");
    assert_eq!(state.body["outage"]["mode"], "error503");

    let body = point(1, "u-1", 5);
    let during = client.grant(POINTS, "k", &body).await?;
    ensure!(during.is_error(503, "unavailable"), "{during:?}");

    let after = eventually("the outage to end", Duration::from_secs(5), || async {
        let answer = client.grant(POINTS, "k", &body).await?;
        Ok((answer.status == 200).then_some(answer))
    })
    .await?;
    assert_eq!(after.replayed(), Some(false));
    assert!(began.elapsed() >= Duration::from_millis(400));
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 1);
    assert!(ledger.rejected_by_status.get(&503).copied().unwrap_or(0) >= 1);
    assert_eq!(sim.faults().outage, None);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_and_reset_outages_grant_nothing() -> Result<()> {
    let sim = start(SimConfig { hang_ms: 150, ..config() }).await?;
    let client = Client::new(&sim)?;
    let body = point(1, "u-1", 5);

    sim.set_faults(FaultUpdate {
        outage: Some(Outage { mode: OutageMode::Hang, duration_ms: 60_000 }),
        ..FaultUpdate::default()
    });
    let began = Instant::now();
    let hung = client.grant(POINTS, "k", &body).await?;
    ensure!(hung.is_error(503, "unavailable"), "{hung:?}");
    assert!(began.elapsed() >= Duration::from_millis(150));
    assert_eq!(sim.ledger().hangs_total, 1);

    sim.set_faults(FaultUpdate {
        outage: Some(Outage { mode: OutageMode::Reset, duration_ms: 60_000 }),
        ..FaultUpdate::default()
    });
    let dropped = client.grant(POINTS, "k", &body).await;
    ensure!(dropped.is_err(), "expected a dropped connection, got {dropped:?}");
    let ledger = sim.ledger();
    assert!(ledger.connections_dropped_total >= 1, "{ledger:?}");
    assert_eq!(ledger.grants_total, 0);

    // duration 0 ends the outage; the key was never stored.
    sim.set_faults(FaultUpdate {
        outage: Some(Outage { mode: OutageMode::Reset, duration_ms: 0 }),
        ..FaultUpdate::default()
    });
    let answer = client.grant(POINTS, "k", &body).await?;
    assert_eq!((answer.status, answer.replayed()), (200, Some(false)));
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_leave_unknown_outcomes_that_retries_resolve() -> Result<()> {
    const ROWS: i64 = 40;
    let sim = start(SimConfig { timeout_share: 1.0, hang_ms: 3_000, ..config() }).await?;
    let impatient = Client::with_timeout(&sim, Duration::from_millis(300))?;
    let mut requests = JoinSet::new();
    for i in 0..ROWS {
        let client = impatient.clone();
        requests.spawn(async move {
            client
                .send(
                    POINTS,
                    &[("x-api-key", API_KEY), ("idempotency-key", &format!("row-{i}"))],
                    point(1, &format!("u-{i}"), 100).to_string(),
                )
                .await
        });
    }
    while let Some(result) = requests.join_next().await {
        match result? {
            Err(error) if error.is_timeout() => {}
            other => anyhow::bail!("expected a client timeout, got {other:?}"),
        }
    }
    eventually("every request to hang", Duration::from_secs(5), || async {
        Ok((sim.ledger().hangs_total == ROWS as u64).then_some(()))
    })
    .await?;
    let committed_before_retry = sim.ledger().grants_total;

    sim.set_faults(FaultUpdate { timeout_share: Some(0.0), ..FaultUpdate::default() });
    let client = Client::new(&sim)?;
    let mut replayed = 0;
    for i in 0..ROWS {
        let answer =
            client.grant(POINTS, &format!("row-{i}"), &point(1, &format!("u-{i}"), 100)).await?;
        assert_eq!(answer.status, 200, "{answer:?}");
        if answer.replayed() == Some(true) {
            replayed += 1;
        }
    }
    // A fair coin per request: all-or-nothing has probability 2^-39.
    assert!(replayed > 0 && replayed < ROWS as u64, "{replayed} of {ROWS} committed");
    assert_eq!(replayed, committed_before_retry);
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, ROWS as u64);
    assert_eq!(ledger.replays_total, replayed);
    assert_eq!(ledger.duplicate_grants, 0);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_key_grant_once() -> Result<()> {
    let sim = start(SimConfig { latency_ms: 50, ..config() }).await?;
    let client = Client::new(&sim)?;
    let mut requests = JoinSet::new();
    for _ in 0..16 {
        let client = client.clone();
        requests.spawn(async move { client.grant(POINTS, "same", &point(1, "u-1", 7)).await });
    }
    let mut fresh = 0;
    let mut transactions = std::collections::BTreeSet::new();
    while let Some(answer) = requests.join_next().await {
        let answer = answer??;
        assert_eq!(answer.status, 200, "{answer:?}");
        if answer.replayed() == Some(false) {
            fresh += 1;
        }
        transactions.insert(answer.transaction_id().map(str::to_owned));
    }
    assert_eq!(fresh, 1);
    assert_eq!(transactions.len(), 1);
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 1);
    assert_eq!(ledger.replays_total, 15);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_body_under_two_keys_is_reported_as_a_duplicate() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let body = point(1, "u-1", 5);
    for key in ["first-key", "second-key", "third-key"] {
        assert_eq!(client.grant(POINTS, key, &body).await?.status, 200);
    }
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 3);
    assert_eq!(ledger.duplicate_bodies, 2);
    assert_eq!(ledger.duplicate_keys, 0);
    assert_eq!(ledger.duplicate_grants, 2);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_fresh_requests() -> Result<()> {
    let sim = start(SimConfig { latency_ms: 100, latency_jitter_ms: 20, ..config() }).await?;
    let client = Client::new(&sim)?;
    let began = Instant::now();
    assert_eq!(client.grant(POINTS, "k", &point(1, "u-1", 5)).await?.status, 200);
    assert!(began.elapsed() >= Duration::from_millis(80));
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_clears_the_ledger_and_restores_start_faults() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let body = point(1, "u-1", 5);
    let before = client.grant(POINTS, "k", &body).await?;
    let before_tx = before.transaction_id().context("no transaction id")?.to_owned();
    let changed = client
        .admin_post("/_sim/faults", &json!({"fail_5xx_share": 1.0, "rate_limit_per_sec": 5}))
        .await?;
    assert_eq!(changed.body["fail_5xx_share"], 1.0);
    assert_eq!(changed.body["rate_limit_per_sec"], 5);

    assert_eq!(client.admin_post("/_sim/reset", &json!({})).await?.status, 200);
    let ledger = sim.ledger();
    // Connections still open stay counted: the peak starts again from them.
    assert_eq!(ledger.connections_open_peak, ledger.connections_open, "{ledger:?}");
    let open = LedgerSummary {
        connections_open: ledger.connections_open,
        connections_open_peak: ledger.connections_open_peak,
        ..LedgerSummary::default()
    };
    assert_eq!(ledger, open);
    assert_eq!(sim.faults().fail_5xx_share, 0.0);
    assert_eq!(sim.faults().rate_limit_per_sec, 0);

    let after = client.grant(POINTS, "k", &body).await?;
    assert_eq!((after.status, after.replayed()), (200, Some(false)));
    assert_ne!(after.transaction_id(), Some(before_tx.as_str()));
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_json_and_validate_updates() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    assert_eq!(client.admin_get("/_sim/health").await?.status, 200);
    let unknown = client.admin_get("/nowhere").await?;
    ensure!(unknown.is_error(404, "not_found"), "{unknown:?}");
    let wrong_method = client.admin_get(VOUCHERS).await?;
    ensure!(wrong_method.is_error(405, "method_not_allowed"), "{wrong_method:?}");
    for bad in [
        json!({"fail_5xx_share": 1.5}),
        json!({"timeout_share": -0.1}),
        json!({"latency": 5}),
        json!({"outage": {"mode": "explode", "duration_ms": 5}}),
    ] {
        let answer = client.admin_post("/_sim/faults", &bad).await?;
        ensure!(answer.is_error(400, "invalid_request"), "{bad}: {answer:?}");
    }
    // Scripts post fault updates without a content type.
    let plain = client
        .http
        .post(format!("{}/_sim/faults", client.base))
        .body(r#"{"latency_ms": 3}"#)
        .send()
        .await?;
    assert_eq!(plain.status().as_u16(), 200);
    assert_eq!(sim.faults().latency_ms, 3);
    let state: FaultState = serde_json::from_value(client.admin_get("/_sim/faults").await?.body)?;
    assert_eq!(state, sim.faults());
    assert_eq!(state.hang_ms, 10_000);
    // Admin traffic is not grant traffic.
    assert_eq!(sim.ledger().requests_total, 0);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_hanging_requests_promptly() -> Result<()> {
    let sim = start(SimConfig { timeout_share: 1.0, hang_ms: 600_000, ..config() }).await?;
    let client = Client::new(&sim)?;
    let request = tokio::spawn(async move { client.grant(POINTS, "k", &point(1, "u-1", 5)).await });
    eventually("the request to hang", Duration::from_secs(5), || async {
        Ok((sim.ledger().hangs_total == 1).then_some(()))
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(3), sim.shutdown())
        .await
        .context("shutdown took too long")?;
    // The hanging request got its (late) answer or lost its connection; either way it ended.
    let _ = tokio::time::timeout(Duration::from_secs(3), request)
        .await
        .context("the hanging request did not end")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_log_records_every_arrival_with_its_answer() -> Result<()> {
    let sim = start(config()).await?;
    let client = Client::new(&sim)?;
    let before = sim.now_ms();
    assert_eq!(client.grant(POINTS, "k-1", &point(1, "u-1", 5)).await?.status, 200);
    assert_eq!(client.grant(POINTS, "k-1", &point(1, "u-1", 5)).await?.status, 200);
    sim.set_faults(FaultUpdate { fail_5xx_share: Some(1.0), ..FaultUpdate::default() });
    assert_eq!(client.grant(VOUCHERS, "k-2", &voucher(1, "u-2", "V-2")).await?.status, 503);
    sim.set_faults(FaultUpdate {
        fail_5xx_share: Some(0.0),
        outage: Some(Outage { mode: OutageMode::Reset, duration_ms: 60_000 }),
        ..FaultUpdate::default()
    });
    ensure!(client.grant(POINTS, "k-3", &point(1, "u-3", 5)).await.is_err(), "reset answered");
    // A request without a key is logged too (and answered 400).
    let no_key =
        client.send(POINTS, &[("x-api-key", API_KEY)], point(1, "u-4", 5).to_string()).await?;
    assert_eq!(no_key.status, 400);

    let log = sim.requests();
    let seen: Vec<(&str, &str, Option<u16>, bool)> = log
        .iter()
        .map(|r| (r.idempotency_key.as_str(), r.endpoint.as_str(), r.status, r.replayed))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("k-1", "points", Some(200), false),
            ("k-1", "points", Some(200), true),
            ("k-2", "vouchers", Some(503), false),
            ("k-3", "points", None, false),
            ("", "points", Some(400), false),
        ]
    );
    ensure!(log.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "arrivals out of order: {log:?}");
    ensure!(log.iter().all(|r| r.at_ms >= before && r.at_ms <= sim.now_ms()), "{log:?}");
    ensure!(
        log.iter().all(|r| r.answered_ms.is_none_or(|a| a >= r.at_ms)
            && r.answered_ms.is_some() == r.status.is_some()),
        "{log:?}"
    );
    let served: Vec<RequestRecord> =
        serde_json::from_value(client.admin_get("/_sim/requests").await?.body)?;
    assert_eq!(served, log);

    sim.reset();
    assert!(sim.requests().is_empty());
    sim.shutdown().await;
    Ok(())
}
