-- Per UTC day totals of the usage log, kept by record_usage in the transaction that inserts the
-- rows (only rows actually inserted move it: a replayed batch adds nothing). The dashboard,
-- usage totals and organization pages read these instead of the raw rows.
-- Columns that may be NULL in usage_records are '' here, so they can be part of the key.
-- The cost is split as usage_totals sums it (pico // 10**6 and pico % 10**6): SQLite turns an
-- integer sum past 2**63 into an inexact REAL, and a cell may sum many large costs.
CREATE TABLE usage_daily (
    account_id        TEXT NOT NULL,
    day               TEXT NOT NULL,          -- 'YYYY-MM-DD', the UTC date of ts
    model             TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    status            INTEGER NOT NULL,
    org_id            TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    cost_high         INTEGER NOT NULL,       -- SUM(actual_cost_pico / 1000000)
    cost_low          INTEGER NOT NULL,       -- SUM(actual_cost_pico % 1000000)
    latency_ms_sum    INTEGER NOT NULL,
    latency_ms_max    INTEGER NOT NULL,
    PRIMARY KEY (account_id, day, model, key_id, status, org_id)
) WITHOUT ROWID;

CREATE INDEX usage_daily_org_day_idx ON usage_daily (org_id, day) WHERE org_id <> '';
CREATE INDEX usage_daily_key_day_idx ON usage_daily (key_id, day) WHERE key_id <> '';

INSERT INTO usage_daily (account_id, day, model, key_id, status, org_id, requests, prompt_tokens, completion_tokens,
                         cached_tokens, cost_high, cost_low, latency_ms_sum, latency_ms_max)
SELECT COALESCE(account_id, ''), substr(ts, 1, 10), COALESCE(model, ''), COALESCE(key_id, ''), status,
       COALESCE(org_id, ''), COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),
       COALESCE(SUM(actual_cost_pico / 1000000), 0), COALESCE(SUM(actual_cost_pico % 1000000), 0),
       SUM(latency_ms), MAX(latency_ms)
FROM usage_records
GROUP BY 1, 2, 3, 4, 5, 6;

-- The statement lists a month's ledger entries other than request debits one by one (those it
-- sums per day in SQL): this index holds only them, a few per account.
CREATE INDEX ledger_entries_account_other_idx ON ledger_entries (account_id, created_at) WHERE source <> 'request';

-- record_usage's debits (one per request) summed per account and UTC day of created_at, kept in
-- the same transaction (one row per account and batch): a statement reads a month's debits
-- from here in one snapshot with the balance. Amounts split as above (they are negative:
-- SQLite's / truncates and % keeps the sign, so high * 10**6 + low is still the sum).
CREATE TABLE request_debits_daily (
    account_id  TEXT NOT NULL,
    day         TEXT NOT NULL,          -- 'YYYY-MM-DD', the UTC date of created_at
    amount_high INTEGER NOT NULL,       -- SUM(amount_pico / 1000000)
    amount_low  INTEGER NOT NULL,       -- SUM(amount_pico % 1000000)
    entries     INTEGER NOT NULL,
    last_at     TEXT NOT NULL,          -- created_at of the day's latest debit
    PRIMARY KEY (account_id, day)
) WITHOUT ROWID;

INSERT INTO request_debits_daily (account_id, day, amount_high, amount_low, entries, last_at)
SELECT account_id, substr(created_at, 1, 10), SUM(amount_pico / 1000000), SUM(amount_pico % 1000000), COUNT(*),
       MAX(created_at)
FROM ledger_entries WHERE source = 'request'
GROUP BY 1, 2;
