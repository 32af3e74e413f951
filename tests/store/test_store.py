"""The store contract, run against SQLite and PostgreSQL alike (see conftest.py)."""

from __future__ import annotations

import asyncio
import re
import secrets
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import bcrypt
import pytest

from nexgate_proxy.store import (
    ApiKeyRow,
    Conflict,
    LastOwnerError,
    NotFound,
    SchemaError,
    Store,
    StoreError,
    latest_version,
    open_store,
)
from nexgate_proxy.store.sqlite import parse_sqlite_url

ID_PATTERN = r"[a-z2-7]{20,}"


def assert_utc(value: datetime) -> None:
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)


async def make_key(store: Store, **overrides) -> ApiKeyRow:
    fields = {
        "public_id": f"pub_{secrets.token_hex(8)}",
        "prefix": "ng-abc",
        "secret_hash": "$2b$04$notarealhashbutshapedlikeonexxxxxxxxxxxxxxxxxxxxxxxx",
        "name": "test key",
    }
    fields.update(overrides)
    if "user_id" not in fields and "org_id" not in fields:
        fields["user_id"] = (await store.create_user()).id
    return await store.create_api_key(**fields)


def slot_values(row: ApiKeyRow) -> list[object]:
    return [getattr(row, name) for name in row.__slots__]


def sqlite_files(url: str) -> list[Path]:
    main = Path(parse_sqlite_url(url))
    return [p for p in (main, main.with_name(main.name + "-wal")) if p.exists()]


async def write_schema_version(url: str, version: int) -> None:
    """Pretend a newer NexGate migrated this database."""
    if url.startswith("sqlite"):
        with sqlite3.connect(parse_sqlite_url(url)) as conn:
            conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (version, "x"))
        return
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
    finally:
        await conn.close()


# --- schema ---------------------------------------------------------------


async def test_fresh_database_is_not_migrated(store_url: str) -> None:
    store = await open_store(store_url)
    try:
        assert await store.schema_version() == 0
        with pytest.raises(SchemaError, match="run `nexgate db migrate`"):
            await store.check_schema()
        with pytest.raises(SchemaError, match="nexgate db migrate"):
            await store.get_user("usr_missing")  # tables missing: a schema problem, said clearly
    finally:
        await store.close()


async def test_migrate_applies_all_then_is_a_no_op(store_url: str) -> None:
    latest = latest_version("sqlite")
    assert latest == latest_version("postgres") >= 1
    store = await open_store(store_url)
    try:
        assert await store.migrate() == list(range(1, latest + 1))
        assert await store.schema_version() == latest
        assert await store.check_schema() == latest
        user = await store.create_user(name="survives a second migrate")
        assert await store.migrate() == []
        assert await store.schema_version() == latest
        assert await store.get_user(user.id) == user
    finally:
        await store.close()


async def test_newer_schema_is_refused(store_url: str, store: Store) -> None:
    latest = latest_version(store.dialect)
    await write_schema_version(store_url, latest + 1)
    assert await store.schema_version() == latest + 1
    expected = f"database schema is at version {latest + 1} but this NexGate knows up to {latest}: upgrade NexGate"
    with pytest.raises(SchemaError, match=re.escape(expected)):
        await store.check_schema()
    with pytest.raises(SchemaError, match="upgrade NexGate"):
        await store.migrate()


async def test_concurrent_migrations_both_succeed(store_url: str) -> None:
    # Two gateway instances starting at once, each with its own connections.
    first, second = await open_store(store_url), await open_store(store_url)
    try:
        applied_a, applied_b = await asyncio.gather(first.migrate(), second.migrate())
        latest = latest_version(first.dialect)
        assert sorted(applied_a + applied_b) == list(range(1, latest + 1))  # each version applied exactly once
        assert await first.check_schema() == await second.check_schema() == latest
        user = await first.create_user(email="a@example.com")
        assert await second.get_user(user.id) == user
    finally:
        await first.close()
        await second.close()


async def test_ping_and_close(store_url: str) -> None:
    store = await open_store(store_url)
    await store.ping()
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError):
        await store.ping()


# --- users ------------------------------------------------------------------


async def test_create_and_get_user(store: Store) -> None:
    user = await store.create_user(external_id="user_2abc", email="ada@example.com", name="Ada")
    assert re.fullmatch(f"usr_{ID_PATTERN}", user.id)
    assert (user.external_id, user.email, user.name, user.deleted_at) == ("user_2abc", "ada@example.com", "Ada", None)
    assert_utc(user.created_at)
    assert abs(datetime.now(UTC) - user.created_at) < timedelta(minutes=1)
    assert await store.get_user(user.id) == user
    assert await store.get_user_by_external_id("user_2abc") == user
    assert await store.get_user("usr_missing") is None
    assert await store.get_user_by_external_id("user_missing") is None


async def test_users_without_external_id_do_not_clash(store: Store) -> None:
    first, second = await store.create_user(), await store.create_user()
    assert first.id != second.id
    assert first.external_id is second.external_id is None


async def test_duplicate_external_id_is_a_conflict(store: Store) -> None:
    await store.create_user(external_id="user_dup")
    with pytest.raises(Conflict, match="external_id"):
        await store.create_user(external_id="user_dup")
    assert len(await store.list_users()) == 1


async def test_list_users_pages_oldest_first(store: Store) -> None:
    created = [await store.create_user(name=f"u{i}") for i in range(5)]
    assert await store.list_users() == created
    assert await store.list_users(limit=2) == created[:2]
    assert await store.list_users(limit=2, offset=2) == created[2:4]
    assert await store.list_users(limit=10, offset=5) == []
    with pytest.raises(ValueError):
        await store.list_users(limit=-1)


async def test_delete_user_is_soft_and_idempotent(store: Store) -> None:
    keep, gone = await store.create_user(name="keep"), await store.create_user(name="gone")
    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert await store.delete_user(gone.id, at=at) is True
    assert await store.delete_user(gone.id) is False
    deleted = await store.get_user(gone.id)
    assert deleted is not None and deleted.deleted_at == at
    assert await store.list_users() == [keep]
    assert [u.id for u in await store.list_users(include_deleted=True)] == [keep.id, gone.id]
    with pytest.raises(NotFound):
        await store.delete_user("usr_missing")


# --- organizations ----------------------------------------------------------


async def test_create_org_makes_the_creator_owner(store: Store) -> None:
    owner = await store.create_user(name="owner")
    org = await store.create_org("Acme", owner.id)
    assert re.fullmatch(f"org_{ID_PATTERN}", org.id)
    assert org.name == "Acme"
    assert_utc(org.created_at)
    assert await store.get_org(org.id) == org
    assert await store.get_org("org_missing") is None
    assert await store.get_role(org.id, owner.id) == "owner"
    [member] = await store.list_members(org.id)
    assert (member.org_id, member.user_id, member.role) == (org.id, owner.id, "owner")
    assert_utc(member.created_at)


async def test_create_org_for_unknown_owner_leaves_nothing_behind(store: Store) -> None:
    with pytest.raises(NotFound, match="usr_ghost"):
        await store.create_org("Ghost Inc", "usr_ghost")
    assert await store.list_orgs() == []  # the org insert was rolled back with the membership


async def test_list_orgs_and_orgs_for_user(store: Store) -> None:
    alice, bob = await store.create_user(name="alice"), await store.create_user(name="bob")
    orgs = [await store.create_org(f"org{i}", alice.id) for i in range(3)]
    await store.add_member(orgs[0].id, bob.id, "admin")
    await store.add_member(orgs[2].id, bob.id, "member")
    assert await store.list_orgs() == orgs
    assert await store.list_orgs(limit=1, offset=1) == [orgs[1]]
    assert await store.list_orgs_for_user(alice.id) == [(o, "owner") for o in orgs]
    assert await store.list_orgs_for_user(bob.id) == [(orgs[0], "admin"), (orgs[2], "member")]
    assert await store.list_orgs_for_user("usr_nobody") == []


async def test_org_limits_round_trip(store: Store) -> None:
    owner = await store.create_user()
    org = await store.create_org("Acme", owner.id)
    assert org.limits is None and (await store.get_org(org.id)).limits is None
    limits = {"rpm": 600, "tpm": 200000, "concurrent": 0}
    updated = await store.set_org_limits(org.id, limits)
    assert (updated.id, updated.name, updated.created_at) == (org.id, org.name, org.created_at)
    assert updated.limits == limits
    assert await store.get_org(org.id) == updated
    assert await store.list_orgs() == [updated]
    assert await store.list_orgs_for_user(owner.id) == [(updated, "owner")]
    replaced = await store.set_org_limits(org.id, {"rpm": 5})
    assert replaced.limits == {"rpm": 5}  # replaced as a whole, not merged
    cleared = await store.set_org_limits(org.id, None)
    assert cleared.limits is None and await store.get_org(org.id) == cleared


async def test_org_limits_of_an_unknown_org_are_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="org_missing"):
        await store.set_org_limits("org_missing", {"rpm": 1})
    assert await store.list_orgs() == []


# --- memberships ------------------------------------------------------------


async def test_add_member_roles_and_duplicates(store: Store) -> None:
    owner, dev = await store.create_user(), await store.create_user()
    org = await store.create_org("Acme", owner.id)
    membership = await store.add_member(org.id, dev.id, "member")
    assert (membership.org_id, membership.user_id, membership.role) == (org.id, dev.id, "member")
    assert await store.get_role(org.id, dev.id) == "member"
    assert [m.user_id for m in await store.list_members(org.id)] == [owner.id, dev.id]
    with pytest.raises(Conflict, match="already a member"):
        await store.add_member(org.id, dev.id, "admin")
    assert await store.get_role(org.id, dev.id) == "member"
    with pytest.raises(ValueError, match="role"):
        await store.add_member(org.id, (await store.create_user()).id, "superuser")


async def test_add_member_needs_existing_org_and_user(store: Store) -> None:
    owner = await store.create_user()
    org = await store.create_org("Acme", owner.id)
    with pytest.raises(NotFound):
        await store.add_member(org.id, "usr_ghost", "member")
    with pytest.raises(NotFound):
        await store.add_member("org_ghost", owner.id, "member")
    assert await store.get_role("org_ghost", owner.id) is None


async def test_set_member_role(store: Store) -> None:
    owner, dev = await store.create_user(), await store.create_user()
    org = await store.create_org("Acme", owner.id)
    added = await store.add_member(org.id, dev.id, "member")
    promoted = await store.set_member_role(org.id, dev.id, "admin")
    assert promoted.role == "admin" and promoted.created_at == added.created_at
    assert await store.get_role(org.id, dev.id) == "admin"
    with pytest.raises(NotFound, match="not a member"):
        await store.set_member_role(org.id, (await store.create_user()).id, "admin")
    with pytest.raises(LastOwnerError, match="last owner"):
        await store.set_member_role(org.id, owner.id, "admin")
    assert await store.get_role(org.id, owner.id) == "owner"
    # With a second owner, the first may step down.
    await store.set_member_role(org.id, dev.id, "owner")
    assert (await store.set_member_role(org.id, owner.id, "member")).role == "member"


async def test_remove_member_refuses_the_last_owner(store: Store) -> None:
    owner, dev = await store.create_user(), await store.create_user()
    org = await store.create_org("Acme", owner.id)
    await store.add_member(org.id, dev.id, "admin")
    assert await store.remove_member(org.id, dev.id) is True
    assert await store.remove_member(org.id, dev.id) is False
    assert await store.get_role(org.id, dev.id) is None
    with pytest.raises(LastOwnerError, match=f"last owner of organization {org.id}"):
        await store.remove_member(org.id, owner.id)
    assert await store.get_role(org.id, owner.id) == "owner"
    await store.add_member(org.id, dev.id, "owner")
    assert await store.remove_member(org.id, owner.id) is True
    assert [(m.user_id, m.role) for m in await store.list_members(org.id)] == [(dev.id, "owner")]


async def test_concurrent_owner_removals_keep_one_owner(store: Store) -> None:
    first, second = await store.create_user(), await store.create_user()
    org = await store.create_org("Acme", first.id)
    await store.add_member(org.id, second.id, "owner")
    results = await asyncio.gather(
        store.remove_member(org.id, first.id), store.remove_member(org.id, second.id), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["LastOwnerError", "bool"]
    assert [m.role for m in await store.list_members(org.id)] == ["owner"]


# --- API keys ---------------------------------------------------------------


async def test_create_and_get_user_key(store: Store) -> None:
    user = await store.create_user()
    expires = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    key = await store.create_api_key(
        public_id="pub_123",
        prefix="ng-pub_1",
        secret_hash="$2b$04$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234",
        name="ci",
        user_id=user.id,
        created_by=user.id,
        expires_at=expires,
        allowed_models=["gpt-4o", "claude-sonnet"],
        limits={"rpm": 60, "tpm": {"gpt-4o": 1000}},
    )
    assert re.fullmatch(f"key_{ID_PATTERN}", key.id)
    assert (key.user_id, key.org_id, key.created_by, key.owner_id) == (user.id, None, user.id, user.id)
    assert key.allowed_models == ("gpt-4o", "claude-sonnet")
    assert key.limits == {"rpm": 60, "tpm": {"gpt-4o": 1000}}
    assert key.expires_at == expires
    assert key.last_used_at is key.revoked_at is None
    assert_utc(key.created_at)
    assert await store.get_api_key(key.id) == key
    assert await store.get_api_key_by_public_id("pub_123") == key
    assert await store.get_api_key("key_missing") is None
    assert await store.get_api_key_by_public_id("pub_missing") is None
    assert key.is_usable(datetime(2031, 1, 1, tzinfo=UTC))
    assert not key.is_usable(expires)


async def test_org_key_with_defaults(store: Store) -> None:
    owner = await store.create_user()
    org = await store.create_org("Acme", owner.id)
    key = await make_key(store, org_id=org.id)
    assert (key.org_id, key.user_id, key.owner_id) == (org.id, None, org.id)
    assert key.allowed_models is None and key.limits is None and key.expires_at is None
    assert await store.get_api_key(key.id) == key
    empty = await make_key(store, public_id="pub_empty", org_id=org.id, allowed_models=[], limits={})
    stored = await store.get_api_key(empty.id)
    assert stored is not None and stored.allowed_models == () and stored.limits == {}


async def test_key_needs_exactly_one_owner(store: Store) -> None:
    user = await store.create_user()
    org = await store.create_org("Acme", user.id)
    with pytest.raises(ValueError, match="exactly one"):
        await make_key(store, user_id=user.id, org_id=org.id)
    with pytest.raises(ValueError, match="exactly one"):
        await store.create_api_key(public_id="p", prefix="p", secret_hash="h", name="n")
    assert await store.list_api_keys() == []


async def test_key_rejects_bad_arguments(store: Store) -> None:
    user = await store.create_user()
    with pytest.raises(ValueError, match="timezone-aware"):
        await make_key(store, user_id=user.id, expires_at=datetime(2030, 1, 1))
    with pytest.raises(TypeError, match="allowed_models"):
        await make_key(store, user_id=user.id, allowed_models="gpt-4o")
    with pytest.raises(NotFound, match="does not exist"):
        await make_key(store, user_id="usr_ghost")
    assert await store.list_api_keys() == []


async def test_duplicate_public_id_is_a_conflict(store: Store) -> None:
    key = await make_key(store, public_id="pub_same")
    with pytest.raises(Conflict, match="public_id"):
        await make_key(store, public_id="pub_same")
    assert [k.id for k in await store.list_api_keys()] == [key.id]


async def test_only_the_bcrypt_hash_is_stored(store_url: str, store: Store) -> None:
    secret = "ng-secret-" + "s3cr3t" * 5
    hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=4)).decode()
    key = await make_key(store, public_id="pub_hash", secret_hash=hashed)
    stored = await store.get_api_key_by_public_id("pub_hash")
    assert stored is not None and stored.secret_hash == hashed  # read back byte for byte
    assert bcrypt.checkpw(secret.encode(), stored.secret_hash.encode())
    assert all(secret not in str(value) for value in slot_values(stored))
    assert hashed not in repr(key)  # the hash stays out of logs too
    if store.dialect == "sqlite":
        await store.close()  # flush WAL into the file before reading it raw
        raw = b"".join(p.read_bytes() for p in sqlite_files(store_url))
        assert hashed.encode() in raw and secret.encode() not in raw


async def test_list_api_keys_filters(store: Store) -> None:
    alice, bob = await store.create_user(), await store.create_user()
    org = await store.create_org("Acme", alice.id)
    a1 = await make_key(store, public_id="a1", user_id=alice.id)
    a2 = await make_key(store, public_id="a2", user_id=alice.id)
    b1 = await make_key(store, public_id="b1", user_id=bob.id)
    o1 = await make_key(store, public_id="o1", org_id=org.id)
    assert await store.list_api_keys(user_id=alice.id) == [a1, a2]
    assert await store.list_api_keys(org_id=org.id) == [o1]
    assert await store.list_api_keys() == [a1, a2, b1, o1]
    assert await store.list_api_keys(user_id=alice.id, org_id=org.id) == []
    assert await store.revoke_api_key(a1.id)
    assert await store.list_api_keys(user_id=alice.id) == [a2]
    with_revoked = await store.list_api_keys(user_id=alice.id, include_revoked=True)
    assert [k.id for k in with_revoked] == [a1.id, a2.id] and with_revoked[0].revoked_at is not None


async def test_revoke_is_idempotent(store: Store) -> None:
    key = await make_key(store)
    at = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    assert await store.revoke_api_key(key.id, at=at) is True
    assert await store.revoke_api_key(key.id) is False
    revoked = await store.get_api_key(key.id)
    assert revoked is not None and revoked.revoked_at == at  # the second call did not move it
    assert not revoked.is_usable(datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(NotFound, match="key_missing"):
        await store.revoke_api_key("key_missing")


async def test_touch_api_keys_in_one_batch(store: Store) -> None:
    keys = [await make_key(store, public_id=f"t{i}") for i in range(50)]
    base = datetime(2030, 1, 1, tzinfo=UTC)
    stamps = {k.id: base + timedelta(seconds=i, microseconds=i) for i, k in enumerate(keys)}
    assert await store.touch_api_keys({**stamps, "key_unknown": base}) == 50
    for key in keys:
        row = await store.get_api_key(key.id)
        assert row is not None and row.last_used_at == stamps[key.id]
    # An older flush (another instance, out of order) never moves last use backwards.
    first = keys[0].id
    assert await store.touch_api_keys({first: base - timedelta(days=1), keys[1].id: base + timedelta(days=1)}) == 1
    assert (await store.get_api_key(first)).last_used_at == stamps[first]
    assert (await store.get_api_key(keys[1].id)).last_used_at == base + timedelta(days=1)
    assert await store.touch_api_keys({}) == 0
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.touch_api_keys({first: datetime(2030, 1, 1)})


async def test_timestamps_round_trip_in_utc(store: Store) -> None:
    key = await make_key(store)
    paris = datetime(2030, 3, 4, 16, 0, 0, 1, tzinfo=timezone(timedelta(hours=1)))
    await store.touch_api_keys({key.id: paris})
    row = await store.get_api_key(key.id)
    assert row is not None and row.last_used_at == paris
    assert row.last_used_at.utcoffset() == timedelta(0) and row.last_used_at.hour == 15


# --- opening ----------------------------------------------------------------


def test_sqlite_url_forms() -> None:
    assert parse_sqlite_url("sqlite:///data/nexgate.db") == "data/nexgate.db"
    assert parse_sqlite_url("sqlite:////var/lib/nexgate.db") == "/var/lib/nexgate.db"
    assert parse_sqlite_url("sqlite://:memory:") == ":memory:"
    for bad in ("sqlite://", "sqlite://relative.db", "postgres://x", "sqlite:///a.db?mode=ro"):
        with pytest.raises(ValueError):
            parse_sqlite_url(bad)


async def test_in_memory_sqlite_store_works() -> None:
    store = await open_store("sqlite://:memory:")
    try:
        await store.migrate()
        user = await store.create_user(name="mem")
        assert await store.get_user(user.id) == user
        assert await store.check_schema() == latest_version("sqlite")
    finally:
        await store.close()


async def test_relative_sqlite_path_is_created(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///data/nested/nexgate.db")
    try:
        await store.migrate()
        assert (tmp_path / "data" / "nested" / "nexgate.db").exists()
    finally:
        await store.close()


async def test_unknown_scheme_is_refused_without_echoing_the_url() -> None:
    with pytest.raises(ValueError, match="mysql") as info:
        await open_store("mysql://root:hunter2@db/nexgate")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_file_uses_wal(store_url: str, store: Store) -> None:
    with sqlite3.connect(parse_sqlite_url(store_url)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent, set by the store


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_tables_live_in_the_search_path_schema(store_url: str, store: Store) -> None:
    schema = re.search(r"search_path=([a-z0-9_]+)", store_url).group(1)
    conn = await asyncpg.connect(store_url.split("?")[0])
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY table_name", schema
        )
        assert [t["table_name"] for t in tables] == [
            "api_keys", "balances", "ledger_entries", "memberships", "organizations", "payment_reversals",
            "request_debits_daily", "schema_migrations", "store_changes", "unapplied_payments", "usage_daily",
            "usage_records", "users", "webhook_events",
        ]
        assert await conn.fetchval("SELECT to_regclass($1)", f"{schema}.api_keys") is not None
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_creates_a_missing_search_path_schema(store_url: str) -> None:
    missing = store_url.replace("search_path=t_", "search_path=n_")
    schema = re.search(r"search_path=([a-z0-9_]+)", missing).group(1)
    other = await open_store(missing)
    try:
        assert await other.schema_version() == 0
        assert await other.migrate() == list(range(1, latest_version("postgres") + 1))
        assert await other.check_schema() == latest_version("postgres")
    finally:
        await other.close()
        conn = await asyncpg.connect(store_url.split("?")[0])
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@pytest.mark.postgres
async def test_postgres_unreachable_is_a_store_error() -> None:
    with pytest.raises(StoreError):
        await open_store("postgresql://postgres@127.0.0.1:1/test", timeout=2)


def test_many_processes_can_open_a_new_sqlite_file_at_once(tmp_path) -> None:
    """Workers starting together all open (and switch to WAL) the same new database file."""
    import subprocess
    import sys

    script = (
        "import asyncio, sys\n"
        "from nexgate_proxy.store import open_store\n"
        "async def main():\n"
        "    store = await open_store(sys.argv[1])\n"
        "    await store.migrate()\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
    )
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", script, url], stderr=subprocess.PIPE) for _ in range(12)]
    results = [(p.wait(60), p.stderr.read().decode()) for p in procs]
    assert all(code == 0 for code, _ in results), results
