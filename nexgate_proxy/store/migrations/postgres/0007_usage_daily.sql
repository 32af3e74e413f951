-- Per UTC day totals of the usage log, kept by record_usage in the statement that inserts the
-- rows (only rows actually inserted move it: a replayed batch adds nothing). The dashboard,
-- usage totals and organization pages read these instead of the raw rows.
-- Columns that may be NULL in usage_records are '' here, so they can be part of the key.
-- numeric cost: a cell may sum many large costs past the bigint range; the sum stays exact.
CREATE TABLE usage_daily (
    account_id        text NOT NULL,
    day               date NOT NULL,          -- the UTC date of ts
    model             text NOT NULL,
    key_id            text NOT NULL,
    status            integer NOT NULL,
    org_id            text NOT NULL,
    requests          bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cached_tokens     bigint NOT NULL,
    cost_pico         numeric NOT NULL,
    latency_ms_sum    bigint NOT NULL,
    latency_ms_max    integer NOT NULL,
    PRIMARY KEY (account_id, day, model, key_id, status, org_id)
);

CREATE INDEX usage_daily_org_day_idx ON usage_daily (org_id, day) WHERE org_id <> '';
CREATE INDEX usage_daily_key_day_idx ON usage_daily (key_id, day) WHERE key_id <> '';

INSERT INTO usage_daily (account_id, day, model, key_id, status, org_id, requests, prompt_tokens, completion_tokens,
                         cached_tokens, cost_pico, latency_ms_sum, latency_ms_max)
SELECT COALESCE(account_id, ''), (ts AT TIME ZONE 'UTC')::date, COALESCE(model, ''), COALESCE(key_id, ''), status,
       COALESCE(org_id, ''), COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),
       COALESCE(SUM(actual_cost_pico), 0), SUM(latency_ms), MAX(latency_ms)
FROM usage_records
GROUP BY 1, 2, 3, 4, 5, 6;

-- The statement lists a month's ledger entries other than request debits one by one (those it
-- sums per day in SQL): this index holds only them, a few per account.
CREATE INDEX ledger_entries_account_other_idx ON ledger_entries (account_id, created_at) WHERE source <> 'request';

-- record_usage's debits (one per request) summed per account and UTC day of created_at, kept in
-- the same statement (one row per account and batch): a statement reads a month's debits from
-- here in one snapshot with the balance.
CREATE TABLE request_debits_daily (
    account_id  text NOT NULL,
    day         date NOT NULL,          -- the UTC date of created_at
    amount_pico numeric NOT NULL,
    entries     bigint NOT NULL,
    last_at     timestamptz NOT NULL,   -- created_at of the day's latest debit
    PRIMARY KEY (account_id, day)
);

INSERT INTO request_debits_daily (account_id, day, amount_pico, entries, last_at)
SELECT account_id, (created_at AT TIME ZONE 'UTC')::date, SUM(amount_pico), COUNT(*), MAX(created_at)
FROM ledger_entries WHERE source = 'request'
GROUP BY 1, 2;
