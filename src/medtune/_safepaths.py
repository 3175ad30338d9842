"""A results store is untrusted input: the one place that keeps store-derived paths inside the store,
writes files without following links, reads only regular files, and keeps output paths off the store.

Stores get zipped, mailed and downloaded with a paper, so everything read from one (run ids, artifact
paths, image paths in records, links in its folders) may have been crafted. As tar and zip refuse
members that escape the extraction root, every path derived from a store is resolved (links
followed) and must stay inside the store's resolved root; a run id must have the run id format
(16 lowercase hex digits) before it is used as a path; a file is written to a temporary file beside
it and renamed over it (a rename replaces a link, it never writes through one), after the target's
folder was checked to lie inside the store; a file is read only if it is a regular file (a FIFO
would block the reader forever); an image is embedded only below :data:`MAX_EMBED_PIXELS`.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from medtune.errors import ConfigError, StoreError, short_repr

__all__ = ["RUN_ID_PATTERN", "MAX_EMBED_PIXELS", "MANAGED_NAMES", "is_run_id", "check_run_id", "is_inside",
           "inside", "atomic_write", "open_regular", "read_regular", "is_regular", "image_pixels",
           "check_output", "disk_hint", "walk_files", "warn_unreadable"]

#: A run id as :func:`medtune.runner.run_id_of` writes it: the first 16 hex digits of a SHA-256.
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
#: Largest image (width × height) the report embeds; a larger one in a store is skipped with a warning.
MAX_EMBED_PIXELS = 16_000_000
#: What medtune manages inside a store folder: no output path may be one of them or lie below one.
MANAGED_NAMES = ("medtune.sqlite", "medtune.sqlite-wal", "medtune.sqlite-shm", "medtune.sqlite-journal",
                 "artifacts", "checkpoints", "data-cache")


def is_run_id(value: object) -> bool:
    return isinstance(value, str) and RUN_ID_PATTERN.fullmatch(value) is not None


def check_run_id(run_id: object, where: str = "the results store") -> str:
    """``run_id`` if it has the run id format (used as a folder name), else a one-line StoreError."""
    if not is_run_id(run_id):
        raise StoreError(f"The record {short_repr(str(run_id))} in {where} has no valid run id (16 hex digits); "
                         "the store was altered: delete that row or use a store medtune wrote.")
    return run_id  # type: ignore[return-value]


def _resolve(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def is_inside(root: str | Path, path: str | Path) -> bool:
    """Whether ``path`` (its links followed) lies inside ``root`` (its links followed)."""
    base, target = _resolve(root), _resolve(path)
    return target == base or base in target.parents


def inside(root: str | Path, path: str | Path, what: str = "a path") -> Path:
    """``path`` if it stays inside the store ``root`` once its links are followed, else a one-line StoreError."""
    if not is_inside(root, path):
        raise StoreError(f"{what} {short_repr(str(path))} leads outside the results store {str(root)!r} "
                         f"(to {short_repr(str(_resolve(path)))}); the store was altered: remove that link or "
                         "record, or use a store medtune wrote.")
    return Path(path)


def disk_hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space and run the same command again"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the folder is not writable: fix its permissions or choose another folder, and run the command again"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "move the file that is in its way and run the same command again"
    return "fix the cause and run the same command again"


def atomic_write(path: str | Path, write: Callable[[Path], None] | bytes | str, *,
                 root: str | Path | None = None) -> Path:
    """Write ``path`` through a temporary file in its folder and a rename: a reader never sees half a file,
    and a link at ``path`` is replaced, never written through. With ``root``, the folder must lie inside it.

    Args:
        write: bytes or text to write, or a function writing the temporary file given its path.

    Raises:
        StoreError: the folder leaves ``root``, ``path`` is a folder, or the write fails (disk full,
            read-only); nothing is left behind.
    """
    path = Path(path)
    if root is not None:
        inside(root, path.parent, "The folder")
    if path.is_dir() and not path.is_symlink():
        raise StoreError(f"Cannot write {str(path)!r}: it is a folder; move it away and run the command again.")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StoreError(f"Cannot write {str(path)!r} ({exc.strerror or exc}); {disk_hint(exc)}.") from None
    try:
        if callable(write):
            os.close(fd)
            write(Path(tmp))
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(write.encode() if isinstance(write, str) else write)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"Cannot write {str(path)!r} ({exc.strerror or exc}); {disk_hint(exc)}.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_regular(path: str | Path) -> bool:
    """Whether ``path`` is a regular file (links followed); False for FIFOs, sockets, devices, folders."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | Path, mode: str = "rb"):
    """Open a file for reading only if it is a regular file: opened without blocking (a FIFO would block
    ``open`` forever), then checked with ``fstat``.

    Raises:
        OSError: missing, unreadable, or not a regular file (``errno.EINVAL``).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, *, text: bool = True, limit: int | None = None) -> str | bytes:
    """The contents of a regular file (see :func:`open_regular`); ``limit`` bytes at most (more: OSError)."""
    with open_regular(path, "rb") as fh:
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data.decode("utf-8") if text else data


def image_pixels(path: str | Path) -> int:
    """Width × height of an image file, read from its header only (no decoding).

    Raises:
        OSError: not a regular, readable image.
    """
    from PIL import Image, UnidentifiedImageError

    with open_regular(path) as fh:
        try:
            with Image.open(fh) as im:
                return int(im.size[0]) * int(im.size[1])
        except (UnidentifiedImageError, ValueError) as exc:
            raise OSError(errno.EINVAL, f"not an image ({exc})", str(path)) from None


def _store_root_of(path: Path) -> Path | None:
    """The results store ``path`` lies in or is (a folder holding ``medtune.sqlite``), or None."""
    for folder in (path, *path.parents):
        try:
            if (folder / "medtune.sqlite").exists():
                return folder
        except OSError:
            continue
    return None


def check_output(path: str | Path, *, flag: str = "-o", folder: bool = False,
                 allow: str | Path | None = None) -> str | None:
    """Check an output path before any work: never a results store's database or a folder medtune
    manages (``artifacts``, ``checkpoints``, ``data-cache``, the store folder itself for a folder
    output), its parent folder exists and is writable, and a file output is not a folder.

    Args:
        folder: the output is a folder (``export -o``, ``explain -o``), not a file.
        allow: a managed folder this output may be (the run's own artifact folder).

    Returns:
        None, or for an existing file the line saying what it replaces (for the caller to print).

    Raises:
        ConfigError: one line naming the path and the fix.
    """
    target = _resolve(path)
    if allow is not None and (target == _resolve(allow) or _resolve(allow) in target.parents):
        return None
    root = _store_root_of(target)
    if root is not None:
        rel = target.relative_to(root).parts
        managed = (not rel and folder) or (rel and rel[0] in MANAGED_NAMES)
        if managed:
            what = "the database" if rel and rel[0].startswith("medtune.sqlite") else (
                f"the managed folder {rel[0]}" if rel else "the store folder itself")
            raise ConfigError(f"{flag} {short_repr(str(path))} is {what} of the results store {str(root)!r}; "
                              "writing there would destroy stored runs: give a path outside the store's "
                              "artifacts, checkpoints and data-cache (e.g. a new file beside the store).")
    parent = target if folder and target.is_dir() else target.parent
    while folder and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {short_repr(str(path))}: its folder {str(parent)!r} does not exist; create it "
                          "or give another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {short_repr(str(path))}: the folder {str(parent)!r} is not writable; give "
                          "another path.")
    if folder:
        if target.exists() and not target.is_dir():
            raise ConfigError(f"{flag} {short_repr(str(path))} is a file, not a folder; give a folder.")
        return None
    if target.is_dir():
        raise ConfigError(f"{flag} {short_repr(str(path))} is a folder; give a file path.")
    if target.exists():
        if not is_regular(target):
            raise ConfigError(f"{flag} {short_repr(str(path))} is not a regular file (a FIFO, socket or device); "
                              "give a file path.")
        return f"replaced {target} ({target.stat().st_size} bytes)"
    return None


_SPECIAL_FS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                         "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "binfmt_misc", "autofs",
                         "efivarfs", "rpc_pipefs", "nsfs"})


def _special_devices() -> set[int]:
    """Device numbers of the mounted special filesystems (``/proc``, ``/sys``, ``/dev``, ...), from
    ``/proc/self/mounts``; where it cannot be read, those of ``/proc`` and ``/sys`` unless they share the
    root's device."""
    out: set[int] = set()
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in _SPECIAL_FS:
                    try:
                        out.add(os.stat(parts[1].replace("\\040", " ")).st_dev)
                    except OSError:
                        pass
        return out
    except OSError:
        pass
    try:
        rootdev = os.stat("/").st_dev
    except OSError:
        return out
    for folder in ("/proc", "/sys"):
        try:
            dev = os.stat(folder).st_dev
        except OSError:
            continue
        if dev != rootdev:
            out.add(dev)
    return out


def walk_files(root: str | Path, *, suffixes: frozenset[str] | set[str] | None = None,
               skip_hidden: bool = True) -> tuple[list[Path], int]:
    """Every regular file under ``root`` (linked files followed, linked folders not entered, as pathlib's
    ``rglob``), sorted; and how many entries were skipped as unreadable (no permission, a broken link).

    Never walks into ``/proc``, ``/sys``, ``/dev`` or ``/run`` (special filesystems whose files block or
    change under a reader), and never opens anything: FIFOs, sockets and devices are not regular files
    and are left out without blocking. ``suffixes`` (lower case, with the dot) keeps only those files.
    """
    special = _special_devices()
    files: list[Path] = []
    unreadable = 0
    seen: set[tuple[int, int]] = set()
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if st.st_dev in special or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            unreadable += 1
            continue
        for entry in entries:
            try:
                st = os.stat(entry.path)
            except OSError:
                unreadable += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                if not entry.is_symlink():  # as pathlib's rglob: a linked folder is not entered (no loops)
                    stack.append(Path(entry.path))
            elif stat.S_ISREG(st.st_mode) and not (skip_hidden and entry.name.startswith(".")) and (
                    suffixes is None or Path(entry.name).suffix.lower() in suffixes):
                files.append(Path(entry.path))
    return sorted(files), unreadable


def warn_unreadable(root: str | Path, count: int) -> None:
    """The one warning line of :func:`walk_files`' skipped entries."""
    if count:
        import warnings

        warnings.warn(f"{root}: skipped {count} unreadable entr{'y' if count == 1 else 'ies'} (no permission, or a "
                      "broken or looping link).", stacklevel=3)
