-- Storage settings for the catch-up's write pattern (BENCHMARKS.md, "Catch-up").
--
-- Every batch rewrites the row of each touched customer's subscriptions, profile and
-- entitlements. With full pages each new row version goes to another page, and every index of
-- the table gets a new entry for it. Leaving a third of each page free lets Postgres put the
-- new version beside the old one (a HOT update: no index entries, the old one pruned in place),
-- since none of these updates changes an indexed column. Applies to pages written from now on.
ALTER TABLE customers SET (fillfactor = 70);
ALTER TABLE subscriptions SET (fillfactor = 70);
ALTER TABLE checkout_sessions SET (fillfactor = 70);
ALTER TABLE entitlement_summaries SET (fillfactor = 70);
ALTER TABLE entitlements SET (fillfactor = 70);
ALTER TABLE consumer_offsets SET (fillfactor = 50);

-- Snapshots past ~2 kB are compressed; lz4 does it at a fraction of pglz's CPU. Only where this
-- server was built with lz4 (the official images are): elsewhere the default stays.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE customers ALTER COLUMN snapshot SET COMPRESSION lz4;
        ALTER TABLE subscriptions ALTER COLUMN snapshot SET COMPRESSION lz4;
        ALTER TABLE invoices ALTER COLUMN snapshot SET COMPRESSION lz4;
        ALTER TABLE checkout_sessions ALTER COLUMN snapshot SET COMPRESSION lz4;
        ALTER TABLE entitlement_summaries ALTER COLUMN snapshot SET COMPRESSION lz4;
        ALTER TABLE outbox ALTER COLUMN payload SET COMPRESSION lz4;
    END IF;
END
$$;
