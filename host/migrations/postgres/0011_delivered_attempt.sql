-- The attempt that delivers a delivery is kept on the delivery row (its start here; its end,
-- outcome and version are `delivered_at`, 'delivered' and `connector_version`) instead of a
-- row of `delivery_attempts`, which now holds the attempts that failed. Most deliveries
-- succeed at once, so recording one writes a row and its two index entries less.
ALTER TABLE deliveries ADD COLUMN delivered_started_at BIGINT;
