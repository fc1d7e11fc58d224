-- Pods, complete: what the user asked for (image, command, env, resources from a plan, region,
-- HTTP port, restart policy), where it runs (node_id, ip), the state machine's current state and
-- the desired one, and the generation every job carries. Plus the pod's event history.

ALTER TABLE pods
    ADD COLUMN generation     bigint NOT NULL DEFAULT 1,
    ADD COLUMN desired_state  text NOT NULL DEFAULT 'running'
        CHECK (desired_state IN ('running', 'stopped', 'deleted')),
    ADD COLUMN reason         text,
    ADD COLUMN image          text NOT NULL DEFAULT '',
    ADD COLUMN runtime_id     text REFERENCES runtimes (id),
    ADD COLUMN preset_id      text REFERENCES presets (id),
    ADD COLUMN plan_id        text NOT NULL DEFAULT 'free' REFERENCES plans (id),
    ADD COLUMN region         text NOT NULL DEFAULT 'local' REFERENCES regions (id),
    ADD COLUMN cpu_millis     integer NOT NULL DEFAULT 250 CHECK (cpu_millis > 0),
    ADD COLUMN memory_bytes   bigint NOT NULL DEFAULT 268435456 CHECK (memory_bytes > 0),
    ADD COLUMN disk_bytes     bigint NOT NULL DEFAULT 1073741824 CHECK (disk_bytes > 0),
    ADD COLUMN env            jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN command        text[],
    ADD COLUMN http_port      integer CHECK (http_port BETWEEN 1 AND 65535),
    ADD COLUMN restart_policy text NOT NULL DEFAULT 'always'
        CHECK (restart_policy IN ('always', 'on-failure', 'never')),
    ADD COLUMN hostnames      text[] NOT NULL DEFAULT '{}',
    ADD COLUMN node_id        uuid REFERENCES nodes (id) ON DELETE SET NULL,
    ADD COLUMN ip             text,
    ADD COLUMN created_by     uuid REFERENCES users (id) ON DELETE SET NULL,
    ADD COLUMN updated_at     timestamptz NOT NULL DEFAULT now(),
    -- An API restart waiting to be carried out (cleared when the node job is sent).
    ADD COLUMN restart_requested boolean NOT NULL DEFAULT false;

ALTER TABLE pods ADD CONSTRAINT pods_state_check CHECK (state IN (
    'pending', 'scheduled', 'starting', 'running', 'stopping', 'stopped', 'failed',
    'deleting', 'deleted', 'unknown'));

-- Capacity committed to a node: the pods placed on it.
CREATE INDEX pods_node ON pods (node_id) WHERE node_id IS NOT NULL;
-- The reconciler's scan: pods not where they should be. A failed pod waits for its user.
CREATE INDEX pods_unsettled ON pods (updated_at)
    WHERE NOT (state = 'failed'
            OR (desired_state = 'running' AND state = 'running')
            OR (desired_state = 'stopped' AND state = 'stopped'));

CREATE TABLE pod_events (
    id         bigserial PRIMARY KEY,
    pod_id     uuid NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
    -- `created`, `state`, `scheduled`, `unschedulable`, `action`, `failure`.
    kind       text NOT NULL,
    state      text,
    message    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX pod_events_pod ON pod_events (pod_id, id DESC);
