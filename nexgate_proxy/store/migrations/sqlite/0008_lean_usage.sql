-- Lean usage rows (issue #20): ts as integer microseconds since 1970-01-01 UTC (8 bytes instead of
-- 32 characters, in the row and in every index); what most rows hold stored as NULL (the endpoint
-- "chat.completions", an upstream model equal to the model, the key prefix of the row's key, read
-- back from api_keys: keys are never deleted; see _common.usage_from_storage and USAGE_SELECT); the
-- indexes the queries use and no others. Every reader scopes by account: the organization and key
-- indexes went (an org_id or key_id filter alone scans; none of the gateway's queries has one).
-- debit_id: the ledger entry that charged the row's cost. record_usage now books one debit per
-- account and batch (external_id: the batch's first request id) instead of one per request; the
-- per-request debits of the old rows stay in the ledger (append-only) and their rows name them here.

-- Columns in the order PostgreSQL's 0008 has them (its alignment): SQLite row size does not depend on it.
CREATE TABLE usage_records_lean (
    ts                  INTEGER NOT NULL,  -- microseconds since 1970-01-01 UTC
    estimated_cost_pico INTEGER CHECK (estimated_cost_pico IS NULL OR typeof(estimated_cost_pico) = 'integer'),
    actual_cost_pico    INTEGER CHECK (actual_cost_pico IS NULL OR typeof(actual_cost_pico) = 'integer'),
    debit_id            INTEGER,           -- ledger_entries.id of the debit that charged actual_cost_pico
    prompt_tokens       INTEGER NOT NULL,
    completion_tokens   INTEGER NOT NULL,
    cached_tokens       INTEGER NOT NULL,
    latency_ms          INTEGER NOT NULL,
    status              INTEGER NOT NULL,
    attempts            INTEGER NOT NULL,
    usage_estimated     INTEGER NOT NULL CHECK (usage_estimated IN (0, 1)),
    stream              INTEGER NOT NULL CHECK (stream IN (0, 1)),
    request_id          TEXT NOT NULL PRIMARY KEY,
    account_id          TEXT,
    key_id              TEXT,
    key_prefix          TEXT,              -- NULL: its key's api_keys.prefix; '': none
    model               TEXT,
    provider            TEXT,
    client_ip           TEXT,              -- personal data: nulled by clear_client_ips after retention
    org_id              TEXT,
    endpoint            TEXT,              -- NULL: "chat.completions"
    upstream_model      TEXT,              -- NULL: the same as model; '': none
    error_code          TEXT
);

-- ts was fixed-width UTC text, 'YYYY-MM-DDTHH:MM:SS.ffffff+00:00'.
INSERT INTO usage_records_lean (ts, estimated_cost_pico, actual_cost_pico, debit_id, prompt_tokens, completion_tokens,
                                cached_tokens, latency_ms, status, attempts, usage_estimated, stream, request_id,
                                account_id, key_id, key_prefix, model, provider, client_ip, org_id, endpoint,
                                upstream_model, error_code)
SELECT CAST(strftime('%s', substr(u.ts, 1, 19)) AS INTEGER) * 1000000 + CAST(substr(u.ts, 21, 6) AS INTEGER),
       u.estimated_cost_pico, u.actual_cost_pico,
       (SELECT l.id FROM ledger_entries l WHERE l.source = 'request' AND l.external_id = u.request_id),
       u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.latency_ms, u.status, u.attempts, u.usage_estimated,
       u.stream, u.request_id, u.account_id, u.key_id,
       CASE WHEN k.prefix IS NULL THEN u.key_prefix WHEN u.key_prefix IS k.prefix THEN NULL
            ELSE COALESCE(u.key_prefix, '') END,
       u.model, u.provider, u.client_ip, u.org_id,
       NULLIF(u.endpoint, 'chat.completions'),
       CASE WHEN u.upstream_model IS u.model THEN NULL WHEN u.upstream_model IS NULL THEN '' ELSE u.upstream_model END,
       u.error_code
FROM usage_records u LEFT JOIN api_keys k ON k.id = u.key_id ORDER BY u.ts;

DROP TABLE usage_records;
ALTER TABLE usage_records_lean RENAME TO usage_records;

-- list_usage and the row totals of part days (dashboard, statements, export): always by account.
CREATE INDEX usage_records_account_ts_idx ON usage_records (account_id, ts);
-- The roll-up job and the unscoped row totals of part days (the admin overview).
CREATE INDEX usage_records_ts_idx ON usage_records (ts);
-- clear_client_ips: only rows still holding an IP are in it, so each run reads just the new ones.
CREATE INDEX usage_records_client_ip_ts_idx ON usage_records (ts) WHERE client_ip IS NOT NULL;
