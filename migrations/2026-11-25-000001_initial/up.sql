-- payoutd initial schema. Portable between MySQL 8.0 and MariaDB 10.6+.
-- All times are UTC (the daemon sets time_zone = '+00:00' on every connection).

-- One campaign per `event_id`. The loader writes id, kind and name; everything else has a default.
CREATE TABLE campaigns (
    id              BIGINT       NOT NULL PRIMARY KEY,
    kind            VARCHAR(16)  NOT NULL,
    name            VARCHAR(255) NOT NULL,
    status          VARCHAR(16)  NOT NULL DEFAULT 'READY',
    -- Why the campaign is PAUSED/STOPPED, and who paused it: OPERATOR, BREAKER or DAEMON.
    status_reason   VARCHAR(512)     NULL,
    paused_by       VARCHAR(16)      NULL,
    -- First time the daemon saw the campaign RUNNING: the first-come-first-served queue position.
    queued_at       DATETIME(3)      NULL,
    started_at      DATETIME(3)      NULL,
    completed_at    DATETIME(3)      NULL,
    -- The stored partition plan: decided once, kept across restarts.
    partition_count SMALLINT         NULL,
    planned_rows    BIGINT           NULL,
    created_at      DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at      DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    KEY ix_campaigns_queue (status, queued_at, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Target rows. `bucket` (0..839) is derived from the row's content when it is inserted, so the
-- loader never writes it; a partition owns a contiguous bucket range, and 840 divides evenly into
-- 1..8 partitions. The claim index starts (event_id, status, bucket) so that a partition's claim
-- reads only its own PENDING rows.
CREATE TABLE voucher_targets (
    id              BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id        BIGINT        NOT NULL,
    customer_uid    VARCHAR(255)  NOT NULL,
    voucher_number  VARCHAR(255)  NOT NULL,
    reason          VARCHAR(1024) NOT NULL,
    status          VARCHAR(16)   CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT 'PENDING',
    bucket          SMALLINT      AS (CRC32(CONCAT(customer_uid, '/', voucher_number)) % 840) STORED,
    attempts        INT           NOT NULL DEFAULT 0,
    transaction_id  VARCHAR(128)      NULL,
    last_error      VARCHAR(512)      NULL,
    next_attempt_at DATETIME(3)       NULL,
    claimed_by      VARCHAR(128)      NULL,
    updated_at      DATETIME(3)       NULL,
    KEY ix_voucher_targets_claim (event_id, status, bucket, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE point_targets (
    id              BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id        BIGINT        NOT NULL,
    customer_uid    VARCHAR(255)  NOT NULL,
    amount          BIGINT        NOT NULL,
    expiry_at       VARCHAR(64)   NOT NULL,
    reason          VARCHAR(1024) NOT NULL,
    status          VARCHAR(16)   CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT 'PENDING',
    bucket          SMALLINT      AS (CRC32(CONCAT(customer_uid, '/', amount, '/', expiry_at, '/', reason)) % 840) STORED,
    attempts        INT           NOT NULL DEFAULT 0,
    transaction_id  VARCHAR(128)      NULL,
    last_error      VARCHAR(512)      NULL,
    next_attempt_at DATETIME(3)       NULL,
    claimed_by      VARCHAR(128)      NULL,
    updated_at      DATETIME(3)       NULL,
    KEY ix_point_targets_claim (event_id, status, bucket, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per target row that needs a person. Written in the same transaction that makes the
-- target row DEAD; at most one unresolved row per target row.
CREATE TABLE dead_letters (
    id            BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    campaign_id   BIGINT        NOT NULL,
    target_kind   VARCHAR(16)   NOT NULL,
    target_id     BIGINT        NOT NULL,
    error_code    VARCHAR(64)   NOT NULL,
    error_message VARCHAR(1024) NOT NULL,
    attempts      INT           NOT NULL,
    created_at    DATETIME(3)   NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    resolved_at   DATETIME(3)       NULL,
    resolution    VARCHAR(32)       NULL,
    resolved_by   VARCHAR(128)      NULL,
    KEY ix_dead_letters_campaign (campaign_id, resolved_at, id),
    KEY ix_dead_letters_target (target_kind, target_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The audit trail and event log: state changes (who, from, to), plans, completions, faults.
CREATE TABLE campaign_events (
    id          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    campaign_id BIGINT           NULL,
    event       VARCHAR(64)  NOT NULL,
    from_status VARCHAR(16)      NULL,
    to_status   VARCHAR(16)      NULL,
    actor       VARCHAR(128) NOT NULL,
    detail      TEXT             NULL,
    created_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    KEY ix_campaign_events_campaign (campaign_id, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The stored partition plan of a campaign: partition n of N owns buckets [bucket_lo, bucket_hi).
-- owner/lease_expires_at are for several daemon instances sharing one campaign.
CREATE TABLE campaign_partitions (
    campaign_id      BIGINT       NOT NULL,
    partition_no     SMALLINT     NOT NULL,
    partition_count  SMALLINT     NOT NULL,
    bucket_lo        SMALLINT     NOT NULL,
    bucket_hi        SMALLINT     NOT NULL,
    owner            VARCHAR(128)     NULL,
    lease_expires_at DATETIME(3)      NULL,
    PRIMARY KEY (campaign_id, partition_no)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
