-- Accounts, organizations and API keys.
-- Constraint names are the ones the store maps to Conflict messages: keep them.

CREATE TABLE users (
    id          text PRIMARY KEY,
    external_id text CONSTRAINT users_external_id_key UNIQUE,  -- Clerk user id; NULL for local users
    email       text,
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

CREATE TABLE organizations (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    org_id     text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id    text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT memberships_pkey PRIMARY KEY (org_id, user_id)
);

-- list_orgs_for_user; the primary key already serves lookups by org.
CREATE INDEX memberships_user_id_idx ON memberships (user_id);

CREATE TABLE api_keys (
    id             text PRIMARY KEY,
    public_id      text NOT NULL CONSTRAINT api_keys_public_id_key UNIQUE,  -- the auth path's lookup key
    prefix         text NOT NULL,
    secret_hash    text NOT NULL,  -- bcrypt hash; the secret itself is never stored
    name           text NOT NULL,
    user_id        text REFERENCES users (id) ON DELETE CASCADE,
    org_id         text REFERENCES organizations (id) ON DELETE CASCADE,
    created_by     text REFERENCES users (id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz,
    expires_at     timestamptz,
    revoked_at     timestamptz,
    allowed_models jsonb CHECK (allowed_models IS NULL OR jsonb_typeof(allowed_models) = 'array'),
    limits         jsonb CHECK (limits IS NULL OR jsonb_typeof(limits) = 'object'),
    CONSTRAINT api_keys_one_owner CHECK ((user_id IS NULL) <> (org_id IS NULL))
);

CREATE INDEX api_keys_user_id_idx ON api_keys (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX api_keys_org_id_idx ON api_keys (org_id) WHERE org_id IS NOT NULL;
