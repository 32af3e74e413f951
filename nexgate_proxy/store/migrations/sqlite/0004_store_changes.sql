-- The store's change feed: what running gateways must learn about (a revoked key, an
-- organization's new limits, a credit...), written in the transaction of the change.
-- Writers are serialized (BEGIN IMMEDIATE), so ids grow in commit order: a gateway reads
-- every row after the last id it saw. AUTOINCREMENT: an id is never used twice.
CREATE TABLE store_changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    amount_pico INTEGER CHECK (amount_pico IS NULL OR typeof(amount_pico) = 'integer'),
    ledger_id   INTEGER,
    created_at  TEXT NOT NULL
);

CREATE INDEX store_changes_created_at_idx ON store_changes (created_at);
