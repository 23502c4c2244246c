-- Session records (DESIGN.md section 2) and the sync outbox (section 4).
-- Timestamps are epoch milliseconds (UTC) on both backends.
CREATE TABLE sessions (
    id                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    realm                 TEXT    NOT NULL,
    external_id           TEXT    NOT NULL,
    kind                  TEXT    NOT NULL CHECK (kind IN ('PARENT', 'CHILD', 'FIXED')),
    parent_id             TEXT,
    idp_session_id        TEXT,
    idp_client_session_id TEXT,
    user_id               TEXT,
    system                TEXT,
    delegated_by          TEXT,
    status                TEXT    NOT NULL CHECK (status IN ('ACTIVE', 'DESTROYED', 'ORPHANED')),
    end_reason            TEXT,
    attributes            TEXT    NOT NULL,
    expires_at            BIGINT,
    created_at            BIGINT  NOT NULL,
    updated_at            BIGINT  NOT NULL,
    CONSTRAINT sessions_realm_external_id_key UNIQUE (realm, external_id),
    CHECK ((kind = 'CHILD') = (parent_id IS NOT NULL))
);

-- Cascades walk these two edges.
CREATE INDEX sessions_parent_idx    ON sessions (realm, parent_id)    WHERE parent_id IS NOT NULL;
CREATE INDEX sessions_delegated_idx ON sessions (realm, delegated_by) WHERE delegated_by IS NOT NULL;
-- Query filters, each ending in id for cursor order.
CREATE INDEX sessions_realm_idx       ON sessions (realm, id);
CREATE INDEX sessions_idp_session_idx ON sessions (realm, idp_session_id, id)        WHERE idp_session_id IS NOT NULL;
CREATE INDEX sessions_idp_client_idx  ON sessions (realm, idp_client_session_id, id) WHERE idp_client_session_id IS NOT NULL;
CREATE INDEX sessions_user_idx        ON sessions (realm, user_id, id)               WHERE user_id IS NOT NULL;
CREATE INDEX sessions_system_idx      ON sessions (realm, system, id)                WHERE system IS NOT NULL;
CREATE INDEX sessions_status_idx      ON sessions (realm, status, id);
-- The expiry sweeper scans only live sessions with a deadline.
CREATE INDEX sessions_expires_idx     ON sessions (expires_at) WHERE status = 'ACTIVE' AND expires_at IS NOT NULL;

CREATE TABLE outbox (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      TEXT    NOT NULL,
    realm         TEXT    NOT NULL,
    event_type    TEXT    NOT NULL CHECK (event_type IN ('login', 'logout', 'revoke', 'refresh')),
    external_id   TEXT    NOT NULL,
    origin_system TEXT,
    payload       TEXT    NOT NULL,
    created_at    BIGINT  NOT NULL
);
CREATE INDEX outbox_session_idx ON outbox (realm, external_id, id);
