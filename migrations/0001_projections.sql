-- Projections of the Stripe event log, keyed by (account, id); account '' is the platform.
-- Every projected row keeps the rank of the snapshot it holds (SPEC §6: created, type rank,
-- status rank, event id) and the whole snapshot as jsonb beside the queried columns, so that
-- columns never mix snapshots. An upsert replaces a row only with a strictly greater rank.
-- rank_event_id uses the "C" collation so that Postgres orders it bytewise, as Rust does.

CREATE TABLE customers (
    account         text    NOT NULL,
    id              text    NOT NULL,
    livemode        boolean NOT NULL,
    email           text,
    name            text,
    -- Sticky: once Stripe says the customer is deleted, no later snapshot revives it.
    deleted         boolean NOT NULL DEFAULT false,
    rank_created    bigint   NOT NULL,
    rank_type       smallint NOT NULL,
    rank_status     smallint NOT NULL,
    rank_event_id   text COLLATE "C" NOT NULL,
    event_type      text    NOT NULL,
    snapshot        jsonb   NOT NULL,
    PRIMARY KEY (account, id)
);

CREATE TABLE subscriptions (
    account              text    NOT NULL,
    id                   text    NOT NULL,
    customer             text    NOT NULL,
    status               text    NOT NULL,
    livemode             boolean NOT NULL,
    current_period_end   bigint,
    cancel_at_period_end boolean NOT NULL,
    -- [{id, price, product, lookup_key, quantity, current_period_end}]
    items                jsonb   NOT NULL,
    rank_created    bigint   NOT NULL,
    rank_type       smallint NOT NULL,
    rank_status     smallint NOT NULL,
    rank_event_id   text COLLATE "C" NOT NULL,
    event_type      text    NOT NULL,
    snapshot        jsonb   NOT NULL,
    PRIMARY KEY (account, id)
);
CREATE INDEX subscriptions_customer ON subscriptions (account, customer);

CREATE TABLE invoices (
    account              text    NOT NULL,
    id                   text    NOT NULL,
    customer             text,
    subscription         text,
    status               text,
    paid                 boolean NOT NULL,
    amount_paid          bigint  NOT NULL,
    -- Dunning: how many attempts failed so far and when Stripe tries next.
    attempt_count        bigint  NOT NULL,
    next_payment_attempt bigint,
    -- The end of the period this invoice pays for.
    paid_through         bigint,
    livemode             boolean NOT NULL,
    rank_created    bigint   NOT NULL,
    rank_type       smallint NOT NULL,
    rank_status     smallint NOT NULL,
    rank_event_id   text COLLATE "C" NOT NULL,
    event_type      text    NOT NULL,
    snapshot        jsonb   NOT NULL,
    PRIMARY KEY (account, id)
);
CREATE INDEX invoices_customer ON invoices (account, customer);
CREATE INDEX invoices_subscription ON invoices (account, subscription);

CREATE TABLE checkout_sessions (
    account              text    NOT NULL,
    id                   text    NOT NULL,
    customer             text,
    client_reference_id  text,
    mode                 text    NOT NULL,
    status               text,
    payment_status       text    NOT NULL,
    subscription         text,
    metadata_price       text,
    metadata_product     text,
    livemode             boolean NOT NULL,
    rank_created    bigint   NOT NULL,
    rank_type       smallint NOT NULL,
    rank_status     smallint NOT NULL,
    rank_event_id   text COLLATE "C" NOT NULL,
    event_type      text    NOT NULL,
    snapshot        jsonb   NOT NULL,
    PRIMARY KEY (account, id)
);
CREATE INDEX checkout_sessions_customer ON checkout_sessions (account, customer);

-- Stripe's active-entitlement summary, one per customer (the latest by rank).
CREATE TABLE entitlement_summaries (
    account         text    NOT NULL,
    customer        text    NOT NULL,
    lookup_keys     text[]  NOT NULL,
    livemode        boolean NOT NULL,
    rank_created    bigint   NOT NULL,
    rank_type       smallint NOT NULL,
    rank_status     smallint NOT NULL,
    rank_event_id   text COLLATE "C" NOT NULL,
    event_type      text    NOT NULL,
    snapshot        jsonb   NOT NULL,
    PRIMARY KEY (account, customer)
);

-- Derived state: a customer's entitlement object (SPEC §8) as last computed. `version` counts
-- its changes and is incremented in the transaction that writes the change message.
CREATE TABLE entitlements (
    account             text    NOT NULL,
    customer            text    NOT NULL,
    livemode            boolean NOT NULL,
    client_reference_id text,
    features            text[]  NOT NULL,
    version             bigint  NOT NULL,
    -- The §8 object without `version`.
    view                jsonb   NOT NULL,
    updated_at          timestamptz NOT NULL,
    PRIMARY KEY (account, customer)
);
CREATE INDEX entitlements_client_reference_id ON entitlements (account, client_reference_id)
    WHERE client_reference_id IS NOT NULL;

-- The customer ↔ client_reference_id link from Checkout.
CREATE VIEW customer_links AS
    SELECT account, customer, client_reference_id FROM entitlements WHERE client_reference_id IS NOT NULL;

-- Progress: the next offset to apply per partition, written in the same transaction as the
-- projection writes it covers. The truth for where to resume; Kafka's commits only show lag.
CREATE TABLE consumer_offsets (
    topic         text    NOT NULL,
    partition     integer NOT NULL,
    next_offset   bigint  NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- Event-id dedupe: Stripe redelivers the same event as a new record at a new offset.
CREATE TABLE processed_events (
    event_id      text PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);

-- Records the projector could not use, with the reason; `projector redrive` re-applies them.
CREATE TABLE dead_letters (
    id            bigserial PRIMARY KEY,
    event_id      text,
    event_type    text,
    topic         text    NOT NULL,
    partition     integer NOT NULL,
    "offset"      bigint  NOT NULL,
    reason        text    NOT NULL,
    message       text    NOT NULL,
    payload       bytea   NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    redriven_at   timestamptz,
    UNIQUE (topic, partition, "offset")
);

-- Transactional outbox: rows written with the projection, published by the relay in id order,
-- marked only after the broker acknowledged them.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    topic         text    NOT NULL,
    key           text,
    payload       bytea   NOT NULL,
    headers       jsonb   NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
