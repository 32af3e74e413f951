-- Credits: the usage log, the money ledger, running balances, processed webhooks.
-- Money is integer pico-USD (1 pUSD = 1e-12 USD) in bigint, never floating point:
-- at most 2^63 - 1 pUSD, about 9.2 million USD, per amount and per balance.
-- No foreign keys to users/organizations: account_id is either, and money
-- history outlives the accounts it belongs to.

-- Metadata of each request. Deliberately no column that could hold content.
CREATE TABLE usage_records (
    request_id          text PRIMARY KEY,
    ts                  timestamptz NOT NULL,
    endpoint            text NOT NULL,
    model               text,
    provider            text,
    upstream_model      text,
    account_id          text,
    org_id              text,
    key_id              text,
    key_prefix          text,
    prompt_tokens       integer NOT NULL,
    completion_tokens   integer NOT NULL,
    cached_tokens       integer NOT NULL,
    usage_estimated     boolean NOT NULL,
    estimated_cost_pico bigint,
    actual_cost_pico    bigint,
    latency_ms          integer NOT NULL,
    status              integer NOT NULL,
    error_code          text,
    stream              boolean NOT NULL,
    client_ip           text,  -- personal data: nulled by clear_client_ips after retention
    attempts            integer NOT NULL
);

CREATE INDEX usage_records_account_ts_idx ON usage_records (account_id, ts) WHERE account_id IS NOT NULL;
CREATE INDEX usage_records_org_ts_idx ON usage_records (org_id, ts) WHERE org_id IS NOT NULL;
CREATE INDEX usage_records_key_ts_idx ON usage_records (key_id, ts) WHERE key_id IS NOT NULL;
CREATE INDEX usage_records_ts_idx ON usage_records (ts);
-- clear_client_ips: only rows still holding an IP are in it, so each run reads just the new ones.
CREATE INDEX usage_records_client_ip_ts_idx ON usage_records (ts) WHERE client_ip IS NOT NULL;

-- Every movement of money, signed: credits positive, debits negative. Append-only.
CREATE TABLE ledger_entries (
    id          bigserial PRIMARY KEY,
    account_id  text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('payment', 'debit', 'refund', 'dispute', 'grant', 'adjustment')),
    amount_pico bigint NOT NULL,
    source      text NOT NULL,  -- "stripe", "request", "admin"...
    external_id text NOT NULL,  -- the source's id of the movement: applied at most once
    request_id  text,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_entries_source_external_id_key UNIQUE (source, external_id)
);

CREATE INDEX ledger_entries_account_created_idx ON ledger_entries (account_id, created_at);

CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: add a correcting entry instead';
END;
$$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

-- The running SUM of each account's ledger, changed only in the transaction that appends to it.
CREATE TABLE balances (
    account_id   text PRIMARY KEY,
    balance_pico bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Payment provider events already processed: a redelivered event is ignored.
CREATE TABLE webhook_events (
    source      text NOT NULL,
    event_id    text NOT NULL,
    event_type  text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_events_pkey PRIMARY KEY (source, event_id)
);
