"""Operator commands: ``nexgate db|users|orgs|keys|retention ...``, straight against the store.

``register(subparsers)`` adds them to the ``nexgate`` command (nexgate_proxy.cli).

Every command takes ``--config PATH`` (default: ``$NEXGATE_CONFIG``,
``./nexgate.yaml``, ``./config/nexgate.yaml``) or ``--storage-url URL``, and
``--json`` for machine-readable output (the admin API's JSON shapes). Errors
print one line and exit with 1; never a traceback. What ``keys revoke``,
``orgs remove-member``, ``users delete`` (account deletion: see ``privacy``)
and ``orgs limits`` change is recorded in the store with the change itself:
every running gateway learns of it from its change feed within a second, on
every deployment.
``users update`` corrects a user's email or name, ``users suspend`` / ``users unsuspend``
restrict an account's processing (its keys are refused, nothing is deleted; running gateways
learn of it from the feed like a revocation); ``users export`` writes a user's data as JSON or a zip of CSVs, and
``retention run`` clears client IPs older than ``privacy.ip_retention_days``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

from nexgate_proxy.clikit import (
    CliError, Env, add_command, emit, option_parents, paging_options, table,
)
from nexgate_proxy.store import ROLES, NotFound, Store, latest_version

def _views() -> Any:
    from . import api  # the admin API's JSON shapes and account rules

    return api


async def _existing_user(store: Store, user_id: str) -> Any:
    user = await store.get_user(user_id)
    if user is None or user.deleted_at is not None:
        raise CliError(f"no such user: {user_id}")
    return user


async def _existing_org(store: Store, org_id: str) -> Any:
    org = await store.get_org(org_id)
    if org is None:
        raise CliError(f"no such organization: {org_id}")
    return org


# ----------------------------------------------------------------- commands


async def _db_migrate(env: Env, store: Store) -> int:
    applied = await store.migrate()
    version = await store.schema_version()
    message = (f"Applied migration(s) {', '.join(map(str, applied))}; the database is at version {version}."
               if applied else f"The database is up to date (version {version}).")
    emit(env, {"applied": applied, "version": version}, message)
    return 0


async def _db_status(env: Env, store: Store) -> int:
    version = await store.schema_version()
    latest = latest_version(store.dialect)
    pending = list(range(version + 1, latest + 1))
    if version > latest:
        state = f"newer than this NexGate knows (version {version} > {latest}): upgrade NexGate"
    elif pending:
        state = f"{len(pending)} migration(s) pending: run `nexgate db migrate`"
    else:
        state = "up to date"
    emit(env, {"backend": store.dialect, "version": version, "latest": latest, "pending": pending,
                "up_to_date": version == latest},
         [f"backend: {store.dialect}", f"schema version: {version} (this NexGate: {latest})", f"status: {state}"])
    return 0


async def _users_create(env: Env, store: Store) -> int:
    args = env.args
    if args.email is not None and "@" not in args.email:
        raise CliError(f"--email {args.email!r} is not an email address")
    user = await store.create_user(external_id=args.external_id, email=args.email, name=args.name)
    emit(env, _views().user_json(user), f"Created user {user.id}" + (f" <{user.email}>" if user.email else ""))
    return 0


async def _users_list(env: Env, store: Store) -> int:
    users = await store.list_users(env.args.limit, env.args.offset, include_deleted=env.args.include_deleted)
    data = [_views().user_json(u) for u in users]
    emit(env, data, table(data, [("id", "ID"), ("email", "EMAIL"), ("name", "NAME"),
                                   ("external_id", "EXTERNAL ID"), ("created_at", "CREATED")]))
    return 0


async def _orgs_create(env: Env, store: Store) -> int:
    name = env.args.name.strip()
    if not name:
        raise CliError("--name must not be empty")
    owner = await _existing_user(store, env.args.owner)
    org = await store.create_org(name, owner.id)
    emit(env, {**_views().org_json(org), "owner_user_id": owner.id},
         f"Created organization {org.id} ({org.name}), owned by {owner.id}")
    return 0


async def _orgs_list(env: Env, store: Store) -> int:
    views = _views()
    if env.args.user:
        await _existing_user(store, env.args.user)
        data = [views.org_json(org, role) for org, role in await store.list_orgs_for_user(env.args.user)]
        columns = [("id", "ID"), ("name", "NAME"), ("role", "ROLE"), ("created_at", "CREATED")]
    else:
        data = [views.org_json(org) for org in await store.list_orgs(env.args.limit, env.args.offset)]
        columns = [("id", "ID"), ("name", "NAME"), ("created_at", "CREATED")]
    emit(env, data, table(data, columns))
    return 0


async def _orgs_add_member(env: Env, store: Store) -> int:
    org = await _existing_org(store, env.args.org_id)
    user = await _existing_user(store, env.args.user_id)
    membership = await store.add_member(org.id, user.id, env.args.role)
    emit(env, _views().member_json(membership, user), f"Added {user.id} to {org.id} as {membership.role}")
    return 0


async def _orgs_remove_member(env: Env, store: Store) -> int:
    org = await _existing_org(store, env.args.org_id)
    user_id = env.args.user_id
    revoked = await _views().remove_member(store, None, org.id, user_id)
    if revoked is None:
        raise CliError(f"{user_id} is not a member of {org.id}")
    lines = [f"Removed {user_id} from {org.id}"]
    if revoked:
        lines.append(f"Revoked the organization keys they created: {', '.join(revoked)}")
    emit(env, {"object": "organization.member.deleted", "org_id": org.id, "user_id": user_id, "deleted": True,
                "revoked_key_ids": revoked}, lines)
    return 0


def _org_limits_argument(env: Env) -> dict[str, Any] | None:
    """--limits JSON or --clear, checked by the admin API's rules (unknown names are refused)."""
    from nexgate_proxy import GatewayError

    if env.args.clear:
        return None
    try:
        raw = json.loads(env.args.limits)
    except ValueError:
        raise CliError("--limits must be a JSON object, e.g. '{\"rpm\": 600}'") from None
    if not isinstance(raw, dict):
        raise CliError("--limits must be a JSON object, e.g. '{\"rpm\": 600}'")
    try:
        return _views().parse_org_limits(raw)
    except GatewayError as exc:
        raise CliError(f"--limits: {exc.message}") from None


async def _orgs_limits(env: Env, store: Store) -> int:
    from nexgate_proxy.accounts import set_org_limits

    limits = _org_limits_argument(env)
    org = await _existing_org(store, env.args.org_id)
    updated = await set_org_limits(store, None, org.id, limits)
    shown = json.dumps(dict(updated.limits), sort_keys=True) if updated.limits else None
    emit(env, _views().org_json(updated),
         f"Set the limits of {org.id} to {shown}" if shown else
         f"Removed the limit overrides of {org.id}: the config's limits apply")
    return 0


async def _keys_create(env: Env, store: Store) -> int:
    from nexgate_plugins.auth.settings import AUTH_SECTION

    from nexgate_proxy.accounts import create_api_key

    args = env.args
    views = _views()
    expires_at = None
    if args.expires_at is not None:
        try:
            expires_at = views.parse_expires_at(args.expires_at)
        except ValueError as exc:
            raise CliError(f"--expires-at {exc}") from None
    limits = None
    if args.limits is not None:
        try:
            limits = json.loads(args.limits)
        except ValueError:
            raise CliError("--limits must be a JSON object, e.g. '{\"rpm\": 60}'") from None
        if not isinstance(limits, dict):
            raise CliError("--limits must be a JSON object, e.g. '{\"rpm\": 60}'")
    name = args.name.strip()
    if not name:
        raise CliError("--name must not be empty")
    if args.user:
        owner: dict[str, str] = {"user_id": (await _existing_user(store, args.user)).id}
    else:
        owner = {"org_id": (await _existing_org(store, args.org)).id}
    rounds = env.config.section(AUTH_SECTION).bcrypt_rounds if env.config else None
    created = await create_api_key(store, name=name, **owner, expires_at=expires_at,
                                   allowed_models=args.allowed_model or None, limits=limits,
                                   **({"bcrypt_rounds": rounds} if rounds else {}))
    body = {**views.key_json(created.row), "key": created.plaintext}
    whose = f"user {args.user}" if args.user else f"organization {args.org}"
    emit(env, body, [f"Created API key {created.row.id} ({name}) for {whose}.",
                      "The key, shown this once (store it now):", created.plaintext])
    return 0


async def _keys_list(env: Env, store: Store) -> int:
    args = env.args
    if args.user:
        await _existing_user(store, args.user)
    if args.org:
        await _existing_org(store, args.org)
    rows = await store.list_api_keys(user_id=args.user, org_id=args.org, include_revoked=args.include_revoked)
    data = [_views().key_json(r) for r in rows]
    shown = [{**item, "owner": item["user_id"] or item["org_id"]} for item in data]
    emit(env, data, table(shown, [("id", "ID"), ("name", "NAME"), ("prefix", "PREFIX"), ("owner", "OWNER"),
                                   ("created_at", "CREATED"), ("last_used_at", "LAST USED"),
                                   ("expires_at", "EXPIRES"), ("revoked_at", "REVOKED")]))
    return 0


async def _keys_revoke(env: Env, store: Store) -> int:
    from nexgate_proxy.accounts import revoke_api_key

    key_id = env.args.key_id
    if await store.get_api_key(key_id) is None:
        raise CliError(f"no such API key: {key_id}")
    newly = await revoke_api_key(store, None, key_id)
    row = await store.get_api_key(key_id)
    emit(env, _views().key_json(row) if row else {"id": key_id},
         f"Revoked API key {key_id}" if newly else f"API key {key_id} was already revoked")
    return 0


async def _users_delete(env: Env, store: Store) -> int:
    from .privacy import delete_account, deletion_json

    user_id = env.args.user_id
    if not env.args.yes:
        raise CliError(f"deleting {user_id} anonymizes the account and revokes its keys; it cannot be undone: "
                       "pass --yes")
    if await store.get_user(user_id) is None:
        raise CliError(f"no such user: {user_id}")
    result = await delete_account(store, None, user_id)
    if result.already_deleted:
        lines = [f"User {user_id} was already deleted; nothing changed."]
    else:
        lines = [f"Deleted user {user_id}: email, name and external id cleared; usage, ledger and balance kept "
                 "under the anonymous id."]
        if result.revoked_key_ids:
            lines.append(f"Revoked keys: {', '.join(result.revoked_key_ids)}")
        if result.left_org_ids:
            lines.append(f"Left organizations: {', '.join(result.left_org_ids)}")
        if result.cleared_ips:
            lines.append(f"Cleared the client IP of {result.cleared_ips} usage records.")
    emit(env, deletion_json(result), lines)
    return 0


async def _users_update(env: Env, store: Store) -> int:
    from .privacy import correct_user, profile_value

    args = env.args
    changes: dict[str, str | None] = {}
    for field, value, clear in (("email", args.email, args.clear_email), ("name", args.name, args.clear_name)):
        if value is not None and clear:
            raise CliError(f"give --{field} or --clear-{field}, not both")
        if value is not None or clear:
            try:
                changes[field] = profile_value(field, value)
            except ValueError as exc:
                raise CliError(f"--{field}: {exc}") from None
    if not changes:
        raise CliError("nothing to change: give --email, --name, --clear-email or --clear-name")
    user = await correct_user(store, await _existing_user(store, args.user_id), changes)
    emit(env, _views().user_json(user), f"Updated user {user.id}: " + ", ".join(
        f"{field} {'cleared' if getattr(user, field) is None else repr(getattr(user, field))}" for field in changes))
    return 0


async def _users_suspend(env: Env, store: Store) -> int:
    from .privacy import suspend_account

    suspended = env.args.users_command == "suspend"
    user_id = env.args.user_id
    if await store.get_user(user_id) is None:
        raise CliError(f"no such user: {user_id}")
    user, changed = await suspend_account(store, None, user_id, suspended)
    if suspended:
        message = (f"Suspended user {user_id}: their API keys are refused on every gateway within a second; "
                   "nothing is deleted." if changed else f"User {user_id} was already suspended; nothing changed.")
    else:
        message = (f"Lifted the suspension of user {user_id}: their API keys work again." if changed
                   else f"User {user_id} was not suspended; nothing changed.")
    emit(env, {**_views().user_json(user), "changed": changed}, message)
    return 0


def _write_private(path: str, data: bytes) -> None:
    """Write personal data readable by the owner only; replace the file whole, never half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


async def _users_export(env: Env, store: Store) -> int:
    from .privacy import build_export, export_csv_zip, export_json_bytes

    args = env.args
    output = args.output
    if args.format == "csv" and output in (None, "-"):
        raise CliError("--format csv writes a zip: pass --output FILE")
    try:
        document = await build_export(store, args.user_id)
    except NotFound:
        raise CliError(f"no such user: {args.user_id}") from None
    data = export_json_bytes(document) if args.format == "json" else export_csv_zip(document)
    if output in (None, "-"):
        sys.stdout.write(data.decode("utf-8"))
        return 0
    _write_private(output, data)
    summary = {"object": "user.export.written", "user_id": args.user_id, "format": args.format, "output": output,
               "bytes": len(data), "usage_records": len(document["usage"]), "ledger_entries": len(document["ledger"])}
    emit(env, summary, f"Wrote the data of {args.user_id} to {output} ({args.format}, {len(data)} bytes: "
                        f"{len(document['usage'])} usage records, {len(document['ledger'])} ledger entries).")
    return 0


# ------------------------------------------------------------------- parser


def register(subparsers: Any) -> None:
    """Add the db, users, orgs, keys and retention commands to the `nexgate` argparse subparsers."""
    common, _ = option_parents("")

    db = subparsers.add_parser("db", help="the account database's schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    add_command(db_sub, "migrate", "apply pending schema migrations (creates a SQLite file)", _db_migrate, common,
                creating=True, checked=False)
    add_command(db_sub, "status", "show the schema version and pending migrations", _db_status, common, checked=False)

    users = subparsers.add_parser("users", help="manage users")
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    p = add_command(users_sub, "create", "create a user", _users_create, common)
    p.add_argument("--email")
    p.add_argument("--name")
    p.add_argument("--external-id", help="the identity provider's user id (Clerk `sub`)")
    p = add_command(users_sub, "list", "list users", _users_list, common)
    paging_options(p)
    p.add_argument("--include-deleted", action="store_true")
    p = add_command(users_sub, "delete", "delete an account: revoke its keys, leave its organizations, clear its "
                    "personal data (usage and ledger stay, anonymous); idempotent", _users_delete, common)
    p.add_argument("user_id")
    p.add_argument("--yes", action="store_true", help="confirm: the deletion cannot be undone")
    p = add_command(users_sub, "update", "correct a user's email or name", _users_update, common)
    p.add_argument("user_id")
    p.add_argument("--email")
    p.add_argument("--name")
    p.add_argument("--clear-email", action="store_true", help="remove the stored email")
    p.add_argument("--clear-name", action="store_true", help="remove the stored name")
    for command, text in (("suspend", "suspend an account (restriction of processing): its API keys are refused "
                                      "on every gateway within a second; nothing is deleted; reversible"),
                          ("unsuspend", "lift an account's suspension: its API keys work again")):
        p = add_command(users_sub, command, text, _users_suspend, common)
        p.add_argument("user_id")
    p = add_command(users_sub, "export", "write everything stored about a user's personal account", _users_export,
                    common)
    p.add_argument("user_id")
    p.add_argument("--format", choices=("json", "csv"), default="json",
                   help="json: one document; csv: a zip of one CSV per section")
    p.add_argument("--output", metavar="FILE", help="where to write it, mode 0600 (json: default standard output)")

    orgs = subparsers.add_parser("orgs", help="manage organizations and their members")
    orgs_sub = orgs.add_subparsers(dest="orgs_command", required=True, metavar="COMMAND")
    p = add_command(orgs_sub, "create", "create an organization with its owner", _orgs_create, common)
    p.add_argument("--name", required=True)
    p.add_argument("--owner", required=True, metavar="USER_ID", help="the user who owns it")
    p = add_command(orgs_sub, "list", "list organizations (all, or one user's with their role)", _orgs_list, common)
    p.add_argument("--user", metavar="USER_ID", help="only this user's organizations")
    paging_options(p)
    p = add_command(orgs_sub, "add-member", "add a user to an organization", _orgs_add_member, common)
    p.add_argument("org_id")
    p.add_argument("user_id")
    p.add_argument("--role", choices=ROLES, default="member")
    p = add_command(orgs_sub, "remove-member",
                    "remove a member; revokes the organization keys they created", _orgs_remove_member, common)
    p.add_argument("org_id")
    p.add_argument("user_id")
    p = add_command(orgs_sub, "limits", "set or remove an organization's rate-limit overrides (over the config's "
                    "limits.orgs and limits.org); running gateways apply them within a second", _orgs_limits, common)
    p.add_argument("org_id")
    change = p.add_mutually_exclusive_group(required=True)
    change.add_argument("--limits", metavar="JSON",
                        help="the overrides as a JSON object, replacing any before, e.g. '{\"rpm\": 600, "
                             "\"tpm\": 200000, \"concurrent\": 20}' (0 = no limit)")
    change.add_argument("--clear", action="store_true", help="remove the overrides")

    keys = subparsers.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    p = add_command(keys_sub, "create", "create an API key and print it once", _keys_create, common)
    p.add_argument("--name", required=True)
    owner = p.add_mutually_exclusive_group(required=True)
    owner.add_argument("--user", metavar="USER_ID", help="a personal key of this user")
    owner.add_argument("--org", metavar="ORG_ID", help="a key of this organization")
    p.add_argument("--expires-at", metavar="ISO8601", help="e.g. 2030-01-31T00:00:00Z (needs a timezone)")
    p.add_argument("--allowed-model", action="append", metavar="MODEL",
                   help="a model alias the key may use (repeat; default: every model)")
    p.add_argument("--limits", metavar="JSON", help="limit overrides as a JSON object")
    p = add_command(keys_sub, "list", "list API keys (metadata only)", _keys_list, common)
    owner = p.add_mutually_exclusive_group()
    owner.add_argument("--user", metavar="USER_ID")
    owner.add_argument("--org", metavar="ORG_ID")
    p.add_argument("--include-revoked", action="store_true")
    p = add_command(keys_sub, "revoke", "revoke an API key (every running gateway refuses it within a second)",
                    _keys_revoke, common)
    p.add_argument("key_id")

