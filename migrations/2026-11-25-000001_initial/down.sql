DROP TABLE campaign_partitions;
DROP TABLE campaign_events;
DROP TABLE dead_letters;
DROP TABLE point_targets;
DROP TABLE voucher_targets;
DROP TABLE campaigns;
