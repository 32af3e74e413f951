-- Accounts, organizations and API keys.
-- Timestamps are UTC ISO-8601 text, always with microseconds and "+00:00":
-- fixed width, so comparing the text compares the times.
-- JSON columns hold text written by the store (a list, an object).

CREATE TABLE users (
    id          TEXT NOT NULL PRIMARY KEY,
    external_id TEXT UNIQUE,              -- Clerk user id; NULL for local users
    email       TEXT,
    name        TEXT,
    created_at  TEXT NOT NULL,
    deleted_at  TEXT
);

CREATE TABLE organizations (
    id         TEXT NOT NULL PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE memberships (
    org_id     TEXT NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at TEXT NOT NULL,
    PRIMARY KEY (org_id, user_id)
) WITHOUT ROWID;

-- list_orgs_for_user; the primary key already serves lookups by org.
CREATE INDEX memberships_user_id_idx ON memberships (user_id);

CREATE TABLE api_keys (
    id             TEXT NOT NULL PRIMARY KEY,
    public_id      TEXT NOT NULL UNIQUE,  -- the auth path's lookup key
    prefix         TEXT NOT NULL,
    secret_hash    TEXT NOT NULL,         -- bcrypt hash; the secret itself is never stored
    name           TEXT NOT NULL,
    user_id        TEXT REFERENCES users (id) ON DELETE CASCADE,
    org_id         TEXT REFERENCES organizations (id) ON DELETE CASCADE,
    created_by     TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at     TEXT NOT NULL,
    last_used_at   TEXT,
    expires_at     TEXT,
    revoked_at     TEXT,
    allowed_models TEXT,                  -- JSON list of model names; NULL = every model
    limits         TEXT,                  -- JSON object of limit overrides
    CHECK ((user_id IS NULL) <> (org_id IS NULL))
);

CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);
CREATE INDEX api_keys_org_id_idx ON api_keys (org_id);
