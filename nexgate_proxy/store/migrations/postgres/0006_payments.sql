-- Payments that moved money: how much of each has been taken back, and payments held unapplied.

-- Per payment, the running total taken back by its refunds and disputes: in the currency's
-- minor units (as the provider reports them) and in pico-USD (what the ledger debited). Each
-- reversal debits the cumulative share minus what was already debited, so partial refunds
-- never drift and the total never exceeds what the payment credited. Written in the
-- reversal's own ledger transaction, compared-and-set (a concurrent reversal retries).
CREATE TABLE payment_reversals (
    source          text NOT NULL,
    payment_id      text NOT NULL,
    reversed_minor  bigint NOT NULL,
    reversed_pico   bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payment_reversals_pkey PRIMARY KEY (source, payment_id)
);

-- A payment that named no account, or one that is unknown or deleted: credited to nobody until
-- the operator applies it to an account (applied_to, once).
CREATE TABLE unapplied_payments (
    source          text NOT NULL,
    payment_id      text NOT NULL,
    account_hint    text,             -- what the payment's metadata named, if anything
    amount_pico     bigint NOT NULL CHECK (amount_pico > 0),
    description     text NOT NULL,
    reason          text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    applied_to      text,
    applied_at      timestamptz,
    CONSTRAINT unapplied_payments_pkey PRIMARY KEY (source, payment_id)
);

CREATE INDEX unapplied_payments_open_idx ON unapplied_payments (received_at) WHERE applied_to IS NULL;
