-- What an instance has sent to Money within its rate limiter's last window (1 s + rate_slack),
-- and until when (database clock) the newest of those sends still counts. Every instance caps
-- its own share of `money.rate_limit_per_sec` at the limit less what the other live instances
-- may still have in Money's window: the larger of their current share (`rate_limit_per_sec`,
-- 0 while they serve nothing) and these recent sends. Partition leases keep the shares of one
-- campaign apart; this covers what leases cannot see: an instance that moved to another
-- campaign (or noticed a pause sooner) while another still sent, or had just sent, at a larger
-- share in the campaign before (see core/src/engine.rs, apply_share).
ALTER TABLE daemon_instances
    ADD COLUMN recent_sends       DOUBLE      NOT NULL DEFAULT 0,
    ADD COLUMN recent_sends_until DATETIME(3)     NULL;
