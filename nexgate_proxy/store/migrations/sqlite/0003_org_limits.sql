-- Per-organization rate-limit overrides, stored like api_keys.limits.
-- JSON object text written by the store; NULL = no override (the YAML limits apply).

ALTER TABLE organizations ADD COLUMN limits TEXT;
