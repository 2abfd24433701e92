-- Rows of processes that died without deregistering (kill -9, a lost host) stay behind until a
-- starting daemon forgets those expired a day ago or more (core/src/lease.rs,
-- forget_dead_instances). The expiry index serves both that purge and the read of the live
-- instances' rates (`expires_at > NOW(3)`, lease::others_rate), which every lease step makes.
ALTER TABLE daemon_instances ADD KEY ix_daemon_instances_expires (expires_at);
