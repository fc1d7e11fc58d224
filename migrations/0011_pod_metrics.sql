-- Pod metrics history. Node agents push one sample per running pod every few seconds; the
-- control plane keeps the samples themselves for a short while (`pod_metrics_raw`) and folds
-- each one, as it arrives, into per-minute and per-hour buckets (`pod_metrics_rollup`), which
-- are kept for a day and for 30 days. A retention worker deletes what is older. Averages are
-- sums over sample counts, so buckets fold into coarser ones exactly.

CREATE TABLE pod_metrics_raw (
    pod_id             uuid NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
    at                 timestamptz NOT NULL,
    cpu_seconds_total  double precision NOT NULL,
    cpu_cores          real NOT NULL,
    cpu_limit_cores    real NOT NULL,
    memory_bytes       bigint NOT NULL,
    memory_limit_bytes bigint NOT NULL,
    rx_bytes           bigint NOT NULL,
    tx_bytes           bigint NOT NULL,
    rx_bytes_per_sec   real NOT NULL,
    tx_bytes_per_sec   real NOT NULL,
    disk_used_bytes    bigint NOT NULL,
    disk_quota_bytes   bigint NOT NULL,
    pids               bigint NOT NULL,
    PRIMARY KEY (pod_id, at)
);

-- Retention deletes by time across all pods.
CREATE INDEX pod_metrics_raw_at ON pod_metrics_raw (at);

CREATE TABLE pod_metrics_rollup (
    pod_id               uuid NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
    -- The bucket's width in seconds: 60 or 3600.
    resolution_secs      integer NOT NULL CHECK (resolution_secs IN (60, 3600)),
    bucket               timestamptz NOT NULL,
    samples              integer NOT NULL,
    cpu_cores_sum        double precision NOT NULL,
    cpu_cores_max        real NOT NULL,
    memory_bytes_sum     double precision NOT NULL,
    memory_bytes_max     bigint NOT NULL,
    rx_bytes_per_sec_sum double precision NOT NULL,
    tx_bytes_per_sec_sum double precision NOT NULL,
    disk_used_bytes_max  bigint NOT NULL,
    pids_max             bigint NOT NULL,
    -- Limits are the largest seen in the bucket (they change only with a resize).
    cpu_limit_cores      real NOT NULL,
    memory_limit_bytes   bigint NOT NULL,
    disk_quota_bytes     bigint NOT NULL,
    PRIMARY KEY (pod_id, resolution_secs, bucket)
);

CREATE INDEX pod_metrics_rollup_bucket ON pod_metrics_rollup (resolution_secs, bucket);
