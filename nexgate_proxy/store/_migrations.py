"""Numbered SQL migrations shipped as package files, one directory per dialect.

`migrations/<dialect>/NNNN_name.sql`: versions are the leading number, applied in
order, each exactly once. Never edit a released file; add the next number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from .base import SchemaError

_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    folder = resources.files(__package__).joinpath("migrations", dialect)
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise SchemaError(f"two {dialect} migrations share version {version}")
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"{dialect} migrations must be numbered 1..N without gaps, found {versions}")
    return tuple(found[v] for v in versions)


def latest_version(dialect: str) -> int:
    migrations = load_migrations(dialect)
    return migrations[-1].version if migrations else 0


def check_version(current: int, dialect: str) -> int:
    """The check shared by check_schema in both backends."""
    refuse_newer(current, dialect)
    known = latest_version(dialect)
    if current == 0:
        raise SchemaError("the database is not migrated yet: run `nexgate db migrate`")
    if current < known:
        raise SchemaError(
            f"database schema is at version {current}, this NexGate needs {known}: run `nexgate db migrate`"
        )
    return current


def refuse_newer(current: int, dialect: str) -> None:
    """migrate() must not touch a database a newer NexGate already upgraded."""
    known = latest_version(dialect)
    if current > known:
        raise SchemaError(
            f"database schema is at version {current} but this NexGate knows up to {known}: upgrade NexGate"
        )
