"""medtune: how deeply, and how, to fine-tune an ImageNet CNN for medical images — and is the
result safe against universal adversarial perturbations?

Python API (every argument is also a YAML key and a CLI flag of the same name)::

    import medtune
    record = medtune.run(medtune.RunConfig(data="demo", strategy="top_k:2"))
    records = medtune.sweep({"strategy": ["linear", "top_k:all", "full"], "seeds": [0, 1]})
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from medtune.config import RunConfig, SweepConfig, load_yaml, save_yaml
from medtune.errors import (ConfigError, DataError, MedtuneError, NotFittedError, RunsFailedError, StoreError,
                            TrainingError)
from medtune._version import __version__

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
    "load_model",
    "predict",
    "export",
    "explain",
    "MedtuneError",
    "ConfigError",
    "DataError",
    "StoreError",
    "NotFittedError",
    "RunsFailedError",
    "TrainingError",
]

def run(config: RunConfig | dict, **kwargs: Any) -> dict:
    """Train one configuration (see :func:`medtune.runner.run`)."""
    from medtune.runner import run as _run

    return _run(config, **kwargs)


def sweep(config: SweepConfig | dict | str | None = None, **kwargs: Any) -> list[dict]:
    """Run a sweep (see :func:`medtune.sweeps.sweep`)."""
    from medtune.sweeps import sweep as _sweep

    return _sweep(config, **kwargs)


def demo(*, store: str = "./medtune-results", seeds: str | list[int] = "0,1", epochs: int | None = None,
         device: str = "auto", stages: Sequence[str] = ("sweep", "search", "audit"),
         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The README's main job, offline: the depth/strategy sweep, a DEFT search and the UAP audit of
    the demo data, then the report (see :func:`medtune._demo.demo`)."""
    from medtune._demo import demo as _demo

    return _demo(store=store, seeds=seeds, epochs=epochs, device=device, stages=stages, log=log)


def search(config: Any = None, **kwargs: Any) -> dict:
    """Run a DEFT search and its full-fidelity comparison (see :func:`medtune.deft.driver.run_search`)."""
    from medtune.deft.driver import run_search

    return run_search(config if config is not None else {}, **kwargs)


def report(store: str = "./medtune-results", *, out_path: str | None = None, fmt: str = "html", metric: str = "auc",
           title: str = "medtune report") -> str:
    """Write the report of a results store; returns its path (default ``STORE/report.html``)
    (see :func:`medtune.reporting.report_store`)."""
    from medtune.reporting import report_store

    return str(report_store(store, out_path=out_path, fmt=fmt, metric=metric, title=title))


def explain(run: str, **kwargs: Any):
    """Heat maps of a stored run's test images and their localisation scores (see
    :func:`medtune.localisation.explain`)."""
    from medtune.localisation import explain as _explain

    return _explain(run, **kwargs)


def attack(runs: Any = "all", **kwargs: Any) -> list[dict]:
    """UAP audit of stored runs (see :func:`medtune.robustness.driver.attack`)."""
    from medtune.robustness.driver import attack as _attack

    return _attack(runs, **kwargs)


def load_model(run_id: str, **kwargs: Any):
    """The trained model of a stored run (see :func:`medtune.inference.load_model`)."""
    from medtune.inference import load_model as _load_model

    return _load_model(run_id, **kwargs)


def predict(run_id: str, data: str, **kwargs: Any):
    """A stored run's predictions (and metrics with intervals, when labelled) on ``data``
    (see :func:`medtune.inference.predict`)."""
    from medtune.inference import predict as _predict

    return _predict(run_id, data, **kwargs)


def export(run_id: str, **kwargs: Any) -> dict:
    """Export a stored run's model for timm or ONNX (see :func:`medtune.exporters.export`)."""
    from medtune.exporters import export as _export

    return _export(run_id, **kwargs)
