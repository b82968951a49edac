-- Outbox rows Kafka can never take (larger than the topic accepts, an invalid record or topic)
-- are parked with the reason instead of blocking every row behind them. A parked row is neither
-- published nor pending; `UPDATE outbox SET parked_at = NULL WHERE id = …` queues it again after
-- a fix (for example a larger `max.message.bytes` on the topic).
ALTER TABLE outbox
    ADD COLUMN parked_at     timestamptz,
    ADD COLUMN park_reason   text,
    ADD COLUMN park_message  text;

-- The relay's one query: pending rows in id order.
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL AND parked_at IS NULL;
DROP INDEX outbox_unpublished;
