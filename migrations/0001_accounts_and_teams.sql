-- Accounts, teams, sessions, one-time codes and the mail outbox.
-- Tokens of every kind are stored only as SHA-256 hashes.

CREATE TABLE plans (
    id                  text PRIMARY KEY,
    name                text NOT NULL,
    cpu_millicores      integer NOT NULL CHECK (cpu_millicores > 0),
    memory_mib          integer NOT NULL CHECK (memory_mib > 0),
    disk_gib            integer NOT NULL CHECK (disk_gib > 0),
    max_pods            integer NOT NULL CHECK (max_pods > 0),
    price_cents_monthly integer NOT NULL CHECK (price_cents_monthly >= 0),
    sort_order          integer NOT NULL DEFAULT 0
);

CREATE TABLE teams (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL,
    slug       text NOT NULL UNIQUE,
    personal   boolean NOT NULL DEFAULT false,
    plan_id    text NOT NULL DEFAULT 'free' REFERENCES plans (id),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email             text NOT NULL UNIQUE,
    name              text NOT NULL,
    password_hash     text NOT NULL,
    email_verified_at timestamptz,
    personal_team_id  uuid NOT NULL REFERENCES teams (id) DEFERRABLE INITIALLY DEFERRED,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE team_members (
    team_id   uuid NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX team_members_user_idx ON team_members (user_id);

-- A session is one credential: the same opaque token works as a bearer token and as the
-- instapod_session cookie. Logout deletes the row; a password reset deletes all of a user's.
CREATE TABLE sessions (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash     bytea NOT NULL UNIQUE,
    active_team_id uuid REFERENCES teams (id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    client_ip      text
);
CREATE INDEX sessions_user_idx ON sessions (user_id);

-- Email verification and password reset codes: single use, expiring.
CREATE TABLE one_time_codes (
    code_hash  bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose    text NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX one_time_codes_user_idx ON one_time_codes (user_id, purpose);

-- Mail is written here in the same transaction as what caused it and delivered by a worker.
-- body_text is cleared once delivered, so plain codes do not linger in the database.
CREATE TABLE mail_outbox (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind            text NOT NULL,
    to_address      text NOT NULL,
    subject         text NOT NULL,
    body_text       text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    sent_at         timestamptz
);
CREATE INDEX mail_outbox_pending_idx ON mail_outbox (next_attempt_at) WHERE sent_at IS NULL;
