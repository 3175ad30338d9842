"""The results store: one SQLite file (WAL) plus an artifacts folder beside it.

The store is the single source of truth of a sweep. A run is keyed by a hash of its resolved
config (seed and data fingerprint included); it is *claimed* before training so two sweeps on
the same store never train the same run twice, written atomically when done, and a run whose
owner died (SIGKILL, power loss) is reclaimed on the next start and resumes from its epoch
checkpoint. Records are strict JSON documents under stable snake_case keys (see ``docs``/README): NaN
and ±inf are stored as ``null`` (so SQLite's ``json_extract`` reads every record) and restored on read.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medtune.errors import StoreError, short_repr

__all__ = ["ResultsStore", "StoreWarning"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL, config TEXT NOT NULL, record TEXT,
    owner TEXT, heartbeat REAL, created TEXT NOT NULL, updated TEXT NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS attacks (attack_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, record TEXT NOT NULL,
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS searches (search_id TEXT PRIMARY KEY, record TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS genomes (key TEXT PRIMARY KEY, value TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rungs (run_id TEXT NOT NULL, rung INTEGER NOT NULL, epochs INTEGER NOT NULL,
    monitor TEXT NOT NULL, val_metric REAL, state TEXT NOT NULL, updated TEXT NOT NULL, PRIMARY KEY (run_id, rung));
"""
_SCHEMA_VERSION = "2"
#: Upgrades run when a store is opened, in the transaction that creates missing tables: each maps the
#: version it reads to SQL that brings it one step on (version 1 lacked the ``rungs`` table, which
#: ``_SCHEMA`` creates; runs may now also be ``paused`` or ``stopped``).
_MIGRATIONS = {"1": "UPDATE meta SET value='2' WHERE key='schema' AND value='1';"}
_ATTACK_FILES = ("perturbation_file", "uap_png", "examples_png")  # artifact paths at an attack record's top level


class StoreWarning(UserWarning):
    """A record of the store cannot be read and is skipped."""

STALE_SECONDS = 1800.0


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: Where a record's NaN and ±inf values were: ``[[key path], "nan" | "inf" | "-inf"], …``.
NONFINITE_KEY = "_nonfinite"


def dumps(obj: Any) -> str:
    """Strict JSON for the store (every JSON parser and SQLite's ``json_extract`` read it): NaN and ±inf
    are written as ``null``, and their places are listed under ``_nonfinite`` of a top-level object so
    that :func:`loads` restores them exactly."""
    found: list[list] = []

    def clean(x: Any, path: list) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            found.append([path, repr(float(x))])
            return None
        if isinstance(x, dict):  # keys as JSON writes them (1 -> "1"), so the path finds them after reading
            keys = [k if isinstance(k, str) else json.dumps(k) for k in x]
            return {key: clean(v, [*path, key]) for key, v in zip(keys, x.values())}
        if isinstance(x, (list, tuple)):
            return [clean(v, [*path, i]) for i, v in enumerate(x)]
        return x

    out = clean(obj, [])
    if found and isinstance(out, dict):
        out[NONFINITE_KEY] = found
    return json.dumps(out, sort_keys=True, allow_nan=False)


def loads(text: str) -> Any:
    """Read what :func:`dumps` wrote (NaN and ±inf back in their places); records of earlier versions,
    which wrote the non-standard ``NaN`` token, read as they always did.

    Raises:
        ValueError, TypeError, KeyError, IndexError: not JSON, or a broken ``_nonfinite`` list.
    """
    obj = json.loads(text)
    if isinstance(obj, dict) and NONFINITE_KEY in obj:
        for path, value in obj.pop(NONFINITE_KEY):
            target = obj
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = float(value)
    return obj


_BAD_JSON = (ValueError, TypeError, KeyError, IndexError)


def _is_json_object(text: str | None) -> bool:
    try:
        return isinstance(loads(text), dict)
    except _BAD_JSON:
        return False


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, Linux ``/proc``), or None where unknown: with the
    PID it identifies a process even after its PID is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return None


def _owner_id() -> str:
    start = _process_start(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}" + (f"@{start}" if start else "")


def _owner_alive(owner: str | None, heartbeat: float | None, stale_seconds: float) -> bool:
    """Whether the process that claimed a run may still be working on it (a live process with the claimed
    PID but another start time is a reused PID: the owner is dead)."""
    if not owner:
        return False
    host, _, pid_start = owner.rpartition(":")
    pid, _, start = pid_start.partition("@")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        if start:
            now = _process_start(int(pid))
            return now is None or now == start
        return True
    return heartbeat is not None and time.time() - heartbeat < stale_seconds


class ResultsStore:
    """A results store rooted at a folder: ``medtune.sqlite``, ``artifacts/``, ``checkpoints/``.

    Args:
        root: the store folder; created if missing (unless ``create`` is False).
        timeout: seconds to wait for a lock held by another process.
        create: False for readers (``results``, ``report``): a folder that holds no ``medtune.sqlite``
            is refused instead of becoming a new store.

    Raises:
        StoreError: the folder cannot be created or written, or ``medtune.sqlite`` is not a
            medtune store (not SQLite, or another schema), or the database stays locked.
    """

    def __init__(self, root: str | Path, *, timeout: float = 30.0, create: bool = True) -> None:
        self.root = Path(root)
        if not create:  # a reader (results, report): never create a store, or tables in another app's file
            try:
                found = (self.root / "medtune.sqlite").is_file()
            except OSError:
                found = False
            if not found:
                where = "does not exist" if not self.root.exists() else "holds no medtune.sqlite"
                raise StoreError(f"{str(self.root)!r} is not a medtune results store (it {where}); give the "
                                 "--store folder of a sweep.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the results store folder {short_repr(str(self.root))}: {exc.strerror}; "
                             "choose a writable --store.") from None
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"The results store folder {str(self.root)!r} is not writable; choose a writable --store.")
        self.path = self.root / "medtune.sqlite"
        try:
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and ("meta" not in tables or self._conn.execute(
                    "SELECT value FROM meta WHERE key='schema'").fetchone() is None):
                raise StoreError(f"{str(self.path)!r} is an SQLite file of another application (tables "
                                 f"{', '.join(sorted(tables)[:5])}); choose another --store.")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            # the tables and the schema row in one transaction: a process killed in between (or a
            # second process opening the store meanwhile) never sees medtune's tables without the row
            # that marks them as medtune's
            self._conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nINSERT OR IGNORE INTO meta VALUES "
                                     f"('schema', '{_SCHEMA_VERSION}');\n{''.join(_MIGRATIONS.values())}\nCOMMIT;")
            try:  # after the schema check: nothing is created beside another application's file
                (self.root / "artifacts").mkdir(exist_ok=True)
                (self.root / "checkpoints").mkdir(exist_ok=True)
            except OSError as exc:
                raise StoreError(f"Cannot create the folders of the results store {str(self.root)!r}: "
                                 f"{exc.strerror}; choose a writable --store.") from None
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row[0] != _SCHEMA_VERSION:
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
            row = conn.execute("SELECT status, owner, heartbeat, record FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is not None:
                status, owner, heartbeat, record = row
                if status == "done" and _is_json_object(record):
                    return False  # (a done run whose record is unreadable is trained again)
                if status == "running" and owner != _owner_id() and _owner_alive(owner, heartbeat, stale_seconds):
                    return False
            now = _now()
            conn.execute(
                "INSERT INTO runs (run_id, status, config, owner, heartbeat, created, updated) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET status='running', "
                "owner=excluded.owner, heartbeat=excluded.heartbeat, updated=excluded.updated, error=NULL",
                (run_id, dumps(config), _owner_id(), time.time(), now, now),
            )
        return True

    def heartbeat(self, run_id: str) -> None:
        self._conn.execute("UPDATE runs SET heartbeat=? WHERE run_id=? AND owner=?", (time.time(), run_id, _owner_id()))

    # -- records: artifact paths relative to the store, resolved on read (the store can be moved) ---------
    def _relative(self, path: str) -> str:
        """An artifact path as stored: relative to the store root (``artifacts/RUN/x``)."""
        p = Path(path)
        for base in (self.root, self.root.resolve()):
            try:
                return p.relative_to(base).as_posix()
            except ValueError:
                pass
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except (ValueError, OSError):
            return str(path)

    def resolve_artifact(self, path: str) -> str:
        """A stored artifact path as a path to open from here: relative ones (and, for records written by
        earlier versions, the part from ``artifacts/`` on) are taken inside this store's root."""
        p = Path(path)
        if not p.is_absolute():
            parts = p.parts
            if "artifacts" in parts:
                p = Path(*parts[len(parts) - 1 - parts[::-1].index("artifacts"):])
            return str(self.root / p)
        return str(p)

    def _with_paths(self, record: dict[str, Any], keys, convert) -> dict[str, Any]:
        record = dict(record)
        if isinstance(record.get("artifacts"), dict):
            record["artifacts"] = {k: convert(v) if isinstance(v, str) else v for k, v in record["artifacts"].items()}
        for key in keys:
            if isinstance(record.get(key), str):
                record[key] = convert(record[key])
        return record

    def _decode(self, table: str, key: str, text: str | None) -> dict[str, Any] | None:
        """One stored record, or None (with a warning naming it) when it is not a JSON object."""
        try:
            record = loads(text) if text is not None else None
        except _BAD_JSON as exc:
            record, why = None, f"{type(exc).__name__}: {str(exc)[:80]}"
        else:
            why = "NULL" if text is None else f"a JSON {type(record).__name__}, not an object"
        if isinstance(record, dict):
            return self._with_paths(record, _ATTACK_FILES, self.resolve_artifact)
        warnings.warn(f"{self.path}: the {table} record {key!r} is unreadable ({why}); skipped.\n"
                      f"HINT: re-run it, or delete its row: sqlite3 {self.path} \"DELETE FROM {table} WHERE "
                      f"{'run_id' if table == 'runs' else 'rowid'}='{key}'\"", StoreWarning, stacklevel=3)
        return None

    def finish(self, run_id: str, record: dict[str, Any]) -> None:
        """Write a finished run's record (one atomic transaction); artifact paths are stored relative to the
        store, so it can be moved."""
        record = self._with_paths(record, (), self._relative)
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET status='done', record=?, updated=?, error=NULL WHERE run_id=?",
                         (dumps(record), _now(), run_id))

    def fail(self, run_id: str, error: str) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET status='failed', error=?, updated=?, owner=NULL WHERE run_id=?",
                         (error, _now(), run_id))

    # -- successive halving: a run's rungs ------------------------------------------------------
    def pause(self, run_id: str, rung: int, val_metric: float, *, monitor: str, epochs: int) -> None:
        """A run reached rung ``rung`` (epochs) and waits, its checkpoint kept: status ``paused``, and the
        rung's validation metric stored (a decision already stored for that rung is kept)."""
        value = val_metric if math.isfinite(val_metric) else None
        with self._transaction() as conn:
            conn.execute("INSERT INTO rungs VALUES (?, ?, ?, ?, ?, 'paused', ?) ON CONFLICT(run_id, rung) DO UPDATE "
                         "SET epochs=excluded.epochs, val_metric=excluded.val_metric, updated=excluded.updated",
                         (run_id, int(rung), int(epochs), monitor, value, _now()))
            conn.execute("UPDATE runs SET status='paused', owner=NULL, updated=?, error=NULL WHERE run_id=?",
                         (_now(), run_id))

    def decide_rung(self, run_id: str, rung: int, state: str, val_metric: float, *, monitor: str) -> None:
        """Store successive halving's decision for a run at a rung: ``promoted`` or ``stopped`` (then the
        run's status becomes ``stopped`` unless it is done or claimed; a later sweep without halving
        trains it on from its checkpoint)."""
        value = val_metric if math.isfinite(val_metric) else None
        with self._transaction() as conn:
            conn.execute("INSERT INTO rungs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id, rung) DO UPDATE "
                         "SET state=excluded.state, val_metric=excluded.val_metric, updated=excluded.updated",
                         (run_id, int(rung), int(rung), monitor, value, state, _now()))
            if state == "stopped":
                conn.execute("UPDATE runs SET status='stopped', owner=NULL, updated=? WHERE run_id=? AND status IN "
                             "('paused', 'pending', 'failed')", (_now(), run_id))

    def rungs(self) -> list[dict[str, Any]]:
        """Every stored rung of every run: ``run_id, rung, epochs, monitor, val_metric, state, updated``
        (``val_metric`` NaN where the metric was undefined), in the order of the rung then the run."""
        rows = self._conn.execute("SELECT run_id, rung, epochs, monitor, val_metric, state, updated FROM rungs "
                                  "ORDER BY rung, rowid").fetchall()
        keys = ("run_id", "rung", "epochs", "monitor", "val_metric", "state", "updated")
        return [{**dict(zip(keys, r)), "val_metric": float("nan") if r[4] is None else r[4]} for r in rows]

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` in the store's ``meta`` table (not the schema row)."""
        if key == "schema":
            raise ValueError("the schema row is the store's own")
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, dumps(value)))

    def get_meta(self, key: str) -> Any:
        """The JSON value stored under ``key`` by :meth:`set_meta`, or None."""
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        try:
            return loads(row[0]) if row else None
        except _BAD_JSON:
            return None

    def release(self, run_id: str) -> None:
        """Give a claimed run back (e.g. after Ctrl-C) so the next start resumes it."""
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET status='pending', owner=NULL, updated=? WHERE run_id=? AND status='running'",
                         (_now(), run_id))

    def force_release(self, run_id: str) -> list[str]:
        """Free the claims of the runs whose id starts with ``run_id`` (``medtune results --release``), whoever
        holds them: for a claim whose owner is gone in a way the store cannot see. Returns the freed ids.

        Raises:
            StoreError: the prefix matches no claimed (running) run.
        """
        with self._transaction() as conn:
            rows = conn.execute("SELECT run_id, status FROM runs WHERE run_id LIKE ? ESCAPE '\\'",
                                (run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",
                                 )).fetchall()
            running = [r[0] for r in rows if r[1] == "running"]
            if not running:
                have = f"its status is {rows[0][1]}" if len(rows) == 1 else f"{len(rows)} runs match, none running"
                raise StoreError(f"No claimed run {short_repr(run_id)} in {self.root} "
                                 f"({have if rows else 'no run has that id'}); see medtune results --runs.")
            for rid in running:
                conn.execute("UPDATE runs SET status='pending', owner=NULL, updated=? WHERE run_id=?", (_now(), rid))
        return running

    def status(self, run_id: str) -> str | None:
        row = self._conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else None

    def get(self, run_id: str) -> dict[str, Any] | None:
        """A finished run's record; None if it is not done (or its record is unreadable: a warning says so,
        and the run is trained again)."""
        row = self._conn.execute("SELECT record FROM runs WHERE run_id=? AND status='done'", (run_id,)).fetchone()
        return self._decode("runs", run_id, row[0]) if row else None

    def explanations(self) -> list[dict[str, Any]]:
        """The ``explain.json`` summaries written under ``artifacts/*/explain/`` (each with its ``dir``)."""
        out = []
        for path in sorted(self.root.glob("artifacts/*/explain/explain.json")):
            try:
                summary = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            summary["dir"] = str(path.parent)
            out.append(summary)
        return out

    def runs(self, status: str | None = "done") -> list[dict[str, Any]]:
        """Finished run records (or, with ``status=None``, one status row per run); an unreadable record is
        skipped with a :class:`StoreWarning` naming it."""
        if status == "done":
            rows = self._conn.execute("SELECT run_id, record FROM runs WHERE status='done' ORDER BY rowid").fetchall()
            return [r for r in (self._decode("runs", rid, text) for rid, text in rows) if r is not None]
        query = "SELECT run_id, status, owner, created, updated, error, config FROM runs"
        args: tuple = ()
        if status is not None:
            query, args = query + " WHERE status=?", (status,)
        rows = self._conn.execute(query + " ORDER BY rowid", args).fetchall()
        keys = ("run_id", "status", "owner", "created", "updated", "error", "config")
        out = []
        for r in rows:
            try:
                config = loads(r[6])
            except _BAD_JSON:
                config = None
            out.append({**dict(zip(keys, r)), "config": config})
        return out

    # -- attacks, searches, genome cache -----------------------------------------------------
    def put_attack(self, attack_id: str, run_id: str, record: dict[str, Any]) -> None:
        record = self._with_paths(record, _ATTACK_FILES, self._relative)
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO attacks VALUES (?, ?, ?, ?)",
                         (attack_id, run_id, dumps(record), _now()))

    def attacks(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            rows = self._conn.execute("SELECT attack_id, record FROM attacks ORDER BY rowid").fetchall()
        else:
            rows = self._conn.execute("SELECT attack_id, record FROM attacks WHERE run_id=? ORDER BY rowid",
                                      (run_id,)).fetchall()
        return [r for r in (self._decode("attacks", aid, text) for aid, text in rows) if r is not None]

    def put_search(self, search_id: str, record: dict[str, Any]) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO searches VALUES (?, ?, ?)",
                         (search_id, dumps(record), _now()))

    def searches(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT search_id, record FROM searches ORDER BY rowid").fetchall()
        return [r for r in (self._decode("searches", sid, text) for sid, text in rows) if r is not None]

    def get_genome(self, key: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT value FROM genomes WHERE key=?", (key,)).fetchone()
        return loads(row[0]) if row else None

    def put_genome(self, key: str, value: dict[str, Any]) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO genomes VALUES (?, ?, ?)", (key, dumps(value), _now()))

