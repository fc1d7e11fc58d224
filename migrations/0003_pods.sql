-- The pods a team owns. Only the columns the foundation needs exist yet (team ownership and
-- names, so a team that still owns pods cannot be deleted); the pods issue extends this table.

CREATE TABLE pods (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    team_id    uuid NOT NULL REFERENCES teams (id) ON DELETE RESTRICT,
    name       text NOT NULL,
    state      text NOT NULL DEFAULT 'pending',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (team_id, name)
);
