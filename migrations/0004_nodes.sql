-- Fleet membership: the nodes that joined, what their last heartbeat said, and the pod state
-- changes they report. A node's token is stored only as its SHA-256 hash; the plain token is
-- handed to the agent once, in the join answer.

CREATE TABLE nodes (
    id                          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The node's DNS-label name (its hostname unless configured); a node that joins again
    -- under the same name is the same machine re-installed and keeps its id.
    name                        text NOT NULL UNIQUE,
    region                      text NOT NULL,
    labels                      jsonb NOT NULL DEFAULT '{}'::jsonb,
    token_hash                  bytea NOT NULL UNIQUE,
    -- `unhealthy` until the first heartbeat, and again once heartbeats stop for longer than
    -- `node_heartbeat_timeout_secs` (the control plane's node-health worker).
    status                      text NOT NULL DEFAULT 'unhealthy' CHECK (status IN ('healthy', 'unhealthy')),
    agent_version               text NOT NULL,
    -- Capacity from the last heartbeat (null until the first one). CPU in millicores.
    total_cpu_millis            bigint CHECK (total_cpu_millis >= 0),
    total_memory_bytes          bigint CHECK (total_memory_bytes >= 0),
    total_disk_bytes            bigint CHECK (total_disk_bytes >= 0),
    allocatable_cpu_millis      bigint CHECK (allocatable_cpu_millis >= 0),
    allocatable_memory_bytes    bigint CHECK (allocatable_memory_bytes >= 0),
    allocatable_disk_bytes      bigint CHECK (allocatable_disk_bytes >= 0),
    -- The last heartbeat's pod list: [{"pod_id", "generation", "state", "ip"?}].
    pods                        jsonb NOT NULL DEFAULT '[]'::jsonb,
    joined_at                   timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at           timestamptz,
    status_changed_at           timestamptz NOT NULL DEFAULT now()
);

-- The health worker's query: healthy nodes whose heartbeat is overdue.
CREATE INDEX nodes_healthy_heartbeat ON nodes (last_heartbeat_at) WHERE status = 'healthy';

-- Append-only: every pod state change a node reported. `pod_id` has no foreign key yet (the
-- pods API arrives in the next issue, and a node may report a pod the database has forgotten).
CREATE TABLE pod_reports (
    id          bigserial PRIMARY KEY,
    node_id     uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    pod_id      uuid NOT NULL,
    generation  bigint NOT NULL,
    state       text NOT NULL,
    reason      text,
    exit_code   integer,
    ip          text,
    -- When the agent observed the change (the report's `at`).
    observed_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- A pod's latest reports first.
CREATE INDEX pod_reports_pod ON pod_reports (pod_id, id DESC);

-- Deleting a node deletes its reports (ON DELETE CASCADE) without a full scan.
CREATE INDEX pod_reports_node ON pod_reports (node_id);
