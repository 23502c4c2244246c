-- Hot-loading (issue 5): connectors uploaded through the admin API, and the enabled flag of
-- every connector, whatever its source. Shared by every instance on the same database.
CREATE TABLE connector_uploads (
    name       TEXT    PRIMARY KEY,
    manifest   TEXT    NOT NULL,
    component  BLOB    NOT NULL,
    version    TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE connector_states (
    name       TEXT    PRIMARY KEY,
    enabled    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
