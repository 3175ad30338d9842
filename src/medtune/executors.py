"""Executors: where the independent runs of a sweep (and the genomes of a DEFT generation) train.

``local`` runs them in this process one after another, or in a pool of worker processes;
``ray`` sends them to a Ray cluster (``pip install medtune[ray]``), the existing distributed engine
rather than a home-made scheduler. Workers only train and return payloads; the driver alone writes
the results store.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from medtune.errors import ConfigError, unknown_name_error

__all__ = ["LocalExecutor", "RayExecutor", "create_executor", "EXECUTORS"]


class _Executor:
    """What every executor offers: ``map_unordered`` (its own) and an ordered ``map`` on top."""

    def map_unordered(self, fn: Callable, items: Sequence[tuple], *, return_exceptions: bool = False,
                      more: Callable[[], Sequence[tuple]] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, fn(*items[index]))`` as calls finish; with ``return_exceptions`` a call that
        raised (or whose worker died) yields its exception as the value and the others go on.

        ``more``: called after each yielded result has been handled by the consumer; the calls it returns
        are added (indices following the items') while the others run — successive halving submits a
        group's next rung as soon as that group's rung is complete, not when every group's is."""
        raise NotImplementedError

    def map(self, fn: Callable, iterable) -> list:
        """Ordered map, e.g. DEFT's ``map_fn`` for one generation."""
        items = [(x,) for x in iterable]
        out: list = [None] * len(items)
        for i, value in self.map_unordered(fn, items):
            out[i] = value
        return out


class LocalExecutor(_Executor):
    """Run calls in this process (``workers=1``) or in a pool of spawned processes.

    Args:
        workers: number of processes; 1 runs in-process (and is what the tests compare against).
    """

    def __init__(self, workers: int = 1) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"The 'workers' parameter of the local executor must be an int >= 1. Got {workers!r}.")
        self.workers = workers

    def map_unordered(self, fn: Callable, items: Sequence[tuple], *, return_exceptions: bool = False,
                      more: Callable[[], Sequence[tuple]] | None = None) -> Iterator[tuple[int, Any]]:
        if self.workers == 1:
            queue = list(items)
            i = 0
            while i < len(queue):
                try:
                    value = fn(*queue[i])
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    value = exc
                yield i, value
                i += 1
                if more is not None:
                    queue += list(more())
            return
        pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        finished = False
        try:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(items)}
            count = len(futures)
            while futures:
                done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    try:
                        value = fut.result()
                    except Exception as exc:  # the call raised, or its worker process died (BrokenProcessPool)
                        if not return_exceptions:
                            raise
                        value = exc
                    yield futures.pop(fut), value
                    for args in (more() if more is not None else ()):
                        futures[pool.submit(fn, *args)] = count
                        count += 1
            finished = True
        finally:
            if not finished:  # an error, Ctrl-C or SIGTERM in the driver: stop the workers now (their runs are
                # released by the caller and resume from their checkpoints); the pool has no public kill
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)



class RayExecutor(_Executor):
    """Run calls as Ray tasks.

    Args:
        address: a running cluster (``auto`` or ``HOST:PORT``), or None to start a local Ray.
        num_cpus: CPUs reserved per call.
        num_gpus: GPUs reserved per call.
        init_kwargs: passed to ``ray.init`` when this executor starts Ray (e.g. ``num_cpus``).
    """

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 init_kwargs: dict | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("The ray executor needs Ray: pip install 'medtune[ray]'.") from None
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.init_kwargs = dict(init_kwargs or {})

    def _ray(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=True, **self.init_kwargs)
        return ray

    def map_unordered(self, fn: Callable, items: Sequence[tuple], *, return_exceptions: bool = False,
                      more: Callable[[], Sequence[tuple]] | None = None) -> Iterator[tuple[int, Any]]:
        ray = self._ray()
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(fn)
        pending = {remote.remote(*args): i for i, args in enumerate(items)}
        count = len(pending)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                try:
                    value = ray.get(ref)
                except Exception as exc:  # RayTaskError, WorkerCrashedError, ...
                    if not return_exceptions:
                        raise
                    value = exc
                yield pending.pop(ref), value
                for args in (more() if more is not None else ()):
                    pending[remote.remote(*args)] = count
                    count += 1
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)



EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def create_executor(name: str = "local", *, workers: int = 1, address: str | None = None, num_cpus: float = 1,
                    num_gpus: float = 0, init_kwargs: dict | None = None):
    """Build an executor by name (``local`` or ``ray``).

    Raises:
        ConfigError: unknown name, bad workers, or Ray missing.
    """
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address, num_cpus=num_cpus, num_gpus=num_gpus, init_kwargs=init_kwargs)
    raise unknown_name_error("executor", name, EXECUTORS)
