-- Listings and counts by status read an index of decided rows only; pending rows are found
-- through the lane and pending-session indexes. While pending rows were in this index too,
-- a planner whose statistics were taken before a backlog built up (no pending rows seen)
-- could take it for a claim's per-session check: it then filtered every pending row of the
-- connector for each candidate, 20 s for a claim of 16 in a backlog of 17,000. With pending
-- rows only in the partial indexes, the check's one exact path is the pending-session index.
DROP INDEX deliveries_status_idx;
CREATE INDEX deliveries_decided_idx ON deliveries (status, connector, id) WHERE status <> 'pending';
