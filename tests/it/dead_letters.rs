//! Issue 2/5, dead letters: every DEAD row has exactly one dead letter, operators list them, and
//! `dead-letters requeue` re-grants them with the rows' own idempotency keys, exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context;
use payout_tests::money_sim::{FaultUpdate, SimConfig};

use crate::support::*;

const LONG: Duration = Duration::from_secs(120);

/// (target_kind, target_id, error_code, attempts, resolved_at)
type LetterRow = (String, i64, String, i32, Option<String>);

/// (event, from_status, to_status, actor, detail)
type EventRow = (String, Option<String>, Option<String>, String, Option<String>);

fn json_array(out: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let v: serde_json::Value =
        serde_json::from_str(out).with_context(|| format!("not JSON: {out}"))?;
    v.as_array().cloned().with_context(|| format!("not a JSON array: {out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_match_dead_rows_one_to_one_and_are_listed() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let sim = sim(SimConfig { not_found_prefix: Some("missing-".into()), ..sim_config() }).await?;
    db.campaign(42, "VOUCHER", "winter vouchers").await?;
    db.campaign(43, "POINT", "winter points").await?;
    let mut vouchers = voucher_rows(42, 5);
    vouchers.push(("missing-v".into(), "V-42-missing".into(), "winter sale".into()));
    db.load_vouchers(42, &vouchers).await?;
    let mut points = point_rows(20);
    for (uid, amount, expiry) in [
        ("missing-1", 10, "20991231235959"),
        ("missing-2", 20, "20991231235959"),
        ("missing-3", 30, "20991231235959"),
        ("u-zero-1", 0, "20991231235959"),
        ("u-zero-2", 0, "20991231235959"),
        ("u-month-13", 40, "20991331235959"),
        ("u-dashed", 50, "2099-12-31 23:59"),
    ] {
        points.push((uid.into(), amount, expiry.into(), "winter sale".into()));
    }
    db.load_points(43, &points).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id IN (42, 43)").await?;

    let mut daemon = Daemon::start(&db, &sim.base_url(), &[]).await?;
    wait_status(&db, 42, "COMPLETED", LONG).await?;
    wait_status(&db, 43, "COMPLETED", LONG).await?;
    daemon.assert_alive()?;

    // The expected error of each DEAD row follows from how it was loaded.
    let dead: Vec<(i64, String, i64, String)> = db
        .query(
            "SELECT id, customer_uid, amount, expiry_at FROM point_targets \
             WHERE event_id = 43 AND status = 'DEAD' ORDER BY id",
        )
        .await?;
    assert_eq!(dead.len(), 7, "{dead:?}");
    let want: BTreeMap<i64, &str> = dead
        .iter()
        .map(|(id, uid, amount, expiry)| {
            let code = if uid.starts_with("missing-") {
                "customer_not_found"
            } else if *amount <= 0 {
                "invalid_amount"
            } else {
                assert!(expiry.len() != 14 || expiry.contains("1331"), "{uid} {expiry}");
                "invalid_expiry_at"
            };
            (*id, code)
        })
        .collect();
    let letters: Vec<LetterRow> = db
        .query(
            "SELECT target_kind, target_id, error_code, attempts, \
             CAST(resolved_at AS CHAR) FROM dead_letters WHERE campaign_id = 43 ORDER BY id",
        )
        .await?;
    assert_eq!(letters.len(), dead.len(), "one dead letter per DEAD row: {letters:?}");
    let got: BTreeMap<i64, &str> =
        letters.iter().map(|(_, target, code, _, _)| (*target, code.as_str())).collect();
    assert_eq!(got, want, "dead letters and DEAD rows match one to one, with the field named");
    let attempts: HashMap<i64, i32> = db
        .query::<(i64, i32)>("SELECT id, attempts FROM point_targets WHERE status = 'DEAD'")
        .await?
        .into_iter()
        .collect();
    for (kind, target, _, n, resolved) in &letters {
        assert_eq!(kind, "POINT");
        assert_eq!(resolved, &None);
        assert_eq!(Some(n), attempts.get(target), "row {target}");
    }
    // Invalid rows never reached Money; the 404 rows did, once each.
    let ledger = sim.ledger();
    assert_eq!(ledger.requests_total, 5 + 1 + 20 + 3, "{ledger:?}");
    assert_eq!(ledger.grants_total, 5 + 20, "{ledger:?}");

    // `list --json --campaign` shows exactly those, with every column, newest first.
    let (ok, out, err) = cli(&db, &["dead-letters", "list", "--json", "--campaign", "43"]).await?;
    assert!(ok, "{err}");
    let listed = json_array(&out)?;
    assert_eq!(listed.len(), 7);
    let listed_pairs: BTreeMap<i64, String> = listed
        .iter()
        .map(|v| {
            (
                v["target_id"].as_i64().unwrap_or(-1),
                v["error_code"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        listed_pairs,
        want.iter().map(|(k, v)| (*k, (*v).to_owned())).collect::<BTreeMap<_, _>>()
    );
    let ids: Vec<i64> = listed.iter().filter_map(|v| v["id"].as_i64()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    for v in &listed {
        for column in [
            "id",
            "campaign_id",
            "target_kind",
            "target_id",
            "error_code",
            "error_message",
            "attempts",
            "created_at",
            "resolved_at",
            "resolution",
            "resolved_by",
        ] {
            assert!(v.get(column).is_some(), "{column} missing in {v}");
        }
        assert_eq!(v["campaign_id"], 43);
        assert_eq!(v["resolved_at"], serde_json::Value::Null);
        assert!(!v["error_message"].as_str().unwrap_or("").is_empty(), "{v}");
    }

    // The table view covers every campaign; the filter and the limit narrow it.
    let (ok, out, err) = cli(&db, &["dead-letters", "list"]).await?;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1 + 8, "{out}");
    assert!(out.contains("customer_not_found") && out.contains("invalid_expiry_at"), "{out}");
    let (ok, out, _) = cli(&db, &["dead-letters", "list", "--json", "--campaign", "42"]).await?;
    assert!(ok);
    let vouchers = json_array(&out)?;
    assert_eq!(vouchers.len(), 1);
    assert_eq!(vouchers[0]["target_kind"], "VOUCHER");
    assert_eq!(vouchers[0]["error_code"], "customer_not_found");
    let (ok, out, _) = cli(&db, &["dead-letters", "list", "--limit", "2"]).await?;
    assert!(ok);
    assert!(out.contains("showing the newest 2 of 8 unresolved dead letters"), "{out}");

    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_requeued_dead_row_is_paid_exactly_once_under_its_own_key() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    // Every request fails with 503 and no retry is allowed: every row dies at its first attempt.
    // Eight rows stay below the circuit breaker's ten consecutive failures.
    let sim = sim(SimConfig { fail_5xx_share: 1.0, ..sim_config() }).await?;
    db.campaign(43, "POINT", "winter points").await?;
    db.load_points(43, &point_rows(8)).await?;
    db.exec("UPDATE campaigns SET status = 'RUNNING' WHERE id = 43").await?;
    let mut daemon =
        Daemon::start(&db, &sim.base_url(), &[("PAYOUTD_RETRY__MAX_RETRIES", "0")]).await?;
    wait_status(&db, 43, "COMPLETED", LONG).await?;
    assert_eq!(db.counts("point_targets", 43).await?, BTreeMap::from([("DEAD".to_owned(), 8)]));
    assert_eq!(sim.ledger().grants_total, 0);
    let codes: Vec<String> =
        db.query("SELECT error_code FROM dead_letters WHERE campaign_id = 43").await?;
    assert_eq!(codes.len(), 8);
    assert!(codes.iter().all(|c| c == "http_503"), "{codes:?}");

    // Money comes back. Three rows were in fact granted by an attempt whose answer was lost (we
    // play that attempt by hand, with the row's key and body): their requeue must replay.
    sim.set_faults(FaultUpdate { fail_5xx_share: Some(0.0), ..Default::default() });
    let rows: Vec<(i64, String, i64, String, String)> = db
        .query(
            "SELECT id, customer_uid, amount, expiry_at, reason FROM point_targets \
             WHERE event_id = 43 ORDER BY id",
        )
        .await?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build()?;
    let mut granted_before = HashMap::new();
    for (id, uid, amount, expiry, reason) in rows.iter().take(3) {
        let body = serde_json::json!({
            "campaign_id": 43, "customer_uid": uid, "amount": amount,
            "expiry_at": expiry, "reason": reason,
        });
        let answer: serde_json::Value = http
            .post(format!("{}/v1/points/grants", sim.base_url()))
            .header("x-api-key", SIM_KEY)
            .header("idempotency-key", format!("point-43-{id}"))
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let tx = answer["transaction_id"].as_str().context("no transaction id")?.to_owned();
        granted_before.insert(*id, tx);
    }
    assert_eq!(sim.ledger().grants_total, 3);

    let (ok, out, err) = cli(&db, &["dead-letters", "requeue", "--campaign", "43"]).await?;
    assert!(ok, "{err}");
    assert!(out.contains("requeued 8 rows of campaign 43"), "{out}");
    assert!(out.contains("campaign 43: COMPLETED -> RUNNING"), "{out}");

    eventually(LONG, "the requeued rows to be paid", || async {
        let done = db.counts("point_targets", 43).await?
            == BTreeMap::from([("SUCCEEDED".to_owned(), 8)])
            && db.status(43).await? == "COMPLETED";
        Ok(done.then_some(()))
    })
    .await?;
    daemon.assert_alive()?;

    // Exactly one grant per row, under `point-<campaign>-<row id>`; the hand-granted ones replayed.
    let ledger = sim.ledger();
    assert_eq!(ledger.grants_total, 8, "{ledger:?}");
    assert_eq!(ledger.duplicate_grants, 0, "{ledger:?}");
    assert_eq!(ledger.replays_total, 3, "{ledger:?}");
    let grants: HashMap<String, String> =
        sim.grants().into_iter().map(|g| (g.idempotency_key, g.transaction_id)).collect();
    let want_keys: BTreeSet<String> = rows.iter().map(|r| format!("point-43-{}", r.0)).collect();
    assert_eq!(grants.keys().cloned().collect::<BTreeSet<_>>(), want_keys);
    let stored: Vec<(i64, Option<String>, i32)> = db
        .query("SELECT id, transaction_id, attempts FROM point_targets WHERE event_id = 43")
        .await?;
    for (id, tx, attempts) in stored {
        let key = format!("point-43-{id}");
        assert_eq!(tx.as_ref(), grants.get(&key), "row {key}");
        if let Some(before) = granted_before.get(&id) {
            assert_eq!(tx.as_ref(), Some(before), "row {key} keeps Money's first transaction");
        }
        // One attempt died with MAX_RETRIES=0, one after the requeue: `attempts` counts both.
        assert_eq!(attempts, 2, "row {key}: attempts made so far");
    }

    // The progress counters followed the rows from DEAD back to SUCCEEDED.
    let progress: Vec<(i64, i64, i64)> = db
        .query(
            "SELECT CAST(succeeded AS SIGNED), CAST(dead AS SIGNED), CAST(pending AS SIGNED) \
             FROM campaign_progress WHERE campaign_id = 43",
        )
        .await?;
    assert_eq!(progress, vec![(8, 0, 0)]);

    // The dead letters are resolved, and no new one was written.
    let letters: Vec<(Option<String>, Option<String>, Option<String>)> = db
        .query(
            "SELECT CAST(resolved_at AS CHAR), resolution, resolved_by FROM dead_letters \
             WHERE campaign_id = 43",
        )
        .await?;
    assert_eq!(letters.len(), 8);
    for (at, resolution, by) in &letters {
        assert!(at.is_some());
        assert_eq!(resolution.as_deref(), Some("REQUEUED"));
        assert!(by.as_deref().is_some_and(|b| b.starts_with("cli:") && b.len() > 4), "{by:?}");
    }

    // The audit trail: the requeue, the reopening, and the second completion.
    let events: Vec<EventRow> = db
        .query(
            "SELECT event, from_status, to_status, actor, detail FROM campaign_events \
             WHERE campaign_id = 43 ORDER BY id",
        )
        .await?;
    let requeued: Vec<_> = events.iter().filter(|e| e.0 == "DEAD_LETTERS_REQUEUED").collect();
    assert_eq!(requeued.len(), 1, "{events:?}");
    assert!(requeued[0].3.starts_with("cli:"), "{events:?}");
    let detail: serde_json::Value =
        serde_json::from_str(requeued[0].4.as_deref().unwrap_or("null"))?;
    assert_eq!(detail["rows"], 8, "{detail}");
    assert_eq!(detail["target_ids"].as_array().map(Vec::len), Some(8), "{detail}");
    let reopened = events.iter().position(|e| {
        e.0 == "STATUS_CHANGED"
            && e.1.as_deref() == Some("COMPLETED")
            && e.2.as_deref() == Some("RUNNING")
            && e.3.starts_with("cli:")
    });
    let completions: Vec<usize> =
        events.iter().enumerate().filter(|(_, e)| e.0 == "COMPLETED").map(|(i, _)| i).collect();
    assert_eq!(completions.len(), 2, "{events:?}");
    assert!(reopened.is_some_and(|r| completions[0] < r && r < completions[1]), "{events:?}");

    let (ok, out, _) = cli(&db, &["dead-letters", "list"]).await?;
    assert!(ok);
    assert_eq!(out.trim(), "no unresolved dead letters");
    let (ok, out, _) = cli(&db, &["dead-letters", "list", "--all", "--json"]).await?;
    assert!(ok);
    let all = json_array(&out)?;
    assert_eq!(all.len(), 8);
    assert!(all.iter().all(|v| v["resolution"] == "REQUEUED"), "{out}");

    daemon.terminate(Duration::from_secs(15)).await?;
    sim.shutdown().await;
    db.drop_db().await
}

/// Rows of `point_targets`: (status, attempts, last_error, next_attempt_at is null, claimed_by).
type RowState = (String, i32, Option<String>, bool, Option<String>);

async fn row_state(db: &TestDb, id: i64) -> anyhow::Result<RowState> {
    let mut rows: Vec<RowState> = db
        .query(&format!(
            "SELECT status, attempts, last_error, next_attempt_at IS NULL, claimed_by \
             FROM point_targets WHERE id = {id}"
        ))
        .await?;
    rows.pop().with_context(|| format!("no point row {id}"))
}

/// Makes the given rows DEAD with a dead letter each, as the engine does; returns the
/// dead-letter ids in row order.
async fn kill_rows(db: &TestDb, campaign: i64, rows: &[i64]) -> anyhow::Result<Vec<i64>> {
    let mut letters = Vec::new();
    for id in rows {
        db.exec(&format!(
            "UPDATE point_targets SET status = 'DEAD', attempts = 6, \
             last_error = 'http_503: gave up after 6 attempts', claimed_by = 'host-1/p0', \
             updated_at = NOW(3) WHERE id = {id}"
        ))
        .await?;
        db.exec(&format!(
            "INSERT INTO dead_letters \
             (campaign_id, target_kind, target_id, error_code, error_message, attempts) \
             VALUES ({campaign}, 'POINT', {id}, 'http_503', 'gave up after 6 attempts', 6)"
        ))
        .await?;
        let last: Vec<i64> = db.query("SELECT MAX(id) FROM dead_letters").await?;
        letters.extend(last);
    }
    Ok(letters)
}

async fn event_count(db: &TestDb) -> anyhow::Result<i64> {
    let n: Vec<i64> = db.query("SELECT COUNT(*) FROM campaign_events").await?;
    n.first().copied().context("no count")
}

#[tokio::test(flavor = "multi_thread")]
async fn requeue_by_ids_touches_only_those_and_names_unknown_or_resolved_ones() -> anyhow::Result<()>
{
    let _timing = shared().await;
    let db = TestDb::new().await?;
    db.campaign(43, "POINT", "completed").await?;
    db.load_points(43, &point_rows(6)).await?;
    db.campaign(44, "POINT", "paused").await?;
    db.load_points(44, &point_rows(2)).await?;
    db.campaign(45, "POINT", "clean").await?;
    let ids43: Vec<i64> =
        db.query("SELECT id FROM point_targets WHERE event_id = 43 ORDER BY id").await?;
    let ids44: Vec<i64> =
        db.query("SELECT id FROM point_targets WHERE event_id = 44 ORDER BY id").await?;
    db.exec("UPDATE point_targets SET status = 'SUCCEEDED', attempts = 1, transaction_id = 'tx'")
        .await?;
    let dl43 = kill_rows(&db, 43, &ids43[..4]).await?;
    let dl44 = kill_rows(&db, 44, &ids44[..1]).await?;
    // A dead letter whose row an operator marked SUCCEEDED by hand: it must never be touched.
    db.exec(&format!(
        "INSERT INTO dead_letters \
         (campaign_id, target_kind, target_id, error_code, error_message, attempts) \
         VALUES (43, 'POINT', {}, 'timeout', 'unknown outcome', 6)",
        ids43[4]
    ))
    .await?;
    let stale: Vec<i64> = db.query("SELECT MAX(id) FROM dead_letters").await?;
    let stale = stale[0];
    db.exec("UPDATE campaigns SET status = 'COMPLETED' WHERE id = 43").await?;
    db.exec("UPDATE campaigns SET status = 'PAUSED' WHERE id = 44").await?;
    let events_before = event_count(&db).await?;

    let pick = format!("{},{},{},{stale}", dl43[0], dl43[1], dl44[0]);

    // A dry run reports and changes nothing.
    let (ok, out, err) =
        cli(&db, &["dead-letters", "requeue", "--ids", &pick, "--dry-run"]).await?;
    assert!(ok, "{err}");
    assert!(out.contains("would requeue 2 rows of campaign 43"), "{out}");
    assert!(out.contains("would requeue 1 rows of campaign 44"), "{out}");
    assert_eq!(row_state(&db, ids43[0]).await?.0, "DEAD");
    assert_eq!(db.status(43).await?, "COMPLETED");
    assert_eq!(event_count(&db).await?, events_before);

    // An unknown id fails the whole command, naming it, and changes nothing.
    let with_unknown = format!("{pick},77777");
    let (ok, out, err) = cli(&db, &["dead-letters", "requeue", "--ids", &with_unknown]).await?;
    assert!(!ok, "{out}");
    assert_eq!(err.trim(), "payoutd: error: no unresolved dead letter with id 77777");
    assert_eq!(row_state(&db, ids43[0]).await?.0, "DEAD");
    assert_eq!(event_count(&db).await?, events_before);

    let (ok, out, err) = cli(&db, &["dead-letters", "requeue", "--ids", &pick]).await?;
    assert!(ok, "{err}");
    assert!(out.contains("requeued 2 rows of campaign 43"), "{out}");
    assert!(out.contains("campaign 43: COMPLETED -> RUNNING"), "{out}");
    assert!(out.contains("requeued 1 rows of campaign 44"), "{out}");
    assert!(
        out.contains("campaign 44 is PAUSED: the requeued rows wait until it is resumed"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "dead letter {stale}: POINT row {} is SUCCEEDED, not DEAD: left as is",
            ids43[4]
        )),
        "{out}"
    );

    // Only the chosen rows are back, with a fresh budget (attempts keep counting) and their
    // history kept.
    for id in [ids43[0], ids43[1], ids44[0]] {
        assert_eq!(
            row_state(&db, id).await?,
            (
                "PENDING".to_owned(),
                6,
                Some("http_503: gave up after 6 attempts".to_owned()),
                true,
                None
            ),
            "row {id}"
        );
    }
    for id in [ids43[2], ids43[3]] {
        assert_eq!(row_state(&db, id).await?.0, "DEAD", "row {id}");
    }
    assert_eq!(row_state(&db, ids43[4]).await?.0, "SUCCEEDED");
    let letters: BTreeMap<i64, (Option<String>, Option<String>)> = db
        .query::<(i64, Option<String>, Option<String>)>(
            "SELECT id, resolution, resolved_by FROM dead_letters",
        )
        .await?
        .into_iter()
        .map(|(id, r, by)| (id, (r, by)))
        .collect();
    for id in [dl43[0], dl43[1], dl44[0]] {
        assert_eq!(letters[&id].0.as_deref(), Some("REQUEUED"), "dead letter {id}");
        assert!(letters[&id].1.as_deref().is_some_and(|b| b.starts_with("cli:")));
    }
    for id in [dl43[2], dl43[3], stale] {
        assert_eq!(letters[&id], (None, None), "dead letter {id} stays unresolved");
    }
    assert_eq!(db.status(43).await?, "RUNNING");
    assert_eq!(db.status(44).await?, "PAUSED");
    let events: Vec<(i64, String)> =
        db.query("SELECT campaign_id, event FROM campaign_events ORDER BY id").await?;
    assert_eq!(
        events,
        vec![
            (43, "DEAD_LETTERS_REQUEUED".to_owned()),
            (43, "STATUS_CHANGED".to_owned()),
            (44, "DEAD_LETTERS_REQUEUED".to_owned()),
        ]
    );

    // Again: already resolved, nothing changes.
    let again = format!("{},{}", dl43[0], dl43[1]);
    let (ok, out, err) = cli(&db, &["dead-letters", "requeue", "--ids", &again]).await?;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("dead letter {} is already resolved (REQUEUED by cli:", dl43[0])),
        "{out}"
    );
    assert!(out.contains("nothing requeued"), "{out}");
    assert_eq!(event_count(&db).await?, 3);
    assert_eq!(row_state(&db, ids43[0]).await?.0, "PENDING");

    // By campaign: the rest of 43; a campaign without dead letters, or unknown, is an error.
    let (ok, out, err) = cli(&db, &["dead-letters", "requeue", "--campaign", "43"]).await?;
    assert!(ok, "{err}");
    assert!(out.contains("requeued 2 rows of campaign 43"), "{out}");
    assert!(out.contains("campaign 43 is RUNNING: the daemon pays the requeued rows"), "{out}");
    assert_eq!(row_state(&db, ids43[2]).await?.0, "PENDING");
    assert_eq!(row_state(&db, ids43[4]).await?.0, "SUCCEEDED");
    let (ok, _, err) = cli(&db, &["dead-letters", "requeue", "--campaign", "45"]).await?;
    assert!(!ok);
    assert_eq!(err.trim(), "payoutd: error: campaign 45 has no unresolved dead letter");
    let (ok, _, err) = cli(&db, &["dead-letters", "requeue", "--campaign", "99"]).await?;
    assert!(!ok);
    assert_eq!(err.trim(), "payoutd: error: campaign 99 does not exist");
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_requeue_goes_in_chunks_and_leaves_no_row_behind() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    db.campaign(43, "POINT", "big").await?;
    db.load_points(43, &point_rows(2_500)).await?;
    db.exec("UPDATE point_targets SET status = 'DEAD', attempts = 6, last_error = 'timeout: x'")
        .await?;
    db.exec(
        "INSERT INTO dead_letters \
         (campaign_id, target_kind, target_id, error_code, error_message, attempts) \
         SELECT 43, 'POINT', id, 'timeout', 'gave up', 6 FROM point_targets ORDER BY id",
    )
    .await?;
    db.exec("UPDATE campaigns SET status = 'STOPPED' WHERE id = 43").await?;

    let (ok, out, _) = cli(&db, &["dead-letters", "list", "--json"]).await?;
    assert!(ok);
    assert_eq!(json_array(&out)?.len(), 1000, "the default limit");

    let (ok, out, err) = cli(&db, &["dead-letters", "requeue", "--campaign", "43"]).await?;
    assert!(ok, "{err}");
    assert!(out.contains("requeued 2500 rows of campaign 43"), "{out}");
    assert!(out.contains("campaign 43 is STOPPED: the requeued rows wait until it is resumed"));
    assert_eq!(
        db.counts("point_targets", 43).await?,
        BTreeMap::from([("PENDING".to_owned(), 2_500)])
    );
    let open: Vec<i64> =
        db.query("SELECT COUNT(*) FROM dead_letters WHERE resolved_at IS NULL").await?;
    assert_eq!(open, vec![0]);
    // One audit row per chunk of at most 1,000, counting rather than listing the ids.
    let details: Vec<String> = db
        .query(
            "SELECT detail FROM campaign_events WHERE event = 'DEAD_LETTERS_REQUEUED' ORDER BY id",
        )
        .await?;
    let counts: Vec<i64> = details
        .iter()
        .map(|d| {
            serde_json::from_str::<serde_json::Value>(d).map(|v| v["rows"].as_i64().unwrap_or(-1))
        })
        .collect::<Result<_, _>>()?;
    assert_eq!(counts, vec![1000, 1000, 500]);
    assert_eq!(db.status(43).await?, "STOPPED");
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_an_empty_database_says_there_is_nothing() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let (ok, out, err) = cli(&db, &["dead-letters", "list"]).await?;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "no unresolved dead letters");
    assert!(err.is_empty(), "{err}");
    let (ok, out, _) = cli(&db, &["dead-letters", "list", "--all"]).await?;
    assert!(ok);
    assert_eq!(out.trim(), "no dead letters");
    let (ok, out, _) = cli(&db, &["dead-letters", "list", "--campaign", "5"]).await?;
    assert!(ok);
    assert_eq!(out.trim(), "no unresolved dead letters of campaign 5");
    let (ok, out, _) = cli(&db, &["dead-letters", "list", "--json"]).await?;
    assert!(ok);
    assert_eq!(json_array(&out)?.len(), 0);
    db.drop_db().await
}
