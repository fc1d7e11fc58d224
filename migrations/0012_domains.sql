-- Custom domains (issue 7): a pod's extra host names, proven by a DNS TXT record and served
-- with certificates from an ACME CA. One row per normalised host name across all teams (a
-- name is claimed by one team only). Certificates are kept per domain (the newest that still
-- works is served); their private keys, like the platform's ACME account credentials, are
-- stored encrypted (AES-256-GCM, `version || nonce || ciphertext+tag`) with the control
-- plane's `[domains] key_encryption_key`, bound to their row by the additional data.

CREATE TABLE domains (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    pod_id          uuid NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
    team_id         uuid NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    -- Normalised: lowercase ASCII (punycode), no trailing dot. Unique across teams.
    hostname        text NOT NULL UNIQUE,
    -- The value the TXT record `_instapod-challenge.<hostname>` must hold.
    txt_value       text NOT NULL,
    status          text NOT NULL DEFAULT 'pending_dns'
        CHECK (status IN ('pending_dns', 'verified', 'issuing_certificate', 'active', 'failed')),
    status_message  text,
    -- The last verification's record checks (`[RecordCheck]`), as the agent reported them.
    checks          jsonb,
    verified_at     timestamptz,
    last_checked_at timestamptz,
    -- When the next periodic re-verification is due (verified, issuing or active domains).
    reverify_at     timestamptz,
    -- Certificate orders that failed in a row (the backoff's exponent); 0 after a success.
    issue_failures  integer NOT NULL DEFAULT 0,
    -- No certificate order is enqueued before this time: an order in flight, or the backoff
    -- after a failure. NULL: none pending.
    next_issue_at   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX domains_pod ON domains (pod_id);
CREATE INDEX domains_team ON domains (team_id);
-- The workers' scans.
CREATE INDEX domains_reverify ON domains (reverify_at) WHERE reverify_at IS NOT NULL;
CREATE INDEX domains_next_issue ON domains (next_issue_at) WHERE next_issue_at IS NOT NULL;

CREATE TABLE domain_certificates (
    id            bigserial PRIMARY KEY,
    domain_id     uuid NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    -- The full chain, leaf first, PEM.
    chain_pem     text NOT NULL,
    -- The PKCS#8 PEM private key, encrypted (additional data `domain-key:<domain_id>`).
    key_encrypted bytea NOT NULL,
    not_before    timestamptz NOT NULL,
    not_after     timestamptz NOT NULL,
    issuer        text,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX domain_certificates_domain ON domain_certificates (domain_id, not_after DESC);

-- The platform's ACME account, one per directory URL (the first node to create it stores it;
-- the others use it). Credentials: instant-acme's `AccountCredentials` JSON, encrypted
-- (additional data `acme-account:<directory_url>`).
CREATE TABLE acme_accounts (
    directory_url         text PRIMARY KEY,
    credentials_encrypted bytea NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now()
);
