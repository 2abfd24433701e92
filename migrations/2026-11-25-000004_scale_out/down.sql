ALTER TABLE campaign_partitions
    DROP KEY ix_campaign_partitions_owner,
    DROP COLUMN leased_at;
ALTER TABLE campaigns DROP COLUMN replan_to;
DROP TABLE daemon_instances;
