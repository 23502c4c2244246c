-- A claim leases a delivery only when its session has no earlier pending delivery to the
-- same connector. That check now reads an index of pending rows alone: a decided delivery
-- leaves it when it is decided, so the lookup stays one probe however long the history
-- grows. With the former index of every row, a planner working from statistics taken while
-- the table was small (a backlog that built up quickly) chose the lane index instead and
-- compared every pending row of the connector for each candidate: 26 ms per claim in a
-- backlog of 50,000.
DROP INDEX deliveries_session_idx;
CREATE INDEX deliveries_pending_session_idx ON deliveries (connector, realm, external_id, id)
    WHERE status = 'pending';
-- A claim writes only the lease (no indexed column): with room left on the page, that
-- update is HOT and adds no index entries at all.
ALTER TABLE deliveries SET (fillfactor = 70);
