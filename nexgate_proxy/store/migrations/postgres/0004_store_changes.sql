-- The store's change feed: what running gateways must learn about (a revoked key, an
-- organization's new limits, a credit...), written in the transaction of the change.
-- Writers of this table take one advisory lock before their insert and hold it to commit,
-- so ids grow in commit order: a gateway reads every row after the last id it saw.
CREATE TABLE store_changes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL,
    subject     text NOT NULL,
    amount_pico bigint,
    ledger_id   bigint,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX store_changes_created_at_idx ON store_changes (created_at);
