//! Dead letters: the target rows that need a person, listed for operators, and the re-grant
//! ("requeue") that hands a DEAD row back to the engine.
//!
//! A requeue never creates a new row: the target row keeps its id, so its idempotency key
//! (`<kind>-<campaign>-<row id>`) and its body stay the same, and Money answers a replay if an
//! earlier attempt of the row was granted after all (an unknown outcome). Only rows that are still
//! `DEAD` are touched; a row found in any other status (an operator's hand edit) is reported and
//! left alone, and so is its dead letter.
//!
//! Each chunk of at most [`CHUNK`] dead letters is one transaction: the dead letters are locked,
//! their rows set back to `PENDING` with a fresh attempt budget, the letters resolved, the action
//! recorded in `campaign_events`, and a `COMPLETED` campaign set `RUNNING` again so the daemon
//! picks the rows up. Locks are taken dead letters → target rows → campaign, and the campaign's
//! status is read last with `FOR UPDATE`, so a completion committed by the daemon meanwhile is
//! seen and undone in the same transaction that makes rows `PENDING` again. The campaign's DEAD
//! progress counter goes down by the rows requeued (shard [`OPERATOR_SHARD`]) in that transaction
//! too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::QueryableByName;
use diesel::mysql::Mysql;
use diesel::sql_types::{BigInt, Datetime, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};

use crate::domain::{CampaignId, CampaignStatus, TargetId, TargetStatus};
use crate::kind::KindRegistry;
use crate::repo::{OPERATOR_SHARD, add_counters, record_event};

type QResult<T> = Result<T, diesel::result::Error>;

/// Dead letters handled per transaction.
pub const CHUNK: usize = 1000;

/// `dead_letters.resolution` of a requeued dead letter.
pub const REQUEUED: &str = "REQUEUED";

/// The audit event one requeue transaction records per campaign.
pub const REQUEUED_EVENT: &str = "DEAD_LETTERS_REQUEUED";

/// Up to this many ids are listed in an audit event's detail; beyond it only the count and range.
const DETAIL_MAX_IDS: usize = 100;

/// How often a chunk is tried again after a deadlock or a lock wait timeout.
const LOCK_RETRIES: u32 = 5;

/// One `dead_letters` row.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct DeadLetter {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub campaign_id: i64,
    #[diesel(sql_type = Text)]
    pub target_kind: String,
    #[diesel(sql_type = BigInt)]
    pub target_id: i64,
    #[diesel(sql_type = Text)]
    pub error_code: String,
    #[diesel(sql_type = Text)]
    pub error_message: String,
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Datetime)]
    pub created_at: NaiveDateTime,
    #[diesel(sql_type = Nullable<Datetime>)]
    pub resolved_at: Option<NaiveDateTime>,
    #[diesel(sql_type = Nullable<Text>)]
    pub resolution: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub resolved_by: Option<String>,
}

impl DeadLetter {
    pub fn campaign(&self) -> CampaignId {
        CampaignId(self.campaign_id)
    }

    pub fn target(&self) -> TargetId {
        TargetId(self.target_id)
    }

    pub fn is_resolved(&self) -> bool {
        self.resolved_at.is_some()
    }
}

const COLUMNS: &str = "id, campaign_id, target_kind, target_id, error_code, error_message, \
     attempts, created_at, resolved_at, resolution, resolved_by";

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

// ---------------------------------------------------------------------------------------------
// Listing

/// Which dead letters `list` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this campaign's; all campaigns when `None`.
    pub campaign: Option<CampaignId>,
    /// Resolved ones too.
    pub include_resolved: bool,
    /// At most this many, newest first.
    pub limit: u32,
}

/// The newest dead letters matching a filter, and how many match in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Newest (highest id) first.
    pub letters: Vec<DeadLetter>,
    pub total: u64,
}

fn list_where(filter: &ListFilter) -> String {
    let mut conds = Vec::new();
    if filter.campaign.is_some() {
        conds.push("campaign_id = ?");
    }
    if !filter.include_resolved {
        conds.push("resolved_at IS NULL");
    }
    if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) }
}

/// Lists dead letters, newest first.
pub async fn list(conn: &mut AsyncMysqlConnection, filter: &ListFilter) -> QResult<Listing> {
    #[derive(QueryableByName)]
    struct CountRow {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let cond = list_where(filter);
    let mut q = diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM dead_letters{cond} ORDER BY id DESC LIMIT ?"
    ))
    .into_boxed::<Mysql>();
    if let Some(c) = filter.campaign {
        q = q.bind::<BigInt, _>(c.0);
    }
    let letters: Vec<DeadLetter> = q.bind::<BigInt, _>(i64::from(filter.limit)).load(conn).await?;
    let total = if letters.len() < filter.limit as usize {
        letters.len() as u64
    } else {
        let mut q = diesel::sql_query(format!("SELECT COUNT(*) AS n FROM dead_letters{cond}"))
            .into_boxed::<Mysql>();
        if let Some(c) = filter.campaign {
            q = q.bind::<BigInt, _>(c.0);
        }
        let mut rows: Vec<CountRow> = q.load(conn).await?;
        rows.pop().map(|r| r.n.max(0) as u64).unwrap_or(0)
    };
    Ok(Listing { letters, total })
}

// ---------------------------------------------------------------------------------------------
// Requeue

/// Which dead letters to requeue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every unresolved dead letter of the campaign.
    Campaign(CampaignId),
    /// These dead letters (`dead_letters.id`).
    Ids(Vec<i64>),
}

/// A selected dead letter that was not requeued, and why. Nothing about it was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// It was resolved before.
    AlreadyResolved { dead_letter: i64, resolution: Option<String>, resolved_by: Option<String> },
    /// Its target row is no longer DEAD (changed by hand); a SUCCEEDED row is never touched.
    NotDead { dead_letter: i64, kind: String, target: TargetId, status: String },
    /// Its target row does not exist, or belongs to another campaign.
    TargetMissing { dead_letter: i64, kind: String, target: TargetId },
    /// Its `target_kind` is not registered in this build.
    UnknownKind { dead_letter: i64, kind: String },
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skipped::AlreadyResolved { dead_letter, resolution, resolved_by } => {
                write!(f, "dead letter {dead_letter} is already resolved")?;
                match (resolution, resolved_by) {
                    (Some(r), Some(by)) => write!(f, " ({r} by {by})")?,
                    (Some(r), None) => write!(f, " ({r})")?,
                    (None, Some(by)) => write!(f, " (by {by})")?,
                    (None, None) => {}
                }
                write!(f, ": skipped")
            }
            Skipped::NotDead { dead_letter, kind, target, status } => write!(
                f,
                "dead letter {dead_letter}: {kind} row {target} is {status}, not DEAD: left as is"
            ),
            Skipped::TargetMissing { dead_letter, kind, target } => write!(
                f,
                "dead letter {dead_letter}: {kind} row {target} of its campaign does not exist: left as is"
            ),
            Skipped::UnknownKind { dead_letter, kind } => {
                write!(f, "dead letter {dead_letter}: unknown target kind {kind:?}: left as is")
            }
        }
    }
}

/// What a requeue did (or, in a dry run, would do) to one campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignRequeue {
    pub campaign: CampaignId,
    /// Target rows set back to PENDING.
    pub rows: u64,
    /// Dead letters resolved as REQUEUED.
    pub dead_letters: Vec<i64>,
    /// The campaign's status after the requeue as stored (`None`: no such campaign row).
    pub status: Option<String>,
    /// The requeue set (in a dry run: would set) the COMPLETED campaign RUNNING again.
    pub reopened: bool,
}

/// The result of a requeue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequeueReport {
    /// Per campaign touched, by id.
    pub campaigns: Vec<CampaignRequeue>,
    pub skipped: Vec<Skipped>,
    pub dry_run: bool,
}

impl RequeueReport {
    pub fn rows(&self) -> u64 {
        self.campaigns.iter().map(|c| c.rows).sum()
    }
}

/// Why a requeue did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    #[error("no unresolved dead letter with {}", id_list(.0))]
    UnknownIds(Vec<i64>),
    #[error("campaign {0} has no unresolved dead letter")]
    NothingForCampaign(CampaignId),
    #[error("campaign {0} does not exist")]
    UnknownCampaign(CampaignId),
    #[error("no dead letter id given")]
    NoIds,
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

fn id_list(ids: &[i64]) -> String {
    match ids {
        [one] => format!("id {one}"),
        many => {
            let shown: Vec<String> = many.iter().take(20).map(i64::to_string).collect();
            let more = if many.len() > 20 {
                format!(" (and {} more)", many.len() - 20)
            } else {
                "".into()
            };
            format!("ids {}{more}", shown.join(", "))
        }
    }
}

/// Requeues the selected unresolved dead letters: a re-grant with the rows' own idempotency keys.
///
/// Fails without changing anything when an id does not exist or the campaign has no unresolved
/// dead letter. With `dry_run`, reads (and briefly locks) the same rows and reports what it would
/// do, writing nothing.
pub async fn requeue(
    conn: &mut AsyncMysqlConnection,
    kinds: &KindRegistry,
    selection: &Selection,
    actor: &str,
    dry_run: bool,
) -> Result<RequeueReport, RequeueError> {
    let mut acc = Accumulator::default();
    match selection {
        Selection::Ids(ids) => {
            let ids: Vec<i64> = ids.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
            if ids.is_empty() {
                return Err(RequeueError::NoIds);
            }
            // Name every wrong id before changing anything.
            let mut known = BTreeSet::new();
            for chunk in ids.chunks(CHUNK) {
                let found: Vec<IdRow> = bind_ids(
                    diesel::sql_query(format!(
                        "SELECT id FROM dead_letters WHERE id IN ({})",
                        placeholders(chunk.len())
                    ))
                    .into_boxed::<Mysql>(),
                    chunk,
                )
                .load(conn)
                .await?;
                known.extend(found.into_iter().map(|r| r.id));
            }
            let unknown: Vec<i64> = ids.iter().copied().filter(|i| !known.contains(i)).collect();
            if !unknown.is_empty() {
                return Err(RequeueError::UnknownIds(unknown));
            }
            for chunk in ids.chunks(CHUNK) {
                let sel = ChunkSelection::Ids(chunk);
                acc.add(run_chunk(conn, kinds, &sel, actor, dry_run).await?);
            }
        }
        Selection::Campaign(id) => {
            let mut after = 0;
            loop {
                let sel = ChunkSelection::Campaign { id: *id, after };
                let done = run_chunk(conn, kinds, &sel, actor, dry_run).await?;
                let (Some(last), locked) = (done.last_id, done.locked) else { break };
                acc.add(done);
                if locked < CHUNK {
                    break;
                }
                after = last;
            }
            if acc.locked == 0 {
                let exists: Vec<IdRow> = diesel::sql_query("SELECT id FROM campaigns WHERE id = ?")
                    .bind::<BigInt, _>(id.0)
                    .load(conn)
                    .await?;
                return Err(if exists.is_empty() {
                    RequeueError::UnknownCampaign(*id)
                } else {
                    RequeueError::NothingForCampaign(*id)
                });
            }
        }
    }
    Ok(acc.into_report(dry_run))
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

fn bind_ids<'a>(
    mut q: diesel::query_builder::BoxedSqlQuery<'a, Mysql, diesel::query_builder::SqlQuery>,
    ids: &[i64],
) -> diesel::query_builder::BoxedSqlQuery<'a, Mysql, diesel::query_builder::SqlQuery> {
    for id in ids {
        q = q.bind::<BigInt, _>(*id);
    }
    q
}

enum ChunkSelection<'a> {
    Campaign { id: CampaignId, after: i64 },
    Ids(&'a [i64]),
}

/// What one committed chunk did.
#[derive(Debug, Default)]
struct ChunkDone {
    /// The highest dead-letter id locked (the campaign cursor).
    last_id: Option<i64>,
    locked: usize,
    /// Per campaign: rows requeued, dead letters resolved, status after, reopened.
    campaigns: BTreeMap<CampaignId, (u64, Vec<i64>, Option<String>, bool)>,
    skipped: Vec<Skipped>,
}

#[derive(Default)]
struct Accumulator {
    locked: usize,
    campaigns: BTreeMap<CampaignId, CampaignRequeue>,
    skipped: Vec<Skipped>,
}

impl Accumulator {
    fn add(&mut self, done: ChunkDone) {
        self.locked += done.locked;
        for (campaign, (rows, letters, status, reopened)) in done.campaigns {
            let entry = self.campaigns.entry(campaign).or_insert_with(|| CampaignRequeue {
                campaign,
                rows: 0,
                dead_letters: Vec::new(),
                status: None,
                reopened: false,
            });
            entry.rows += rows;
            entry.dead_letters.extend(letters);
            entry.status = status;
            entry.reopened |= reopened;
        }
        self.skipped.extend(done.skipped);
    }

    fn into_report(self, dry_run: bool) -> RequeueReport {
        RequeueReport {
            campaigns: self.campaigns.into_values().collect(),
            skipped: self.skipped,
            dry_run,
        }
    }
}

fn is_retryable_lock(e: &diesel::result::Error) -> bool {
    match e {
        diesel::result::Error::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("Deadlock") || m.contains("Lock wait timeout")
        }
        _ => false,
    }
}

/// One chunk in one transaction, tried again after a deadlock or lock wait timeout.
async fn run_chunk(
    conn: &mut AsyncMysqlConnection,
    kinds: &KindRegistry,
    sel: &ChunkSelection<'_>,
    actor: &str,
    dry_run: bool,
) -> QResult<ChunkDone> {
    let mut tries = 0;
    loop {
        let result = conn.transaction(async |c| chunk(c, kinds, sel, actor, dry_run).await).await;
        match result {
            Err(e) if is_retryable_lock(&e) && tries < LOCK_RETRIES => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(tries))).await;
            }
            other => return other,
        }
    }
}

#[derive(QueryableByName)]
struct TargetRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    event_id: i64,
    #[diesel(sql_type = Text)]
    status: String,
}

#[derive(QueryableByName)]
struct CampaignStatusRow {
    #[diesel(sql_type = Text)]
    status: String,
}

async fn chunk(
    c: &mut AsyncMysqlConnection,
    kinds: &KindRegistry,
    sel: &ChunkSelection<'_>,
    actor: &str,
    dry_run: bool,
) -> QResult<ChunkDone> {
    // 1. Lock the dead letters.
    let letters: Vec<DeadLetter> =
        match sel {
            ChunkSelection::Campaign { id, after } => {
                diesel::sql_query(format!(
                    "SELECT {COLUMNS} FROM dead_letters \
                 WHERE campaign_id = ? AND resolved_at IS NULL AND id > ? \
                 ORDER BY id LIMIT ? FOR UPDATE"
                ))
                .bind::<BigInt, _>(id.0)
                .bind::<BigInt, _>(*after)
                .bind::<BigInt, _>(CHUNK as i64)
                .load(c)
                .await?
            }
            ChunkSelection::Ids(ids) => bind_ids(
                diesel::sql_query(format!(
                    "SELECT {COLUMNS} FROM dead_letters WHERE id IN ({}) ORDER BY id FOR UPDATE",
                    placeholders(ids.len())
                ))
                .into_boxed::<Mysql>(),
                ids,
            )
            .load(c)
            .await?,
        };
    let mut done = ChunkDone {
        last_id: letters.iter().map(|l| l.id).max(),
        locked: letters.len(),
        ..ChunkDone::default()
    };

    // 2. Group the unresolved ones by target table.
    let mut by_kind: BTreeMap<String, Vec<&DeadLetter>> = BTreeMap::new();
    for l in &letters {
        if l.is_resolved() {
            done.skipped.push(Skipped::AlreadyResolved {
                dead_letter: l.id,
                resolution: l.resolution.clone(),
                resolved_by: l.resolved_by.clone(),
            });
        } else {
            by_kind.entry(l.target_kind.clone()).or_default().push(l);
        }
    }

    // 3. Per kind: lock the target rows, requeue those still DEAD, resolve their letters.
    let mut per_campaign: BTreeMap<CampaignId, (BTreeSet<i64>, Vec<i64>)> = BTreeMap::new();
    for (kind_name, group) in by_kind {
        let Some(kind) = kinds.get(&kind_name) else {
            done.skipped.extend(
                group
                    .iter()
                    .map(|l| Skipped::UnknownKind { dead_letter: l.id, kind: kind_name.clone() }),
            );
            continue;
        };
        let table = kind.table();
        let target_ids: Vec<i64> =
            group.iter().map(|l| l.target_id).collect::<BTreeSet<_>>().into_iter().collect();
        let targets: Vec<TargetRow> = bind_ids(
            diesel::sql_query(format!(
                "SELECT id, event_id, status FROM {table} WHERE id IN ({}) ORDER BY id FOR UPDATE",
                placeholders(target_ids.len())
            ))
            .into_boxed::<Mysql>(),
            &target_ids,
        )
        .load(c)
        .await?;
        let targets: BTreeMap<i64, TargetRow> = targets.into_iter().map(|t| (t.id, t)).collect();

        let mut rows = BTreeSet::new();
        let mut resolved = Vec::new();
        for l in group {
            match targets.get(&l.target_id) {
                Some(t) if t.event_id == l.campaign_id => {
                    if t.status == TargetStatus::Dead.as_str() {
                        rows.insert(t.id);
                        resolved.push(l.id);
                        let e = per_campaign.entry(l.campaign()).or_default();
                        e.0.insert(t.id);
                        e.1.push(l.id);
                    } else {
                        done.skipped.push(Skipped::NotDead {
                            dead_letter: l.id,
                            kind: kind_name.clone(),
                            target: l.target(),
                            status: t.status.clone(),
                        });
                    }
                }
                Some(_) | None => done.skipped.push(Skipped::TargetMissing {
                    dead_letter: l.id,
                    kind: kind_name.clone(),
                    target: l.target(),
                }),
            }
        }
        if dry_run || rows.is_empty() {
            continue;
        }
        let rows: Vec<i64> = rows.into_iter().collect();
        // A fresh attempt budget (`retry_base` moves up to `attempts`, which itself only grows,
        // so it keeps fencing late outcome writes); `last_error` stays as the history of why it
        // died. The id, and so the idempotency key and body, are unchanged.
        bind_ids(
            diesel::sql_query(format!(
                "UPDATE {table} SET status = 'PENDING', retry_base = attempts, next_attempt_at = NULL, \
                 claimed_by = NULL, updated_at = NOW(3) WHERE id IN ({}) AND status = 'DEAD'",
                placeholders(rows.len())
            ))
            .into_boxed::<Mysql>(),
            &rows,
        )
        .execute(c)
        .await?;
        bind_ids(
            diesel::sql_query(format!(
                "UPDATE dead_letters SET resolved_at = NOW(3), resolution = ?, resolved_by = ? \
                 WHERE id IN ({}) AND resolved_at IS NULL",
                placeholders(resolved.len())
            ))
            .into_boxed::<Mysql>()
            .bind::<Text, _>(REQUEUED)
            .bind::<Text, _>(truncate(actor, 128)),
            &resolved,
        )
        .execute(c)
        .await?;
    }

    // 4. Per campaign: audit, and reopen a COMPLETED campaign so the daemon serves the rows.
    for (campaign, (rows, letters)) in per_campaign {
        let mut status_rows: Vec<CampaignStatusRow> =
            diesel::sql_query("SELECT status FROM campaigns WHERE id = ? FOR UPDATE")
                .bind::<BigInt, _>(campaign.0)
                .load(c)
                .await?;
        let status = status_rows.pop().map(|r| r.status);
        let completed =
            status.as_deref().map(CampaignStatus::parse) == Some(Ok(CampaignStatus::Completed));
        let mut status_after = status.clone();
        if !dry_run {
            let detail = requeue_detail(&rows, &letters, completed);
            record_event(c, Some(campaign), REQUEUED_EVENT, None, actor, Some(&detail)).await?;
            // The rows left DEAD: the progress counters move with them, in this transaction.
            let n = i64::try_from(rows.len()).unwrap_or(i64::MAX);
            add_counters(c, campaign, OPERATOR_SHARD, 0, -n).await?;
            if completed {
                reopen(c, campaign, actor).await?;
                status_after = Some(CampaignStatus::Running.as_str().to_owned());
            }
        }
        done.campaigns.insert(campaign, (rows.len() as u64, letters, status_after, completed));
    }
    Ok(done)
}

/// COMPLETED → RUNNING after a requeue. The campaign takes a new place at the end of the
/// first-come-first-served queue: it is new work, and must not jump ahead of campaigns waiting.
async fn reopen(c: &mut AsyncMysqlConnection, campaign: CampaignId, actor: &str) -> QResult<()> {
    diesel::sql_query(
        "UPDATE campaigns SET status = 'RUNNING', completed_at = NULL, status_reason = NULL, \
         paused_by = NULL, queued_at = NOW(3) WHERE id = ? AND status = 'COMPLETED'",
    )
    .bind::<BigInt, _>(campaign.0)
    .execute(c)
    .await?;
    record_event(
        c,
        Some(campaign),
        "STATUS_CHANGED",
        Some((CampaignStatus::Completed.as_str(), CampaignStatus::Running.as_str())),
        actor,
        Some(r#"{"command":"dead-letters requeue"}"#),
    )
    .await
}

/// The audit detail: the count, and the ids while they are few.
fn requeue_detail(rows: &BTreeSet<i64>, letters: &[i64], reopened: bool) -> String {
    let mut detail = serde_json::json!({
        "rows": rows.len(),
        "dead_letters": letters.len(),
        "reopened": reopened,
    });
    if letters.len() <= DETAIL_MAX_IDS && rows.len() <= DETAIL_MAX_IDS {
        detail["dead_letter_ids"] = serde_json::json!(letters);
        detail["target_ids"] = serde_json::json!(rows);
    } else {
        detail["dead_letter_id_min"] = serde_json::json!(letters.iter().min());
        detail["dead_letter_id_max"] = serde_json::json!(letters.iter().max());
    }
    detail.to_string()
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ids_are_named_in_one_line() {
        assert_eq!(
            RequeueError::UnknownIds(vec![77]).to_string(),
            "no unresolved dead letter with id 77"
        );
        assert_eq!(
            RequeueError::UnknownIds(vec![7, 8]).to_string(),
            "no unresolved dead letter with ids 7, 8"
        );
        let many: Vec<i64> = (1..=25).collect();
        assert!(RequeueError::UnknownIds(many).to_string().ends_with("20 (and 5 more)"));
    }

    #[test]
    fn the_audit_detail_lists_few_ids_and_counts_many() {
        let rows: BTreeSet<i64> = [10, 11].into();
        let v: serde_json::Value =
            serde_json::from_str(&requeue_detail(&rows, &[1, 2], true)).unwrap_or_default();
        assert_eq!(v["rows"], 2);
        assert_eq!(v["dead_letter_ids"], serde_json::json!([1, 2]));
        assert_eq!(v["target_ids"], serde_json::json!([10, 11]));
        assert_eq!(v["reopened"], true);
        let rows: BTreeSet<i64> = (0..500).collect();
        let letters: Vec<i64> = (1000..1500).collect();
        let v: serde_json::Value =
            serde_json::from_str(&requeue_detail(&rows, &letters, false)).unwrap_or_default();
        assert_eq!(v["rows"], 500);
        assert!(v.get("dead_letter_ids").is_none());
        assert_eq!(v["dead_letter_id_min"], 1000);
        assert_eq!(v["dead_letter_id_max"], 1499);
    }

    #[test]
    fn list_conditions_follow_the_filter() {
        let f = ListFilter { campaign: None, include_resolved: true, limit: 10 };
        assert_eq!(list_where(&f), "");
        let f = ListFilter { campaign: Some(CampaignId(4)), include_resolved: false, limit: 10 };
        assert_eq!(list_where(&f), " WHERE campaign_id = ? AND resolved_at IS NULL");
    }

    #[test]
    fn skip_messages_name_the_dead_letter_and_row() {
        let s = Skipped::NotDead {
            dead_letter: 5,
            kind: "POINT".into(),
            target: TargetId(17),
            status: "SUCCEEDED".into(),
        };
        assert_eq!(s.to_string(), "dead letter 5: POINT row 17 is SUCCEEDED, not DEAD: left as is");
        let s = Skipped::AlreadyResolved {
            dead_letter: 3,
            resolution: Some("REQUEUED".into()),
            resolved_by: Some("cli:ops".into()),
        };
        assert_eq!(
            s.to_string(),
            "dead letter 3 is already resolved (REQUEUED by cli:ops): skipped"
        );
    }
}
