-- Deliveries are claimed per connector (each connector has its own lane): the due pending
-- rows of one connector, most overdue first. A lane's claim then reads only its own rows,
-- however large another connector's backlog of retries grows.
DROP INDEX deliveries_due_idx;
CREATE INDEX deliveries_lane_idx ON deliveries (connector, next_attempt_at, id) WHERE status = 'pending';
