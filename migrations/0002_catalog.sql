-- The catalog: regions, runtimes and presets (plans are in 0001, teams reference them),
-- with a starter set. Operators edit these rows; the API only reads them.

CREATE TABLE regions (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    available  boolean NOT NULL DEFAULT true,
    sort_order integer NOT NULL DEFAULT 0
);

CREATE TABLE runtimes (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    version         text NOT NULL,
    image           text NOT NULL,
    default_command text[] NOT NULL,
    http_port       integer NOT NULL CHECK (http_port BETWEEN 1 AND 65535),
    sort_order      integer NOT NULL DEFAULT 0
);

CREATE TABLE presets (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL,
    runtime_id  text NOT NULL REFERENCES runtimes (id),
    env         jsonb NOT NULL DEFAULT '{}'::jsonb,
    ports       integer[] NOT NULL DEFAULT '{}',
    plan_id     text NOT NULL REFERENCES plans (id),
    services    text[] NOT NULL DEFAULT '{}',
    sort_order  integer NOT NULL DEFAULT 0
);

INSERT INTO plans (id, name, cpu_millicores, memory_mib, disk_gib, max_pods, price_cents_monthly, sort_order) VALUES
    ('free',    'Free',    250,  256,  1,  1,     0, 0),
    ('starter', 'Starter', 500,  512,  5,  3,   500, 1),
    ('pro',     'Pro',     1000, 2048, 20, 10, 2000, 2),
    ('scale',   'Scale',   4000, 8192, 80, 50, 8000, 3);

INSERT INTO regions (id, name, available, sort_order) VALUES
    ('local', 'Local (this machine)', true, 0),
    ('eu-central', 'Europe Central', true, 1),
    ('us-east', 'US East', true, 2);

INSERT INTO runtimes (id, name, version, image, default_command, http_port, sort_order) VALUES
    ('static', 'Static site', '1', 'instapod/static:1', ARRAY['httpd', '-f', '-p', '8080', '-h', '/data/public'], 8080, 0),
    ('node',   'Node.js',     '22', 'docker.io/library/node:22-bookworm-slim', ARRAY['node', '/data/server.js'], 3000, 1),
    ('python', 'Python',      '3.12', 'docker.io/library/python:3.12-slim', ARRAY['python3', '-m', 'http.server', '8000', '--directory', '/data/public'], 8000, 2),
    ('go',     'Go',          '1.23', 'docker.io/library/golang:1.23-bookworm', ARRAY['/data/app'], 8080, 3);

INSERT INTO presets (id, name, description, runtime_id, env, ports, plan_id, services, sort_order) VALUES
    ('static-site', 'Static website', 'Serves the files under /data/public over HTTP.', 'static', '{}', ARRAY[8080], 'free', '{}', 0),
    ('express-api', 'Express API', 'A Node.js HTTP API listening on $PORT.', 'node', '{"NODE_ENV": "production", "PORT": "3000"}', ARRAY[3000], 'starter', '{}', 1),
    ('django-postgres', 'Django with PostgreSQL', 'A Python web app with a PostgreSQL service.', 'python', '{"PYTHONUNBUFFERED": "1", "PORT": "8000"}', ARRAY[8000], 'pro', ARRAY['postgresql'], 2),
    ('go-service', 'Go service', 'A compiled Go binary at /data/app.', 'go', '{"PORT": "8080"}', ARRAY[8080], 'starter', '{}', 3);
