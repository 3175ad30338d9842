"""``medtune attack``: UAP audits of stored runs, written back to the results store.

Loads each run's best weights (safetensors) and data from its stored config, calls
:func:`medtune.robustness.audit.audit`, and stores one record per (source, ζ, target) with the
perturbation (``.safetensors``) and PNGs (the UAP amplified for visibility; clean vs perturbed
examples). An audit already in the store is not recomputed. ``transfer`` evaluates the train-image
UAP of every audited run on every other audited run (same input size) — the transferability matrix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from medtune.config import RunConfig
from medtune.errors import ConfigError
from medtune.store import ResultsStore

__all__ = ["attack", "load_run_model", "resolve_runs"]


def resolve_runs(store: ResultsStore, runs: str | Sequence[str]) -> list[dict]:
    """Records for run ids (unique prefixes allowed) or ``"all"``.

    Raises:
        ConfigError: an id matches no finished run, or several.
    """
    records = store.runs()
    if runs == "all" or runs == ["all"]:
        return records
    if isinstance(runs, str):
        runs = [r for r in runs.split(",") if r]
    out = []
    for rid in runs:
        hits = [r for r in records if r["run_id"].startswith(rid)]
        if len(hits) != 1:
            what = "no finished run" if not hits else f"{len(hits)} runs"
            raise ConfigError(f"Run id {rid!r} matches {what} in {store.root}; see `medtune results --runs --store "
                              f"{store.root}` for the ids.")
        out.append(hits[0])
    return out


def load_run_model(store: ResultsStore, record: dict, device: torch.device):
    """The trained model of a stored run (best weights), in eval mode on ``device``."""
    from safetensors.torch import load_file

    from medtune.models import create_model

    path = store.run_dir(record["run_id"]) / "best.safetensors"
    if not path.exists():
        raise ConfigError(f"Run {record['run_id']} has no stored weights at {path}; re-run it to audit it.")
    num_classes = record.get("num_classes") or len(record["predictions"]["class_names"])
    state = load_file(str(path))
    with torch.random.fork_rng(devices=[]):
        model = create_model(record["arch"], num_classes=num_classes, weights="none")
    model.backbone.load_state_dict(state)
    return model.to(device).eval()


def _attack_id(run_id: str, params: dict) -> str:
    return hashlib.sha256(json.dumps({"run": run_id, **params}, sort_keys=True).encode()).hexdigest()[:16]


def attack(runs: str | Sequence[str] = "all", *, store: ResultsStore | str = "./medtune-results",
           sources: Sequence[str] = ("train", "natural"), zetas: Sequence[float] = (0.02, 0.04, 0.08),
           norm: str | int = 2, targeted: int | str | None = None, natural_folder: str | None = None,
           num_source_images: int = 256, max_passes: int = 10, goal_rate: float = 0.8, batch_size: int = 32,
           seed: int = 0, device: str = "auto", transfer: bool = False,
           log: Callable[[str], None] | None = None) -> list[dict]:
    """Audit stored runs with UAPs; return the attack records (also written to the store).

    Args:
        runs: run ids (prefixes) or ``"all"``.
        store: the results store or its folder.
        sources: ``train`` (the run's training images) and/or ``natural`` (photos; ``natural_folder``
            or scikit-image's built-in ones).
        zetas: budgets ζ as fractions of the mean Lp norm of the source images.
        norm: 2 or ``inf``.
        targeted: None, a class index or ``all``.
        transfer: also evaluate each run's train-image UAP at the middle ζ on every other run.
    """
    from medtune.robustness.audit import audit as run_audit
    from medtune.robustness.plots import save_examples_png, save_perturbation_png
    from medtune.robustness.uap import apply_perturbation
    from medtune.runner import prepare_data
    from medtune.training.loop import resolve_device

    from safetensors.torch import save_file

    log = log or (lambda _m: None)
    store = store if isinstance(store, ResultsStore) else ResultsStore(store)
    dev = resolve_device(device)
    records = resolve_runs(store, runs)
    if not records:
        raise ConfigError(f"No finished runs in {store.root} to attack; run `medtune sweep` first.")
    params = {"sources": list(sources), "zetas": [float(z) for z in zetas], "norm": str(norm), "targeted": targeted,
              "natural_folder": natural_folder, "num_source_images": num_source_images, "max_passes": max_passes,
              "goal_rate": goal_rate, "batch_size": batch_size, "seed": seed}
    out: list[dict] = []
    uaps: dict[str, torch.Tensor] = {}
    for record in records:
        run_id = record["run_id"]
        done = [a for a in store.attacks(run_id) if a.get("params") == params]
        if done:
            log(f"{run_id} {record['label']}: audit already stored")
            out += done
            main = [a for a in done if a["source"] == "train" and a.get("perturbation_file")]
            if main:
                from safetensors.torch import load_file

                uaps[run_id] = load_file(main[len(main) // 2]["perturbation_file"])["v"]
            continue
        cfg = RunConfig.from_dict(record["config"])
        data = prepare_data(cfg)
        model = load_run_model(store, record, dev)
        test = data.split("test")
        log(f"{run_id} {record['label']}: UAP audit ({', '.join(sources)}; ζ={', '.join(map(str, zetas))}; L{norm})")
        result = run_audit(model, test_images=test.images, test_labels=test.labels,
                           train_images=data.split("train").images, class_names=data.class_names, zetas=zetas,
                           norm=norm, sources=sources, targeted=targeted, natural_folder=natural_folder,
                           num_source_images=num_source_images, max_passes=max_passes, goal_rate=goal_rate,
                           batch_size=batch_size, seed=seed, device=dev)
        folder = store.run_dir(run_id) / "uap"
        folder.mkdir(exist_ok=True)
        for rec in result.records:
            key = rec["perturbation_key"]
            aid = _attack_id(run_id, {**params, "key": key})
            v = result.perturbations[key]
            vfile = folder / f"{aid}.safetensors"
            save_file({"v": v.contiguous(), "random": result.random_perturbations[key].contiguous()}, str(vfile))
            png = save_perturbation_png(v, folder / f"{aid}.png", title=f"{rec['source']} ζ={rec['zeta']}")
            examples = save_examples_png(test.images[:4], apply_perturbation(test.images[:4], v), folder / f"{aid}_examples.png")
            full = {**rec, "attack_id": aid, "run_id": run_id, "label": record["label"], "arch": record["arch"],
                    "strategy": record["strategy"], "seed": record["seed"], "dataset": record["dataset"],
                    "params": params, "perturbation_file": str(vfile), "uap_png": str(png),
                    "examples_png": str(examples)}
            store.put_attack(aid, run_id, full)
            out.append(full)
            if rec["source"] == "train" and rec.get("targeted") is None and rec["zeta"] == sorted(zetas)[len(zetas) // 2]:
                uaps[run_id] = v
        best = max((r for r in result.records if r.get("targeted") is None), key=lambda r: r["zeta"], default=None)
        if best is not None:
            log(f"{run_id}: fooling {best['fooling_rate']:.3f} at ζ={best['zeta']} ({best['source']}) vs random "
                f"{best['random_fooling_rate']:.3f}")
    if transfer and len(uaps) > 1:
        from medtune.robustness.evaluate import evaluate_perturbation

        by_id = {r["run_id"]: r for r in records}
        matrix: dict[str, dict[str, float]] = {}
        for target_id in uaps:
            rec = by_id[target_id]
            model = load_run_model(store, rec, dev)
            test = prepare_data(RunConfig.from_dict(rec["config"])).split("test")
            for source_id, v in uaps.items():
                if v.shape[-2:] != test.images.shape[-2:]:
                    continue
                ev = evaluate_perturbation(model, test.images, test.labels, v, device=dev)
                matrix.setdefault(source_id, {})[target_id] = ev["fooling_rate"]
        tid = _attack_id("transfer", {**params, "runs": sorted(uaps)})
        trecord = {"attack_id": tid, "run_id": "transfer", "source": "transfer", "matrix": matrix, "params": params,
                   "labels": {k: by_id[k]["label"] for k in uaps}}
        store.put_attack(tid, "transfer", trecord)
        out.append(trecord)
    return out
