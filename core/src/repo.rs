//! The repository: every SQL statement the engine and the CLI run.
//!
//! Target tables differ only in their payload columns, so the statements here take the table
//! name from the kind (a `'static` constant, never user input) and touch only the columns all
//! target tables share: `id, event_id, status, bucket, attempts, transaction_id, last_error,
//! next_attempt_at, claimed_by, updated_at`.
//!
//! Outcome writes are fenced by the claim: a claim stores a token unique to it in `claimed_by`,
//! and every later write for that claim (failed, dead, released) requires the row to be
//! IN_FLIGHT under the same token, so a write retried after a lost acknowledgement can never
//! touch a newer claim of the row. A success is written unconditionally: Money's transaction id
//! is the truth whatever the row's state. `attempts` counts requests whose answer was recorded;
//! a claimed row that was never sent costs no attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::QueryableByName;
use diesel::mysql::Mysql;
use diesel::row::NamedRow;
use diesel::sql_types::{BigInt, Datetime, Integer, Nullable, SmallInt, Text};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};

use crate::domain::{CampaignId, CampaignStatus, OperatorCommand, TargetId, TargetStatus};
use crate::plan::{PartitionRule, PartitionSlice, slices};
use crate::reused::{Reused, chunked, padded, shape};

type QResult<T> = Result<T, diesel::result::Error>;

/// Longest `last_error` / dead-letter message stored.
const MAX_ERROR_CHARS: usize = 500;

fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

/// `SELECT ? AS c1, ? AS c2 UNION ALL SELECT ?, ? ...`: a derived table of values that both
/// MySQL 8 and MariaDB accept (their `VALUES` constructors differ).
fn values_table(columns: &[&str], rows: usize) -> String {
    let first: Vec<String> = columns.iter().map(|c| format!("? AS {c}")).collect();
    let rest = vec!["?"; columns.len()].join(", ");
    let mut s = format!("SELECT {}", first.join(", "));
    for _ in 1..rows {
        s.push_str(" UNION ALL SELECT ");
        s.push_str(&rest);
    }
    s
}

/// `CASE id WHEN ? THEN ? ... END`: a value per row, bound as (id, value) pairs.
fn case_by_id(rows: usize) -> String {
    let mut s = String::with_capacity(8 + rows * 14);
    s.push_str("CASE id");
    for _ in 0..rows {
        s.push_str(" WHEN ? THEN ?");
    }
    s.push_str(" END");
    s
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Campaigns

/// A campaign as the engine and the CLI see it.
#[derive(Debug, Clone, QueryableByName)]
pub struct CampaignRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub status_reason: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub paused_by: Option<String>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Datetime>)]
    pub queued_at: Option<NaiveDateTime>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Datetime>)]
    pub started_at: Option<NaiveDateTime>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Datetime>)]
    pub completed_at: Option<NaiveDateTime>,
    #[diesel(sql_type = Nullable<SmallInt>)]
    pub partition_count: Option<i16>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub planned_rows: Option<i64>,
}

impl CampaignRow {
    pub fn id(&self) -> CampaignId {
        CampaignId(self.id)
    }

    /// The parsed status; an unknown value (written by hand) reads as not runnable.
    pub fn status(&self) -> Option<CampaignStatus> {
        CampaignStatus::parse(&self.status).ok()
    }
}

const CAMPAIGN_COLUMNS: &str = "id, kind, name, status, status_reason, paused_by, queued_at, \
     started_at, completed_at, partition_count, planned_rows";

pub async fn campaign(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
) -> QResult<Option<CampaignRow>> {
    let mut rows: Vec<CampaignRow> =
        diesel::sql_query(format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = ?"))
            .bind::<BigInt, _>(id.0)
            .load(conn)
            .await?;
    Ok(rows.pop())
}

pub async fn campaigns(conn: &mut AsyncMysqlConnection) -> QResult<Vec<CampaignRow>> {
    diesel::sql_query(format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns ORDER BY id"))
        .load(conn)
        .await
}

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text)]
    status: String,
}

/// The campaign's status as stored now (`None` if the campaign does not exist).
pub async fn campaign_status(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
) -> QResult<Option<String>> {
    let mut rows: Vec<StatusRow> = diesel::sql_query("SELECT status FROM campaigns WHERE id = ?")
        .bind::<BigInt, _>(id.0)
        .load(conn)
        .await?;
    Ok(rows.pop().map(|r| r.status))
}

/// Gives every newly RUNNING campaign its place in the first-come-first-served queue and
/// returns the queue: RUNNING campaigns, earliest first, `id` breaking ties.
pub async fn running_queue(conn: &mut AsyncMysqlConnection) -> QResult<Vec<CampaignRow>> {
    diesel::sql_query(
        "UPDATE campaigns SET queued_at = NOW(3) WHERE status = 'RUNNING' AND queued_at IS NULL",
    )
    .execute(conn)
    .await?;
    running_campaigns(conn).await
}

/// Whether any campaign is RUNNING (one probe of the status index; nothing is written).
pub async fn any_running(conn: &mut AsyncMysqlConnection) -> QResult<bool> {
    let rows: Vec<StatusRow> =
        diesel::sql_query("SELECT status FROM campaigns WHERE status = 'RUNNING' LIMIT 1")
            .load(conn)
            .await?;
    Ok(!rows.is_empty())
}

/// RUNNING campaigns in queue order, without touching queue positions (for sweeps that only
/// read the set).
pub async fn running_campaigns(conn: &mut AsyncMysqlConnection) -> QResult<Vec<CampaignRow>> {
    diesel::sql_query(format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE status = 'RUNNING' \
         ORDER BY queued_at, id"
    ))
    .load(conn)
    .await
}

/// Events that are also Slack alerts: recorded with `alert_state = 'PENDING'`, so the event log
/// is the alert outbox (see `alerts`).
pub const ALERT_EVENTS: [&str; 5] =
    ["BREAKER_OPENED", "BREAKER_CLOSED", "COMPLETED", "CONFIG_FAULT", "FAILURE_RATE_HIGH"];

/// Appends to the audit trail / event log; an event in [`ALERT_EVENTS`] is queued for delivery
/// in the same statement.
pub async fn record_event(
    conn: &mut AsyncMysqlConnection,
    campaign: Option<CampaignId>,
    event: &str,
    transition: Option<(&str, &str)>,
    actor: &str,
    detail: Option<&str>,
) -> QResult<()> {
    let alert = ALERT_EVENTS.contains(&event);
    diesel::sql_query(
        "INSERT INTO campaign_events \
         (campaign_id, event, from_status, to_status, actor, detail, alert_state, next_alert_at) \
         VALUES (?, ?, ?, ?, ?, ?, CASE WHEN ? THEN 'PENDING' END, CASE WHEN ? THEN NOW(3) END)",
    )
    .bind::<Nullable<BigInt>, _>(campaign.map(|c| c.0))
    .bind::<Text, _>(event)
    .bind::<Nullable<Text>, _>(transition.map(|t| t.0))
    .bind::<Nullable<Text>, _>(transition.map(|t| t.1))
    .bind::<Text, _>(truncate(actor, 128))
    .bind::<Nullable<Text>, _>(detail)
    .bind::<diesel::sql_types::Bool, _>(alert)
    .bind::<diesel::sql_types::Bool, _>(alert)
    .execute(conn)
    .await?;
    Ok(())
}

/// Why an operator's command was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("campaign {0} does not exist")]
    UnknownCampaign(CampaignId),
    #[error("campaign {campaign}: {reason}")]
    Illegal { campaign: CampaignId, reason: crate::domain::IllegalTransition },
    #[error("campaign {0} has an unknown status {1:?}")]
    BadStatus(CampaignId, String),
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

/// Applies an operator's command atomically and records it in the audit trail.
pub async fn apply_command(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
    command: OperatorCommand,
    actor: &str,
) -> Result<(CampaignStatus, CampaignStatus), CommandError> {
    conn.transaction(async |c| {
        let mut rows: Vec<StatusRow> =
            diesel::sql_query("SELECT status FROM campaigns WHERE id = ? FOR UPDATE")
                .bind::<BigInt, _>(id.0)
                .load(c)
                .await?;
        let from = rows.pop().ok_or(CommandError::UnknownCampaign(id))?.status;
        let from = CampaignStatus::parse(&from).map_err(|e| CommandError::BadStatus(id, e.0))?;
        let to =
            from.apply(command).map_err(|reason| CommandError::Illegal { campaign: id, reason })?;
        let paused_by = match to {
            CampaignStatus::Paused => Some("OPERATOR"),
            CampaignStatus::Ready
            | CampaignStatus::Running
            | CampaignStatus::Stopped
            | CampaignStatus::Completed => None,
        };
        // Entering RUNNING takes a place in the first-come-first-served queue (kept on resume).
        diesel::sql_query(
            "UPDATE campaigns SET status = ?, paused_by = ?, status_reason = ?, \
             queued_at = CASE WHEN ? THEN COALESCE(queued_at, NOW(3)) ELSE queued_at END \
             WHERE id = ?",
        )
        .bind::<Text, _>(to.as_str())
        .bind::<Nullable<Text>, _>(paused_by)
        .bind::<Nullable<Text>, _>(
            (to != CampaignStatus::Running).then(|| format!("{} by {actor}", command.as_str())),
        )
        .bind::<diesel::sql_types::Bool, _>(to == CampaignStatus::Running)
        .bind::<BigInt, _>(id.0)
        .execute(c)
        .await?;
        record_event(
            c,
            Some(id),
            "STATUS_CHANGED",
            Some((from.as_str(), to.as_str())),
            actor,
            Some(&format!("{{\"command\":\"{}\"}}", command.as_str())),
        )
        .await?;
        Ok((from, to))
    })
    .await
}

/// The daemon pauses a RUNNING campaign (breaker, configuration fault, unknown kind).
/// Returns whether it was RUNNING.
pub async fn pause_by_daemon(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
    paused_by: &str,
    reason: &str,
    actor: &str,
) -> QResult<bool> {
    conn.transaction(async |c| {
        let n = diesel::sql_query(
            "UPDATE campaigns SET status = 'PAUSED', paused_by = ?, status_reason = ? \
             WHERE id = ? AND status = 'RUNNING'",
        )
        .bind::<Text, _>(paused_by)
        .bind::<Text, _>(truncate(reason, 500))
        .bind::<BigInt, _>(id.0)
        .execute(c)
        .await?;
        if n > 0 {
            let detail =
                serde_json::json!({ "paused_by": paused_by, "reason": reason }).to_string();
            record_event(
                c,
                Some(id),
                "STATUS_CHANGED",
                Some(("RUNNING", "PAUSED")),
                actor,
                Some(&detail),
            )
            .await?;
        }
        Ok(n > 0)
    })
    .await
}

/// Notes the first send of a campaign.
pub async fn mark_started(conn: &mut AsyncMysqlConnection, id: CampaignId) -> QResult<()> {
    diesel::sql_query(
        "UPDATE campaigns SET started_at = NOW(3) WHERE id = ? AND started_at IS NULL",
    )
    .bind::<BigInt, _>(id.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks a RUNNING campaign COMPLETED if none of its rows is PENDING, IN_FLIGHT or FAILED,
/// deciding on the rows themselves in the same statement. Returns whether it did.
pub async fn complete_if_done(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
    actor: &str,
) -> QResult<bool> {
    conn.transaction(async |c| {
        let n = diesel::sql_query(format!(
            "UPDATE campaigns SET status = 'COMPLETED', completed_at = NOW(3), \
             status_reason = NULL, paused_by = NULL \
             WHERE id = ? AND status = 'RUNNING' AND NOT EXISTS \
             (SELECT 1 FROM {table} WHERE event_id = ? AND status IN ('PENDING', 'IN_FLIGHT', 'FAILED'))"
        ))
        .bind::<BigInt, _>(id.0)
        .bind::<BigInt, _>(id.0)
        .execute(c)
        .await?;
        if n > 0 {
            let counts = count_by_status(c, table, id).await?;
            let detail = serde_json::to_string(
                &counts.iter().map(|(k, v)| (k.as_str(), *v)).collect::<BTreeMap<_, _>>(),
            )
            .unwrap_or_default();
            record_event(c, Some(id), "COMPLETED", Some(("RUNNING", "COMPLETED")), actor, Some(&detail))
                .await?;
        }
        Ok(n > 0)
    })
    .await
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct StatusCountRow {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Rows of a campaign per status (statuses with no row are absent).
pub async fn count_by_status(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
) -> QResult<BTreeMap<TargetStatus, u64>> {
    let rows: Vec<StatusCountRow> = diesel::sql_query(format!(
        "SELECT status, COUNT(*) AS n FROM {table} WHERE event_id = ? GROUP BY status"
    ))
    .bind::<BigInt, _>(id.0)
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| TargetStatus::parse(&r.status).ok().map(|s| (s, r.n.max(0) as u64)))
        .collect())
}

#[derive(QueryableByName)]
struct PartitionCountRow {
    #[diesel(sql_type = Nullable<SmallInt>)]
    partition_count: Option<i16>,
}

/// `campaigns.partition_count`, read with `FOR UPDATE` when `lock`.
async fn partition_count(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
    lock: bool,
) -> QResult<Option<i16>> {
    let sql = if lock {
        "SELECT partition_count FROM campaigns WHERE id = ? FOR UPDATE"
    } else {
        "SELECT partition_count FROM campaigns WHERE id = ?"
    };
    let mut rows: Vec<PartitionCountRow> =
        diesel::sql_query(sql).bind::<BigInt, _>(id.0).load(conn).await?;
    Ok(rows.pop().and_then(|r| r.partition_count))
}

/// The campaign's stored partition count, if it has a plan.
pub async fn stored_partition_count(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
) -> QResult<Option<u16>> {
    Ok(partition_count(conn, id, false).await?.and_then(|n| u16::try_from(n).ok()))
}

/// Conditions that split a campaign's target rows into disjoint ranges of the claim index
/// `(event_id, status, bucket, id)`: every status sorting before PENDING, every status after
/// it, and PENDING in `pending_slices` bucket slices. Each row is in exactly one range, so the
/// counts of the ranges add up to the campaign's row count, and they can be counted in parallel.
pub fn count_ranges(pending_slices: u16) -> Vec<String> {
    let mut ranges = vec!["status < 'PENDING'".to_owned(), "status > 'PENDING'".to_owned()];
    for s in slices(pending_slices) {
        ranges.push(format!(
            "status = 'PENDING' AND bucket >= {} AND bucket < {}",
            s.bucket_lo, s.bucket_hi
        ));
    }
    ranges
}

/// Counts the campaign's rows in one range of [`count_ranges`].
pub async fn count_target_range(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
    range: &str,
) -> QResult<i64> {
    let mut counted: Vec<CountRow> = diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM {table} WHERE event_id = ? AND {range}"
    ))
    .bind::<BigInt, _>(id.0)
    .load(conn)
    .await?;
    Ok(counted.pop().map(|r| r.n).unwrap_or(0).max(0))
}

/// Returns the campaign's stored partition count, deciding and storing the plan first if there
/// is none: counted once, kept across restarts.
pub async fn ensure_plan(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
    rule: PartitionRule,
    actor: &str,
) -> QResult<Vec<PartitionSlice>> {
    ensure_plan_counted(conn, table, id, rule, actor, None).await
}

/// [`ensure_plan`] with the rows already counted (`counted`, e.g. by [`count_ranges`] in
/// parallel); `None` counts them inside the planning transaction. A plan stored meanwhile by
/// another instance wins over the count.
pub async fn ensure_plan_counted(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
    rule: PartitionRule,
    actor: &str,
    counted: Option<i64>,
) -> QResult<Vec<PartitionSlice>> {
    conn.transaction(async |c| {
        if let Some(n) = partition_count(c, id, true).await? {
            return Ok(slices(u16::try_from(n).unwrap_or(1)));
        }
        let rows_total = match counted {
            Some(n) => n.max(0),
            None => {
                let mut counted: Vec<CountRow> = diesel::sql_query(format!(
                    "SELECT COUNT(*) AS n FROM {table} WHERE event_id = ?"
                ))
                .bind::<BigInt, _>(id.0)
                .load(c)
                .await?;
                counted.pop().map(|r| r.n).unwrap_or(0).max(0)
            }
        };
        let plan = slices(rule.partitions_for(rows_total as u64));
        let count = plan.len() as i16;
        diesel::sql_query(
            "UPDATE campaigns SET partition_count = ?, planned_rows = ? WHERE id = ?",
        )
        .bind::<SmallInt, _>(count)
        .bind::<BigInt, _>(rows_total)
        .bind::<BigInt, _>(id.0)
        .execute(c)
        .await?;
        store_partitions(c, id, &plan).await?;
        let detail = format!("{{\"rows\":{rows_total},\"partitions\":{count}}}");
        record_event(c, Some(id), "PLANNED", None, actor, Some(&detail)).await?;
        Ok(plan)
    })
    .await
}

/// Replaces the campaign's partition rows with `plan` (no lease held), inside the caller's
/// transaction: the first plan, or a re-plan. The new rows remember when the old ones were last
/// sent in (`released_at`), so that whoever takes them first waits out the window the old
/// holders' last requests still count in, and by whom if one process held them all last
/// (`released_by`): that process's own send log holds those requests, so it need not wait.
pub async fn store_partitions(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
    plan: &[PartitionSlice],
) -> QResult<()> {
    #[derive(QueryableByName)]
    struct Quiet {
        #[diesel(sql_type = Nullable<Datetime>)]
        since: Option<NaiveDateTime>,
        #[diesel(sql_type = Nullable<Text>)]
        by: Option<String>,
    }
    // An aggregate: always one row, NULL when there is no old row (the first plan). `by`: the
    // one process that held every old partition ever held last, else NULL (anyone's sends).
    let quiet: Quiet = diesel::sql_query(
        "SELECT LEAST(NOW(3), MAX(COALESCE(released_at, lease_expires_at))) AS since, \
         IF(COUNT(DISTINCT COALESCE(owner, released_by)) = 1 \
            AND COUNT(COALESCE(owner, released_by)) = COUNT(*), \
            MAX(COALESCE(owner, released_by)), NULL) AS `by` \
         FROM campaign_partitions \
         WHERE campaign_id = ? AND COALESCE(released_at, lease_expires_at) IS NOT NULL",
    )
    .bind::<BigInt, _>(id.0)
    .get_result(conn)
    .await?;
    let Quiet { since, by } = quiet;
    diesel::sql_query("DELETE FROM campaign_partitions WHERE campaign_id = ?")
        .bind::<BigInt, _>(id.0)
        .execute(conn)
        .await?;
    for s in plan {
        diesel::sql_query(
            "INSERT INTO campaign_partitions \
             (campaign_id, partition_no, partition_count, bucket_lo, bucket_hi, released_at, \
             released_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind::<BigInt, _>(id.0)
        .bind::<SmallInt, _>(s.partition_no as i16)
        .bind::<SmallInt, _>(s.partition_count as i16)
        .bind::<SmallInt, _>(s.bucket_lo as i16)
        .bind::<SmallInt, _>(s.bucket_hi as i16)
        .bind::<Nullable<Datetime>, _>(since)
        .bind::<Nullable<Text>, _>(by.as_deref())
        .execute(conn)
        .await?;
    }
    Ok(())
}

/// Campaigns a breaker probe may use, in queue order: RUNNING ones and those the breaker paused.
pub async fn breaker_candidates(conn: &mut AsyncMysqlConnection) -> QResult<Vec<CampaignRow>> {
    diesel::sql_query(format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE status = 'RUNNING' \
         OR (status = 'PAUSED' AND paused_by = 'BREAKER') ORDER BY queued_at, id"
    ))
    .load(conn)
    .await
}

/// Resumes every campaign the breaker paused (never one an operator paused). Returns their ids.
pub async fn resume_breaker_paused(
    conn: &mut AsyncMysqlConnection,
    actor: &str,
) -> QResult<Vec<CampaignId>> {
    conn.transaction(async |c| {
        #[derive(QueryableByName)]
        struct IdRow {
            #[diesel(sql_type = BigInt)]
            id: i64,
        }
        let rows: Vec<IdRow> = diesel::sql_query(
            "SELECT id FROM campaigns WHERE status = 'PAUSED' AND paused_by = 'BREAKER' FOR UPDATE",
        )
        .load(c)
        .await?;
        for r in &rows {
            diesel::sql_query(
                "UPDATE campaigns SET status = 'RUNNING', paused_by = NULL, status_reason = NULL \
                 WHERE id = ? AND status = 'PAUSED' AND paused_by = 'BREAKER'",
            )
            .bind::<BigInt, _>(r.id)
            .execute(c)
            .await?;
            record_event(
                c,
                Some(CampaignId(r.id)),
                "STATUS_CHANGED",
                Some(("PAUSED", "RUNNING")),
                actor,
                Some("{\"reason\":\"circuit breaker closed\"}"),
            )
            .await?;
        }
        Ok(rows.into_iter().map(|r| CampaignId(r.id)).collect())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Target rows

/// Puts rows a dead process left IN_FLIGHT in the given slice back to PENDING. They keep their
/// attempt count and idempotency key, so resending them is answered by Money with a replay if
/// the earlier attempt went through. Only the slice's owner may call this.
pub async fn recover_in_flight(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
    slice: &PartitionSlice,
) -> QResult<usize> {
    diesel::sql_query(format!(
        "UPDATE {table} SET status = 'PENDING', claimed_by = NULL, updated_at = NOW(3) \
         WHERE event_id = ? AND status = 'IN_FLIGHT' AND bucket >= ? AND bucket < ?"
    ))
    .bind::<BigInt, _>(id.0)
    .bind::<SmallInt, _>(slice.bucket_lo as i16)
    .bind::<SmallInt, _>(slice.bucket_hi as i16)
    .execute(conn)
    .await
}

/// A claim's token in `claimed_by`: unique to one claim, it fences the claim's outcome write.
pub type ClaimToken = std::sync::Arc<str>;

/// A claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub target: TargetId,
    pub claim: ClaimToken,
    /// Attempts recorded before this claim.
    pub attempts: i32,
    /// `attempts` when the row last got a fresh retry budget (a requeue).
    pub retry_base: i32,
}

impl Claimed {
    /// Which attempt of the current retry budget this claim's request is (1 = the first).
    pub fn budget_attempt(&self) -> i32 {
        (self.attempts + 1 - self.retry_base).max(1)
    }
}

#[derive(QueryableByName)]
struct ClaimRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = SmallInt)]
    bucket: i16,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Integer)]
    retry_base: i32,
}

/// A claimed row read together with the payload columns a kind asked for (`R`), from one
/// result row: the claim's own columns and the kind's are looked up by name.
struct ClaimedRow<R> {
    claim: ClaimRow,
    payload: R,
}

impl<R: QueryableByName<Mysql>> QueryableByName<Mysql> for ClaimedRow<R> {
    fn build<'a>(row: &impl NamedRow<'a, Mysql>) -> diesel::deserialize::Result<Self> {
        Ok(ClaimedRow { claim: ClaimRow::build(row)?, payload: R::build(row)? })
    }
}

/// No payload: [`claim`] reads the claim's own columns only.
struct NoPayload;

impl QueryableByName<Mysql> for NoPayload {
    fn build<'a>(_row: &impl NamedRow<'a, Mysql>) -> diesel::deserialize::Result<Self> {
        Ok(NoPayload)
    }
}

/// Where a partition's next claim starts: after this `(bucket, id)` in claim-index order.
///
/// Claiming from the start of the partition's range every time makes each claim step over the
/// index entries of every row claimed before it (InnoDB only delete-marks the old `PENDING`
/// entries and purges them later), so claims slow down as a partition drains. A claim that
/// starts after the last row of the previous one does not. Rows that become `PENDING` again
/// behind the cursor (released, swept back for a retry, requeued) are found when the cursor
/// starts over: after a short batch, and at least every few seconds (the caller decides).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClaimCursor {
    after: Option<(i16, i64)>,
}

impl ClaimCursor {
    /// A cursor at the start of the partition.
    pub fn start() -> ClaimCursor {
        ClaimCursor::default()
    }

    pub fn at_start(&self) -> bool {
        self.after.is_none()
    }
}

/// What one claim asks for: up to `limit` PENDING rows of `slice` of `campaign`, under `token`.
#[derive(Debug, Clone, Copy)]
pub struct ClaimSpec<'a> {
    pub campaign: CampaignId,
    pub slice: &'a PartitionSlice,
    pub limit: u32,
    pub token: &'a ClaimToken,
}

/// Claims up to `limit` PENDING rows of one partition, in claim-index order from `cursor`:
/// locks their ids (`SKIP LOCKED`) and marks them IN_FLIGHT under the claim's `token`, in one
/// short transaction. Moves the cursor past the claimed rows, or back to the start when the
/// claim found fewer than `limit` rows (the end of the partition).
pub async fn claim(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
    slice: &PartitionSlice,
    limit: u32,
    token: &ClaimToken,
    cursor: &mut ClaimCursor,
) -> QResult<Vec<Claimed>> {
    let spec = ClaimSpec { campaign: id, slice, limit, token };
    let rows = claim_rows::<NoPayload>(conn, table, "", spec, cursor).await?;
    Ok(rows.into_iter().map(|(claimed, NoPayload)| claimed).collect())
}

/// [`claim`], reading each claimed row's `columns` (a kind's `SELECT` list, loaded as `R`;
/// empty for none) in the claim's own locking read: no second statement to load the rows it
/// claimed.
pub async fn claim_rows<R>(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    columns: &str,
    spec: ClaimSpec<'_>,
    cursor: &mut ClaimCursor,
) -> QResult<Vec<(Claimed, R)>>
where
    R: QueryableByName<Mysql> + Send + 'static,
{
    let ClaimSpec { campaign: id, slice, limit, token } = spec;
    // From the start: after (bucket_lo, id 0); ids start at 1. The index is forced: when the
    // partition holds much of the table, the optimizer prefers a table scan and a sort for the
    // ORDER BY, and a locking table scan briefly locks every other partition's rows, which
    // their concurrent SKIP LOCKED claims then skip (seen: a claim coming back empty with
    // thousands of rows PENDING).
    let (after_bucket, after_id) = cursor.after.unwrap_or((slice.bucket_lo as i16, 0));
    let payload = if columns.is_empty() { String::new() } else { format!(", {columns}") };
    let rows: Vec<ClaimedRow<R>> = conn
        .transaction(async |c| {
            let rows: Vec<ClaimedRow<R>> = Reused::new(format!(
                "SELECT id, bucket, attempts, retry_base{payload} FROM {table} \
                 FORCE INDEX (ix_{table}_claim) \
                 WHERE event_id = ? AND status = 'PENDING' AND bucket < ? \
                 AND (bucket > ? OR (bucket = ? AND id > ?)) \
                 ORDER BY bucket, id LIMIT ? FOR UPDATE SKIP LOCKED"
            ))
            .big(id.0)
            .small(slice.bucket_hi as i16)
            .small(after_bucket)
            .small(after_bucket)
            .big(after_id)
            .big(i64::from(limit))
            .load(c)
            .await?;
            if rows.is_empty() {
                return Ok::<_, diesel::result::Error>(rows);
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.claim.id).collect();
            for chunk in chunked(&ids) {
                let mut q = Reused::new(format!(
                    "UPDATE {table} SET status = 'IN_FLIGHT', claimed_by = ?, updated_at = NOW(3) \
                     WHERE id IN ({})",
                    placeholders(shape(chunk.len()))
                ))
                .text(token.to_string());
                for &id in padded(chunk) {
                    q = q.big(id);
                }
                q.execute(c).await?;
            }
            Ok::<_, diesel::result::Error>(rows)
        })
        .await?;
    cursor.after = match rows.last() {
        Some(last) if rows.len() >= limit as usize => Some((last.claim.bucket, last.claim.id)),
        _ => None,
    };
    Ok(rows
        .into_iter()
        .map(|r| {
            let claimed = Claimed {
                target: TargetId(r.claim.id),
                claim: token.clone(),
                attempts: r.claim.attempts,
                retry_base: r.claim.retry_base,
            };
            (claimed, r.payload)
        })
        .collect())
}

/// PENDING rows of one partition, counted without locking anything.
///
/// A claim that comes back empty does not prove the partition has nothing left: `SKIP LOCKED`
/// can pass over a PENDING row while another transaction briefly holds a lock on it, and on
/// MariaDB 10.11 a claim from the start of a partition was seen to come back empty with a
/// PENDING row nobody held (payout-bench's database-only pass, 1 run in 5). The worker asks
/// this count before it calls its partition idle.
pub async fn pending_in_slice(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
    slice: &PartitionSlice,
) -> QResult<i64> {
    let mut counted: Vec<CountRow> = diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM {table} FORCE INDEX (ix_{table}_claim) \
         WHERE event_id = ? AND status = 'PENDING' AND bucket >= ? AND bucket < ?"
    ))
    .bind::<BigInt, _>(id.0)
    .bind::<SmallInt, _>(slice.bucket_lo as i16)
    .bind::<SmallInt, _>(slice.bucket_hi as i16)
    .load(conn)
    .await?;
    Ok(counted.pop().map(|r| r.n).unwrap_or(0).max(0))
}

/// Claims one row of a campaign for a breaker probe: PENDING, or FAILED whatever its retry time.
pub async fn claim_probe(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
    token: &ClaimToken,
) -> QResult<Option<Claimed>> {
    conn.transaction(async |c| {
        let mut rows: Vec<ClaimRow> = diesel::sql_query(format!(
            "SELECT id, bucket, attempts, retry_base FROM {table} \
             WHERE event_id = ? AND status IN ('PENDING', 'FAILED') LIMIT 1 FOR UPDATE SKIP LOCKED"
        ))
        .bind::<BigInt, _>(id.0)
        .load(c)
        .await?;
        let Some(row) = rows.pop() else { return Ok(None) };
        diesel::sql_query(format!(
            "UPDATE {table} SET status = 'IN_FLIGHT', claimed_by = ?, updated_at = NOW(3) \
             WHERE id = ?"
        ))
        .bind::<Text, _>(token.to_string())
        .bind::<BigInt, _>(row.id)
        .execute(c)
        .await?;
        Ok(Some(Claimed {
            target: TargetId(row.id),
            claim: token.clone(),
            attempts: row.attempts,
            retry_base: row.retry_base,
        }))
    })
    .await
}

/// Loads rows by id with the kind's column list.
pub async fn load_rows<R>(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    columns: &str,
    ids: &[TargetId],
) -> QResult<Vec<R>>
where
    R: QueryableByName<Mysql> + Send + 'static,
{
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!("SELECT {columns} FROM {table} WHERE id IN ({})", placeholders(ids.len()));
    let mut q = diesel::sql_query(sql).into_boxed::<Mysql>();
    for id in ids {
        q = q.bind::<BigInt, _>(id.0);
    }
    q.load(conn).await
}

/// What became of one claimed row.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Money granted it (or replayed the grant).
    Granted { transaction_id: String },
    /// Not granted; tried again after `after`.
    Retry { after: Duration, error: String },
    /// Given up after this attempt: DEAD with a dead letter.
    Dead { code: String, message: String },
    /// Never sent because the row is invalid: DEAD with a dead letter, no attempt counted.
    Invalid { code: String, message: String },
    /// Never sent (the campaign stopped first): back to PENDING, the attempt not counted.
    Released,
}

/// One row's outcome, fenced by its claim.
#[derive(Debug, Clone, PartialEq)]
pub struct RowOutcome {
    pub target: TargetId,
    pub claim: ClaimToken,
    pub outcome: Outcome,
}

/// Writes a batch of outcomes in one transaction (one statement per outcome class).
///
/// `shard` names the writer in `campaign_counters` (a partition number; other writers use
/// [`PROBE_SHARD`]), whose SUCCEEDED and DEAD counts change in the same transaction.
pub async fn write_outcomes(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    kind: &str,
    id: CampaignId,
    shard: i16,
    outcomes: &[RowOutcome],
) -> QResult<()> {
    let mut granted = Vec::new();
    let mut retry = Vec::new();
    let mut dead = Vec::new();
    let mut released = Vec::new();
    for o in outcomes {
        match &o.outcome {
            Outcome::Granted { transaction_id } => granted.push((o, transaction_id)),
            Outcome::Retry { after, error } => retry.push((o, after, error)),
            Outcome::Dead { code, message } => dead.push((o, code, message, 1)),
            Outcome::Invalid { code, message } => dead.push((o, code, message, 0)),
            Outcome::Released => released.push(o),
        }
    }
    conn.transaction(async |c| {
        let mut succeeded_delta: i64 = 0;
        let mut dead_delta: i64 = 0;
        if !granted.is_empty() {
            // Normally from IN_FLIGHT; a success found on a DEAD row (a race with a person's
            // action) still wins, and moves the row between the counters.
            // One statement over the rows by primary key (per [`chunked`] part), each row's
            // transaction id picked by a CASE. A join with a derived table of one `SELECT` per
            // row (as the rarer outcome classes below use) makes MariaDB fill and read a
            // temporary table per batch: two
            // temporary-table writes and two reads per row, about 15 % more CPU for the
            // statement (measured on 100,000 rows in batches of 250).
            for chunk in chunked(&granted) {
                let places = shape(chunk.len());
                let mut updated = 0;
                for from in ["status NOT IN ('SUCCEEDED', 'DEAD')", "status = 'DEAD'"] {
                    let mut q = Reused::new(format!(
                        "UPDATE {table} SET status = 'SUCCEEDED', transaction_id = {}, \
                         last_error = NULL, attempts = attempts + 1, next_attempt_at = NULL, \
                         updated_at = NOW(3) WHERE id IN ({}) AND {from}",
                        case_by_id(places),
                        placeholders(places)
                    ));
                    for (o, tx) in padded(chunk) {
                        q = q.big(o.target.0).text(truncate(tx, 128));
                    }
                    for (o, _) in padded(chunk) {
                        q = q.big(o.target.0);
                    }
                    let n = q.execute(c).await?;
                    updated += n;
                    succeeded_delta += n as i64;
                    if from.contains("= 'DEAD'") {
                        dead_delta -= n as i64;
                    }
                    if updated >= chunk.len() {
                        break;
                    }
                }
            }
        }
        if !retry.is_empty() {
            let sql = format!(
                "UPDATE {table} t JOIN ({}) v ON t.id = v.id AND t.claimed_by = v.claim \
                 SET t.status = 'FAILED', t.last_error = v.err, t.attempts = t.attempts + 1, \
                 t.next_attempt_at = NOW(3) + INTERVAL v.delay_us MICROSECOND, t.updated_at = NOW(3) \
                 WHERE t.status = 'IN_FLIGHT'",
                values_table(&["id", "claim", "err", "delay_us"], retry.len())
            );
            let mut q = diesel::sql_query(sql).into_boxed::<Mysql>();
            for (o, after, error) in &retry {
                q = q
                    .bind::<BigInt, _>(o.target.0)
                    .bind::<Text, _>(o.claim.to_string())
                    .bind::<Text, _>(truncate(error, MAX_ERROR_CHARS))
                    .bind::<BigInt, _>(i64::try_from(after.as_micros()).unwrap_or(i64::MAX));
            }
            q.execute(c).await?;
        }
        if !dead.is_empty() {
            let sql = format!(
                "UPDATE {table} t JOIN ({}) v ON t.id = v.id AND t.claimed_by = v.claim \
                 SET t.status = 'DEAD', t.last_error = v.err, t.next_attempt_at = NULL, \
                 t.attempts = t.attempts + v.sent, t.updated_at = NOW(3) \
                 WHERE t.status = 'IN_FLIGHT'",
                values_table(&["id", "claim", "err", "sent"], dead.len())
            );
            let mut q = diesel::sql_query(sql).into_boxed::<Mysql>();
            for (o, code, message, sent) in &dead {
                q = q
                    .bind::<BigInt, _>(o.target.0)
                    .bind::<Text, _>(o.claim.to_string())
                    .bind::<Text, _>(truncate(&format!("{code}: {message}"), MAX_ERROR_CHARS))
                    .bind::<Integer, _>(*sent);
            }
            dead_delta += q.execute(c).await? as i64;
            // One unresolved dead letter per DEAD row; a retried write adds nothing.
            let sql = format!(
                "INSERT INTO dead_letters \
                 (campaign_id, target_kind, target_id, error_code, error_message, attempts) \
                 SELECT ?, ?, t.id, v.code, v.msg, t.attempts FROM ({}) v \
                 JOIN {table} t ON t.id = v.id AND t.claimed_by = v.claim \
                 WHERE t.status = 'DEAD' AND NOT EXISTS (SELECT 1 FROM dead_letters d \
                 WHERE d.target_kind = ? AND d.target_id = t.id AND d.resolved_at IS NULL)",
                values_table(&["id", "claim", "code", "msg"], dead.len())
            );
            let mut q = diesel::sql_query(sql)
                .into_boxed::<Mysql>()
                .bind::<BigInt, _>(id.0)
                .bind::<Text, _>(kind.to_owned());
            for (o, code, message, _) in &dead {
                q = q
                    .bind::<BigInt, _>(o.target.0)
                    .bind::<Text, _>(o.claim.to_string())
                    .bind::<Text, _>(truncate(code, 64))
                    .bind::<Text, _>(truncate(message, MAX_ERROR_CHARS));
            }
            q = q.bind::<Text, _>(kind.to_owned());
            q.execute(c).await?;
        }
        if !released.is_empty() {
            let sql = format!(
                "UPDATE {table} t JOIN ({}) v ON t.id = v.id AND t.claimed_by = v.claim \
                 SET t.status = 'PENDING', t.claimed_by = NULL, t.updated_at = NOW(3) \
                 WHERE t.status = 'IN_FLIGHT'",
                values_table(&["id", "claim"], released.len())
            );
            let mut q = diesel::sql_query(sql).into_boxed::<Mysql>();
            for o in &released {
                q = q.bind::<BigInt, _>(o.target.0).bind::<Text, _>(o.claim.to_string());
            }
            q.execute(c).await?;
        }
        if succeeded_delta != 0 || dead_delta != 0 {
            add_counters(c, id, shard, succeeded_delta, dead_delta).await?;
        }
        Ok(())
    })
    .await
}

/// The `campaign_counters` shard of writers that are not a partition (the breaker probe).
pub const PROBE_SHARD: i16 = 900;
/// The `campaign_counters` shard of operator actions (requeue).
pub const OPERATOR_SHARD: i16 = 901;

/// Adds to a campaign's SUCCEEDED and DEAD counters (inside the caller's transaction).
pub async fn add_counters(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
    shard: i16,
    succeeded: i64,
    dead: i64,
) -> QResult<()> {
    Reused::new(
        "INSERT INTO campaign_counters (campaign_id, shard, succeeded, dead) VALUES (?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE succeeded = succeeded + ?, dead = dead + ?",
    )
    .big(id.0)
    .small(shard)
    .big(succeeded)
    .big(dead)
    .big(succeeded)
    .big(dead)
    .execute(conn)
    .await?;
    Ok(())
}

/// One campaign's row of the `campaign_progress` view.
#[derive(Debug, Clone, QueryableByName)]
pub struct Progress {
    #[diesel(sql_type = BigInt)]
    pub campaign_id: i64,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = BigInt)]
    pub total_rows: i64,
    #[diesel(sql_type = BigInt)]
    pub succeeded: i64,
    #[diesel(sql_type = BigInt)]
    pub dead: i64,
    #[diesel(sql_type = BigInt)]
    pub in_flight: i64,
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub failure_rate_pct: f64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Double>)]
    pub current_rows_per_sec: Option<f64>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Datetime>)]
    pub started_at: Option<NaiveDateTime>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Datetime>)]
    pub completed_at: Option<NaiveDateTime>,
}

const PROGRESS_COLUMNS: &str = "campaign_id, kind, name, status, \
     CAST(total_rows AS SIGNED) AS total_rows, CAST(succeeded AS SIGNED) AS succeeded, \
     CAST(dead AS SIGNED) AS dead, CAST(in_flight AS SIGNED) AS in_flight, \
     CAST(failed AS SIGNED) AS failed, CAST(pending AS SIGNED) AS pending, \
     CAST(failure_rate_pct AS DOUBLE) AS failure_rate_pct, current_rows_per_sec, started_at, \
     completed_at";

impl Progress {
    pub fn campaign_id(&self) -> CampaignId {
        CampaignId(self.campaign_id)
    }
}

/// The `campaign_progress` row of one campaign.
pub async fn progress(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
) -> QResult<Option<Progress>> {
    let mut rows: Vec<Progress> = diesel::sql_query(format!(
        "SELECT {PROGRESS_COLUMNS} FROM campaign_progress WHERE campaign_id = ?"
    ))
    .bind::<BigInt, _>(id.0)
    .load(conn)
    .await?;
    Ok(rows.pop())
}

/// Notes a campaign's current throughput (rows finished per second).
pub async fn set_current_rate(
    conn: &mut AsyncMysqlConnection,
    id: CampaignId,
    rows_per_sec: f64,
) -> QResult<()> {
    diesel::sql_query("UPDATE campaigns SET current_rows_per_sec = ? WHERE id = ?")
        .bind::<diesel::sql_types::Double, _>(rows_per_sec)
        .bind::<BigInt, _>(id.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// Moves a campaign's FAILED rows whose retry time has come back to PENDING.
pub async fn requeue_due_failures(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
) -> QResult<usize> {
    diesel::sql_query(format!(
        "UPDATE {table} SET status = 'PENDING', updated_at = NOW(3) \
         WHERE event_id = ? AND status = 'FAILED' AND next_attempt_at <= NOW(3)"
    ))
    .bind::<BigInt, _>(id.0)
    .execute(conn)
    .await
}

/// Wait until the earliest FAILED row of a campaign is due (None when there is none).
pub async fn next_retry_due_in(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    id: CampaignId,
) -> QResult<Option<Duration>> {
    #[derive(QueryableByName)]
    struct DueRow {
        #[diesel(sql_type = Nullable<BigInt>)]
        ms: Option<i64>,
    }
    let mut rows: Vec<DueRow> = diesel::sql_query(format!(
        "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, NOW(3), MIN(next_attempt_at)) / 1000 AS SIGNED) AS ms \
         FROM {table} WHERE event_id = ? AND status = 'FAILED'"
    ))
    .bind::<BigInt, _>(id.0)
    .load(conn)
    .await?;
    Ok(rows.pop().and_then(|r| r.ms).map(|ms| Duration::from_millis(ms.max(0) as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_tables_have_one_select_per_row() {
        assert_eq!(values_table(&["id", "tx"], 1), "SELECT ? AS id, ? AS tx");
        assert_eq!(
            values_table(&["id", "tx"], 3),
            "SELECT ? AS id, ? AS tx UNION ALL SELECT ?, ? UNION ALL SELECT ?, ?"
        );
        assert_eq!(placeholders(3), "?,?,?");
        assert_eq!(case_by_id(2), "CASE id WHEN ? THEN ? WHEN ? THEN ? END");
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("가나다", 2), "가나");
        assert_eq!(truncate("ab", 5), "ab");
    }
}
