//! Partition leases: several payoutd processes sharing one campaign.
//!
//! Each process (a run id `<instance>#<nonce>`, new on every start) keeps a row in
//! `daemon_instances` alive with [`heartbeat`]; the live rows of a campaign are its
//! [`participants`]. The heartbeat also says what the process may still have in Money's rate
//! window (its share and its sends of the last window); [`others_rate`] sums that over the other
//! live processes, whatever campaign they serve. Every participant computes the same [`fair_share`] of the campaign's
//! partitions from the same sorted list, so the targets sum to the partition count and nobody
//! flaps. A partition is held through a lease in `campaign_partitions` (`owner`,
//! `lease_expires_at`): taken with the compare-and-set [`try_acquire`], kept with [`renew`],
//! given back with [`release`] or [`deregister`]. [`plan_balance`] turns a snapshot of the leases
//! into what to keep, shed and try next.
//!
//! Every time comes from the database clock (`NOW(3)`), so instances whose clocks disagree still
//! agree on who holds what. A lease whose owner is set but whose expiry is NULL is treated as
//! expired everywhere (no statement here writes one; a hand edit must not wedge a partition).
//!
//! Re-planning (a new partition count while a campaign runs) is a barrier: [`request_replan`]
//! records the decision, new leases are refused while it waits, and [`apply_replan`] swaps the
//! partition rows only once no lease of the campaign is held. A row's bucket never changes; only
//! the ranges do, and only while nobody serves any of them, so no row is ever in the hands of two
//! partitions. A holder must stop using a partition as soon as its own lease deadline passes
//! without a successful renewal: after that the partition may be taken over or re-planned.

use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Datetime, Double, Nullable, SmallInt, Text};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};

use crate::domain::CampaignId;
use crate::plan::{MAX_PARTITIONS, PartitionRule, PartitionSlice, slices};
use crate::repo;

pub type QResult<T> = Result<T, diesel::result::Error>;

/// Longest lease or heartbeat expiry accepted; a longer one would only hide a dead process.
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// The lease length as bound to `INTERVAL ? MICROSECOND`.
fn lease_micros(lease_time: Duration) -> i64 {
    i64::try_from(lease_time.min(MAX_LEASE).as_micros()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Instances

/// One heartbeat of this process: who it is, what it serves, and what it may send.
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
    pub run_id: &'a str,
    pub instance_id: &'a str,
    /// The campaign served now (`None`: idle).
    pub campaign: Option<CampaignId>,
    /// Alive until `NOW(3) + lease_time`.
    pub lease_time: Duration,
    /// Its current share of the Money rate limit (0 while it serves no partition).
    pub rate_limit_per_sec: f64,
    /// Rows it finished per second since the last heartbeat.
    pub current_rows_per_sec: Option<f64>,
    /// Requests it sent within its rate limiter's last window, and how long the newest of them
    /// still counts there ([`crate::rate::RateLimiter::recent_sends`]).
    pub recent_sends: (usize, Duration),
}

/// Announces (or refreshes) this process: alive until `NOW(3) + lease_time`, serving `campaign`,
/// with its current share of the Money rate limit, what it sent in the last window and its
/// throughput. `started_at` is kept from the first heartbeat of the run id.
pub async fn heartbeat(conn: &mut AsyncMysqlConnection, beat: &Heartbeat<'_>) -> QResult<()> {
    let (recent, recent_for) = beat.recent_sends;
    diesel::sql_query(
        "INSERT INTO daemon_instances (run_id, instance_id, campaign_id, started_at, \
         heartbeat_at, expires_at, rate_limit_per_sec, current_rows_per_sec, recent_sends, \
         recent_sends_until) \
         VALUES (?, ?, ?, NOW(3), NOW(3), NOW(3) + INTERVAL ? MICROSECOND, ?, ?, ?, \
         NOW(3) + INTERVAL ? MICROSECOND) \
         ON DUPLICATE KEY UPDATE instance_id = VALUES(instance_id), \
         campaign_id = VALUES(campaign_id), heartbeat_at = VALUES(heartbeat_at), \
         expires_at = VALUES(expires_at), rate_limit_per_sec = VALUES(rate_limit_per_sec), \
         current_rows_per_sec = VALUES(current_rows_per_sec), \
         recent_sends = VALUES(recent_sends), recent_sends_until = VALUES(recent_sends_until)",
    )
    .bind::<Text, _>(beat.run_id)
    .bind::<Text, _>(beat.instance_id)
    .bind::<Nullable<BigInt>, _>(beat.campaign.map(|c| c.0))
    .bind::<BigInt, _>(lease_micros(beat.lease_time))
    .bind::<Double, _>(beat.rate_limit_per_sec)
    .bind::<Nullable<Double>, _>(beat.current_rows_per_sec)
    .bind::<Double, _>(recent as f64)
    // Rounded up: the newest send must not stop counting early.
    .bind::<BigInt, _>(lease_micros(recent_for + Duration::from_millis(1)))
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(QueryableByName)]
struct RateRow {
    #[diesel(sql_type = Double)]
    rate: f64,
}

/// What the live instances other than `run_id` may still have in Money's window, together: for
/// each, the larger of its current share and the requests of its last window that still count
/// (as of its last heartbeat). The global limit less this is the most `run_id` may take.
pub async fn others_rate(conn: &mut AsyncMysqlConnection, run_id: &str) -> QResult<f64> {
    let row: RateRow = diesel::sql_query(
        "SELECT COALESCE(SUM(GREATEST(rate_limit_per_sec, \
         IF(recent_sends_until > NOW(3), recent_sends, 0))), 0) AS rate \
         FROM daemon_instances WHERE run_id <> ? AND expires_at > NOW(3)",
    )
    .bind::<Text, _>(run_id)
    .get_result(conn)
    .await?;
    Ok(row.rate)
}

/// Forgets a process and frees every partition it holds at once, so the others need not wait
/// for the leases to expire (a process of this host found gone, or a clean exit with nothing
/// sent in the last window: see [`retire`]).
pub async fn deregister(conn: &mut AsyncMysqlConnection, run_id: &str) -> QResult<()> {
    conn.transaction(async |c| {
        diesel::sql_query("DELETE FROM daemon_instances WHERE run_id = ?")
            .bind::<Text, _>(run_id)
            .execute(c)
            .await?;
        release_all(c, run_id).await
    })
    .await
}

/// A clean exit: frees every partition the process holds at once, and leaves its row behind,
/// serving nothing, for as long as its last requests count at Money (`recent_sends`, as
/// [`crate::rate::RateLimiter::recent_sends`] gives it): a last [`heartbeat`] with no campaign
/// and no share that expires with those requests, so the others' shares stay capped by them
/// ([`others_rate`]) until then. With nothing sent in the last window, [`deregister`].
pub async fn retire(
    conn: &mut AsyncMysqlConnection,
    run_id: &str,
    instance_id: &str,
    recent_sends: (usize, Duration),
) -> QResult<()> {
    let (recent, recent_for) = recent_sends;
    if recent == 0 {
        return deregister(conn, run_id).await;
    }
    let last = Heartbeat {
        run_id,
        instance_id,
        campaign: None,
        lease_time: recent_for + Duration::from_millis(1),
        rate_limit_per_sec: 0.0,
        current_rows_per_sec: None,
        recent_sends,
    };
    conn.transaction(async |c| {
        heartbeat(c, &last).await?;
        release_all(c, run_id).await
    })
    .await
}

/// Frees every partition `run_id` holds, noting when it stopped sending in them.
async fn release_all(c: &mut AsyncMysqlConnection, run_id: &str) -> QResult<()> {
    diesel::sql_query(
        // released_at and released_by first: MariaDB assigns left to right, and later
        // assignments see the earlier ones' values.
        "UPDATE campaign_partitions \
         SET released_at = LEAST(NOW(3), COALESCE(lease_expires_at, NOW(3))), \
         released_by = owner, owner = NULL, lease_expires_at = NULL, leased_at = NULL \
         WHERE owner = ?",
    )
    .bind::<Text, _>(run_id)
    .execute(c)
    .await?;
    Ok(())
}

/// Forgets the processes whose heartbeat expired more than `after` ago: those that died
/// without deregistering (kill -9, a lost host). Their leases have long run out; their rows
/// would only slow the reads of the live instances down. Returns how many were forgotten.
pub async fn forget_dead_instances(
    conn: &mut AsyncMysqlConnection,
    after: Duration,
) -> QResult<usize> {
    diesel::sql_query(
        "DELETE FROM daemon_instances WHERE expires_at < NOW(3) - INTERVAL ? MICROSECOND",
    )
    .bind::<BigInt, _>(lease_micros(after))
    .execute(conn)
    .await
}

#[derive(QueryableByName)]
struct RunIdRow {
    #[diesel(sql_type = Text)]
    run_id: String,
}

/// Run ids of the live instances serving `campaign`, sorted (byte order, as [`fair_share`]).
pub async fn participants(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
) -> QResult<Vec<String>> {
    let rows: Vec<RunIdRow> = diesel::sql_query(
        "SELECT run_id FROM daemon_instances WHERE campaign_id = ? AND expires_at > NOW(3) \
         ORDER BY run_id",
    )
    .bind::<BigInt, _>(campaign.0)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.run_id).collect())
}

/// `me`'s rank among the participants (with `me` counted even if its heartbeat is not visible
/// yet) and the number of participants.
fn rank_of(participants: &[String], me: &str) -> (usize, usize) {
    let mut all: Vec<&str> = participants.iter().map(String::as_str).collect();
    all.push(me);
    all.sort_unstable();
    all.dedup();
    let rank = all.iter().position(|p| *p == me).unwrap_or(0);
    (rank, all.len())
}

fn share_of(partitions: u16, rank: usize, n: usize) -> u16 {
    let (partitions, n) = (usize::from(partitions), n.max(1));
    let share = partitions / n + usize::from(rank < partitions % n);
    u16::try_from(share).unwrap_or(u16::MAX)
}

/// How many partitions `me` should hold. Every instance computes this from the same sorted list,
/// so the shares sum to `partitions` and differ by at most one, the lower ranks taking the
/// remainder: nobody's target depends on timing, hence no flapping.
pub fn fair_share(partitions: u16, participants: &[String], me: &str) -> u16 {
    let (rank, n) = rank_of(participants, me);
    share_of(partitions, rank, n)
}

// ---------------------------------------------------------------------------------------------
// Leases

/// One partition's lease as the database sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub partition_no: u16,
    pub slice: PartitionSlice,
    pub owner: Option<String>,
    /// Until the lease ends, by the database clock (negative: expired that long ago).
    pub expires_in_ms: Option<i64>,
    /// When the current owner took it (database clock, UTC).
    pub leased_at: Option<NaiveDateTime>,
    /// For how long the current owner has held it.
    pub held_for_ms: Option<i64>,
    /// For how long nobody has sent in it: since it was given back, or since the lease of the
    /// holder that let it run out ended (negative: a lease still running). `None`: never held.
    pub quiet_for_ms: Option<i64>,
    /// The process that gave it back last (kept until it is taken again; after a re-plan, the
    /// one process that held the old plan's partitions last, if it was one).
    pub released_by: Option<String>,
}

impl LeaseView {
    /// Free, or held by a lease that has run out: [`try_acquire`] would take it.
    pub fn is_takeable(&self) -> bool {
        self.owner.is_none() || self.expires_in_ms.is_none_or(|ms| ms <= 0)
    }
}

#[derive(QueryableByName)]
struct LeaseRow {
    #[diesel(sql_type = SmallInt)]
    partition_no: i16,
    #[diesel(sql_type = SmallInt)]
    partition_count: i16,
    #[diesel(sql_type = SmallInt)]
    bucket_lo: i16,
    #[diesel(sql_type = SmallInt)]
    bucket_hi: i16,
    #[diesel(sql_type = Nullable<Text>)]
    owner: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    expires_in_ms: Option<i64>,
    #[diesel(sql_type = Nullable<Datetime>)]
    leased_at: Option<NaiveDateTime>,
    #[diesel(sql_type = Nullable<BigInt>)]
    held_for_ms: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    quiet_for_ms: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    released_by: Option<String>,
}

/// Columns of [`LeaseRow`]; the durations are computed by the database so that no local clock
/// is involved (DATETIME(3) differences are whole milliseconds).
const LEASE_COLUMNS: &str = "partition_no, partition_count, bucket_lo, bucket_hi, owner, \
     CAST(TIMESTAMPDIFF(MICROSECOND, NOW(3), lease_expires_at) DIV 1000 AS SIGNED) \
     AS expires_in_ms, leased_at, \
     CAST(TIMESTAMPDIFF(MICROSECOND, leased_at, NOW(3)) DIV 1000 AS SIGNED) AS held_for_ms, \
     CAST(TIMESTAMPDIFF(MICROSECOND, COALESCE(released_at, lease_expires_at), NOW(3)) DIV 1000 \
     AS SIGNED) AS quiet_for_ms, released_by";

fn small(v: i16) -> u16 {
    u16::try_from(v).unwrap_or(0)
}

impl From<LeaseRow> for LeaseView {
    fn from(r: LeaseRow) -> Self {
        LeaseView {
            partition_no: small(r.partition_no),
            slice: PartitionSlice {
                partition_no: small(r.partition_no),
                partition_count: small(r.partition_count),
                bucket_lo: small(r.bucket_lo),
                bucket_hi: small(r.bucket_hi),
            },
            owner: r.owner,
            expires_in_ms: r.expires_in_ms,
            leased_at: r.leased_at,
            held_for_ms: r.held_for_ms,
            quiet_for_ms: r.quiet_for_ms,
            released_by: r.released_by,
        }
    }
}

/// Every partition of the campaign's stored plan with its lease, by partition number.
pub async fn leases(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
) -> QResult<Vec<LeaseView>> {
    let rows: Vec<LeaseRow> = diesel::sql_query(format!(
        "SELECT {LEASE_COLUMNS} FROM campaign_partitions WHERE campaign_id = ? \
         ORDER BY partition_no"
    ))
    .bind::<BigInt, _>(campaign.0)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(LeaseView::from).collect())
}

/// `partition_nos` as a bit set: one fixed statement text for any list (varying `IN` lists are
/// prepared anew each time). Partition numbers are below [`MAX_PARTITIONS`].
fn partition_mask(partition_nos: &[u16]) -> i64 {
    partition_nos.iter().filter(|&&p| p < 63).fold(0, |mask, &p| mask | (1_i64 << p))
}

#[derive(QueryableByName)]
struct PartitionNoRow {
    #[diesel(sql_type = SmallInt)]
    partition_no: i16,
}

/// Extends the leases of the listed partitions that `run_id` still owns (even past their expiry,
/// as long as nobody took them over). Returns the renewed ones, ascending; the others are lost
/// and must not be used any more.
pub async fn renew(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
    run_id: &str,
    partition_nos: &[u16],
    lease_time: Duration,
) -> QResult<Vec<u16>> {
    let mask = partition_mask(partition_nos);
    if mask == 0 {
        return Ok(Vec::new());
    }
    conn.transaction(async |c| {
        let owned: Vec<PartitionNoRow> = diesel::sql_query(
            "SELECT partition_no FROM campaign_partitions \
             WHERE campaign_id = ? AND owner = ? AND (? >> partition_no) & 1 = 1 \
             ORDER BY partition_no FOR UPDATE",
        )
        .bind::<BigInt, _>(campaign.0)
        .bind::<Text, _>(run_id)
        .bind::<BigInt, _>(mask)
        .load(c)
        .await?;
        if owned.is_empty() {
            return Ok(Vec::new());
        }
        diesel::sql_query(
            "UPDATE campaign_partitions SET lease_expires_at = NOW(3) + INTERVAL ? MICROSECOND \
             WHERE campaign_id = ? AND owner = ? AND (? >> partition_no) & 1 = 1",
        )
        .bind::<BigInt, _>(lease_micros(lease_time))
        .bind::<BigInt, _>(campaign.0)
        .bind::<Text, _>(run_id)
        .bind::<BigInt, _>(mask)
        .execute(c)
        .await?;
        Ok(owned.into_iter().map(|r| small(r.partition_no)).collect())
    })
    .await
}

/// A partition [`try_acquire`] took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// `None`: it was free; `Some(x)`: taken over from `x`, whose lease ran out (for the caller
    /// to log).
    pub previous_owner: Option<String>,
    /// For how long no other process had sent in it, by the database clock: since it was given
    /// back, or since the lease that ran out ended. `None`: nobody had held it, or the taker
    /// itself held it last (its own send log holds what it sent there).
    pub quiet_for: Option<Duration>,
}

/// Takes `slice`'s partition for `run_id` if it is free or its lease has run out: a
/// compare-and-set on the locked row. Returns `None` if not acquired.
///
/// The row must still describe `slice` (same partition count and bucket range): a caller whose
/// view predates a re-plan gets `None` instead of a partition whose rows differ from the ones it
/// would serve. Nothing is acquired while a re-plan waits for the old plan's leases to end.
pub async fn try_acquire(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
    run_id: &str,
    slice: &PartitionSlice,
    lease_time: Duration,
) -> QResult<Option<Taken>> {
    conn.transaction(async |c| {
        let mut rows: Vec<LeaseRow> = diesel::sql_query(format!(
            "SELECT {LEASE_COLUMNS} FROM campaign_partitions \
             WHERE campaign_id = ? AND partition_no = ? FOR UPDATE"
        ))
        .bind::<BigInt, _>(campaign.0)
        .bind::<SmallInt, _>(slice.partition_no as i16)
        .load(c)
        .await?;
        let Some(current) = rows.pop().map(LeaseView::from) else {
            return Ok(None);
        };
        if current.slice != *slice || !current.is_takeable() {
            return Ok(None);
        }
        // A plain read: the decision only needs to be recent (a re-plan requested a moment later
        // waits for this lease like for any other), and locking the campaign row here would
        // invert apply_replan's lock order.
        if pending_replan(c, campaign).await?.is_some() {
            return Ok(None);
        }
        let n = diesel::sql_query(
            "UPDATE campaign_partitions SET owner = ?, \
             lease_expires_at = NOW(3) + INTERVAL ? MICROSECOND, leased_at = NOW(3), \
             released_at = NULL, released_by = NULL WHERE campaign_id = ? AND partition_no = ? \
             AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= NOW(3))",
        )
        .bind::<Text, _>(run_id)
        .bind::<BigInt, _>(lease_micros(lease_time))
        .bind::<BigInt, _>(campaign.0)
        .bind::<SmallInt, _>(slice.partition_no as i16)
        .execute(c)
        .await?;
        // Sends of this very process are in its own send log: only another's count here.
        let last_holder = current.owner.as_deref().or(current.released_by.as_deref());
        let quiet_for = match last_holder {
            Some(holder) if holder == run_id => None,
            _ => current.quiet_for_ms.map(|ms| Duration::from_millis(ms.max(0) as u64)),
        };
        Ok((n == 1).then_some(Taken { previous_owner: current.owner, quiet_for }))
    })
    .await
}

/// Gives a partition back at once. Returns whether `run_id` held it.
pub async fn release(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
    run_id: &str,
    partition_no: u16,
) -> QResult<bool> {
    let n = diesel::sql_query(
        "UPDATE campaign_partitions SET released_by = owner, owner = NULL, \
         lease_expires_at = NULL, leased_at = NULL, released_at = NOW(3) \
         WHERE campaign_id = ? AND partition_no = ? AND owner = ?",
    )
    .bind::<BigInt, _>(campaign.0)
    .bind::<SmallInt, _>(partition_no as i16)
    .bind::<Text, _>(run_id)
    .execute(conn)
    .await?;
    Ok(n > 0)
}

/// One partition of a campaign with its holder, for `campaign status`.
#[derive(Debug, Clone, PartialEq, QueryableByName, serde::Serialize)]
pub struct Holder {
    #[diesel(sql_type = SmallInt)]
    pub partition_no: i16,
    #[diesel(sql_type = SmallInt)]
    pub bucket_lo: i16,
    #[diesel(sql_type = SmallInt)]
    pub bucket_hi: i16,
    /// The holder's run id (`<instance>#<nonce>`); none: free.
    #[diesel(sql_type = Nullable<Text>)]
    pub owner: Option<String>,
    /// Until the lease runs out, by the database clock (negative: ran out that long ago).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub lease_expires_in_ms: Option<i64>,
    /// The holder's current share of the Money limit (requests per second).
    #[diesel(sql_type = Nullable<Double>)]
    pub owner_rate_limit_per_sec: Option<f64>,
    /// Rows the holder finished per second lately (all its partitions together).
    #[diesel(sql_type = Nullable<Double>)]
    pub owner_rows_per_sec: Option<f64>,
}

/// Every partition of the campaign with its holder and the holder's rate (a read of the small
/// `campaign_partitions` and `daemon_instances` tables by key).
pub async fn holders(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
) -> QResult<Vec<Holder>> {
    diesel::sql_query(
        "SELECT p.partition_no, p.bucket_lo, p.bucket_hi, p.owner, \
         CAST(TIMESTAMPDIFF(MICROSECOND, NOW(3), p.lease_expires_at) DIV 1000 AS SIGNED) \
         AS lease_expires_in_ms, \
         i.rate_limit_per_sec AS owner_rate_limit_per_sec, \
         i.current_rows_per_sec AS owner_rows_per_sec \
         FROM campaign_partitions p LEFT JOIN daemon_instances i ON i.run_id = p.owner \
         WHERE p.campaign_id = ? ORDER BY p.partition_no",
    )
    .bind::<BigInt, _>(campaign.0)
    .load(conn)
    .await
}

/// What one instance should do with its leases now (see [`plan_balance`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancePlan {
    /// This instance's fair share.
    pub target: u16,
    /// Live participants, this instance included.
    pub participants: usize,
    /// Partitions held (or still renewable) to keep: renew them.
    pub keep: Vec<u16>,
    /// Partitions held beyond the target: release them (after draining) so others can take them.
    pub shed: Vec<u16>,
    /// Partitions to try, in order, while fewer than `target` are held (empty when `keep`
    /// already reaches it): free ones first, then ones whose lease ran out.
    pub candidates: Vec<u16>,
}

/// Decides keep / shed / candidates from a snapshot of the leases. Pure, so every instance
/// reaches the same targets from the same participants. Partitions owned by `me` count as held
/// even past their expiry ([`renew`] keeps them while nobody took them). Candidates are rotated
/// to start at `rank * partition_count / participants`, so instances acquiring at the same
/// moment mostly try different partitions first.
pub fn plan_balance(
    leases: &[LeaseView],
    participants: &[String],
    me: &str,
    partition_count: u16,
) -> BalancePlan {
    let (rank, n) = rank_of(participants, me);
    let target = share_of(partition_count, rank, n);
    let mut keep: Vec<u16> =
        leases.iter().filter(|l| l.owner.as_deref() == Some(me)).map(|l| l.partition_no).collect();
    keep.sort_unstable();
    keep.dedup();
    let shed = keep.split_off(keep.len().min(usize::from(target)));
    let candidates = if keep.len() < usize::from(target) && partition_count > 0 {
        let count = usize::from(partition_count);
        let offset = rank * count / n;
        let rotated = |p: u16| (usize::from(p) % count + count - offset) % count;
        let others = leases.iter().filter(|l| l.owner.as_deref() != Some(me) && l.is_takeable());
        let (mut free, mut expired): (Vec<&LeaseView>, Vec<&LeaseView>) =
            others.partition(|l| l.owner.is_none());
        free.sort_by_key(|l| rotated(l.partition_no));
        expired.sort_by_key(|l| rotated(l.partition_no));
        free.into_iter().chain(expired).map(|l| l.partition_no).collect()
    } else {
        Vec::new()
    };
    BalancePlan { target, participants: n, keep, shed, candidates }
}

// ---------------------------------------------------------------------------------------------
// Re-planning

/// Rows of a campaign still to be done (PENDING, FAILED or IN_FLIGHT): a range read of the
/// claim index `(event_id, status, bucket, id)` over three `(event_id, status)` prefixes.
/// `table` is the kind's target table (a `'static` constant, never user input), as in `repo`.
pub async fn remaining_rows(
    conn: &mut AsyncMysqlConnection,
    table: &str,
    campaign: CampaignId,
) -> QResult<u64> {
    #[derive(QueryableByName)]
    struct CountRow {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut rows: Vec<CountRow> = diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM {table} \
         WHERE event_id = ? AND status IN ('PENDING', 'FAILED', 'IN_FLIGHT')"
    ))
    .bind::<BigInt, _>(campaign.0)
    .load(conn)
    .await?;
    Ok(rows.pop().map_or(0, |r| u64::try_from(r.n).unwrap_or(0)))
}

/// The rule's partition count with its thresholds scaled by `scale`.
fn band(rule: &PartitionRule, remaining: u64, scale: f64) -> u16 {
    let at_least = |threshold: u64| remaining as f64 >= threshold as f64 * scale;
    if at_least(rule.large_from) {
        8
    } else if at_least(rule.medium_from) {
        6
    } else {
        4
    }
}

/// Whether a running campaign with `remaining` rows left should move from `current` partitions
/// to another count. A threshold must be passed by the `hysteresis` fraction (0.05: up needs
/// `remaining ≥ threshold × 1.05`, down needs `remaining < threshold × 0.95`), so a count hovering
/// near a threshold does not re-plan back and forth. When a move would cross two thresholds but
/// only the nearer one by the margin, it goes to the nearer band. A fixed rule never re-plans.
pub fn replan_decision(
    current: u16,
    remaining: u64,
    rule: PartitionRule,
    hysteresis: f64,
) -> Option<u16> {
    if rule.fixed.is_some() {
        return None;
    }
    let h = if hysteresis.is_finite() { hysteresis.clamp(0.0, 0.99) } else { 0.0 };
    let up = band(&rule, remaining, 1.0 + h);
    let down = band(&rule, remaining, 1.0 - h);
    if up > current {
        Some(up)
    } else if down < current {
        Some(down)
    } else {
        None
    }
}

#[derive(QueryableByName)]
struct PlanRow {
    #[diesel(sql_type = Nullable<SmallInt>)]
    partition_count: Option<i16>,
    #[diesel(sql_type = Nullable<SmallInt>)]
    replan_to: Option<i16>,
}

/// Records the decision to move the campaign to `to` partitions (clamped to
/// `1..=MAX_PARTITIONS` like [`slices`]) unless one is already waiting, the campaign has no plan
/// yet, or it already has that count. Returns whether it was recorded.
pub async fn request_replan(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
    to: u16,
    actor: &str,
) -> QResult<bool> {
    let to = to.clamp(1, MAX_PARTITIONS);
    conn.transaction(async |c| {
        let mut rows: Vec<PlanRow> = diesel::sql_query(
            "SELECT partition_count, replan_to FROM campaigns WHERE id = ? FOR UPDATE",
        )
        .bind::<BigInt, _>(campaign.0)
        .load(c)
        .await?;
        let Some(PlanRow { partition_count: Some(from), replan_to: None }) = rows.pop() else {
            return Ok(false);
        };
        if small(from) == to {
            return Ok(false);
        }
        diesel::sql_query("UPDATE campaigns SET replan_to = ? WHERE id = ? AND replan_to IS NULL")
            .bind::<SmallInt, _>(to as i16)
            .bind::<BigInt, _>(campaign.0)
            .execute(c)
            .await?;
        let detail = serde_json::json!({ "from": from, "to": to }).to_string();
        repo::record_event(c, Some(campaign), "REPLAN_REQUESTED", None, actor, Some(&detail))
            .await?;
        Ok(true)
    })
    .await
}

/// The partition count a decided re-plan waits to apply, if any.
pub async fn pending_replan(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
) -> QResult<Option<u16>> {
    let mut rows: Vec<PlanRow> =
        diesel::sql_query("SELECT partition_count, replan_to FROM campaigns WHERE id = ?")
            .bind::<BigInt, _>(campaign.0)
            .load(conn)
            .await?;
    Ok(rows.pop().and_then(|r| r.replan_to).map(small))
}

#[derive(QueryableByName)]
struct HeldRow {
    #[diesel(sql_type = BigInt)]
    held: i64,
}

/// Applies a waiting re-plan if no lease of the campaign is held (every owner NULL or expired):
/// replaces the partition rows with the new plan's (all free), stores the new count and records
/// `REPLANNED`, in one transaction. Returns the new slices, or `None` if there is nothing to
/// apply or a lease is still held (try again later).
pub async fn apply_replan(
    conn: &mut AsyncMysqlConnection,
    campaign: CampaignId,
    actor: &str,
) -> QResult<Option<Vec<PartitionSlice>>> {
    conn.transaction(async |c| {
        let mut rows: Vec<PlanRow> = diesel::sql_query(
            "SELECT partition_count, replan_to FROM campaigns WHERE id = ? FOR UPDATE",
        )
        .bind::<BigInt, _>(campaign.0)
        .load(c)
        .await?;
        let Some(PlanRow { partition_count: from, replan_to: Some(to) }) = rows.pop() else {
            return Ok(None);
        };
        // Lock every partition row, not only held ones: at READ COMMITTED InnoDB drops the locks
        // of rows a WHERE rejects, and a free row left unlocked could be acquired between this
        // check and the swap. A try_acquire waiting on one of these rows then sees the new plan.
        let held: Vec<HeldRow> = diesel::sql_query(
            "SELECT CAST(owner IS NOT NULL AND lease_expires_at > NOW(3) AS SIGNED) AS held \
             FROM campaign_partitions WHERE campaign_id = ? FOR UPDATE",
        )
        .bind::<BigInt, _>(campaign.0)
        .load(c)
        .await?;
        if held.iter().any(|r| r.held != 0) {
            return Ok(None);
        }
        let plan = slices(small(to));
        let count = plan.len() as i16;
        repo::store_partitions(c, campaign, &plan).await?;
        diesel::sql_query(
            "UPDATE campaigns SET partition_count = ?, replan_to = NULL WHERE id = ?",
        )
        .bind::<SmallInt, _>(count)
        .bind::<BigInt, _>(campaign.0)
        .execute(c)
        .await?;
        let detail = serde_json::json!({ "from": from, "to": count }).to_string();
        repo::record_event(c, Some(campaign), "REPLANNED", None, actor, Some(&detail)).await?;
        Ok(Some(plan))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `owners[i]`: owner of partition i and whether its lease is still running.
    fn view(owners: &[Option<(&str, bool)>]) -> Vec<LeaseView> {
        let count = owners.len() as u16;
        slices(count)
            .into_iter()
            .zip(owners)
            .map(|(slice, o)| LeaseView {
                partition_no: slice.partition_no,
                slice,
                owner: o.map(|(who, _)| who.to_owned()),
                expires_in_ms: o.map(|(_, live)| if live { 5_000 } else { -1 }),
                leased_at: None,
                held_for_ms: None,
                quiet_for_ms: None,
                released_by: None,
            })
            .collect()
    }

    #[test]
    fn fair_shares_sum_to_the_partition_count_and_differ_by_at_most_one() {
        for partitions in 0..=8u16 {
            for n in 1..=5usize {
                let all: Vec<String> = (0..n).map(|i| format!("i{i}#x")).collect();
                let shares: Vec<u16> =
                    all.iter().map(|me| fair_share(partitions, &all, me)).collect();
                assert_eq!(shares.iter().sum::<u16>(), partitions, "{partitions}/{n}: {shares:?}");
                let (lo, hi) = (shares.iter().min(), shares.iter().max());
                assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{shares:?}");
            }
        }
    }

    #[test]
    fn fair_share_table() {
        let two = ids(&["a#1", "b#1"]);
        let three = ids(&["a#1", "b#1", "c#1"]);
        // (partitions, participants, me, share)
        let table: [(u16, &[String], &str, u16); 9] = [
            (4, &two, "a#1", 2),
            (4, &two, "b#1", 2),
            (4, &three, "a#1", 2),
            (4, &three, "b#1", 1),
            (4, &three, "c#1", 1),
            (8, &three, "a#1", 3),
            (8, &three, "b#1", 3),
            (8, &three, "c#1", 2),
            (4, &[], "z#1", 4),
        ];
        for (partitions, all, me, want) in table {
            assert_eq!(fair_share(partitions, all, me), want, "{partitions} {all:?} {me}");
        }
    }

    #[test]
    fn an_absent_me_is_counted_and_the_input_order_does_not_matter() {
        // "b#1" not visible yet: it still counts itself, so a and c agree with it once it is.
        assert_eq!(fair_share(4, &ids(&["c#1", "a#1"]), "b#1"), 1);
        assert_eq!(fair_share(4, &ids(&["c#1", "a#1", "b#1"]), "a#1"), 2);
        assert_eq!(fair_share(4, &ids(&["a#1", "a#1"]), "a#1"), 4);
        let plan = plan_balance(&view(&[None; 4]), &ids(&["a#1"]), "b#1", 4);
        assert_eq!((plan.target, plan.participants), (2, 2));
    }

    #[test]
    fn two_instances_on_four_free_partitions_start_on_different_halves() {
        let all = ids(&["a#1", "b#1"]);
        let leases = view(&[None; 4]);
        let a = plan_balance(&leases, &all, "a#1", 4);
        let b = plan_balance(&leases, &all, "b#1", 4);
        assert_eq!((a.target, b.target), (2, 2));
        assert_eq!(a.candidates, vec![0, 1, 2, 3]);
        assert_eq!(b.candidates, vec![2, 3, 0, 1]);
        assert!(a.keep.is_empty() && a.shed.is_empty());
    }

    #[test]
    fn a_third_instance_joining_makes_the_holders_shed_their_excess() {
        let live = |who| Some((who, true));
        let leases = view(&[live("a#1"), live("a#1"), live("b#1"), live("b#1")]);
        let all = ids(&["a#1", "b#1", "c#1"]);
        let a = plan_balance(&leases, &all, "a#1", 4);
        let b = plan_balance(&leases, &all, "b#1", 4);
        let c = plan_balance(&leases, &all, "c#1", 4);
        assert_eq!((a.target, b.target, c.target), (2, 1, 1));
        assert_eq!((a.keep.clone(), a.shed.clone()), (vec![0, 1], vec![]));
        assert_eq!((b.keep.clone(), b.shed.clone()), (vec![2], vec![3]));
        assert!(a.candidates.is_empty() && b.candidates.is_empty());
        // Nothing is free yet: c waits for b's release.
        assert_eq!(c.candidates, Vec::<u16>::new());
        let after = view(&[live("a#1"), live("a#1"), live("b#1"), None]);
        assert_eq!(plan_balance(&after, &all, "c#1", 4).candidates, vec![3]);
    }

    #[test]
    fn an_instance_holding_more_than_its_share_sheds_exactly_the_excess() {
        let live = |who| Some((who, true));
        let leases = view(&[
            live("b#1"),
            live("a#1"),
            live("b#1"),
            live("b#1"),
            live("b#1"),
            live("b#1"),
            live("b#1"),
            None,
        ]);
        let all = ids(&["a#1", "b#1", "c#1"]);
        let b = plan_balance(&leases, &all, "b#1", 8);
        assert_eq!(b.target, 3);
        assert_eq!(b.keep, vec![0, 2, 3]);
        assert_eq!(b.shed, vec![4, 5, 6]);
        assert!(b.candidates.is_empty());
        let a = plan_balance(&leases, &all, "a#1", 8);
        assert_eq!((a.target, a.keep.clone(), a.shed.clone()), (3, vec![1], vec![]));
        assert_eq!(a.candidates, vec![7]);
    }

    #[test]
    fn expired_leases_are_candidates_after_free_ones_and_my_own_are_kept() {
        let leases = view(&[
            Some(("x#1", false)),
            Some(("a#1", false)),
            None,
            Some(("y#1", true)),
            Some(("x#1", false)),
            None,
        ]);
        let plan = plan_balance(&leases, &ids(&["a#1"]), "a#1", 6);
        assert_eq!(plan.target, 6);
        assert_eq!(plan.keep, vec![1]);
        assert_eq!(plan.candidates, vec![2, 5, 0, 4]);
        // A lease with an owner but no expiry counts as expired.
        let mut odd = view(&[Some(("x#1", true))]);
        odd[0].expires_in_ms = None;
        assert!(odd[0].is_takeable());
    }

    #[test]
    fn rotation_follows_the_rank() {
        let all = ids(&["a#1", "b#1", "c#1"]);
        let leases = view(&[None; 8]);
        let c = plan_balance(&leases, &all, "c#1", 8);
        // rank 2 of 3 on 8 partitions: offset 16 / 3 = 5.
        assert_eq!(c.candidates, vec![5, 6, 7, 0, 1, 2, 3, 4]);
    }

    #[test]
    fn replan_decisions_at_the_thresholds() {
        let rule = PartitionRule { medium_from: 1_000, large_from: 2_000, fixed: None };
        // (current, remaining, decision)
        let table: [(u16, u64, Option<u16>); 16] = [
            (4, 999, None),
            (4, 1_000, None),
            (4, 1_049, None),
            (4, 1_050, Some(6)),
            (4, 2_099, Some(6)),
            (4, 2_100, Some(8)),
            (6, 951, None),
            (6, 950, None),
            (6, 949, Some(4)),
            (6, 1_500, None),
            (6, 2_099, None),
            (6, 2_100, Some(8)),
            (8, 1_900, None),
            (8, 1_899, Some(6)),
            (8, 949, Some(4)),
            (8, 0, Some(4)),
        ];
        for (current, remaining, want) in table {
            assert_eq!(
                replan_decision(current, remaining, rule, 0.05),
                want,
                "{current} partitions, {remaining} rows left"
            );
        }
        // Without hysteresis the rule itself decides.
        assert_eq!(replan_decision(4, 1_000, rule, 0.0), Some(6));
        assert_eq!(replan_decision(6, 999, rule, 0.0), Some(4));
        assert_eq!(replan_decision(6, 1_000, rule, f64::NAN), None);
        // A plan outside the rule (an old fixed count) moves to the rule's band.
        assert_eq!(replan_decision(2, 10, rule, 0.05), Some(4));
    }

    #[test]
    fn a_fixed_rule_never_replans() {
        let rule = PartitionRule { fixed: Some(4), ..PartitionRule::default() };
        assert_eq!(replan_decision(4, 5_000_000, rule, 0.05), None);
        assert_eq!(replan_decision(8, 0, rule, 0.05), None);
    }

    #[test]
    fn masks_hold_the_listed_partitions() {
        assert_eq!(partition_mask(&[0, 2, 7]), 0b1000_0101);
        assert_eq!(partition_mask(&[]), 0);
        assert_eq!(partition_mask(&[63, 100]), 0);
    }
}
