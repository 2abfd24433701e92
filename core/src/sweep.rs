//! The periodic steps the daemon's scheduler runs: campaign discovery and the retry sweep.
//!
//! Each exposes one `tick()` so tests can drive it directly; the daemon puts them on
//! tokio-cron-scheduler with an overlap guard.

use tokio::sync::watch;
use tracing::{debug, info};

use crate::db::{DbError, DbPool, conn};
use crate::kind::KindRegistry;
use crate::repo::{self, CampaignRow};

/// Finds RUNNING campaigns, gives newcomers their queue position, and publishes the queue
/// (earliest first) to the executor.
pub struct Discovery {
    pool: DbPool,
    queue: watch::Sender<Vec<CampaignRow>>,
}

impl Discovery {
    pub fn new(pool: DbPool) -> (Discovery, watch::Receiver<Vec<CampaignRow>>) {
        let (queue, rx) = watch::channel(Vec::new());
        (Discovery { pool, queue }, rx)
    }

    /// One discovery pass; returns the number of RUNNING campaigns.
    pub async fn tick(&self) -> Result<usize, DbError> {
        let mut c = conn(&self.pool).await?;
        let running = repo::running_queue(&mut c).await?;
        let n = running.len();
        let before: Vec<i64> = self.queue.borrow().iter().map(|c| c.id).collect();
        let after: Vec<i64> = running.iter().map(|c| c.id).collect();
        if before != after {
            info!(queue = ?after, "RUNNING campaigns, first come first served");
        }
        self.queue.send_replace(running);
        Ok(n)
    }
}

/// Puts FAILED rows whose retry time has come back to PENDING, for every RUNNING campaign.
pub struct RetrySweeper {
    pool: DbPool,
    kinds: KindRegistry,
}

impl RetrySweeper {
    pub fn new(pool: DbPool, kinds: KindRegistry) -> RetrySweeper {
        RetrySweeper { pool, kinds }
    }

    /// One sweep; returns the number of rows made PENDING again.
    pub async fn tick(&self) -> Result<usize, DbError> {
        let mut c = conn(&self.pool).await?;
        let running = repo::running_campaigns(&mut c).await?;
        let mut total = 0;
        for campaign in running {
            let Some(kind) = self.kinds.get(&campaign.kind) else {
                continue;
            };
            let n = repo::requeue_due_failures(&mut c, kind.table(), campaign.id()).await?;
            if n > 0 {
                debug!(campaign.id = campaign.id, rows = n, "failed rows due for retry");
            }
            total += n;
        }
        Ok(total)
    }
}
