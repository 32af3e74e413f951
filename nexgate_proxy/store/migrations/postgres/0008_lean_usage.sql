-- Lean usage rows (issue #20): columns ordered widest first (no alignment padding between them);
-- what most rows hold stored as NULL (0 cached tokens, 1 attempt, the endpoint "chat.completions",
-- an upstream model equal to the model, the key prefix of the row's key, read back from api_keys:
-- keys are never deleted; see
-- _common.usage_from_storage and USAGE_SELECT); the indexes the queries use and no others. Every
-- reader scopes by account: the organization and key indexes went (an org_id or key_id filter
-- alone scans; none of the gateway's queries has one). The time index is a BRIN: rows arrive in
-- time order, and the roll-up job and the unscoped part-day totals read ranges of it.
-- debit_id: the ledger entry that charged the row's cost. record_usage now books one debit per
-- account and batch (external_id: the batch's first request id) instead of one per request; the
-- per-request debits of the old rows stay in the ledger (append-only) and their rows name them here.

ALTER TABLE usage_records RENAME TO usage_records_old;
ALTER INDEX usage_records_pkey RENAME TO usage_records_old_pkey;
DROP INDEX usage_records_account_ts_idx;
DROP INDEX usage_records_org_ts_idx;
DROP INDEX usage_records_key_ts_idx;
DROP INDEX usage_records_ts_idx;
DROP INDEX usage_records_client_ip_ts_idx;

CREATE TABLE usage_records (
    ts                  timestamptz NOT NULL,
    estimated_cost_pico bigint,
    actual_cost_pico    bigint,
    debit_id            bigint,   -- ledger_entries.id of the debit that charged actual_cost_pico
    prompt_tokens       integer NOT NULL,
    completion_tokens   integer NOT NULL,
    cached_tokens       integer,  -- NULL: 0 (then the row is 8 bytes shorter, a MAXALIGN step)
    latency_ms          integer NOT NULL,
    status              integer NOT NULL,
    attempts            integer,  -- NULL: 1
    usage_estimated     boolean NOT NULL,
    stream              boolean NOT NULL,
    request_id          text NOT NULL CONSTRAINT usage_records_pkey PRIMARY KEY,
    account_id          text,
    key_id              text,
    key_prefix          text,     -- NULL: its key's api_keys.prefix; '': none
    model               text,
    provider            text,
    client_ip           text,     -- personal data: nulled by clear_client_ips after retention
    org_id              text,
    endpoint            text,     -- NULL: 'chat.completions'
    upstream_model      text,     -- NULL: the same as model; '': none
    error_code          text
);

INSERT INTO usage_records (ts, estimated_cost_pico, actual_cost_pico, debit_id, prompt_tokens, completion_tokens,
                           cached_tokens, latency_ms, status, attempts, usage_estimated, stream, request_id,
                           account_id, key_id, key_prefix, model, provider, client_ip, org_id, endpoint,
                           upstream_model, error_code)
SELECT u.ts, u.estimated_cost_pico, u.actual_cost_pico, l.id, u.prompt_tokens, u.completion_tokens,
       NULLIF(u.cached_tokens, 0), u.latency_ms, u.status, NULLIF(u.attempts, 1), u.usage_estimated, u.stream,
       u.request_id, u.account_id, u.key_id,
       CASE WHEN k.prefix IS NULL THEN u.key_prefix WHEN u.key_prefix IS NOT DISTINCT FROM k.prefix THEN NULL
            ELSE COALESCE(u.key_prefix, '') END,
       u.model, u.provider, u.client_ip, u.org_id, NULLIF(u.endpoint, 'chat.completions'),
       CASE WHEN u.upstream_model IS NOT DISTINCT FROM u.model THEN NULL
            WHEN u.upstream_model IS NULL THEN '' ELSE u.upstream_model END,
       u.error_code
FROM usage_records_old u
LEFT JOIN ledger_entries l ON l.source = 'request' AND l.external_id = u.request_id
LEFT JOIN api_keys k ON k.id = u.key_id
ORDER BY u.ts;

DROP TABLE usage_records_old;

-- list_usage and the row totals of part days (dashboard, statements, export): always by account.
-- On hashtext(account_id), 4 bytes instead of the id's 31: the queries say both (PostgresStore._usage_where),
-- an account sharing another's hash only adds rows the id then filters out.
CREATE INDEX usage_records_account_ts_idx ON usage_records (hashtext(account_id), ts) WHERE account_id IS NOT NULL;
CREATE INDEX usage_records_ts_idx ON usage_records USING brin (ts) WITH (autosummarize = on);
-- clear_client_ips: only rows still holding an IP are in it, so each run reads just the new ones.
CREATE INDEX usage_records_client_ip_ts_idx ON usage_records (ts) WHERE client_ip IS NOT NULL;
