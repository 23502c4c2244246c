-- Sync engine (DESIGN.md section 4): per-connector deliveries of outbox events.
ALTER TABLE outbox ADD COLUMN fanned_out INTEGER NOT NULL DEFAULT 0;
CREATE INDEX outbox_unfanned_idx ON outbox (id) WHERE fanned_out = 0;

CREATE TABLE deliveries (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id         INTEGER NOT NULL,
    event_id          TEXT    NOT NULL,
    event_type        TEXT    NOT NULL,
    connector         TEXT    NOT NULL,
    realm             TEXT    NOT NULL,
    external_id       TEXT    NOT NULL,
    status            TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'dead', 'dropped')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER NOT NULL,
    lease_until       INTEGER,
    last_error        TEXT,
    connector_version TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    delivered_at      INTEGER,
    CONSTRAINT deliveries_outbox_connector_key UNIQUE (outbox_id, connector)
);
-- Claiming: due pending rows in order; per-session ordering looks up earlier pending rows.
CREATE INDEX deliveries_due_idx     ON deliveries (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX deliveries_session_idx ON deliveries (connector, realm, external_id, id);
CREATE INDEX deliveries_status_idx  ON deliveries (status, connector, id);
CREATE INDEX deliveries_realm_session_idx ON deliveries (realm, external_id, id);

CREATE TABLE delivery_attempts (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id       INTEGER NOT NULL,
    attempt           INTEGER NOT NULL,
    outcome           TEXT    NOT NULL,
    error             TEXT,
    connector_version TEXT,
    started_at        INTEGER NOT NULL,
    finished_at       INTEGER NOT NULL
);
CREATE INDEX delivery_attempts_delivery_idx ON delivery_attempts (delivery_id, attempt);
