"""The results store: one SQLite file (WAL) plus an artifacts folder beside it.

The store is the single source of truth of a sweep. A run is keyed by a hash of its resolved
config (seed and data fingerprint included); it is *claimed* before training so two sweeps on
the same store never train the same run twice, written atomically when done, and a run whose
owner died (SIGKILL, power loss) is reclaimed on the next start and resumes from its epoch
checkpoint. Records are JSON documents under stable snake_case keys (see ``docs``/README).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medtune.errors import StoreError

__all__ = ["ResultsStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL, config TEXT NOT NULL, record TEXT,
    owner TEXT, heartbeat REAL, created TEXT NOT NULL, updated TEXT NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS attacks (attack_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, record TEXT NOT NULL,
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS searches (search_id TEXT PRIMARY KEY, record TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS genomes (key TEXT PRIMARY KEY, value TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SCHEMA_VERSION = "1"
STALE_SECONDS = 1800.0


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None, heartbeat: float | None, stale_seconds: float) -> bool:
    """Whether the process that claimed a run may still be working on it."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return heartbeat is not None and time.time() - heartbeat < stale_seconds


class ResultsStore:
    """A results store rooted at a folder: ``medtune.sqlite``, ``artifacts/``, ``checkpoints/``.

    Args:
        root: the store folder; created if missing.

    Raises:
        StoreError: the folder cannot be created or written, or ``medtune.sqlite`` is not a
            medtune store (not SQLite, or another schema), or the database stays locked.
    """

    def __init__(self, root: str | Path, *, timeout: float = 30.0) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "artifacts").mkdir(exist_ok=True)
            (self.root / "checkpoints").mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the results store folder {str(self.root)!r}: {exc.strerror}; "
                             "choose a writable --store.") from None
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"The results store folder {str(self.root)!r} is not writable; choose a writable --store.")
        self.path = self.root / "medtune.sqlite"
        try:
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise StoreError(f"{self.path} has results schema {row[0]}, this medtune reads {_SCHEMA_VERSION}; "
                                 "use another --store.")
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            if "locked" in msg or "busy" in msg:
                raise StoreError(f"The results store {str(self.path)!r} is locked by another process; "
                                 "wait for it or use another --store.") from None
            raise StoreError(f"{str(self.path)!r} is not a medtune results store ({msg}); "
                             "move it away or choose another --store.") from None

    # -- plumbing ----------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"The results store {str(self.path)!r} is locked ({exc}); "
                             "wait for the other process or use another --store.") from None
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    def run_dir(self, run_id: str) -> Path:
        """The artifacts folder of a run (created on demand)."""
        path = self.root / "artifacts" / run_id
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the artifacts folder {str(path)!r} ({exc.strerror or exc}); "
                             "move the file that is in its way and run the same command again.") from None
        return path

    def checkpoint_path(self, run_id: str) -> Path:
        return self.root / "checkpoints" / f"{run_id}.pt"

    # -- runs --------------------------------------------------------------------------------
    def claim(self, run_id: str, config: dict[str, Any], *, stale_seconds: float = STALE_SECONDS) -> bool:
        """Claim a run for this process; False if it is done or another live process holds it."""
        with self._transaction() as conn:
            row = conn.execute("SELECT status, owner, heartbeat FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is not None:
                status, owner, heartbeat = row
                if status == "done":
                    return False
                if status == "running" and owner != _owner_id() and _owner_alive(owner, heartbeat, stale_seconds):
                    return False
            now = _now()
            conn.execute(
                "INSERT INTO runs (run_id, status, config, owner, heartbeat, created, updated) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET status='running', "
                "owner=excluded.owner, heartbeat=excluded.heartbeat, updated=excluded.updated, error=NULL",
                (run_id, json.dumps(config, sort_keys=True), _owner_id(), time.time(), now, now),
            )
        return True

    def heartbeat(self, run_id: str) -> None:
        self._conn.execute("UPDATE runs SET heartbeat=? WHERE run_id=? AND owner=?", (time.time(), run_id, _owner_id()))

    def finish(self, run_id: str, record: dict[str, Any]) -> None:
        """Write a finished run's record (one atomic transaction)."""
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET status='done', record=?, updated=?, error=NULL WHERE run_id=?",
                         (json.dumps(record, sort_keys=True, allow_nan=True), _now(), run_id))

    def fail(self, run_id: str, error: str) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET status='failed', error=?, updated=?, owner=NULL WHERE run_id=?",
                         (error, _now(), run_id))

    def release(self, run_id: str) -> None:
        """Give a claimed run back (e.g. after Ctrl-C) so the next start resumes it."""
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET status='pending', owner=NULL, updated=? WHERE run_id=? AND status='running'",
                         (_now(), run_id))

    def status(self, run_id: str) -> str | None:
        row = self._conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else None

    def get(self, run_id: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT record FROM runs WHERE run_id=? AND status='done'", (run_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def runs(self, status: str | None = "done") -> list[dict[str, Any]]:
        """Finished run records (or, with ``status=None``, one status row per run)."""
        if status == "done":
            rows = self._conn.execute("SELECT record FROM runs WHERE status='done' ORDER BY rowid").fetchall()
            return [json.loads(r[0]) for r in rows]
        query = "SELECT run_id, status, owner, created, updated, error, config FROM runs"
        args: tuple = ()
        if status is not None:
            query, args = query + " WHERE status=?", (status,)
        rows = self._conn.execute(query + " ORDER BY rowid", args).fetchall()
        keys = ("run_id", "status", "owner", "created", "updated", "error", "config")
        return [{**dict(zip(keys, r)), "config": json.loads(r[6])} for r in rows]

    # -- attacks, searches, genome cache -----------------------------------------------------
    def put_attack(self, attack_id: str, run_id: str, record: dict[str, Any]) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO attacks VALUES (?, ?, ?, ?)",
                         (attack_id, run_id, json.dumps(record, sort_keys=True), _now()))

    def attacks(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            rows = self._conn.execute("SELECT record FROM attacks ORDER BY rowid").fetchall()
        else:
            rows = self._conn.execute("SELECT record FROM attacks WHERE run_id=? ORDER BY rowid", (run_id,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def put_search(self, search_id: str, record: dict[str, Any]) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO searches VALUES (?, ?, ?)",
                         (search_id, json.dumps(record, sort_keys=True), _now()))

    def searches(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._conn.execute("SELECT record FROM searches ORDER BY rowid").fetchall()]

    def get_genome(self, key: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT value FROM genomes WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_genome(self, key: str, value: dict[str, Any]) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO genomes VALUES (?, ?, ?)", (key, json.dumps(value, sort_keys=True), _now()))

