ALTER TABLE campaign_partitions DROP COLUMN released_by;
