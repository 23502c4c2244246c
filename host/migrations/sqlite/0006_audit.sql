-- Audit log (issue 8): one row per session operation and admin action, written in the
-- transaction of the change it records (refusals: a separate write after the rollback).
-- `realm` is NULL for actions that span realms (connectors, deliveries). `result` is 'ok'
-- (then `changed` counts the sessions, deliveries or connectors changed) or the refusal's
-- problem code. `detail` is a small JSON object or NULL.
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    realm   TEXT,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT,
    result  TEXT    NOT NULL,
    changed INTEGER,
    detail  TEXT
);
-- The query filters (newest first by id) and the retention sweep.
CREATE INDEX audit_realm_idx ON audit (realm, id);
CREATE INDEX audit_actor_idx ON audit (actor, id);
CREATE INDEX audit_at_idx    ON audit (at_ms);
