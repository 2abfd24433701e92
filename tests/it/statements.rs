//! Issue 4/5: the statements run for every batch (the claim's read and mark, the granted rows'
//! write, the counter update) are prepared once per connection, not once per batch, and the
//! padding that keeps their texts to a few shapes changes nothing they count or write. Drives
//! `payout_core::repo` directly on one connection and reads that session's own counters.

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use payout_core::db::{self, DbSettings};
use payout_core::plan::slices;
use payout_core::repo::{self, ClaimCursor, Outcome, RowOutcome};
use payout_core::{CampaignId, PayoutKind};
use secrecy::SecretString;

use crate::support::*;

const C: CampaignId = CampaignId(43);

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text)]
    value: String,
}

/// `Com_stmt_prepare` of this connection's own session.
async fn prepares(c: &mut diesel_async::AsyncMysqlConnection) -> anyhow::Result<i64> {
    let rows: Vec<StatusRow> = diesel::sql_query(
        "SELECT VARIABLE_VALUE AS value FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'COM_STMT_PREPARE'",
    )
    .load(c)
    .await?;
    Ok(rows.into_iter().next().map(|r| r.value.parse()).transpose()?.unwrap_or(0))
}

#[derive(QueryableByName)]
struct Sum {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A pool of two connections to the test's database, made as the daemon makes them.
fn two_connections(db: &TestDb) -> anyhow::Result<db::DbPool> {
    Ok(db::pool(&DbSettings {
        url: SecretString::from(db.url.clone()),
        pool_size: 2,
        connect_timeout: Duration::from_secs(10),
    })?)
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_statements_are_prepared_once_per_connection() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    db.campaign(C.0, "POINT", "reuse").await?;
    db.load_points(C.0, &point_rows(2_000)).await?;
    let pool = two_connections(&db)?;
    let mut c = db::conn(&pool).await?;
    let slice = slices(1)[0];
    let before = prepares(&mut c).await?;

    // Batches of 100 (written as 256 places), then whatever is left in batches of 300 (a
    // 256-row statement and a 64-row one).
    let mut cursor = ClaimCursor::start();
    let (mut batches, mut claimed_total) = (0, 0);
    for n in 0.. {
        let limit = if n < 12 { 100 } else { 300 };
        let claimed = claim_and_grant(&mut c, limit, &format!("reuse/{n}"), &mut cursor).await?;
        if claimed == 0 {
            break;
        }
        claimed_total += claimed;
        batches += 1;
    }
    assert_eq!(claimed_total, 2_000);
    assert!(batches >= 15, "{batches} batches");

    // Each shape prepared once: the claim's read, its mark (256 and 64 places, and the short
    // last batch's shape), the granted write (the same shapes) and the counters; the status
    // queries of this test add one each.
    let prepared = prepares(&mut c).await? - before;
    assert!(prepared <= 10, "{prepared} statements prepared over {batches} batches");

    // Padding repeats the last row: every row written once, with its own id, counted once.
    let wrong: Vec<Sum> = diesel::sql_query(
        "SELECT COUNT(*) AS n FROM point_targets WHERE event_id = ? AND (status <> 'SUCCEEDED' \
         OR transaction_id <> CONCAT('tx-', id) OR attempts <> 1)",
    )
    .bind::<BigInt, _>(C.0)
    .load(&mut *c)
    .await?;
    assert_eq!(wrong[0].n, 0);
    let counted: Vec<Sum> = diesel::sql_query(
        "SELECT CAST(SUM(succeeded) AS SIGNED) AS n FROM campaign_counters WHERE campaign_id = ?",
    )
    .bind::<BigInt, _>(C.0)
    .load(&mut *c)
    .await?;
    assert_eq!(counted[0].n, 2_000);

    // The kind's claim reads the kind's columns with the same statement reuse.
    drop(c);
    db.exec("UPDATE point_targets SET status = 'PENDING' WHERE event_id = 43 AND id % 2 = 0")
        .await?;
    let mut c = db::conn(&pool).await?;
    let kinds = {
        let mut k = payout_core::KindRegistry::new();
        k.register::<payout_point::Point>();
        k
    };
    let kind = kinds.get(payout_point::Point::KIND).ok_or_else(|| anyhow::anyhow!("no kind"))?;
    let ctx = payout_core::kind::conformance::context();
    let token: repo::ClaimToken = "reuse/kind".into();
    let spec = repo::ClaimSpec { campaign: C, slice: &slice, limit: 2_000, token: &token };
    let got = kind.claim_prepared(&mut c, spec, &mut ClaimCursor::start(), &ctx).await?;
    assert_eq!(got.len(), 1_000);
    for (claimed, prepared) in &got {
        assert_eq!(claimed.target, prepared.target);
        let request = prepared.request.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let body: serde_json::Value = serde_json::from_slice(&request.body)?;
        // point_rows gives row i (id i + 1) the amount 100 + i.
        assert_eq!(body["amount"].as_i64(), Some(99 + claimed.target.0), "{body}");
        assert_eq!(request.idempotency_key.as_str(), format!("point-43-{}", claimed.target.0));
    }
    drop(c);
    db.drop_db().await
}

/// Claims up to `limit` rows and writes every one granted (`tx-<id>`); returns the count.
async fn claim_and_grant(
    c: &mut diesel_async::AsyncMysqlConnection,
    limit: u32,
    token: &str,
    cursor: &mut ClaimCursor,
) -> anyhow::Result<usize> {
    let slice = slices(1)[0];
    let token: repo::ClaimToken = token.into();
    let claimed = repo::claim(c, "point_targets", C, &slice, limit, &token, cursor).await?;
    let outcomes: Vec<RowOutcome> = claimed
        .iter()
        .map(|cl| RowOutcome {
            target: cl.target,
            claim: cl.claim.clone(),
            outcome: Outcome::Granted { transaction_id: format!("tx-{}", cl.target.0) },
        })
        .collect();
    repo::write_outcomes(c, "point_targets", "POINT", C, 0, &outcomes).await?;
    Ok(claimed.len())
}

/// A batch or flush of more than 256 rows is written as 256-row statements in its
/// transaction, so no connection caches a longer text (each placeholder's description stays in
/// the cache): after a 700-row batch, a 256-row batch prepares nothing new. Every row is still
/// claimed by its batch's token, written once and counted once.
#[tokio::test(flavor = "multi_thread")]
async fn long_batches_are_written_as_statements_of_256_rows() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    db.campaign(C.0, "POINT", "split").await?;
    db.load_points(C.0, &point_rows(1_212)).await?;
    let pool = two_connections(&db)?;
    let mut c = db::conn(&pool).await?;
    let mut cursor = ClaimCursor::start();

    assert_eq!(claim_and_grant(&mut c, 700, "split/0", &mut cursor).await?, 700);
    let before = prepares(&mut c).await?;
    assert_eq!(claim_and_grant(&mut c, 256, "split/1", &mut cursor).await?, 256);
    // Only the status query itself (`sql_query` prepares every time).
    let prepared = prepares(&mut c).await? - before;
    assert!(prepared <= 1, "a 256-row batch after a 700-row one prepared {prepared} statements");
    assert_eq!(claim_and_grant(&mut c, 1_000, "split/2", &mut cursor).await?, 256);
    assert_eq!(claim_and_grant(&mut c, 1_000, "split/3", &mut cursor).await?, 0);

    let by_token: Vec<Sum> = diesel::sql_query(
        "SELECT COUNT(*) AS n FROM point_targets WHERE event_id = ? AND status = 'SUCCEEDED' \
         AND transaction_id = CONCAT('tx-', id) AND attempts = 1 GROUP BY claimed_by \
         ORDER BY claimed_by",
    )
    .bind::<BigInt, _>(C.0)
    .load(&mut *c)
    .await?;
    assert_eq!(by_token.iter().map(|r| r.n).collect::<Vec<_>>(), [700, 256, 256]);
    let counted: Vec<Sum> = diesel::sql_query(
        "SELECT CAST(SUM(succeeded) AS SIGNED) AS n FROM campaign_counters WHERE campaign_id = ?",
    )
    .bind::<BigInt, _>(C.0)
    .load(&mut *c)
    .await?;
    assert_eq!(counted[0].n, 1_212);
    drop(c);
    db.drop_db().await
}

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    value: String,
}

/// One of this connection's own session variables or status counters.
async fn session_value(
    c: &mut diesel_async::AsyncMysqlConnection,
    sql: &str,
) -> anyhow::Result<String> {
    let rows: Vec<Setting> = diesel::sql_query(sql).load(c).await?;
    rows.into_iter().next().map(|r| r.value).ok_or_else(|| anyhow::anyhow!("no row for {sql}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_connection_claims_at_read_committed_in_utc_after_one_setup() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = two_connections(&db)?;
    let mut a = db::conn(&pool).await?;
    let mut b = db::conn(&pool).await?;
    for c in [&mut a, &mut b] {
        // MariaDB before 11.1 names it tx_isolation, MySQL 8 transaction_isolation.
        let isolation =
            match session_value(c, "SELECT CAST(@@SESSION.tx_isolation AS CHAR) AS value").await {
                Ok(v) => v,
                Err(_) => {
                    session_value(
                        c,
                        "SELECT CAST(@@SESSION.transaction_isolation AS CHAR) AS value",
                    )
                    .await?
                }
            };
        assert_eq!(isolation, "READ-COMMITTED");
        let zone = session_value(c, "SELECT CAST(@@SESSION.time_zone AS CHAR) AS value").await?;
        assert_eq!(zone, "+00:00");
        let wait =
            session_value(c, "SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS CHAR) AS value")
                .await?;
        assert_eq!(wait, "10");
        // The session was set up once: payoutd's two SET statements (one round trip) and
        // diesel-async's four. As mysql_async `init` commands, ours ran twice on a connection
        // it moved from TCP to the server's Unix socket (10 SETs).
        let sets = session_value(
            c,
            "SELECT VARIABLE_VALUE AS value FROM information_schema.SESSION_STATUS \
             WHERE VARIABLE_NAME = 'COM_SET_OPTION'",
        )
        .await?;
        assert!(sets.parse::<i64>()? <= 6, "{sets} SET statements on one connection");
    }
    drop((a, b));
    db.drop_db().await
}

/// `SELECT` one value of this connection's own session as text.
async fn own(c: &mut diesel_async::AsyncMysqlConnection, what: &str) -> anyhow::Result<String> {
    session_value(c, &format!("SELECT CAST({what} AS CHAR) AS value")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_connection_has_the_pool_settings_in_fewer_round_trips() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let mut one = db::connect_one(&db.url, Duration::from_secs(10)).await?;
    let pool = two_connections(&db)?;
    let mut pooled = db::conn(&pool).await?;
    for c in [&mut one, &mut *pooled] {
        let isolation = match own(c, "@@SESSION.tx_isolation").await {
            Ok(v) => v,
            Err(_) => own(c, "@@SESSION.transaction_isolation").await?,
        };
        assert_eq!(isolation, "READ-COMMITTED");
        assert_eq!(own(c, "@@SESSION.time_zone").await?, "+00:00");
        assert_eq!(own(c, "@@SESSION.innodb_lock_wait_timeout").await?, "10");
        assert_eq!(own(c, "@@SESSION.character_set_results").await?, "utf8mb4");
    }
    // Counted before any other statement of ours: the reading statement's own prepare is the
    // one. The pooled connection's setup prepared diesel-async's four SETs as well.
    let mut fresh_one = db::connect_one(&db.url, Duration::from_secs(10)).await?;
    assert_eq!(prepares(&mut fresh_one).await?, 1, "the command connection prepared its setup");
    let fresh_pool = two_connections(&db)?;
    let mut fresh_pooled = db::conn(&fresh_pool).await?;
    assert_eq!(prepares(&mut fresh_pooled).await?, 5);
    // It stays on TCP where the URL names a local server by address: a pooled connection is
    // moved to the server's Unix socket (a second handshake), where the server sees "localhost".
    if db.url.contains("@127.0.0.1") {
        let host = |c| {
            own(c, "(SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID())")
        };
        assert!(host(&mut one).await?.starts_with("127.0.0.1"));
        assert_eq!(host(&mut pooled).await?, "localhost");
    }
    // A bad URL is named as a connection failure, without the password.
    let bad = "mysql://root:secret@127.0.0.1:1/payoutd";
    let err = db::connect_one(bad, Duration::from_secs(5)).await.err().expect("port 1 answered");
    assert!(!err.to_string().contains("secret"), "{err}");
    drop((one, pooled, fresh_one, fresh_pooled));
    db.drop_db().await
}
