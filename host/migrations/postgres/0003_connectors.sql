-- Hot-loading (issue 5): connectors uploaded through the admin API, and the enabled flag of
-- every connector, whatever its source. Shared by every instance on the same database;
-- changes are announced on the `lockstep_connectors` channel (LISTEN/NOTIFY).
CREATE TABLE connector_uploads (
    name       TEXT    PRIMARY KEY,
    manifest   TEXT    NOT NULL,
    component  BYTEA   NOT NULL,
    version    TEXT    NOT NULL,
    updated_at BIGINT  NOT NULL
);

CREATE TABLE connector_states (
    name       TEXT    PRIMARY KEY,
    enabled    INTEGER NOT NULL,
    updated_at BIGINT  NOT NULL
);
