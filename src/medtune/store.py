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
import re
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medtune._safepaths import check_run_id, disk_hint, inside, is_inside
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
# ids that are safe to show and compare; a run id proper (16 hex digits) is checked where it becomes a path
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+=-]{0,127}")
_RUN_FILES = ("weights", "predictions", "config")  # a run record's ``artifacts``


def _is_disk_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("disk is full", "readonly", "read-only", "disk i/o", "unable to open",
                                   "cannot commit"))


def _disk_error(path: Path, exc: BaseException) -> StoreError:
    text = str(exc).lower()
    if "full" in text:
        why = "the disk is full: free space (or move the store to a larger disk) and run the same command again"
    elif "readonly" in text or "read-only" in text:
        why = "the store is read-only: make it writable (or copy it to a writable folder) and run the command again"
    else:
        why = "check the disk and run the same command again"
    return StoreError(f"Cannot write the results store {str(path)!r} ({exc}); {why}: finished runs are kept and "
                      "the others resume.")


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
                self._keep_reserve()
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
            if _is_disk_error(exc):
                raise _disk_error(self.path, exc) from None
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
        except BaseException as exc:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back itself (e.g. after SQLITE_FULL)
            if isinstance(exc, sqlite3.Error) and _is_disk_error(exc):
                raise _disk_error(self.path, exc) from None
            raise
        else:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if _is_disk_error(exc):
                    raise _disk_error(self.path, exc) from None
                raise

    def close(self) -> None:
        self._conn.close()

    def run_dir(self, run_id: str, sub: str | None = None) -> Path:
        """The artifacts folder of a run (or its subfolder ``sub``), created on demand.

        Raises:
            StoreError: ``run_id`` is not a run id, or the folder (a link in the store) leads outside it.
        """
        check_run_id(run_id, str(self.root))
        path = self.root / "artifacts"
        folders = [path, path / run_id]
        for part in Path(sub).parts if sub is not None else ():
            folders.append(folders[-1] / part)
        path = folders[-1]
        try:
            for folder in folders:
                inside(self.root, folder, f"The artifacts folder of run {run_id}")  # before mkdir follows a link
                folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the artifacts folder {str(path)!r} ({exc.strerror or exc}); "
                             f"{disk_hint(exc)}.") from None
        return inside(self.root, path, f"The artifacts folder of run {run_id}")

    def checkpoint_path(self, run_id: str) -> Path:
        check_run_id(run_id, str(self.root))
        return inside(self.root, self.root / "checkpoints" / f"{run_id}.pt", f"The checkpoint of run {run_id}")

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
        try:
            self._conn.execute("UPDATE runs SET heartbeat=? WHERE run_id=? AND owner=?",
                               (time.time(), run_id, _owner_id()))
        except sqlite3.Error as exc:
            if not _is_disk_error(exc):
                raise
            raise _disk_error(self.path, exc) from None

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

    def resolve_artifact(self, path: str) -> str | None:
        """A stored artifact path as a path to open from here: relative ones (and, for records written by
        earlier versions, the part from ``artifacts/`` on, absolute ones too) are taken inside this store's
        root. None for a path that leads outside the store (``..``, an absolute path elsewhere, a link)."""
        p = Path(path)
        parts = p.parts
        if "artifacts" in parts:
            p = Path(*parts[len(parts) - 1 - parts[::-1].index("artifacts"):])
        if p.is_absolute():
            return None
        out = self.root / p
        return str(out) if is_inside(self.root, out) else None

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
            return self._checked(table, key, record)
        warnings.warn(f"{self.path}: the {table} record {key!r} is unreadable ({why}); skipped.\n"
                      f"HINT: re-run it, or delete its row: sqlite3 {self.path} \"DELETE FROM {table} WHERE "
                      f"{'run_id' if table == 'runs' else 'rowid'}='{key}'\"", StoreWarning, stacklevel=3)
        return None

    def _checked(self, table: str, key: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """A record read from the store, made safe to use: a run id that is not one skips the record, and
        an artifact path that leads outside the store is dropped, each with one warning naming the record."""
        if table in ("runs", "attacks") and "run_id" in record and not _SAFE_ID.fullmatch(str(record["run_id"])):
            warnings.warn(f"{self.path}: the {table} record {short_repr(str(key))} has the run id "
                          f"{short_repr(str(record['run_id']))}, not a run id (16 hex digits); skipped (the store "
                          "was altered).",
                          StoreWarning, stacklevel=4)
            return None
        dropped: list[str] = []

        def convert(path: str) -> str | None:
            out = self.resolve_artifact(path)
            if out is None:
                dropped.append(path)
            return out

        record = self._with_paths(record, _ATTACK_FILES, convert)
        for where in (record, record.get("artifacts") if isinstance(record.get("artifacts"), dict) else {}):
            for k in [k for k, v in where.items() if v is None and k in (*_ATTACK_FILES, *_RUN_FILES)]:
                del where[k]
        if dropped:
            warnings.warn(f"{self.path}: the {table} record {short_repr(str(key))} names the file "
                          f"{short_repr(dropped[0])} outside the store; that file is ignored (the store was altered).",
                          StoreWarning, stacklevel=4)
        return record

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

    _RESERVE = ".medtune-reserve"
    _RESERVE_BYTES = 64 << 10

    def _keep_reserve(self) -> None:
        """A small file of reserved space (a ballast): on a full disk it is deleted so that the claims can still
        be released (SQLite needs room in its WAL even for that), and written again when there is room."""
        path = self.root / self._RESERVE
        try:
            if not path.is_symlink() and (not path.exists() or path.stat().st_size < self._RESERVE_BYTES):
                path.write_bytes(b"\0" * self._RESERVE_BYTES)
        except OSError:
            path.unlink(missing_ok=True)

    def release_all(self, run_ids) -> None:
        """:meth:`release` each run; on a full disk the reserve is given up so that no claim stays ``running``."""
        for attempt in (0, 1):
            try:
                for run_id in run_ids:
                    self.release(run_id)
                return
            except StoreError:
                if attempt:
                    return  # the owner is gone when this process ends: the next start reclaims the runs
                (self.root / self._RESERVE).unlink(missing_ok=True)

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
        """The ``explain.json`` summaries written under ``artifacts/*/explain/`` (each with its ``dir``), read
        as untrusted input: only regular files inside the store (a link out of it, or a FIFO, is skipped
        with a warning), and ``gallery_png`` only where it names a file inside the store (else dropped)."""
        from medtune._safepaths import is_inside, read_regular

        out = []
        for path in sorted(self.root.glob("artifacts/*/explain/explain.json")):
            try:
                if not is_inside(self.root, path):
                    raise OSError(f"it leads outside the store, to {os.path.realpath(path)}")
                summary = json.loads(read_regular(path, limit=16 << 20))
            except (OSError, ValueError) as exc:
                warnings.warn(f"{path}: skipped ({exc}).", stacklevel=2)
                continue
            if not isinstance(summary, dict):
                continue
            png = path.parent / str(summary.get("gallery_png", "gallery.png"))
            if not is_inside(self.root, png):
                warnings.warn(f"{path}: its gallery_png {str(summary.get('gallery_png'))[:200]!r} leads outside the "
                              "store; not shown.", stacklevel=2)
                summary["gallery_png"] = None
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

    def put_expected(self, name: str, table: dict[str, Any]) -> None:
        """Keep a preset's published-results table (:mod:`medtune.expected`) under ``name``."""
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"expected:{name}", dumps(table)))

    def raw_expected_tables(self) -> dict[str, Any]:
        """Name → published-results table as stored, NOT validated: a store is untrusted input, so readers
        pass these through :func:`medtune.expected.load_tables` (a table that is not JSON is skipped here)."""
        rows = self._conn.execute("SELECT key, value FROM meta WHERE key LIKE 'expected:%' ORDER BY key").fetchall()
        raw = {}
        for key, text in rows:
            try:
                raw[key.split(":", 1)[1]] = loads(text)
            except ValueError as exc:
                warnings.warn(f"{self.root}: expected table {key!r} is not JSON ({exc}); it is skipped.", StoreWarning,
                              stacklevel=2)
        return raw
