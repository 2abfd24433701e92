//! Several payoutd instances sharing one campaign: heartbeats, partition leases (acquire,
//! take-over, renew, release), the balancing loop, re-planning behind the lease barrier, and the
//! plans of their statements. Drives `payout_core::lease` directly against a fresh database.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use mysql_async::prelude::Queryable;
use payout_core::CampaignId;
use payout_core::db::{self, DbConn, DbPool, DbSettings};
use payout_core::lease::{self, LeaseView};
use payout_core::plan::{PartitionRule, PartitionSlice, slices};
use payout_core::repo;
use secrecy::SecretString;

use crate::support::*;

const C: CampaignId = CampaignId(42);
const LONG_LEASE: Duration = Duration::from_secs(60);

fn pool(db: &TestDb) -> anyhow::Result<DbPool> {
    Ok(db::pool(&DbSettings {
        url: SecretString::from(db.url.clone()),
        pool_size: 8,
        connect_timeout: Duration::from_secs(10),
    })?)
}

async fn conn(pool: &DbPool) -> anyhow::Result<DbConn> {
    Ok(db::conn(pool).await?)
}

/// Campaign 42 (vouchers) with a stored plan of `partitions` partitions.
async fn campaign_with_plan(
    db: &TestDb,
    pool: &DbPool,
    partitions: u16,
) -> anyhow::Result<Vec<PartitionSlice>> {
    db.campaign(C.0, "VOUCHER", "shared").await?;
    let rule = PartitionRule { fixed: Some(partitions), ..PartitionRule::default() };
    Ok(repo::ensure_plan(&mut *conn(pool).await?, "voucher_targets", C, rule, "test").await?)
}

/// The previous owner of a partition just taken.
fn owner(taken: lease::Taken) -> Option<String> {
    taken.previous_owner
}

/// A heartbeat with nothing sent in the last window.
async fn heartbeat(
    c: &mut diesel_async::AsyncMysqlConnection,
    run_id: &str,
    instance_id: &str,
    campaign: Option<CampaignId>,
    lease_time: Duration,
    rate_limit_per_sec: f64,
    current_rows_per_sec: Option<f64>,
) -> Result<(), diesel::result::Error> {
    let beat = lease::Heartbeat {
        run_id,
        instance_id,
        campaign,
        lease_time,
        rate_limit_per_sec,
        current_rows_per_sec,
        recent_sends: (0, Duration::ZERO),
    };
    lease::heartbeat(c, &beat).await
}

/// Lets a lease run out now, by the database clock.
async fn expire(db: &TestDb, partition_no: u16) -> anyhow::Result<()> {
    db.exec(&format!(
        "UPDATE campaign_partitions SET lease_expires_at = NOW(3) - INTERVAL 1 SECOND \
         WHERE campaign_id = {} AND partition_no = {partition_no}",
        C.0
    ))
    .await
}

/// Owner of every partition, by partition number.
async fn owners(pool: &DbPool) -> anyhow::Result<Vec<Option<String>>> {
    let views = lease::leases(&mut *conn(pool).await?, C).await?;
    Ok(views.into_iter().map(|l| l.owner).collect())
}

fn slice_of(views: &[LeaseView], partition_no: u16) -> anyhow::Result<PartitionSlice> {
    views
        .iter()
        .find(|l| l.partition_no == partition_no)
        .map(|l| l.slice)
        .with_context(|| format!("no partition {partition_no}"))
}

/// instance_id, campaign_id, rate_limit_per_sec, current_rows_per_sec, expires_at > heartbeat_at
type InstanceRow = (String, Option<i64>, f64, Option<f64>, bool);

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_make_instances_participants_until_they_expire() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    let mut c = conn(&pool).await?;
    db.campaign(43, "VOUCHER", "other").await?;
    heartbeat(&mut c, "node-b#2", "node-b", Some(C), LONG_LEASE, 500.0, None).await?;
    heartbeat(&mut c, "node-a#1", "node-a", Some(C), LONG_LEASE, 500.0, Some(12.5)).await?;
    heartbeat(&mut c, "node-c#3", "node-c", Some(CampaignId(43)), LONG_LEASE, 1000.0, None).await?;
    heartbeat(&mut c, "node-d#4", "node-d", None, LONG_LEASE, 0.0, None).await?;
    assert_eq!(lease::participants(&mut c, C).await?, ["node-a#1", "node-b#2"]);
    assert_eq!(lease::participants(&mut c, CampaignId(43)).await?, ["node-c#3"]);

    let row: Option<InstanceRow> = db
        .conn()
        .await?
        .query_first(
            "SELECT instance_id, campaign_id, rate_limit_per_sec, current_rows_per_sec, \
             expires_at > heartbeat_at FROM daemon_instances WHERE run_id = 'node-a#1'",
        )
        .await?;
    assert_eq!(row, Some(("node-a".to_owned(), Some(42), 500.0, Some(12.5), true)));

    // A heartbeat is an upsert: one row per run id, started_at kept, the rest refreshed. A short
    // lease then runs out by the database clock and the instance stops being a participant.
    let started: Vec<String> = db
        .query("SELECT CAST(started_at AS CHAR) FROM daemon_instances WHERE run_id = 'node-b#2'")
        .await?;
    heartbeat(&mut c, "node-b#2", "node-b", Some(C), Duration::from_millis(300), 250.0, None)
        .await?;
    let after: Vec<(String, f64)> = db
        .query(
            "SELECT CAST(started_at AS CHAR), rate_limit_per_sec FROM daemon_instances \
             WHERE run_id = 'node-b#2'",
        )
        .await?;
    assert_eq!(after, [(started[0].clone(), 250.0)]);
    eventually(Duration::from_secs(10), "node-b's heartbeat to expire", || async {
        let live = lease::participants(&mut *conn(&pool).await?, C).await?;
        Ok((live == ["node-a#1"]).then_some(()))
    })
    .await?;
    drop(c);
    pool.close();
    db.drop_db().await
}

/// What the other live instances may still have in Money's window: per instance the larger of
/// its share and its recent sends while they count, summed over the live instances but the one
/// asking, whatever campaign they serve (the limit is Money's, across campaigns).
#[tokio::test(flavor = "multi_thread")]
async fn others_rate_counts_shares_and_recent_sends_of_live_instances() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    let mut c = conn(&pool).await?;
    db.campaign(43, "VOUCHER", "other").await?;
    let beat = |run_id, campaign, rate, recent: (usize, Duration)| lease::Heartbeat {
        run_id,
        instance_id: "node",
        campaign,
        lease_time: LONG_LEASE,
        rate_limit_per_sec: rate,
        current_rows_per_sec: None,
        recent_sends: recent,
    };
    assert_eq!(lease::others_rate(&mut c, "me#1").await?, 0.0);
    // Serving campaign 42 at 300/s, having sent 280 in its last window.
    lease::heartbeat(&mut c, &beat("a#1", Some(C), 300.0, (280, LONG_LEASE))).await?;
    // Just lowered from 700 to 200: its last window still holds 650 sends.
    lease::heartbeat(&mut c, &beat("b#1", Some(C), 200.0, (650, LONG_LEASE))).await?;
    // Idle after another campaign: share 0, but 400 sends still count.
    lease::heartbeat(&mut c, &beat("c#1", None, 0.0, (400, LONG_LEASE))).await?;
    // Another campaign, at 100/s.
    lease::heartbeat(&mut c, &beat("d#1", Some(CampaignId(43)), 100.0, (0, Duration::ZERO)))
        .await?;
    lease::heartbeat(&mut c, &beat("me#1", Some(C), 999.0, (999, LONG_LEASE))).await?;
    assert_eq!(lease::others_rate(&mut c, "me#1").await?, 300.0 + 650.0 + 400.0 + 100.0);
    assert_eq!(lease::others_rate(&mut c, "a#1").await?, 650.0 + 400.0 + 100.0 + 999.0);

    // Recent sends stop counting when their newest leaves the window (database clock).
    lease::heartbeat(&mut c, &beat("c#1", None, 0.0, (400, Duration::from_millis(200)))).await?;
    lease::heartbeat(&mut c, &beat("b#1", Some(C), 200.0, (650, Duration::from_millis(200))))
        .await?;
    eventually(Duration::from_secs(10), "the recent sends to stop counting", || async {
        let rate = lease::others_rate(&mut *conn(&pool).await?, "me#1").await?;
        Ok((rate == 300.0 + 200.0 + 100.0).then_some(()))
    })
    .await?;
    // An instance whose heartbeat expired, or that deregistered, counts no more.
    db.exec(
        "UPDATE daemon_instances SET expires_at = NOW(3) - INTERVAL 1 SECOND WHERE run_id = 'd#1'",
    )
    .await?;
    lease::deregister(&mut c, "a#1").await?;
    assert_eq!(lease::others_rate(&mut c, "me#1").await?, 200.0);

    // A process that exits cleanly is no participant any more, but its last requests count
    // until they leave the window; with none, it is forgotten at once.
    lease::heartbeat(&mut c, &beat("e#1", Some(C), 300.0, (280, LONG_LEASE))).await?;
    lease::retire(&mut c, "e#1", "node", (290, Duration::from_millis(300))).await?;
    assert_eq!(lease::others_rate(&mut c, "me#1").await?, 200.0 + 290.0);
    assert!(!lease::participants(&mut c, C).await?.contains(&"e#1".to_owned()));
    eventually(Duration::from_secs(10), "the retired process's sends to stop counting", || async {
        let rate = lease::others_rate(&mut *conn(&pool).await?, "me#1").await?;
        Ok((rate == 200.0).then_some(()))
    })
    .await?;
    lease::heartbeat(&mut c, &beat("f#1", Some(C), 300.0, (0, Duration::ZERO))).await?;
    lease::retire(&mut c, "f#1", "node", (0, Duration::ZERO)).await?;
    let f: Vec<String> =
        db.query("SELECT run_id FROM daemon_instances WHERE run_id = 'f#1'").await?;
    assert!(f.is_empty(), "a process with nothing left in the window is forgotten at once");
    db.exec("DELETE FROM daemon_instances WHERE run_id = 'e#1'").await?;

    // A starting daemon forgets the processes that died a day ago or more, and only those.
    db.exec(
        "UPDATE daemon_instances SET expires_at = NOW(3) - INTERVAL 25 HOUR WHERE run_id = 'd#1'",
    )
    .await?;
    db.exec(
        "UPDATE daemon_instances SET expires_at = NOW(3) - INTERVAL 23 HOUR WHERE run_id = 'c#1'",
    )
    .await?;
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(lease::forget_dead_instances(&mut c, day).await?, 1);
    let left: Vec<String> = db.query("SELECT run_id FROM daemon_instances ORDER BY run_id").await?;
    assert_eq!(left, ["b#1", "c#1", "me#1"]);
    drop(c);
    pool.close();
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_competing_for_a_partition_exactly_one_acquires() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    let plan = campaign_with_plan(&db, &pool, 4).await?;
    let (mut a, mut b) = (conn(&pool).await?, conn(&pool).await?);
    for slice in &plan {
        let (ra, rb) = tokio::join!(
            lease::try_acquire(&mut a, C, "node-a#1", slice, LONG_LEASE),
            lease::try_acquire(&mut b, C, "node-b#1", slice, LONG_LEASE),
        );
        let (ra, rb) = (ra?.map(owner), rb?.map(owner));
        let winner = match (&ra, &rb) {
            (Some(None), None) => "node-a#1",
            (None, Some(None)) => "node-b#1",
            other => anyhow::bail!(
                "partition {}: exactly one acquisition expected, got {other:?}",
                slice.partition_no
            ),
        };
        let views = lease::leases(&mut a, C).await?;
        let view = &views[usize::from(slice.partition_no)];
        assert_eq!(view.owner.as_deref(), Some(winner));
        assert!(view.expires_in_ms.is_some_and(|ms| ms > 50_000), "{view:?}");
        assert!(view.leased_at.is_some() && view.held_for_ms.is_some_and(|ms| ms >= 0));
        // The loser, and the winner itself, cannot take a running lease again.
        for who in ["node-a#1", "node-b#1"] {
            assert_eq!(lease::try_acquire(&mut a, C, who, slice, LONG_LEASE).await?, None);
        }
    }
    drop((a, b));
    pool.close();
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_lease_is_taken_over_and_the_previous_owner_reported() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    let plan = campaign_with_plan(&db, &pool, 4).await?;
    let mut c = conn(&pool).await?;
    assert_eq!(
        lease::try_acquire(&mut c, C, "node-a#1", &plan[0], LONG_LEASE).await?.map(owner),
        Some(None)
    );
    assert_eq!(lease::try_acquire(&mut c, C, "node-b#1", &plan[0], LONG_LEASE).await?, None);

    expire(&db, 0).await?;
    let view = lease::leases(&mut c, C).await?.remove(0);
    assert!(view.is_takeable() && view.expires_in_ms.is_some_and(|ms| ms <= 0), "{view:?}");
    assert_eq!(
        lease::try_acquire(&mut c, C, "node-b#1", &plan[0], LONG_LEASE).await?.map(owner),
        Some(Some("node-a#1".to_owned()))
    );
    let view = lease::leases(&mut c, C).await?.remove(0);
    assert_eq!(view.owner.as_deref(), Some("node-b#1"));
    assert!(view.expires_in_ms.is_some_and(|ms| ms > 0), "{view:?}");
    assert_eq!(lease::try_acquire(&mut c, C, "node-a#1", &plan[0], LONG_LEASE).await?, None);

    // A short lease runs out by the database clock alone.
    let short = Duration::from_millis(300);
    assert_eq!(
        lease::try_acquire(&mut c, C, "node-a#1", &plan[1], short).await?.map(owner),
        Some(None)
    );
    let previous = eventually(Duration::from_secs(10), "node-a's lease to run out", || async {
        let mut c = conn(&pool).await?;
        Ok(lease::try_acquire(&mut c, C, "node-b#1", &plan[1], LONG_LEASE).await?)
    })
    .await?;
    assert_eq!(previous.previous_owner.as_deref(), Some("node-a#1"));
    // Nobody has sent in it since node-a's lease ended: at most the polling interval ago.
    let quiet = previous.quiet_for.context("an expired lease has a quiet time")?;
    assert!(quiet < Duration::from_secs(5), "{previous:?}");
    drop(c);
    pool.close();
    db.drop_db().await
}

/// What `try_acquire` says about when a partition was last sent in, which the engine waits a
/// rate window past before counting the partition in its share of the limit: nothing for a
/// partition nobody held, the end of the lease for one taken over, the hand-back for one given
/// back (also by a deregistered process), and the old plan's last moment for a re-plan's rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_partition_says_how_long_nobody_has_sent_in_it() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    let plan = campaign_with_plan(&db, &pool, 4).await?;
    let mut c = conn(&pool).await?;
    let quiet = |t: Option<lease::Taken>| t.map(|t| t.quiet_for);

    // Never held.
    assert_eq!(
        quiet(lease::try_acquire(&mut c, C, "node-a#1", &plan[0], LONG_LEASE).await?),
        Some(None)
    );
    assert!(lease::leases(&mut c, C).await?[1].quiet_for_ms.is_none());

    // Taken over a second after its lease ended (`expire` sets the end 1 s back).
    expire(&db, 0).await?;
    let q = quiet(lease::try_acquire(&mut c, C, "node-b#1", &plan[0], LONG_LEASE).await?)
        .flatten()
        .context("a lease that ran out has a quiet time")?;
    assert!((Duration::from_millis(990)..Duration::from_secs(5)).contains(&q), "{q:?}");

    // Given back a moment ago: quiet for less than a window, however long the lease had left.
    assert!(lease::release(&mut c, C, "node-b#1", 0).await?);
    let view = lease::leases(&mut c, C).await?.remove(0);
    assert!(view.quiet_for_ms.is_some_and(|ms| (0..1_000).contains(&ms)), "{view:?}");
    let q = quiet(lease::try_acquire(&mut c, C, "node-a#1", &plan[0], LONG_LEASE).await?)
        .flatten()
        .context("a partition given back has a quiet time")?;
    assert!(q < Duration::from_secs(1), "{q:?}");
    // Held again: the hand-back is forgotten until the next one.
    let view = lease::leases(&mut c, C).await?.remove(0);
    assert!(view.quiet_for_ms.is_some_and(|ms| ms < 0) && view.released_by.is_none(), "{view:?}");

    // Given back and taken again by the same process: its own send log holds what it sent
    // there, so there is nothing to wait out.
    assert!(lease::release(&mut c, C, "node-a#1", 0).await?);
    assert_eq!(lease::leases(&mut c, C).await?[0].released_by.as_deref(), Some("node-a#1"));
    assert_eq!(
        quiet(lease::try_acquire(&mut c, C, "node-a#1", &plan[0], LONG_LEASE).await?),
        Some(None)
    );
    // Nor for a lease of its own that ran out (a database outage of its own).
    expire(&db, 0).await?;
    assert_eq!(
        quiet(lease::try_acquire(&mut c, C, "node-a#1", &plan[0], LONG_LEASE).await?),
        Some(None)
    );

    // A deregistered process's partitions: quiet since it went, or since its lease ended if
    // that was earlier.
    assert!(lease::try_acquire(&mut c, C, "node-a#1", &plan[1], LONG_LEASE).await?.is_some());
    expire(&db, 1).await?;
    lease::deregister(&mut c, "node-a#1").await?;
    let views = lease::leases(&mut c, C).await?;
    assert!(views[0].quiet_for_ms.is_some_and(|ms| (0..1_000).contains(&ms)), "{:?}", views[0]);
    assert!(views[1].quiet_for_ms.is_some_and(|ms| ms >= 990), "{:?}", views[1]);

    // A re-plan's rows carry the old plan's last moment: here the hand-back of partition 0.
    assert!(lease::request_replan(&mut c, C, 8, "test").await?);
    assert!(lease::apply_replan(&mut c, C, "test").await?.is_some());
    let views = lease::leases(&mut c, C).await?;
    assert_eq!(views.len(), 8);
    assert!(
        views.iter().all(|v| v.quiet_for_ms.is_some_and(|ms| (0..2_000).contains(&ms))),
        "{views:?}"
    );
    // ... and by whom, when one process held all the old partitions last: that process takes
    // the new ones without waiting, any other waits.
    assert!(views.iter().all(|v| v.released_by.as_deref() == Some("node-a#1")), "{views:?}");
    let plan8 = lease::leases(&mut c, C).await?.into_iter().map(|v| v.slice).collect::<Vec<_>>();
    assert_eq!(
        quiet(lease::try_acquire(&mut c, C, "node-a#2", &plan8[0], LONG_LEASE).await?)
            .map(|q| q.is_some()),
        Some(true),
        "another run of the same host is another process"
    );
    assert_eq!(
        quiet(lease::try_acquire(&mut c, C, "node-a#1", &plan8[1], LONG_LEASE).await?),
        Some(None)
    );
    // Old partitions last held by two processes: the new ones wait whoever takes them.
    lease::deregister(&mut c, "node-a#2").await?;
    lease::deregister(&mut c, "node-a#1").await?;
    assert!(lease::request_replan(&mut c, C, 4, "test").await?);
    assert!(lease::apply_replan(&mut c, C, "test").await?.is_some());
    let views = lease::leases(&mut c, C).await?;
    assert!(views.iter().all(|v| v.released_by.is_none()), "{views:?}");
    assert!(
        quiet(lease::try_acquire(&mut c, C, "node-a#1", &views[0].slice, LONG_LEASE).await?)
            .flatten()
            .is_some()
    );
    drop(c);
    pool.close();
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn renew_extends_only_partitions_still_owned() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    let plan = campaign_with_plan(&db, &pool, 4).await?;
    let mut c = conn(&pool).await?;
    for s in &plan[..3] {
        assert!(lease::try_acquire(&mut c, C, "node-a#1", s, LONG_LEASE).await?.is_some());
    }
    assert_eq!(lease::renew(&mut c, C, "node-a#1", &[3, 0, 1, 2], LONG_LEASE).await?, [0, 1, 2]);
    assert_eq!(lease::renew(&mut c, C, "node-a#1", &[], LONG_LEASE).await?, Vec::<u16>::new());
    assert_eq!(lease::renew(&mut c, C, "node-b#1", &[0, 1], LONG_LEASE).await?, Vec::<u16>::new());

    // Partition 1 runs out and is taken over; partition 2 runs out but nobody takes it.
    expire(&db, 1).await?;
    expire(&db, 2).await?;
    assert!(lease::try_acquire(&mut c, C, "node-b#1", &plan[1], LONG_LEASE).await?.is_some());
    assert_eq!(lease::renew(&mut c, C, "node-a#1", &[0, 1, 2], LONG_LEASE).await?, [0, 2]);
    let views = lease::leases(&mut c, C).await?;
    assert!(views[2].expires_in_ms.is_some_and(|ms| ms > 50_000), "{:?}", views[2]);
    assert_eq!(views[1].owner.as_deref(), Some("node-b#1"));
    drop(c);
    pool.close();
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn release_and_deregister_free_leases_at_once() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    let plan = campaign_with_plan(&db, &pool, 4).await?;
    let mut c = conn(&pool).await?;
    heartbeat(&mut c, "node-a#1", "node-a", Some(C), LONG_LEASE, 500.0, None).await?;
    heartbeat(&mut c, "node-b#1", "node-b", Some(C), LONG_LEASE, 500.0, None).await?;
    for s in &plan[..2] {
        assert!(lease::try_acquire(&mut c, C, "node-a#1", s, LONG_LEASE).await?.is_some());
    }
    assert!(lease::try_acquire(&mut c, C, "node-b#1", &plan[2], LONG_LEASE).await?.is_some());

    assert!(!lease::release(&mut c, C, "node-b#1", 0).await?, "not node-b's to release");
    assert!(lease::release(&mut c, C, "node-a#1", 0).await?);
    assert!(!lease::release(&mut c, C, "node-a#1", 0).await?, "released twice");
    assert_eq!(
        lease::try_acquire(&mut c, C, "node-b#1", &plan[0], LONG_LEASE).await?.map(owner),
        Some(None)
    );

    lease::deregister(&mut c, "node-a#1").await?;
    assert_eq!(lease::participants(&mut c, C).await?, ["node-b#1"]);
    let views = lease::leases(&mut c, C).await?;
    assert_eq!(
        views.iter().map(|l| l.owner.as_deref()).collect::<Vec<_>>(),
        [Some("node-b#1"), None, Some("node-b#1"), None]
    );
    assert!(views[1].expires_in_ms.is_none() && views[1].leased_at.is_none(), "{:?}", views[1]);
    // Free, not taken over: nobody has to wait for node-a's lease.
    assert_eq!(
        lease::try_acquire(&mut c, C, "node-b#1", &plan[1], LONG_LEASE).await?.map(owner),
        Some(None)
    );
    // A clean exit of a process that sent within the last window frees its leases just as well.
    lease::retire(&mut c, "node-b#1", "node-b", (120, LONG_LEASE)).await?;
    assert!(lease::participants(&mut c, C).await?.is_empty());
    assert!(lease::leases(&mut c, C).await?.iter().all(|l| l.owner.is_none()));
    drop(c);
    pool.close();
    db.drop_db().await
}

/// One simulated daemon instance: its run id, its connection and the partitions it believes it
/// holds (what its runners would serve).
struct Instance {
    run_id: String,
    conn: DbConn,
    held: BTreeSet<u16>,
}

impl Instance {
    async fn new(pool: &DbPool, run_id: &str) -> anyhow::Result<Instance> {
        Ok(Instance { run_id: run_id.to_owned(), conn: conn(pool).await?, held: BTreeSet::new() })
    }

    /// One balancing step, as the daemon's lease loop does it: heartbeat, look, shed the excess,
    /// renew the rest (dropping what was lost), then acquire up to the fair share.
    async fn step(&mut self, partition_count: u16) -> anyhow::Result<()> {
        let c = &mut *self.conn;
        let instance = self.run_id.split('#').next().unwrap_or("");
        heartbeat(c, &self.run_id, instance, Some(C), LONG_LEASE, 100.0, None).await?;
        let participants = lease::participants(c, C).await?;
        let views = lease::leases(c, C).await?;
        let plan = lease::plan_balance(&views, &participants, &self.run_id, partition_count);
        for p in &plan.shed {
            // Stop serving first, then release.
            self.held.remove(p);
            lease::release(c, C, &self.run_id, *p).await?;
        }
        let renewed = lease::renew(c, C, &self.run_id, &plan.keep, LONG_LEASE).await?;
        self.held = renewed.into_iter().collect();
        for p in &plan.candidates {
            if self.held.len() >= usize::from(plan.target) {
                break;
            }
            let slice = slice_of(&views, *p)?;
            if lease::try_acquire(c, C, &self.run_id, &slice, LONG_LEASE).await?.is_some() {
                self.held.insert(*p);
            }
        }
        Ok(())
    }
}

/// Runs one concurrent balancing step of every instance, then checks that no partition is
/// believed held by two instances and that every belief matches the database.
async fn round(
    instances: Vec<Instance>,
    pool: &DbPool,
    partition_count: u16,
) -> anyhow::Result<Vec<Instance>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, mut inst) in instances.into_iter().enumerate() {
        set.spawn(async move { inst.step(partition_count).await.map(|()| (i, inst)) });
    }
    let mut done = Vec::new();
    while let Some(r) = set.join_next().await {
        done.push(r??);
    }
    done.sort_by_key(|(i, _)| *i);
    let instances: Vec<Instance> = done.into_iter().map(|(_, inst)| inst).collect();

    let owners = owners(pool).await?;
    let mut believed: BTreeMap<u16, &str> = BTreeMap::new();
    for inst in &instances {
        for p in &inst.held {
            if let Some(other) = believed.insert(*p, &inst.run_id) {
                anyhow::bail!("partition {p} is held by both {other} and {}", inst.run_id);
            }
            let owner = owners[usize::from(*p)].as_deref();
            anyhow::ensure!(
                owner == Some(inst.run_id.as_str()),
                "{} believes it holds partition {p}, the database says {owner:?}",
                inst.run_id
            );
        }
    }
    Ok(instances)
}

/// Held counts once every instance holds its fair share, else `None`.
fn converged(instances: &[Instance], partition_count: u16) -> Option<Vec<usize>> {
    let ids: Vec<String> = instances.iter().map(|i| i.run_id.clone()).collect();
    let counts: Vec<usize> = instances.iter().map(|i| i.held.len()).collect();
    let fair = instances
        .iter()
        .all(|i| i.held.len() == usize::from(lease::fair_share(partition_count, &ids, &i.run_id)));
    (fair && counts.iter().sum::<usize>() == usize::from(partition_count)).then_some(counts)
}

async fn converge(
    mut instances: Vec<Instance>,
    pool: &DbPool,
    partition_count: u16,
) -> anyhow::Result<(Vec<Instance>, Vec<usize>)> {
    for _ in 0..20 {
        instances = round(instances, pool, partition_count).await?;
        if let Some(counts) = converged(&instances, partition_count) {
            return Ok((instances, counts));
        }
    }
    let state: Vec<(&str, &BTreeSet<u16>)> =
        instances.iter().map(|i| (i.run_id.as_str(), &i.held)).collect();
    anyhow::bail!("no convergence after 20 rounds: {state:?}")
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_joining_converge_to_fair_shares_without_sharing_a_partition()
-> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    campaign_with_plan(&db, &pool, 4).await?;
    let instances =
        vec![Instance::new(&pool, "node-a#1").await?, Instance::new(&pool, "node-b#1").await?];
    let (mut instances, counts) = converge(instances, &pool, 4).await?;
    assert_eq!(counts, [2, 2]);

    // A third instance joins; its run id sorts first, so it gets the larger share and both
    // holders shed one partition.
    instances.push(Instance::new(&pool, "node-0#1").await?);
    let (mut instances, counts) = converge(instances, &pool, 4).await?;
    assert_eq!(counts, [1, 1, 2]);
    assert_eq!(counts.iter().max().zip(counts.iter().min()).map(|(h, l)| h - l), Some(1));

    // Converged means stable: further rounds move nothing.
    let before: Vec<BTreeSet<u16>> = instances.iter().map(|i| i.held.clone()).collect();
    for _ in 0..3 {
        instances = round(instances, &pool, 4).await?;
    }
    let after: Vec<BTreeSet<u16>> = instances.iter().map(|i| i.held.clone()).collect();
    assert_eq!(before, after);
    drop(instances);
    pool.close();
    db.drop_db().await
}

/// (event, detail) of the campaign's events of one kind, oldest first.
async fn events(db: &TestDb, event: &str) -> anyhow::Result<Vec<Option<String>>> {
    db.query(&format!(
        "SELECT detail FROM campaign_events WHERE campaign_id = {} AND event = '{event}' \
         ORDER BY id",
        C.0
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replan_waits_for_every_lease_to_end_then_swaps_the_bucket_ranges() -> anyhow::Result<()>
{
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    let old = campaign_with_plan(&db, &pool, 4).await?;
    let mut c = conn(&pool).await?;
    assert_eq!(lease::pending_replan(&mut c, C).await?, None);
    assert_eq!(lease::apply_replan(&mut c, C, "test").await?, None, "nothing was requested");
    assert!(!lease::request_replan(&mut c, C, 4, "test").await?, "already 4 partitions");
    db.campaign(43, "VOUCHER", "no plan yet").await?;
    assert!(!lease::request_replan(&mut c, CampaignId(43), 8, "test").await?, "no plan to change");

    assert!(lease::try_acquire(&mut c, C, "node-a#1", &old[1], LONG_LEASE).await?.is_some());
    assert!(lease::request_replan(&mut c, C, 8, "node-a#1").await?);
    assert!(!lease::request_replan(&mut c, C, 6, "node-b#1").await?, "one re-plan at a time");
    assert_eq!(lease::pending_replan(&mut c, C).await?, Some(8));
    assert_eq!(events(&db, "REPLAN_REQUESTED").await?, [Some(r#"{"from":4,"to":8}"#.to_owned())]);

    // While it waits, nothing new is leased, held leases are still renewed, and nothing changes.
    assert_eq!(lease::try_acquire(&mut c, C, "node-b#1", &old[2], LONG_LEASE).await?, None);
    assert_eq!(lease::renew(&mut c, C, "node-a#1", &[1], LONG_LEASE).await?, [1]);
    assert_eq!(lease::apply_replan(&mut c, C, "node-b#1").await?, None, "node-a holds one");
    assert_eq!(lease::leases(&mut c, C).await?.len(), 4);

    assert!(lease::release(&mut c, C, "node-a#1", 1).await?);
    let new = lease::apply_replan(&mut c, C, "node-b#1").await?.context("not applied")?;
    assert_eq!(new, slices(8));
    let views = lease::leases(&mut c, C).await?;
    assert_eq!(views.iter().map(|l| l.slice).collect::<Vec<_>>(), slices(8));
    assert!(views.iter().all(|l| l.owner.is_none() && l.leased_at.is_none()));
    let stored: Vec<(Option<i16>, Option<i16>)> =
        db.query("SELECT partition_count, replan_to FROM campaigns WHERE id = 42").await?;
    assert_eq!(stored, [(Some(8), None)]);
    assert_eq!(events(&db, "REPLANNED").await?, [Some(r#"{"from":4,"to":8}"#.to_owned())]);
    assert_eq!(lease::apply_replan(&mut c, C, "node-b#1").await?, None, "applied once");

    // A view from before the re-plan acquires nothing; the new plan's partitions are free.
    assert_eq!(lease::try_acquire(&mut c, C, "node-a#1", &old[1], LONG_LEASE).await?, None);
    assert_eq!(
        lease::try_acquire(&mut c, C, "node-a#1", &new[1], LONG_LEASE).await?.map(owner),
        Some(None)
    );

    // An expired lease does not hold the barrier, and its owner loses it in the swap.
    assert!(lease::request_replan(&mut c, C, 4, "test").await?);
    assert_eq!(lease::apply_replan(&mut c, C, "test").await?, None);
    expire(&db, 1).await?;
    assert_eq!(lease::apply_replan(&mut c, C, "test").await?, Some(slices(4)));
    assert_eq!(lease::renew(&mut c, C, "node-a#1", &[1], LONG_LEASE).await?, Vec::<u16>::new());
    drop(c);
    pool.close();
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn remaining_rows_counts_pending_failed_and_in_flight_rows() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    db.campaign(42, "VOUCHER", "mixed").await?;
    db.campaign(43, "VOUCHER", "untouched").await?;
    db.campaign(44, "POINT", "points").await?;
    db.load_vouchers(42, &voucher_rows(42, 40)).await?;
    db.load_vouchers(43, &voucher_rows(43, 25)).await?;
    db.load_points(44, &point_rows(7)).await?;
    for (status, modulo) in [("SUCCEEDED", 0), ("DEAD", 1), ("FAILED", 2), ("IN_FLIGHT", 3)] {
        db.exec(&format!(
            "UPDATE voucher_targets SET status = '{status}' WHERE event_id = 42 AND id % 5 = {modulo}"
        ))
        .await?;
    }
    let counts = db.counts("voucher_targets", 42).await?;
    let want: i64 = ["PENDING", "FAILED", "IN_FLIGHT"].iter().filter_map(|s| counts.get(*s)).sum();
    assert_eq!(want, 24, "{counts:?}");

    let mut c = conn(&pool).await?;
    assert_eq!(lease::remaining_rows(&mut c, "voucher_targets", C).await?, 24);
    assert_eq!(lease::remaining_rows(&mut c, "voucher_targets", CampaignId(43)).await?, 25);
    assert_eq!(lease::remaining_rows(&mut c, "point_targets", CampaignId(44)).await?, 7);
    assert_eq!(lease::remaining_rows(&mut c, "point_targets", CampaignId(45)).await?, 0);
    drop(c);
    pool.close();
    db.drop_db().await
}

/// One EXPLAIN row: (table, type, key).
async fn explain(db: &TestDb, sql: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let rows: Vec<mysql_async::Row> = db.conn().await?.query(format!("EXPLAIN {sql}")).await?;
    let text = |r: &mysql_async::Row, col: &str| -> String {
        match r.get_opt::<Option<String>, _>(col) {
            Some(Ok(Some(s))) => s,
            _ => "NULL".to_owned(),
        }
    };
    Ok(rows.iter().map(|r| (text(r, "table"), text(r, "type"), text(r, "key"))).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_and_remaining_row_statements_use_their_indexes() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    // Enough rows that a scan would look different from an index read: 2 campaigns of 3,000
    // rows, 50 campaigns of 4 partitions, 100 instances.
    db.campaign(42, "VOUCHER", "under way").await?;
    db.campaign(43, "VOUCHER", "untouched").await?;
    db.load_vouchers(42, &voucher_rows(42, 3000)).await?;
    db.load_vouchers(43, &voucher_rows(43, 3000)).await?;
    db.exec("UPDATE voucher_targets SET status = 'SUCCEEDED' WHERE event_id = 42 AND id % 3 = 0")
        .await?;
    db.exec("UPDATE voucher_targets SET status = 'FAILED' WHERE event_id = 42 AND id % 7 = 1")
        .await?;
    db.exec("UPDATE voucher_targets SET status = 'IN_FLIGHT' WHERE event_id = 42 AND id % 11 = 2")
        .await?;
    db.exec(
        "INSERT INTO campaign_partitions \
         (campaign_id, partition_no, partition_count, bucket_lo, bucket_hi, owner, \
          lease_expires_at) \
         SELECT c.seq, p.seq, 4, p.seq * 210, (p.seq + 1) * 210, \
                IF(p.seq < 2, CONCAT('node-', c.seq % 10, '#1'), NULL), \
                IF(p.seq < 2, NOW(3) + INTERVAL 60 SECOND, NULL) \
         FROM seq_1_to_50 c, seq_0_to_3 p",
    )
    .await?;
    db.exec(
        "INSERT INTO daemon_instances (run_id, instance_id, campaign_id, started_at, \
         heartbeat_at, expires_at) SELECT CONCAT('node-', seq, '#1'), CONCAT('node-', seq), \
         seq % 10, NOW(3), NOW(3), NOW(3) + INTERVAL 60 SECOND FROM seq_1_to_100",
    )
    .await?;
    // And 1,000 processes that died without deregistering within the last day (a starting
    // daemon forgets older ones).
    db.exec(
        "INSERT INTO daemon_instances (run_id, instance_id, campaign_id, started_at, \
         heartbeat_at, expires_at) SELECT CONCAT('dead-', seq, '#1'), CONCAT('dead-', seq), \
         seq % 10, NOW(3) - INTERVAL 2 DAY, NOW(3) - INTERVAL seq MINUTE, \
         NOW(3) - INTERVAL seq MINUTE FROM seq_1_to_1000",
    )
    .await?;
    db.exec("ANALYZE TABLE voucher_targets, campaign_partitions, daemon_instances").await?;

    let ms =
        |col: &str| format!("CAST(TIMESTAMPDIFF(MICROSECOND, NOW(3), {col}) DIV 1000 AS SIGNED)");
    // (statement as lease.rs runs it, with literals; expected key)
    let cases = [
        (
            "SELECT COUNT(*) AS n FROM voucher_targets \
             WHERE event_id = 42 AND status IN ('PENDING', 'FAILED', 'IN_FLIGHT')"
                .to_owned(),
            "ix_voucher_targets_claim",
        ),
        (
            "SELECT run_id FROM daemon_instances WHERE campaign_id = 3 AND expires_at > NOW(3) \
             ORDER BY run_id"
                .to_owned(),
            "ix_daemon_instances_campaign",
        ),
        (
            "SELECT COALESCE(SUM(GREATEST(rate_limit_per_sec, \
             IF(recent_sends_until > NOW(3), recent_sends, 0))), 0) AS rate \
             FROM daemon_instances WHERE run_id <> 'node-3#1' AND expires_at > NOW(3)"
                .to_owned(),
            "ix_daemon_instances_expires",
        ),
        (
            "DELETE FROM daemon_instances WHERE expires_at < NOW(3) - INTERVAL 86400000000 \
             MICROSECOND"
                .to_owned(),
            "ix_daemon_instances_expires",
        ),
        (
            format!(
                "SELECT partition_no, owner, {} AS expires_in_ms FROM campaign_partitions \
                 WHERE campaign_id = 3 ORDER BY partition_no",
                ms("lease_expires_at")
            ),
            "PRIMARY",
        ),
        (
            format!(
                "SELECT partition_no, owner, {} AS expires_in_ms FROM campaign_partitions \
                 WHERE campaign_id = 3 AND partition_no = 2 FOR UPDATE",
                ms("lease_expires_at")
            ),
            "PRIMARY",
        ),
        (
            "UPDATE campaign_partitions SET owner = 'node-4#1', \
             lease_expires_at = NOW(3) + INTERVAL 1000 MICROSECOND, leased_at = NOW(3) \
             WHERE campaign_id = 3 AND partition_no = 2 \
             AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= NOW(3))"
                .to_owned(),
            "PRIMARY",
        ),
        (
            "UPDATE campaign_partitions SET owner = NULL, lease_expires_at = NULL, \
             leased_at = NULL WHERE campaign_id = 3 AND partition_no = 0 AND owner = 'node-3#1'"
                .to_owned(),
            "PRIMARY",
        ),
        (
            "UPDATE campaign_partitions SET owner = NULL, lease_expires_at = NULL, \
             leased_at = NULL WHERE owner = 'node-3#1'"
                .to_owned(),
            "ix_campaign_partitions_owner",
        ),
        (
            "SELECT CAST(owner IS NOT NULL AND lease_expires_at > NOW(3) AS SIGNED) AS held \
             FROM campaign_partitions WHERE campaign_id = 3 FOR UPDATE"
                .to_owned(),
            "PRIMARY",
        ),
    ];
    let mut report = String::new();
    for (sql, want) in &cases {
        let plan = explain(&db, sql).await?;
        report.push_str(&format!("{sql}\n  {plan:?}\n"));
        assert_eq!(plan.len(), 1, "one table access expected for {sql}: {plan:?}");
        let (_, ty, key) = &plan[0];
        assert!(ty != "ALL" && ty != "index", "{sql} scans ({ty}): {plan:?}");
        assert_eq!(key, want, "{sql}: {plan:?}");
    }
    // renew's statements may use the primary key or the owner index (both seek the campaign's
    // few rows); they must not scan.
    for sql in [
        "SELECT partition_no FROM campaign_partitions \
         WHERE campaign_id = 3 AND owner = 'node-3#1' AND (5 >> partition_no) & 1 = 1 \
         ORDER BY partition_no FOR UPDATE",
        "UPDATE campaign_partitions SET lease_expires_at = NOW(3) + INTERVAL 1000 MICROSECOND \
         WHERE campaign_id = 3 AND owner = 'node-3#1' AND (5 >> partition_no) & 1 = 1",
    ] {
        let plan = explain(&db, sql).await?;
        report.push_str(&format!("{sql}\n  {plan:?}\n"));
        let (_, ty, key) = &plan[0];
        assert!(ty != "ALL" && ty != "index" && key != "NULL", "{sql}: {plan:?}");
    }
    println!("{report}");
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_plans_parallel_count_sees_every_row_once() -> anyhow::Result<()> {
    let _timing = shared().await;
    let db = TestDb::new().await?;
    let pool = pool(&db)?;
    db.campaign(C.0, "VOUCHER", "counted").await?;
    db.campaign(43, "VOUCHER", "neighbour").await?;
    db.load_vouchers(C.0, &voucher_rows(C.0, 3_000)).await?;
    db.load_vouchers(43, &voucher_rows(43, 500)).await?;
    // Every status, and PENDING rows in every bucket slice.
    for (status, every) in [("SUCCEEDED", 3), ("IN_FLIGHT", 7), ("FAILED", 11), ("DEAD", 13)] {
        db.exec(&format!(
            "UPDATE voucher_targets SET status = '{status}' \
             WHERE event_id = {} AND id % {every} = 0",
            C.0
        ))
        .await?;
    }
    let ranges = repo::count_ranges(4);
    assert_eq!(ranges.len(), 6);
    let mut sum = 0;
    for range in &ranges {
        let n =
            repo::count_target_range(&mut *conn(&pool).await?, "voucher_targets", C, range).await?;
        assert!(n > 0, "range {range} counted nothing");
        sum += n;
    }
    assert_eq!(sum, 3_000);

    // The plan stores the count it was given; a stored plan ignores a later count.
    let rule = PartitionRule::default();
    let plan = repo::ensure_plan_counted(
        &mut *conn(&pool).await?,
        "voucher_targets",
        C,
        rule,
        "t",
        Some(sum),
    )
    .await?;
    assert_eq!(plan.len(), 4);
    let planned: Vec<(Option<i64>,)> =
        db.query(&format!("SELECT planned_rows FROM campaigns WHERE id = {}", C.0)).await?;
    assert_eq!(planned, vec![(Some(3_000),)]);
    let again = repo::ensure_plan_counted(
        &mut *conn(&pool).await?,
        "voucher_targets",
        C,
        rule,
        "t",
        Some(5_000_000),
    )
    .await?;
    assert_eq!(again, plan);
    assert_eq!(repo::stored_partition_count(&mut *conn(&pool).await?, C).await?, Some(4));
    db.drop_db().await
}
