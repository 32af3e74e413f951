-- Per-organization rate-limit overrides, stored like api_keys.limits.
-- NULL = no override (the YAML limits apply).

ALTER TABLE organizations
    ADD COLUMN limits jsonb
        CONSTRAINT organizations_limits_object CHECK (limits IS NULL OR jsonb_typeof(limits) = 'object');
