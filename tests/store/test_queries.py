"""The statement renderer both backends share: `:name` markers -> `?N` / `$N`, checked at import."""

from __future__ import annotations

import sqlite3

import pytest

from nexgate_proxy.store._queries import sql


def test_numbers_markers_in_order_of_first_use_for_both_dialects() -> None:
    query = sql("UPDATE t SET a = :when WHERE id = :id AND (b = :id OR c < :when) AND d = :name",
                "when", "id", "name")
    assert query.postgres == "UPDATE t SET a = $1 WHERE id = $2 AND (b = $2 OR c < $1) AND d = $3"
    assert query.sqlite == "UPDATE t SET a = ?1 WHERE id = ?2 AND (b = ?2 OR c < ?1) AND d = ?3"


def test_leaves_postgres_casts_and_marker_free_statements_alone() -> None:
    assert sql("SELECT :x::text[], 'a'", "x").postgres == "SELECT $1::text[], 'a'"
    assert sql("SELECT COUNT(*) FROM t") == ("SELECT COUNT(*) FROM t", "SELECT COUNT(*) FROM t")


def test_rejects_a_marker_it_was_not_told_of() -> None:
    with pytest.raises(ValueError, match="unknown marker :user"):
        sql("SELECT 1 FROM t WHERE id = :id AND owner = :user", "id")


def test_rejects_parameters_out_of_first_use_order_or_unused() -> None:
    with pytest.raises(ValueError, match="order of first use"):
        sql("SELECT 1 FROM t WHERE a = :a AND b = :b", "b", "a")
    with pytest.raises(ValueError, match="order of first use"):
        sql("SELECT 1 FROM t WHERE a = :a", "a", "b")


def test_sqlite_binds_a_repeated_marker_once_from_a_positional_tuple() -> None:
    query = sql("SELECT :name || '-' || :id || '-' || :name", "name", "id")
    with sqlite3.connect(":memory:") as conn:
        assert conn.execute(query.sqlite, ("n", "i")).fetchone() == ("n-i-n",)
