-- Restriction of processing: a suspended account's keys are refused (403 account_suspended), its data kept.
-- NULL = not suspended; the time it was suspended otherwise (ISO-8601 text, like the other times).

ALTER TABLE users ADD COLUMN suspended_at TEXT;
