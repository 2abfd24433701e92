-- When the last holder of a partition stopped sending in it (database clock): set when a lease is
-- given back, cleared when one is taken. A lease that ran out stopped at its lease_expires_at.
-- An instance that takes a partition counts it in its share of the global rate limit only one
-- window (1 s + rate_slack) after that moment: the previous holder's last requests still count
-- at Money until then, and a share raised at once put 2,006 requests into one second at a
-- limit of 2,000 when one of three instances stopped (see core/src/engine.rs, apply_share).
ALTER TABLE campaign_partitions ADD COLUMN released_at DATETIME(3) NULL;
