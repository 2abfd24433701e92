//! Issues 4/5: the statements that touch target rows per campaign (claim, status, completion
//! check, retry sweep) use the claim index, never a scan of a target table. Checked with MariaDB's
//! tabular EXPLAIN after ANALYZE, on two campaigns per target table so that a plan reading the
//! whole table would differ from one reading the campaign's index range.
//!
//! The statement texts are those of `core/src/repo.rs` with literal values (point and voucher
//! tables alike). The loader's multi-row INSERT ... VALUES reads nothing; its EXPLAIN row
//! (`type ALL`, no key) only says so, and it is not asserted on.

use mysql_async::Value;
use mysql_async::prelude::Queryable;
use payout_core::PayoutKind;

use crate::support::*;

/// One EXPLAIN row, column name → value as text (`NULL` for SQL NULL).
type PlanRow = std::collections::BTreeMap<String, String>;

fn text(v: &Value) -> String {
    match v {
        Value::NULL => "NULL".to_owned(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        other => format!("{other:?}"),
    }
}

async fn explain(db: &TestDb, sql: &str) -> anyhow::Result<Vec<PlanRow>> {
    let mut c = db.conn().await?;
    let rows: Vec<mysql_async::Row> = c.query(format!("EXPLAIN {sql}")).await?;
    Ok(rows
        .iter()
        .map(|r| {
            r.columns_ref()
                .iter()
                .enumerate()
                .map(|(i, col)| {
                    (col.name_str().into_owned(), r.as_ref(i).map(text).unwrap_or_default())
                })
                .collect()
        })
        .collect())
}

fn show(sql: &str, plan: &[PlanRow]) -> String {
    let cols = ["id", "select_type", "table", "type", "possible_keys", "key", "key_len", "ref"];
    let mut s = format!("EXPLAIN {sql}\n  {}  rows  Extra\n", cols.join("  "));
    for r in plan {
        let get = |k: &str| r.get(k).cloned().unwrap_or_default();
        let line: Vec<String> = cols.iter().map(|c| get(c)).collect();
        s.push_str(&format!("  {}  {}  {}\n", line.join("  "), get("rows"), get("Extra")));
    }
    s
}

fn is_target(table: &str) -> bool {
    // The view's aliases (`p`, `v`) and the tables' own names.
    matches!(table, "p" | "v" | "point_targets" | "voucher_targets")
}

fn index_for(table: &str) -> &'static str {
    match table {
        "v" | "voucher_targets" => "ix_voucher_targets_claim",
        _ => "ix_point_targets_claim",
    }
}

/// Every access to a target table in `plan` uses that table's claim index (or, when `by_id`, the
/// primary key) and no access at all is a full scan (`type ALL`) or a full index scan
/// (`type index`). Returns the number of target-table accesses.
fn assert_indexed(sql: &str, plan: &[PlanRow], by_id: bool) -> usize {
    assert!(!plan.is_empty(), "no plan for {sql}");
    let mut targets = 0;
    for r in plan {
        let table = r.get("table").map(String::as_str).unwrap_or("");
        let ty = r.get("type").map(String::as_str).unwrap_or("");
        let key = r.get("key").map(String::as_str).unwrap_or("NULL");
        if table == "NULL" || table.is_empty() {
            continue; // "No tables used" / "Impossible WHERE" lines
        }
        assert!(
            ty != "ALL" && ty != "index",
            "`{table}` is scanned (type {ty}) in\n{}",
            show(sql, plan)
        );
        assert!(key != "NULL", "`{table}` is read without a key in\n{}", show(sql, plan));
        if is_target(table) {
            targets += 1;
            let want = if by_id { "PRIMARY" } else { index_for(table) };
            assert_eq!(
                key,
                want,
                "`{table}` should be read through {want}, got {key}, in\n{}",
                show(sql, plan)
            );
        }
    }
    targets
}

#[tokio::test(flavor = "multi_thread")]
async fn claiming_status_completion_and_retries_use_the_claim_index() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    // Two campaigns per target table, a few thousand rows each; campaign 43 is under way (a
    // third SUCCEEDED, some IN_FLIGHT and FAILED, a stored plan and counters), 42 is untouched
    // and has no plan (its status falls back to counting rows).
    db.campaign(42, "POINT", "untouched").await?;
    db.campaign(43, "POINT", "under way").await?;
    db.campaign(44, "VOUCHER", "untouched").await?;
    db.campaign(45, "VOUCHER", "under way").await?;
    db.load_points(42, &point_rows(3000)).await?;
    db.load_points(43, &point_rows(3000)).await?;
    db.load_vouchers(44, &voucher_rows(44, 2000)).await?;
    db.load_vouchers(45, &voucher_rows(45, 2000)).await?;
    for (table, id) in [("point_targets", 43), ("voucher_targets", 45)] {
        db.exec(&format!(
            "UPDATE {table} SET status = 'SUCCEEDED' WHERE event_id = {id} AND id % 3 = 0"
        ))
        .await?;
        db.exec(&format!(
            "UPDATE {table} SET status = 'IN_FLIGHT' WHERE event_id = {id} AND id % 3 = 1 \
             AND id % 10 = 1"
        ))
        .await?;
        db.exec(&format!(
            "UPDATE {table} SET status = 'FAILED', next_attempt_at = NOW(3) \
             WHERE event_id = {id} AND id % 3 = 1 AND id % 10 = 4"
        ))
        .await?;
    }
    db.exec(
        "UPDATE campaigns SET status = 'RUNNING', partition_count = 4, \
         planned_rows = IF(kind = 'POINT', 3000, 2000) WHERE id IN (43, 45)",
    )
    .await?;
    db.exec(
        "INSERT INTO campaign_counters (campaign_id, shard, succeeded, dead) VALUES \
         (43, 0, 500, 0), (43, 1, 500, 0), (45, 0, 666, 1)",
    )
    .await?;
    db.exec("ANALYZE TABLE point_targets, voucher_targets, campaigns, campaign_counters").await?;

    let mut report = String::new();
    let kinds = [
        ("point_targets", 43, <payout_point::Point as PayoutKind>::COLUMNS),
        ("voucher_targets", 45, <payout_voucher::Voucher as PayoutKind>::COLUMNS),
    ];
    for (table, id, columns) in kinds {
        // repo::claim_rows: the SELECT (with and without the locking clause, with the kind's
        // columns) and the UPDATE by id.
        for sql in [
            // From the start of partition 1 of 4 (after bucket 210, id 0), and from a cursor
            // in the middle of it; the ORDER BY must come from the index (no filesort).
            format!(
                "SELECT id, bucket, attempts, retry_base, {columns} FROM {table} \
                 FORCE INDEX (ix_{table}_claim) \
                 WHERE event_id = {id} AND status = 'PENDING' AND bucket < 420 \
                 AND (bucket > 210 OR (bucket = 210 AND id > 0)) \
                 ORDER BY bucket, id LIMIT 1000 FOR UPDATE SKIP LOCKED"
            ),
            format!(
                "SELECT id, bucket, attempts, retry_base, {columns} FROM {table} \
                 FORCE INDEX (ix_{table}_claim) \
                 WHERE event_id = {id} AND status = 'PENDING' AND bucket < 420 \
                 AND (bucket > 300 OR (bucket = 300 AND id > 1000)) \
                 ORDER BY bucket, id LIMIT 1000"
            ),
            // repo::pending_in_slice (after an empty claim)
            format!(
                "SELECT COUNT(*) AS n FROM {table} FORCE INDEX (ix_{table}_claim) \
                 WHERE event_id = {id} AND status = 'PENDING' AND bucket >= 210 AND bucket < 420"
            ),
            // repo::recover_in_flight
            format!(
                "UPDATE {table} SET status = 'PENDING', claimed_by = NULL, updated_at = NOW(3) \
                 WHERE event_id = {id} AND status = 'IN_FLIGHT' AND bucket >= 210 AND bucket < 420"
            ),
            // repo::complete_if_done: the whole UPDATE and its NOT EXISTS subquery alone.
            format!(
                "UPDATE campaigns SET status = 'COMPLETED', completed_at = NOW(3), \
                 status_reason = NULL, paused_by = NULL \
                 WHERE id = {id} AND status = 'RUNNING' AND NOT EXISTS \
                 (SELECT 1 FROM {table} WHERE event_id = {id} \
                 AND status IN ('PENDING', 'IN_FLIGHT', 'FAILED'))"
            ),
            format!(
                "SELECT 1 FROM {table} WHERE event_id = {id} \
                 AND status IN ('PENDING', 'IN_FLIGHT', 'FAILED') LIMIT 1"
            ),
            // repo::requeue_due_failures and repo::next_retry_due_in
            format!(
                "UPDATE {table} SET status = 'PENDING', updated_at = NOW(3) \
                 WHERE event_id = {id} AND status = 'FAILED' AND next_attempt_at <= NOW(3)"
            ),
            format!(
                "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, NOW(3), MIN(next_attempt_at)) / 1000 \
                 AS SIGNED) AS ms FROM {table} WHERE event_id = {id} AND status = 'FAILED'"
            ),
            // repo::claim_probe
            format!(
                "SELECT id, attempts, retry_base FROM {table} \
                 WHERE event_id = {id} AND status IN ('PENDING', 'FAILED') \
                 LIMIT 1 FOR UPDATE SKIP LOCKED"
            ),
            // repo::count_by_status (run once, at completion)
            format!(
                "SELECT status, COUNT(*) AS n FROM {table} WHERE event_id = {id} GROUP BY status"
            ),
        ] {
            let plan = explain(&db, &sql).await?;
            let n = assert_indexed(&sql, &plan, false);
            assert_eq!(n, 1, "one access to {table} expected in\n{}", show(&sql, &plan));
            if sql.contains("ORDER BY bucket, id") {
                let sorted = plan.iter().any(|r| {
                    r.get("Extra")
                        .is_some_and(|e| e.contains("filesort") || e.contains("temporary"))
                });
                assert!(
                    !sorted,
                    "the claim's ORDER BY should come from the index in\n{}",
                    show(&sql, &plan)
                );
            }
            report.push_str(&show(&sql, &plan));
        }
        // repo::count_target_range over repo::count_ranges (the first plan's parallel count)
        for range in payout_core::repo::count_ranges(4) {
            let sql =
                format!("SELECT COUNT(*) AS n FROM {table} WHERE event_id = {id} AND {range}");
            let plan = explain(&db, &sql).await?;
            let n = assert_indexed(&sql, &plan, false);
            assert_eq!(n, 1, "one access to {table} expected in\n{}", show(&sql, &plan));
            report.push_str(&show(&sql, &plan));
        }
        let sql = format!(
            "UPDATE {table} SET status = 'IN_FLIGHT', claimed_by = 'c-1', updated_at = NOW(3) \
             WHERE id IN (3, 4, 5, 6, 7, 8, 9, 10)"
        );
        let plan = explain(&db, &sql).await?;
        assert_indexed(&sql, &plan, true);
        report.push_str(&show(&sql, &plan));
    }

    // The status query, for a campaign with a stored plan and for one without (its total falls
    // back to COUNT(*) over the campaign's index range).
    for id in [42, 43, 44, 45] {
        let sql = format!("SELECT * FROM campaign_progress WHERE campaign_id = {id}");
        let plan = explain(&db, &sql).await?;
        let n = assert_indexed(&sql, &plan, false);
        // total (2 tables), in_flight (2), failed (2): six subqueries on the target tables.
        assert_eq!(n, 6, "six target-table subqueries expected in\n{}", show(&sql, &plan));
        let campaigns = plan
            .iter()
            .find(|r| r.get("table").map(String::as_str) == Some("c"))
            .unwrap_or_else(|| panic!("no access to campaigns in\n{}", show(&sql, &plan)));
        assert_eq!(
            campaigns.get("type").map(String::as_str),
            Some("const"),
            "campaigns should be read by primary key in\n{}",
            show(&sql, &plan)
        );
        // The IN_FLIGHT/FAILED counts seek (event_id, status): both key parts are used.
        let seeks = plan
            .iter()
            .filter(|r| {
                r.get("table").is_some_and(|t| is_target(t))
                    && r.get("ref").map(String::as_str) == Some("const,const")
            })
            .count();
        assert_eq!(
            seeks,
            4,
            "IN_FLIGHT/FAILED counts should seek (event_id, status) in\n{}",
            show(&sql, &plan)
        );
        report.push_str(&show(&sql, &plan));
    }

    // The loader's INSERT reads nothing: shown, not asserted.
    let sql = "INSERT INTO point_targets (event_id, customer_uid, amount, expiry_at, reason) \
               VALUES (42, 'u-x', 1, '20991231235959', 'r'), (42, 'u-y', 2, '20991231235959', 'r')";
    report.push_str(&show(sql, &explain(&db, sql).await?));
    println!("{report}");
    db.drop_db().await
}
