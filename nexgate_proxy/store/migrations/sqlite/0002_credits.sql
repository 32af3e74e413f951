-- Credits: the usage log, the money ledger, running balances, processed webhooks.
-- Money is integer pico-USD (1 pUSD = 1e-12 USD), never floating point. SQLite
-- would silently turn an integer overflow into a REAL: the typeof() checks
-- refuse that, and the store checks balances before it writes them.
-- No foreign keys to users/organizations: account_id is either, and money
-- history outlives the accounts it belongs to.

-- Metadata of each request. Deliberately no column that could hold content.
CREATE TABLE usage_records (
    request_id          TEXT NOT NULL PRIMARY KEY,
    ts                  TEXT NOT NULL,
    endpoint            TEXT NOT NULL,
    model               TEXT,
    provider            TEXT,
    upstream_model      TEXT,
    account_id          TEXT,
    org_id              TEXT,
    key_id              TEXT,
    key_prefix          TEXT,
    prompt_tokens       INTEGER NOT NULL,
    completion_tokens   INTEGER NOT NULL,
    cached_tokens       INTEGER NOT NULL,
    usage_estimated     INTEGER NOT NULL CHECK (usage_estimated IN (0, 1)),
    estimated_cost_pico INTEGER CHECK (estimated_cost_pico IS NULL OR typeof(estimated_cost_pico) = 'integer'),
    actual_cost_pico    INTEGER CHECK (actual_cost_pico IS NULL OR typeof(actual_cost_pico) = 'integer'),
    latency_ms          INTEGER NOT NULL,
    status              INTEGER NOT NULL,
    error_code          TEXT,
    stream              INTEGER NOT NULL CHECK (stream IN (0, 1)),
    client_ip           TEXT,             -- personal data: nulled by clear_client_ips after retention
    attempts            INTEGER NOT NULL
);

CREATE INDEX usage_records_account_ts_idx ON usage_records (account_id, ts);
CREATE INDEX usage_records_org_ts_idx ON usage_records (org_id, ts);
CREATE INDEX usage_records_key_ts_idx ON usage_records (key_id, ts);
CREATE INDEX usage_records_ts_idx ON usage_records (ts);
-- clear_client_ips: only rows still holding an IP are in it, so each run reads just the new ones.
CREATE INDEX usage_records_client_ip_ts_idx ON usage_records (ts) WHERE client_ip IS NOT NULL;

-- Every movement of money, signed: credits positive, debits negative. Append-only.
CREATE TABLE ledger_entries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
    account_id  TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('payment', 'debit', 'refund', 'dispute', 'grant', 'adjustment')),
    amount_pico INTEGER NOT NULL CHECK (typeof(amount_pico) = 'integer'),
    source      TEXT NOT NULL,        -- "stripe", "request", "admin"...
    external_id TEXT NOT NULL,        -- the source's id of the movement: applied at most once
    request_id  TEXT,
    description TEXT,
    created_at  TEXT NOT NULL,
    UNIQUE (source, external_id)
);

CREATE INDEX ledger_entries_account_created_idx ON ledger_entries (account_id, created_at);

CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger_entries is append-only: add a correcting entry instead');
END;

CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger_entries is append-only: add a correcting entry instead');
END;

-- The running SUM of each account's ledger, changed only in the transaction that appends to it.
CREATE TABLE balances (
    account_id   TEXT NOT NULL PRIMARY KEY,
    balance_pico INTEGER NOT NULL CHECK (typeof(balance_pico) = 'integer'),
    updated_at   TEXT NOT NULL
) WITHOUT ROWID;

-- Payment provider events already processed: a redelivered event is ignored.
CREATE TABLE webhook_events (
    source      TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (source, event_id)
) WITHOUT ROWID;
