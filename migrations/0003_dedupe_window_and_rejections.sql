-- A record Postgres refused (a constraint, a value it cannot store) becomes a dead letter that
-- names the SQLSTATE, so an operator can tell a data problem from a code problem at a glance.
ALTER TABLE dead_letters ADD COLUMN sqlstate text;

-- `processed_events` is pruned beyond the redelivery window (DEDUPE_WINDOW_SECS) in bounded
-- batches, oldest first: this index makes each batch find its rows without a scan.
CREATE INDEX processed_events_processed_at ON processed_events (processed_at);
