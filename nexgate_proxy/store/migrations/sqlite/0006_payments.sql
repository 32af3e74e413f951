-- Payments that moved money: how much of each has been taken back, and payments held unapplied.

-- Per payment, the running total taken back by its refunds and disputes: in the currency's
-- minor units (as the provider reports them) and in pico-USD (what the ledger debited). Each
-- reversal debits the cumulative share minus what was already debited, so partial refunds
-- never drift and the total never exceeds what the payment credited. Written in the
-- reversal's own ledger transaction, compared-and-set (a concurrent reversal retries).
CREATE TABLE payment_reversals (
    source          TEXT NOT NULL,
    payment_id      TEXT NOT NULL,
    reversed_minor  INTEGER NOT NULL CHECK (typeof(reversed_minor) = 'integer'),
    reversed_pico   INTEGER NOT NULL CHECK (typeof(reversed_pico) = 'integer'),
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (source, payment_id)
) WITHOUT ROWID;

-- A payment that named no account, or one that is unknown or deleted: credited to nobody until
-- the operator applies it to an account (applied_to, once).
CREATE TABLE unapplied_payments (
    source          TEXT NOT NULL,
    payment_id      TEXT NOT NULL,
    account_hint    TEXT,             -- what the payment's metadata named, if anything
    amount_pico     INTEGER NOT NULL CHECK (typeof(amount_pico) = 'integer' AND amount_pico > 0),
    description     TEXT NOT NULL,
    reason          TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    applied_to      TEXT,
    applied_at      TEXT,
    PRIMARY KEY (source, payment_id)
) WITHOUT ROWID;

CREATE INDEX unapplied_payments_open_idx ON unapplied_payments (received_at) WHERE applied_to IS NULL;
