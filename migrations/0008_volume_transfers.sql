-- Volume transfers between nodes (clones and moves). A node advertises where other nodes reach
-- its peer endpoint; a pod whose volume must first be copied from another pod's volume has a
-- `volume_transfers` row until it runs on its node (the scheduler re-sends both nodes' jobs
-- while the row exists, and for a move removes the old copy once the new one runs).

ALTER TABLE nodes ADD COLUMN peer_addr text;

CREATE TABLE volume_transfers (
    -- The pod that receives the volume.
    pod_id         uuid PRIMARY KEY REFERENCES pods (id) ON DELETE CASCADE,
    -- `clone`: copy another pod's volume; `move`: the pod's own volume from its former node
    -- (stopped there, deleted there once the pod runs on its new node).
    kind           text NOT NULL CHECK (kind IN ('clone', 'move')),
    -- Whose volume is copied (the pod itself for a move).
    source_pod_id  uuid NOT NULL,
    -- Where that volume lives. A source node that is removed ends the transfer.
    source_node_id uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX volume_transfers_source_node ON volume_transfers (source_node_id);
