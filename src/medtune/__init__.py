"""medtune: how deeply, and how, to fine-tune an ImageNet CNN for medical images — and is the
result safe against universal adversarial perturbations?

Python API (every argument is also a YAML key and a CLI flag of the same name)::

    import medtune
    record = medtune.run(medtune.RunConfig(data="demo", strategy="top_k:2"))
    records = medtune.sweep({"strategy": ["linear", "top_k:all", "full"], "seeds": [0, 1]})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medtune.config import RunConfig, SweepConfig, load_yaml, save_yaml
from medtune.errors import (ConfigError, DataError, MedtuneError, NotFittedError, RunsFailedError, StoreError,
                            TrainingError)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "RunConfig",
    "SweepConfig",
    "load_yaml",
    "save_yaml",
    "run",
    "sweep",
    "demo",
    "search",
    "report",
    "attack",
    "DEMO_SWEEP",
    "MedtuneError",
    "ConfigError",
    "DataError",
    "StoreError",
    "NotFittedError",
    "RunsFailedError",
    "TrainingError",
]

#: The offline demo: EfficientNet-Lite0 with its real ImageNet weights on the built-in demo data.
DEMO_SWEEP: dict[str, Any] = {
    "name": "demo",
    "data": "demo",
    "arch": ["tf_efficientnet_lite0"],
    "weights": "efficientnet_lite0",
    "strategy": ["scratch", "linear", "top_k:all", "full"],
    "seeds": [0, 1],
    "epochs": 6,
    "img_size": 64,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_epochs": 0.5,
    "monitor": "auc",
}


def run(config: RunConfig | dict, **kwargs: Any) -> dict:
    """Train one configuration (see :func:`medtune.runner.run`)."""
    from medtune.runner import run as _run

    return _run(config, **kwargs)


def sweep(config: SweepConfig | dict | str | None = None, **kwargs: Any) -> list[dict]:
    """Run a sweep (see :func:`medtune.sweeps.sweep`)."""
    from medtune.sweeps import sweep as _sweep

    return _sweep(config, **kwargs)


def demo(*, store: str = "./medtune-results", seeds: str | list[int] = "0,1", epochs: int | None = None,
         device: str = "auto", log: Callable[[str], None] | None = None) -> list[dict]:
    """The README's main job: the demo sweep, offline, on 2 CPU cores in about 10 minutes."""
    return sweep(dict(DEMO_SWEEP), store=store, log=log, seeds=seeds, epochs=epochs, device=device)


def search(config: Any = None, **kwargs: Any) -> dict:
    """Run a DEFT search and its full-fidelity comparison (see :func:`medtune.deft.driver.run_search`)."""
    from medtune.deft.driver import run_search

    return run_search(config if config is not None else {}, **kwargs)


def report(store: str = "./medtune-results", *, out_path: str | None = None, fmt: str = "html", metric: str = "auc",
           title: str = "medtune report") -> str:
    """Write the report of a results store; returns its path (default ``STORE/report.html``)."""
    from pathlib import Path

    from medtune.reporting import build_report
    from medtune.store import ResultsStore

    db = ResultsStore(store, create=False)
    out = out_path or str(Path(store) / f"report.{fmt}")
    return str(build_report(db.runs(), db.attacks(), db.searches(), title=title, out_path=out, fmt=fmt, metric=metric))


def attack(runs: Any = "all", **kwargs: Any) -> list[dict]:
    """UAP audit of stored runs (see :func:`medtune.robustness.driver.attack`)."""
    from medtune.robustness.driver import attack as _attack

    return _attack(runs, **kwargs)
