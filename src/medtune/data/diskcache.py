"""The decode cache: images decoded once, in parallel processes, into an on-disk uint8 array.

A folder, CSV or ``.npz`` source whose decoded size is over :data:`DISK_THRESHOLD_BYTES` (or any
size with ``data_cache: disk``) is decoded into ``STORE/data-cache/KEY/images.npy`` (an ``.npy`` file of shape
(N, 3, S, S), uint8) beside ``meta.json`` (shape, header offset and the data fingerprint).
``KEY`` hashes what the pixels and labels come from, computed before any decoding: every file's
path, size and modification time, the labels, splits and groups, ``img_size``, ``resize`` and
``dicom_window`` (of an ``.npz``: its path, size and mtime). A second run, process or Ray worker
on the machine finds the folder and decodes nothing. A cache is built in a temporary folder and
renamed into place, so a killed or concurrent decode never leaves half a cache; a damaged one
(truncated file, unreadable meta, bytes that no longer match the SHA-256 in ``meta.json``) is decoded
again with a warning; the checksum is verified whenever the file's size, times or inode changed
since it was last verified (one ``stat`` otherwise), and FIFOs or links out of the store are refused.

:class:`DiskImages` reads rows with explicit positioned reads (``os.preadv``) into fresh tensors:
nothing is memory-mapped, so a process's resident memory does not grow with the data set (pages
of a touched ``numpy.memmap`` would count in its RSS). ``subset``/``split`` give index views.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import uuid
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from medtune._safepaths import atomic_write, is_inside, open_regular, read_regular
from medtune.errors import DataError, MedtuneError

__all__ = ["DiskImages", "DATA_CACHES", "DISK_THRESHOLD_BYTES", "resolve_workers", "source_key", "load_or_decode",
           "open_cached", "build", "write_row", "use_disk"]

#: ``data_cache`` policies (RunConfig.data_cache).
DATA_CACHES = ("auto", "memory", "disk")
#: ``data_cache: auto`` decodes to disk above this decoded size (N · 3 · S² bytes).
DISK_THRESHOLD_BYTES = 1 << 30
_VERSION = 1
_IOV_MAX = 1024  # Linux's limit on the buffers of one preadv call
_CHUNK_ROWS = 128  # rows per decode task, and per read when hashing


def resolve_workers(requested: int) -> int:
    """Decoding processes: ``requested``, or for 0 min(4, the CPUs this process may use)."""
    if requested > 0:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def use_disk(policy: str, nbytes: int, cache_root: str | Path | None) -> bool:
    """Whether a source of ``nbytes`` decoded bytes goes to the disk cache under ``policy``."""
    if policy == "disk":
        if cache_root is None:
            raise DataError("data_cache: disk needs a folder for the decode cache; give load_data a cache_dir "
                            "(runs use STORE/data-cache).")
        return True
    return policy == "auto" and cache_root is not None and nbytes > DISK_THRESHOLD_BYTES


def source_key(paths: Sequence[Path], **facts) -> str:
    """Hash of the files (path, size, mtime) and ``facts`` (labels, splits, sizes, policies): the
    cache folder's name, computed before decoding (32 hex chars)."""
    h = hashlib.sha256(json.dumps({"version": _VERSION, **facts}, sort_keys=True, default=str).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class DiskImages:
    """A uint8 image array (N, 3, H, W) in an ``.npy`` file, read batch by batch.

    Indexing (an int, a slice, an int/bool tensor, array or list) returns a real torch uint8
    tensor read from the file; :meth:`view` returns another DiskImages over some rows (no read).
    ``to``/``numpy`` read every row of the view (meant for small views). On a machine with CUDA
    the batches are read into pinned memory, so ``.to(device, non_blocking=True)`` overlaps.
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, path: str | Path, offset: int, shape: Sequence[int], index: np.ndarray | None = None) -> None:
        self.path, self.offset, self.full_shape = Path(path), int(offset), tuple(int(s) for s in shape)
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.row_bytes = int(np.prod(self.full_shape[1:]))
        self.pin = torch.cuda.is_available()
        self._fd: int | None = None
        self._pid = -1
        self._ahead: _ReadAhead | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1, "_ahead": None}

    def prefetch(self, batches: Sequence) -> None:
        """Read ``batches`` (index tensors or arrays, in the order they will be asked for) ahead on a
        background thread, two at a time; asking for them in another order just reads directly."""
        if self._ahead is not None:
            self._ahead.close()
        self._ahead = _ReadAhead(self, [self._positions(b) for b in batches])

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return self.full_shape[0] if self.index is None else len(self.index)

    def __repr__(self) -> str:
        return f"DiskImages({str(self.path)!r}, shape={tuple(self.shape)})"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self),) + self.full_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.full_shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def _positions(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        pos = np.asarray(key)
        if pos.dtype == bool:
            if pos.shape != (len(self),):
                raise IndexError(f"boolean index of shape {pos.shape} for {len(self)} images")
            return np.flatnonzero(pos)
        if not np.issubdtype(pos.dtype, np.integer):
            raise IndexError(f"DiskImages takes int, slice, bool or int-array indices, not {pos.dtype}")
        pos = pos.astype(np.int64).reshape(-1)
        if pos.size and (pos.max() >= len(self) or pos.min() < -len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return np.where(pos < 0, pos + len(self), pos)

    def rows(self, pos: np.ndarray) -> np.ndarray:
        """File rows of view positions ``pos``."""
        return pos if self.index is None else self.index[pos]

    def view(self, idx) -> DiskImages:
        """The images at ``idx`` as another DiskImages (an index map; nothing is read)."""
        return DiskImages(self.path, self.offset, self.full_shape, self.rows(self._positions(idx)))

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self._read(self.rows(self._positions([key])))[0]
        if isinstance(key, tuple):  # e.g. images[:4, 0]: rows first, then the rest in memory
            return self[key[0]][(slice(None),) + key[1:]]
        pos = self._positions(key)
        if self._ahead is not None:
            batch = self._ahead.take(pos)
            if batch is not None:
                return batch
            self._ahead = None
        return self._read(self.rows(pos))

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own descriptor
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{self.path}: the decode cache cannot be read ({exc.strerror or exc}); delete its "
                                "folder to decode again.") from None
            self._pid = os.getpid()
        return self._fd

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows ``rows`` of the file in that order, as a new (pinned on CUDA machines) tensor.

        Rows are visited in file order; each run of consecutive rows is one ``preadv`` that
        scatters straight into the output rows (no intermediate copy)."""
        out = torch.empty((len(rows),) + self.full_shape[1:], dtype=torch.uint8, pin_memory=self.pin)
        if not len(rows):
            return out
        flat = out.numpy().reshape(len(rows), self.row_bytes)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        fd, start = self._file(), 0
        for i in range(1, len(srt) + 1):
            if i == len(srt) or srt[i] != srt[i - 1] + 1 or i - start >= _IOV_MAX:
                bufs = [memoryview(flat[j]) for j in order[start:i]]
                want = self.row_bytes * len(bufs)
                got = os.preadv(fd, bufs, self.offset + int(srt[start]) * self.row_bytes)
                if got != want:
                    raise DataError(f"{self.path}: the decode cache is shorter than its header says (truncated?); "
                                    "delete its folder to decode again.")
                start = i
        return out

    def chunks(self, rows_per_chunk: int = _CHUNK_ROWS) -> Iterator[np.ndarray]:
        """The images in view order, ``rows_per_chunk`` at a time (bounded memory)."""
        for s in range(0, len(self), rows_per_chunk):
            yield self[s:s + rows_per_chunk].numpy()

    def numpy(self) -> np.ndarray:
        return self[:].numpy()

    def to(self, *args, **kwargs) -> torch.Tensor:
        """Every image of the view, read into memory, then ``Tensor.to`` (small views only)."""
        return self[:].to(*args, **kwargs)

    def cpu(self) -> torch.Tensor:
        return self[:]

    def float(self) -> torch.Tensor:
        return self[:].float()


class _ReadAhead:
    """The next ``depth`` batches of a known order, read on one background thread (``os.preadv``
    releases the GIL), so disk reads overlap the training step."""

    def __init__(self, images: DiskImages, order: list[np.ndarray], depth: int = 2) -> None:
        self.images, self.order = images, deque(order)
        self.pool = cf.ThreadPoolExecutor(1, thread_name_prefix="medtune-readahead")
        self.pending: deque[tuple[np.ndarray, cf.Future]] = deque()
        for _ in range(depth):
            self._submit()

    def _submit(self) -> None:
        if self.order:
            pos = self.order.popleft()
            self.pending.append((pos, self.pool.submit(self.images._read, self.images.rows(pos))))
        else:
            self.pool.shutdown(wait=False)

    def take(self, pos: np.ndarray) -> torch.Tensor | None:
        """The batch at ``pos`` if it is the next one read ahead; else None (and stop)."""
        if not self.pending or not np.array_equal(self.pending[0][0], pos):
            self.close()
            return None
        _, future = self.pending.popleft()
        self._submit()
        return future.result()

    def close(self) -> None:
        for _, future in self.pending:
            future.cancel()
        self.pending.clear()
        self.order.clear()
        self.pool.shutdown(wait=False)


# ----------------------------------------------------------------------------------------- building


def _read_header(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) of a C-order uint8 ``.npy`` file, read with numpy's own header parser
    (no pickle: the dtype must be uint8)."""
    with open_regular(path) as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        if fortran or dtype != np.uint8:
            raise ValueError(f"dtype {dtype}, fortran_order {fortran}")
        return tuple(shape), fh.tell()


def _checksum(path: Path) -> str:
    """SHA-256 of a file, read 8 MiB at a time (a regular file only)."""
    h = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    """What changes whenever a file's bytes can have changed: size, mtime, ctime (which no user can set),
    inode and device. A copied or edited cache has another stamp, so its checksum is verified again."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _open(folder: Path, key: str) -> tuple[DiskImages, dict]:
    """The cache in ``folder``, checked against its meta; ValueError/OSError when damaged.

    The checksum of ``images.npy`` in the meta is verified when the file's stamp (:func:`_stamp`) differs
    from the one recorded at the last verification (after a copy, an edit, or a move to another disk),
    and the new stamp recorded; an unchanged file costs one ``stat``. Regular files only (a FIFO would
    block), and nothing that leads outside the cache folder's parent (a link in a crafted store).
    """
    npy, meta_path = folder / "images.npy", folder / "meta.json"
    for path in (npy, meta_path):
        if not is_inside(folder.parent, path):
            raise ValueError(f"{path.name} is a link out of the decode cache")
    meta = json.loads(read_regular(meta_path, limit=1 << 20))
    if not isinstance(meta, dict) or meta.get("version") != _VERSION or meta.get("key") != key:
        raise ValueError("meta.json does not match")
    if not isinstance(meta.get("sha256"), str):
        raise ValueError("meta.json holds no checksum (a cache of an earlier medtune)")
    shape, offset = _read_header(npy)
    if list(shape) != meta.get("shape") or offset != meta.get("offset") or not isinstance(meta.get("fingerprint"), str):
        raise ValueError("meta.json and images.npy disagree")
    size = npy.stat().st_size
    if size != offset + int(np.prod(shape)):
        raise ValueError(f"images.npy holds {size} bytes, expected {offset + int(np.prod(shape))}")
    if meta.get("verified") != _stamp(npy):
        if _checksum(npy) != meta["sha256"]:
            raise ValueError("images.npy does not match the checksum in meta.json (changed on disk)")
        meta["verified"] = _stamp(npy)
        try:
            atomic_write(meta_path, json.dumps(meta, indent=1))
        except MedtuneError:
            pass  # a read-only store: verified again next time
    return DiskImages(npy, offset, shape), meta


def _decode_rows(npy: str, offset: int, rows: list[tuple[int, str]], img_size: int, resize: str,
                 dicom_window: str) -> int:
    """Decode ``rows`` ((row, path) pairs) and write each at its place in ``npy`` (a worker task)."""
    from medtune.data._decode import decode_image, resize_image

    torch.set_num_threads(1)
    fd = os.open(npy, os.O_WRONLY)
    try:
        for i, path in rows:
            rgb, _, _ = decode_image(Path(path), dicom_window)
            write_row(fd, offset, i, resize_image(rgb, img_size, resize).numpy())
    finally:
        os.close(fd)
    return len(rows)


def _context() -> mp.context.BaseContext:
    """fork where it is safe (POSIX, CUDA not started in this process): a spawned worker imports
    medtune and torch again, 5-10 s each on a busy 2-core machine, more than decoding 2,000 images.
    The workers only decode (PIL) and resize on one CPU thread, as DataLoader workers do."""
    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _decode_all(npy: Path, offset: int, paths: Sequence[Path], img_size: int, resize: str, dicom_window: str,
                workers: int) -> None:
    from medtune.progress import progress_bar

    tasks = [[(i, str(p)) for i, p in enumerate(paths[s:s + _CHUNK_ROWS], start=s)]
             for s in range(0, len(paths), _CHUNK_ROWS)]
    bar = progress_bar(len(paths), "decode", unit="img")
    if workers <= 1 or len(tasks) <= 1:
        with bar:
            for rows in tasks:
                bar.update(_decode_rows(str(npy), offset, rows, img_size, resize, dicom_window))
        return
    with cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=_context()) as pool, bar:
        futures = [pool.submit(_decode_rows, str(npy), offset, rows, img_size, resize, dicom_window)
                   for rows in tasks]
        try:
            for f in cf.as_completed(futures):
                bar.update(f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def open_cached(cache_root: str | Path, key: str) -> tuple[DiskImages, str] | None:
    """(images, fingerprint) of the cache ``cache_root/key``; None when there is none. A damaged
    one (truncated, unreadable meta) is removed with a one-line warning, and None returned."""
    folder = Path(cache_root) / key
    if not folder.exists():
        return None
    try:
        images, meta = _open(folder, key)
        return images, meta["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"{folder}: damaged decode cache ({' '.join(str(exc).split())[:200]}); decoding again.",
                      stacklevel=3)
        if folder.is_symlink():
            folder.unlink(missing_ok=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        return None


def write_row(fd: int, offset: int, row: int, image: torch.Tensor | np.ndarray) -> None:
    """Write one (3, S, S) uint8 image at its row of an open ``.npy`` file."""
    data = memoryview(np.ascontiguousarray(image)).cast("B")
    pos = offset + row * len(data)
    while len(data):  # pwrite may write less than asked
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


def build(cache_root: str | Path, key: str, shape: tuple[int, ...], fill, fingerprint) -> tuple[DiskImages, str]:
    """Build the cache ``cache_root/key`` of ``shape`` in a temporary folder and rename it into place.

    Args:
        fill: ``fill(npy_path, offset)`` writes every row (e.g. with :func:`write_row`).
        fingerprint: called with the new DiskImages after ``fill``; returns the data fingerprint
            stored in the meta (the value :meth:`ImageSet.fingerprint` gives for the same data).

    Raises:
        DataError: the folder cannot be written (or the disk fills up); whatever ``fill`` raises.
    """
    root = Path(cache_root)
    folder = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise DataError(f"{root}: cannot write the decode cache there ({exc.strerror or exc}); give a writable "
                        "--store, or --data-cache memory.") from None
    try:
        npy = tmp / "images.npy"
        try:
            del_me = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=shape)  # header + sparse body
            del del_me
        except OSError as exc:
            raise DataError(f"{tmp}: cannot write the decode cache ({exc.strerror or exc}; "
                            f"{int(np.prod(shape)) / 2**30:.1f} GiB needed); free disk space, give another --store, "
                            "or --data-cache memory.") from None
        _, offset = _read_header(npy)
        try:
            fill(npy, offset)
        except OSError as exc:  # e.g. the disk filled up while writing
            raise DataError(f"{tmp}: writing the decode cache failed ({exc.strerror or exc}); free disk space, give "
                            "another --store, or --data-cache memory.") from None
        images = DiskImages(npy, offset, shape)
        meta = {"version": _VERSION, "key": key, "shape": list(shape), "offset": offset,
                "fingerprint": fingerprint(images), "sha256": _checksum(npy), "verified": _stamp(npy)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same cache first: use theirs
            if not folder.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        images, meta = _open(folder, key)
        return images, meta["fingerprint"]
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_or_decode(cache_root: str | Path, key: str, paths: Sequence[Path], *, img_size: int, resize: str,
                   dicom_window: str, workers: int, fingerprint) -> tuple[DiskImages, str]:
    """The decoded images of ``paths`` from the cache folder ``cache_root/key``, decoding them
    (in ``workers`` processes) first when it is missing or damaged (:func:`build`).

    Returns:
        (images, fingerprint).

    Raises:
        DataError: the cache folder cannot be written, or a file cannot be decoded.
    """
    return open_cached(cache_root, key) or build(
        cache_root, key, (len(paths), 3, img_size, img_size),
        lambda npy, offset: _decode_all(npy, offset, paths, img_size, resize, dicom_window, workers), fingerprint)
