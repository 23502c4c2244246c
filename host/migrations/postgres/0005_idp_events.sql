-- Keycloak event intake (issue 7): ids of events already applied, kept for the window in
-- which the extension may still resend them, written in the transaction of their change.
CREATE TABLE idp_events (
    realm    TEXT    NOT NULL,
    event_id TEXT    NOT NULL,
    until_ms BIGINT  NOT NULL,
    PRIMARY KEY (realm, event_id)
);
CREATE INDEX idp_events_until_idx ON idp_events (until_ms);

-- Impersonations by an administrator of another realm (Keycloak's master realm): when the
-- administrator's session `actor_sid` in `actor_realm` ends, the mirror of it in `realm`
-- ends too, and with it every session delegated by it. Recorded by the impersonated realm's
-- own (authenticated) IMPERSONATE event.
CREATE TABLE idp_delegations (
    actor_realm TEXT NOT NULL,
    actor_sid   TEXT NOT NULL,
    realm       TEXT NOT NULL,
    PRIMARY KEY (actor_realm, actor_sid, realm)
);
