-- SSH: the public keys registered on each pod (only they log into it through a node's SSH
-- gateway), and where each node's gateway is reached (sent with every heartbeat).

ALTER TABLE nodes ADD COLUMN ssh_addr text;

CREATE TABLE pod_ssh_keys (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    pod_id      uuid NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
    -- `ssh-ed25519`, `ecdsa-sha2-nistp256|384|521` or `ssh-rsa`.
    algorithm   text NOT NULL,
    -- `<algorithm> <base64>`, without the comment.
    public_key  text NOT NULL,
    -- OpenSSH's `SHA256:<base64>`: what identifies a key, on a pod and at the gateway.
    fingerprint text NOT NULL,
    comment     text NOT NULL DEFAULT '',
    bits        integer NOT NULL,
    created_by  uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pod_id, fingerprint)
);

-- The gateway's question: which pods does this key open?
CREATE INDEX pod_ssh_keys_fingerprint ON pod_ssh_keys (fingerprint);
