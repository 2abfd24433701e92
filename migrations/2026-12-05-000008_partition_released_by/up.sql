-- Who last held a partition given back (`owner` at the time of released_at; a lease that ran out
-- keeps its owner). An instance taking a partition that it held last itself counts it in its
-- share at once: its own send log already holds the requests it sent there. Waiting a window
-- regardless left a single instance at 1 request a second for a whole second after each
-- re-plan (the new plan's rows carry the old plan's last hand-back; see
-- core/src/lease.rs, try_acquire, and core/src/repo.rs, store_partitions).
ALTER TABLE campaign_partitions ADD COLUMN released_by VARCHAR(128) NULL;
