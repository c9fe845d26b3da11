"""The one read path into the gateway's SQLite file: the read-only connection factory and Reader's named queries."""

from __future__ import annotations

import sqlite3

import pytest

from gateway.store import connect_read_only


def test_a_read_only_connection_opens_the_file_named_even_with_uri_characters(tmp_path):
    """'#', '?' and '%' in a path are URI syntax: pasted into ``file:...?mode=ro`` they name another file."""
    path = tmp_path / "site #1?50%20.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (a)")
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    reader = connect_read_only(path)
    assert reader.execute("SELECT a FROM t").fetchall() == [(1,)]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("INSERT INTO t VALUES (2)")
    reader.close()


def test_a_read_only_connection_never_creates_the_file(tmp_path):
    with pytest.raises(sqlite3.OperationalError):
        connect_read_only(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
