-- Listings of a session's deliveries find them through the outbox's session index and the
-- (outbox_id, connector) key (a delivery's realm and session are its event's), so this
-- index only cost every new delivery an entry.
DROP INDEX deliveries_realm_session_idx;
