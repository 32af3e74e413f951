"""The durable store: accounts, organizations, API keys, usage and money.

`Store` is the one interface the gateway codes against; `sqlite.py` and
`postgres.py` implement it on `_sqlstore.SqlStore` (what both do alike) and the
statements of `_queries.py` (each written once, rendered per dialect at import).
Rows come back as frozen dataclasses (usage rows as `UsageRecord` named tuples)
with timezone-aware UTC datetimes, whatever the backend.

Lookups (`get_*`) return None for a missing row; operations on something that
must exist (adding a member to an unknown org, revoking an unknown key) raise
`NotFound`.

Money is exact: integer pico-USD (1 pUSD = 1e-12 USD) in Python ints and BIGINT
columns, never floats. A BIGINT holds at most 2**63 - 1 pUSD, about 9.2 million
USD (9,223,372.036854775807): the bound, either sign, of any one amount, of any
one balance and of the net change one call makes to one account. An operation
that would cross it fails as a whole with StoreError and changes nothing.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from ..records import UsageRecord

if TYPE_CHECKING:
    from .feed import ChangeFeed, StoreChange

Role = Literal["owner", "admin", "member"]
ROLES: tuple[str, ...] = ("owner", "admin", "member")

LedgerKind = Literal["payment", "debit", "refund", "dispute", "grant", "adjustment"]
LEDGER_KINDS: tuple[str, ...] = ("payment", "debit", "refund", "dispute", "grant", "adjustment")
CREDIT_KINDS: tuple[str, ...] = ("payment", "grant")
"""Kinds whose amount must be positive; a "debit" must be negative, the others may be either."""

GroupBy = Literal["day", "model", "key"]
GROUP_BYS: tuple[str, ...] = ("day", "model", "key")

PICO_PER_USD = 10**12
MAX_PICO = 2**63 - 1
"""The largest BIGINT: about 9.2 million USD. Balances and amounts stay within MIN_PICO..MAX_PICO."""
MIN_PICO = -(2**63)


# --- errors ---------------------------------------------------------------


class StoreError(Exception):
    """Any failure of the store; the other store errors derive from it."""


class NotFound(StoreError):
    """A row the operation needs does not exist."""


class Conflict(StoreError):
    """A unique value is already taken; the message names which one."""


class SchemaError(StoreError):
    """The database schema is missing, behind, or ahead of this code."""


class LastOwnerError(StoreError):
    """The operation would leave an organization without an owner."""


# --- rows -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    id: str
    external_id: str | None
    """The identity provider's user id (Clerk), when the user came from there."""
    email: str | None
    name: str | None
    created_at: datetime
    deleted_at: datetime | None = None
    suspended_at: datetime | None = None
    """Set while the account is suspended (restriction of processing): its personal keys are refused."""


@dataclass(frozen=True, slots=True)
class AnonymizedUser:
    """What `Store.anonymize_user` did (account deletion)."""

    user: User
    """The row afterwards: no email, name or external_id; deleted_at set."""
    revoked_key_ids: tuple[str, ...]
    """Keys this call revoked: the user's personal keys and the organization keys they created."""
    key_ids: tuple[str, ...]
    """Every key the user owns or created, revoked now or before: announce them all on the bus."""
    left_org_ids: tuple[str, ...]
    """Organizations whose membership this call removed."""
    cleared_ips: int
    """Usage records whose client_ip this call nulled."""
    already_deleted: bool
    """True when the user was already anonymized and this call changed nothing."""


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    name: str
    created_at: datetime
    limits: Mapping[str, Any] | None = field(default=None, hash=False)
    """Rate-limit overrides set by the operator (``rpm``, ``tpm``, ``concurrent``); None = the YAML limits apply."""


@dataclass(frozen=True, slots=True)
class Membership:
    org_id: str
    user_id: str
    role: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    public_id: str
    """The non-secret half of the key the auth path looks the row up by."""
    prefix: str
    """Short display prefix, safe to show and log."""
    secret_hash: str = field(repr=False)
    """bcrypt hash of the secret half; the plaintext is never stored. Kept out of repr."""
    name: str
    user_id: str | None
    org_id: str | None
    created_by: str | None
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    allowed_models: tuple[str, ...] | None = None
    """None means every model."""
    limits: Mapping[str, Any] | None = field(default=None, hash=False)
    owner_suspended: bool = False
    """A personal key whose user is suspended (read by get_api_key and get_api_key_by_public_id)."""

    @property
    def owner_id(self) -> str:
        """The account that pays: the user or the organization that owns the key."""
        return self.user_id or self.org_id  # type: ignore[return-value]  # CHECK: exactly one is set

    def is_usable(self, now: datetime) -> bool:
        """Not revoked and not expired at `now`."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class UsageTotal:
    group: str
    """'YYYY-MM-DD' (UTC) by day, the model alias by model, the key id by key; '' when that column is empty."""
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_pico: int
    """Sum of actual_cost_pico, what was charged (rows without a cost count as 0)."""


@dataclass(frozen=True, slots=True)
class LedgerDay:
    """The ledger entries of one account on one UTC day (of created_at), summed."""
    day: str
    """'YYYY-MM-DD'."""
    last_at: datetime
    """created_at of the day's latest entry."""
    amount_pico: int
    count: int


StatusFilter = int | range
"""A status code (402), or a range of them (range(200, 300): every 2xx; step 1)."""


@dataclass(frozen=True, slots=True)
class NewLedgerEntry:
    """A movement of money to apply.

    (source, external_id) makes it idempotent: the same pair is applied at most
    once, whatever calls carry it. Source "request" is record_usage's own.
    """

    account_id: str
    kind: str
    """One of LEDGER_KINDS."""
    amount_pico: int
    """Signed and non-zero: credits positive, debits negative."""
    source: str
    """Who says so: "stripe", "request", "admin"..."""
    external_id: str
    """The source's own id of this movement (a payment intent, a request id...)."""
    request_id: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    account_id: str
    kind: str
    amount_pico: int
    source: str
    external_id: str
    request_id: str | None
    description: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UnappliedPayment:
    """A payment credited to nobody (it named no account, or an unknown or deleted one) until the
    operator applies it to an account, once."""

    source: str
    payment_id: str
    account_hint: str | None
    """What the payment's metadata named, if anything."""
    amount_pico: int
    """The credit it buys."""
    description: str
    """The ledger description it gets when applied."""
    reason: str
    """Why it was not credited."""
    received_at: datetime
    applied_to: str | None = None
    applied_at: datetime | None = None


# --- interface ------------------------------------------------------------


class Store(abc.ABC):
    """Async access to accounts, API keys, usage and money. Open one with `open_store(url)`."""

    dialect: str
    """"sqlite" or "postgres": which migrations directory applies."""

    # schema and lifecycle

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations, one transaction each; return the versions applied."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The highest applied migration, 0 for an empty database."""

    @abc.abstractmethod
    async def check_schema(self) -> int:
        """Return the version if it is exactly the one this code knows; else raise SchemaError."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Round-trip to the database; raise StoreError when it does not answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # users

    @abc.abstractmethod
    async def create_user(
        self, *, external_id: str | None = None, email: str | None = None, name: str | None = None
    ) -> User: ...

    @abc.abstractmethod
    async def get_user(self, user_id: str) -> User | None: ...

    @abc.abstractmethod
    async def get_user_by_external_id(self, external_id: str) -> User | None: ...

    @abc.abstractmethod
    async def list_users(self, limit: int = 100, offset: int = 0, *, include_deleted: bool = False) -> list[User]: ...

    @abc.abstractmethod
    async def update_user(self, user_id: str, *, email: str | None, name: str | None) -> User:
        """Correct the user's email and name (both written; None clears one); NotFound for an unknown or
        deleted user. On SQLite the old values are overwritten in the file and the WAL is checkpointed."""

    @abc.abstractmethod
    async def set_user_suspended(self, user_id: str, suspended: bool, at: datetime | None = None) -> tuple[User, bool]:
        """Suspend (restrict) or lift the suspension of an account; (the row after, whether this call changed it).

        NotFound if unknown. Nothing else changes: keys, usage and money stay. When it changed, records an
        ``api_key`` change per unrevoked personal key so every gateway re-reads them within a second.
        """

    @abc.abstractmethod
    async def delete_user(self, user_id: str, at: datetime | None = None) -> bool:
        """Soft-delete (set deleted_at); False if already deleted, NotFound if unknown."""

    @abc.abstractmethod
    async def anonymize_user(self, user_id: str, at: datetime | None = None) -> AnonymizedUser:
        """Delete an account's personal data, in ONE transaction; NotFound if the user is unknown.

        Refuses with LastOwnerError (and changes nothing) when the user is the last owner
        of an organization. Otherwise: revokes the user's personal keys and the
        organization keys they created (and renames the personal keys, whose names are
        the user's own words, to "deleted"); removes their memberships; nulls email,
        name and external_id and sets deleted_at (kept if already set); nulls client_ip
        on the usage records of their account and of the keys they owned or created.
        The user row, its id, usage records, ledger entries and balance stay: money
        history is kept under the now anonymous id. Calling it again changes nothing
        (``already_deleted``). Records an ``api_key`` change per key it revoked and an ``org``
        change per organization it left.
        """

    # organizations

    @abc.abstractmethod
    async def create_org(self, name: str, owner_user_id: str) -> Organization:
        """Create the organization and its owner membership in one transaction."""

    @abc.abstractmethod
    async def get_org(self, org_id: str) -> Organization | None: ...

    @abc.abstractmethod
    async def list_orgs(self, limit: int = 100, offset: int = 0) -> list[Organization]: ...

    @abc.abstractmethod
    async def list_orgs_for_user(self, user_id: str) -> list[tuple[Organization, str]]:
        """The user's organizations with the user's role in each."""

    @abc.abstractmethod
    async def set_org_limits(self, org_id: str, limits: Mapping[str, Any] | None) -> Organization:
        """Replace the organization's limit overrides (None removes them); NotFound if the org is unknown.

        Returns the updated row. Records an ``org`` change (see ``feed``).
        """

    # memberships

    @abc.abstractmethod
    async def add_member(self, org_id: str, user_id: str, role: str) -> Membership:
        """Conflict if already a member; NotFound if the org or user does not exist."""

    @abc.abstractmethod
    async def set_member_role(self, org_id: str, user_id: str, role: str) -> Membership:
        """NotFound if not a member; LastOwnerError when demoting the last owner."""

    @abc.abstractmethod
    async def remove_member(self, org_id: str, user_id: str) -> bool:
        """False if not a member; LastOwnerError when removing the last owner. Records an ``org`` change."""

    @abc.abstractmethod
    async def get_role(self, org_id: str, user_id: str) -> str | None: ...

    @abc.abstractmethod
    async def list_members(self, org_id: str) -> list[Membership]: ...

    # API keys

    @abc.abstractmethod
    async def create_api_key(
        self,
        *,
        public_id: str,
        prefix: str,
        secret_hash: str,
        name: str,
        user_id: str | None = None,
        org_id: str | None = None,
        created_by: str | None = None,
        expires_at: datetime | None = None,
        allowed_models: list[str] | tuple[str, ...] | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> ApiKeyRow:
        """Exactly one of user_id / org_id. `secret_hash` is a bcrypt hash, never the secret."""

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> ApiKeyRow | None: ...

    @abc.abstractmethod
    async def get_api_key_by_public_id(self, public_id: str) -> ApiKeyRow | None:
        """The auth path's lookup on a cache miss: one indexed query. Returns revoked keys too."""

    @abc.abstractmethod
    async def list_api_keys(
        self, *, user_id: str | None = None, org_id: str | None = None, include_revoked: bool = False
    ) -> list[ApiKeyRow]:
        """Keys of the user and/or org given (all keys when neither), oldest first."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str, at: datetime | None = None) -> bool:
        """True if this call revoked it, False if it was already revoked; NotFound if unknown.

        Records an ``api_key`` change when it revoked it.
        """

    @abc.abstractmethod
    async def touch_api_keys(self, last_used: Mapping[str, datetime]) -> int:
        """Batch-record last use, in one transaction. Never moves last_used_at backwards.

        Returns how many rows changed; unknown ids are ignored.
        """

    # usage

    @abc.abstractmethod
    async def record_usage(self, rows: Sequence[UsageRecord]) -> int:
        """Store a batch of usage records and debit their cost, all in ONE transaction.

        A row whose request_id is already stored is skipped. The newly stored rows with an
        account_id and a positive actual_cost_pico are charged with ONE ledger entry per account
        (account_id, "debit", minus the sum of their costs, source "request", external_id and
        request_id = the first of their request ids, description "N requests"); each row names
        it (``debited_requests`` lists a debit's rows). A row whose request id has a "request"
        entry already (a per-request debit from before migration 0008) is not charged again.
        Replaying a batch, even concurrently from two processes, changes nothing: replayed rows
        are not stored, so not charged. Returns how many rows were new; the first of two rows
        with the same request_id wins. In the same transaction, the newly stored rows are added
        to the daily totals (usage_daily) and their costs to the per-day debit sums
        (request_debits_daily, whose ``entries`` counts requests).
        A bad row (naive ts, a cost that is not a non-negative int,
        a count outside 0..2**31-1) raises ValueError/TypeError before anything is written.
        """

    @abc.abstractmethod
    async def debited_requests(self, account_id: str, ledger_id: int) -> list[tuple[str, int]]:
        """The (request_id, actual_cost_pico) of the stored usage rows the account's "request" debit
        ``ledger_id`` charged, by request id (an audit: their costs sum to minus its amount, until the
        roll-up deletes rows)."""

    @abc.abstractmethod
    async def list_usage(
        self,
        *,
        account_id: str | None = None,
        org_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        status: StatusFilter | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[UsageRecord]:
        """Newest first. Filters combine with AND; since is inclusive, until exclusive; ``status``
        one code or a range of codes (StatusFilter; ValueError for anything else).

        At least one of account_id / org_id / key_id is required (ValueError otherwise).
        """

    @abc.abstractmethod
    async def usage_totals(
        self,
        *,
        account_id: str | None = None,
        org_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: GroupBy,
    ) -> list[UsageTotal]:
        """Totals per UTC day, model or key, ordered by group; filters as in list_usage.

        Without account_id / org_id / key_id it totals every account (admin use). Whole UTC days
        are read from the daily totals record_usage keeps (usage_daily), only the partial days
        at the edges of since/until from the rows themselves.
        """

    @abc.abstractmethod
    async def usage_by_day_and_model(
        self, *, account_id: str, since: date, until: date | None = None
    ) -> list[tuple[str, UsageTotal]]:
        """The account's totals per (UTC day 'YYYY-MM-DD', model) of the days since..until (excluded),
        from the daily totals: (day, total whose group is the model, '' for none), ordered."""

    @abc.abstractmethod
    async def clear_client_ips(self, before: datetime) -> int:
        """Null client_ip on usage records older than `before`; return how many changed.

        The data-retention job: no other column is touched.
        """

    @abc.abstractmethod
    async def delete_rolled_up_usage(self, before: date, limit: int) -> int:
        """Delete at most ``limit`` usage records of UTC days before ``before`` whose day is in
        usage_daily (record_usage keeps it in the same transaction, so it always is); return how many.

        The usage roll-up job (usage.rollup_after_days): usage_daily, request_debits_daily and the
        ledger are not touched. Idempotent: concurrent runs delete each row once.
        """

    # money

    @abc.abstractmethod
    async def apply_ledger_entry(self, entry: NewLedgerEntry) -> bool:
        """Append the entry and move the balance, in one transaction.

        False (and no change) when its (source, external_id) was already applied.
        ValueError for an unknown kind, a zero amount or a sign the kind forbids,
        TypeError for a non-int amount. Every applied entry but a request's own debit
        (record_usage) records a ``credit`` change with its amount and ledger id; so does
        apply_webhook.
        """

    @abc.abstractmethod
    async def apply_webhook(
        self, source: str, event_id: str, event_type: str, entries: Sequence[NewLedgerEntry]
    ) -> bool:
        """Record a payment provider's event and apply its entries, in ONE transaction.

        False (and no change) when (source, event_id) was seen before. An entry whose
        (source, external_id) was already applied (by another event carrying the same
        payment) is skipped. True when the event was new.
        """

    @abc.abstractmethod
    async def get_balance(self, account_id: str) -> int:
        """The running balance in pico-USD; 0 for an account with no entries."""

    @abc.abstractmethod
    async def balance_snapshot(self, account_id: str) -> tuple[int, int]:
        """(balance, position), read together: the balance includes exactly the changes up to that feed position.

        A cached balance is then raised by the ``credit`` changes after it, and by no other.
        """

    @abc.abstractmethod
    async def ledger_sum(self, account_id: str) -> int:
        """SUM of the account's ledger entries: always equal to get_balance (an invariant check)."""

    @abc.abstractmethod
    async def get_ledger_entry(self, source: str, external_id: str) -> LedgerEntry | None:
        """The entry booked under (source, external_id), e.g. the credit of a payment; one indexed query."""

    @abc.abstractmethod
    async def list_ledger(
        self,
        account_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        without_request_debits: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> list[LedgerEntry]:
        """The account's entries, newest first; since is inclusive, until exclusive (on created_at).

        ``without_request_debits``: leave out record_usage's own debits (source "request"), one per
        request, to list the few other entries (an index holds only those)."""

    @abc.abstractmethod
    async def ledger_snapshot(self, account_id: str, *, since: datetime) -> tuple[int, int, list[LedgerDay]]:
        """In one snapshot: the account's balance, the id of the entry list_ledger shows first (0 for
        none) and record_usage's debits summed per UTC day of created_at, from since's day on
        (request_debits_daily, kept in record_usage's transaction), oldest first."""

    @abc.abstractmethod
    async def ledger_days(
        self,
        account_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        up_to_id: int | None = None,
        without_request_debits: bool = False,
    ) -> list[LedgerDay]:
        """The account's entries summed per UTC day of created_at (exact, in SQL), oldest first.

        ``up_to_id``: only entries with ids up to it; ``without_request_debits`` as in list_ledger."""

    # payments: reversals and unapplied payments

    @abc.abstractmethod
    async def get_payment_reversed(self, source: str, payment_id: str) -> tuple[int, int]:
        """(minor units, pico-USD) the payment's refunds and disputes took back so far; (0, 0) for none."""

    @abc.abstractmethod
    async def apply_reversal(self, entry: NewLedgerEntry, payment_id: str, before: tuple[int, int],
                             after: tuple[int, int]) -> bool:
        """Apply a refund's or dispute's debit and move the payment's reversed total from ``before`` to
        ``after`` (see get_payment_reversed), in ONE transaction; ``entry.source`` is the payment's.

        False (and no change) when the entry was applied before. Conflict (and no change) when the
        total is no longer ``before``: a concurrent reversal came first, compute again.
        """

    @abc.abstractmethod
    async def hold_payment(self, payment: UnappliedPayment) -> bool:
        """Record a payment credited to nobody; False when (source, payment_id) is held already."""

    @abc.abstractmethod
    async def list_unapplied_payments(self, *, include_applied: bool = False, limit: int = 100,
                                      offset: int = 0) -> list[UnappliedPayment]:
        """Held payments, oldest first: the open ones, or all with include_applied."""

    @abc.abstractmethod
    async def get_unapplied_payment(self, source: str, payment_id: str) -> UnappliedPayment | None: ...

    @abc.abstractmethod
    async def apply_unapplied_payment(self, source: str, payment_id: str, entry: NewLedgerEntry) -> bool:
        """Credit a held payment with ``entry`` (to its account) and mark it applied, in ONE transaction.

        False (and no change) when it was applied before; NotFound when no such payment is held.
        """

    # change feed (see ``feed``)

    @abc.abstractmethod
    def change_feed(self) -> ChangeFeed:
        """A new feed of this store's changes, not started yet."""

    @abc.abstractmethod
    async def latest_change_id(self) -> int:
        """The id of the newest change (0 when none): a feed starting now reads what comes after it."""

    @abc.abstractmethod
    async def changes_since(self, after: int, limit: int) -> list[StoreChange]:
        """The changes with an id greater than ``after``, oldest first, at most ``limit``."""

    @abc.abstractmethod
    async def prune_changes(self, older_than: timedelta) -> int:
        """Delete changes older than that (by the database's clock), always keeping the newest; how many."""
