-- Keycloak event intake (issue 7): ids of events already applied, kept for the window in
-- which the extension may still resend them, written in the transaction of their change.
CREATE TABLE idp_events (
    realm    TEXT    NOT NULL,
    event_id TEXT    NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (realm, event_id)
);
CREATE INDEX idp_events_until_idx ON idp_events (until_ms);
