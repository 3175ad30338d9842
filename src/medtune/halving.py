"""Successive halving over epochs (Jamieson & Talwalkar 2016; Li et al. 2018, Hyperband's inner loop):
configurations that compete train to a rung (epoch ``r`` of their full budget), are ranked by their mean
validation metric over seeds there, and the top ``1/eta`` continue from their epoch checkpoint to the
next rung (``r * eta``) until the full budget. Configurations tied exactly with the last one kept all
continue: a tie decides nothing, and breaking it by plan order would favour the first-listed value.

Decisions are a pure function of what the results store holds (each run's rung metrics, or a finished
run's history), so a killed sweep, restarted, makes the same promotions and trains nothing twice; the
learning-rate schedule of a paused run still spans the full budget, so a promoted run ends exactly as
if it had trained straight through. Selection reads validation metrics only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from medtune.store import ResultsStore
from medtune.training.metrics import higher_is_better, rung_metric

__all__ = ["rung_epochs", "rung_metric", "group_key", "decide", "run_halving", "halving_summary",
           "epochs_trained"]

_WITHIN_LR_AXES = ("lr", "weight_decay")  # what competes with ``within: lr``


def rung_epochs(epochs: int, first: int, eta: int) -> list[int]:
    """The rungs (epochs) below a full budget of ``epochs``: ``first, first*eta, first*eta**2, ...``."""
    out, r = [], max(1, int(first))
    while r < epochs:
        out.append(r)
        r *= eta
    return out


def group_key(cfg, within: str) -> str:
    """What a configuration competes within: ``lr`` — the same cell but for lr and weight decay;
    ``all`` — every cell of the same training fraction and fold (evaluation set-ups, not choices)."""
    d = cfg.semantic_dict()
    if within == "all":
        return json.dumps({"train_fraction": d.get("train_fraction"), "fold": d.get("fold")}, sort_keys=True)
    return json.dumps({k: v for k, v in d.items() if k not in (*_WITHIN_LR_AXES, "seed")}, sort_keys=True, default=str)


def _config_key(cfg) -> str:
    """A configuration: the cell without its seed (seeds are never split)."""
    return json.dumps({k: v for k, v in cfg.semantic_dict().items() if k != "seed"}, sort_keys=True, default=str)


def _solved(plan) -> bool:
    from medtune.runner import structure_blocks

    return bool(plan.strategy.ignores_optimiser(structure_blocks(plan.config.arch, plan.strategy.granularity)))


@dataclasses.dataclass
class _Decision:
    need: list[tuple[Any, int | None]]  # (plan, pause_at or None for the full budget)
    states: dict[tuple[str, int], tuple[str, float]]  # (run_id, rung) -> (promoted|stopped, val metric)


def decide(plans: Sequence[Any], store: ResultsStore, *, eta: int, first_rung: int, within: str) -> _Decision:
    """What to train next and every promotion so far, from the store alone (a pure function of it).

    Args:
        plans: the sweep's planned runs (:func:`medtune.sweeps.plan_sweep`).
        store: the results store.
        eta: keep the top ``1/eta`` of the configurations of a group at each rung (at least one).
        first_rung: epochs of the first rung.
        within: ``lr`` or ``all`` (:func:`group_key`).
    """
    rung_rows = {(r["run_id"], r["rung"]): r["val_metric"] for r in store.rungs()}
    status = {r["run_id"]: r["status"] for r in store.runs(status=None)}
    records: dict[str, dict | None] = {}

    def metric_at(plan, rung: int) -> float | None:
        if (plan.run_id, rung) in rung_rows:
            return rung_rows[(plan.run_id, rung)]
        if status.get(plan.run_id) == "done":
            if plan.run_id not in records:
                records[plan.run_id] = store.get(plan.run_id)
            rec = records[plan.run_id]
            if rec is not None:
                return rung_metric(rec.get("history") or [], rung, plan.config.monitor)
        return None

    need: list[tuple[Any, int | None]] = []
    states: dict[tuple[str, int], tuple[str, float]] = {}
    groups: dict[str, dict[str, list]] = {}
    for plan in plans:
        if _solved(plan):  # no epochs to halve: solved once, never paused
            if status.get(plan.run_id) != "done":
                need.append((plan, None))
            continue
        groups.setdefault(group_key(plan.config, within), {}).setdefault(_config_key(plan.config), []).append(plan)
    for members in groups.values():
        alive = list(members)  # configuration keys, in plan order (the tie-break)
        cfg0 = members[alive[0]][0].config
        higher = higher_is_better(cfg0.monitor)
        finished = True
        for rung in rung_epochs(cfg0.epochs, first_rung, eta):
            if len(alive) <= 1:
                break
            values = {c: [metric_at(p, rung) for p in members[c]] for c in alive}
            missing = [p for c in alive for p, v in zip(members[c], values[c]) if v is None]
            if missing:
                need += [(p, rung) for p in missing]
                finished = False
                break

            def score(c: str) -> float:
                vals = [v for v in values[c] if math.isfinite(v)]
                if len(vals) < len(values[c]) or not vals:
                    return -math.inf  # an undefined metric ranks last
                mean = sum(vals) / len(vals)
                return mean if higher else -mean

            order = sorted(range(len(alive)), key=lambda i: (-score(alive[i]), i))
            keep = max(1, len(alive) // eta)
            # a tie at the cut is no evidence: every configuration tied with the last one kept continues
            # (LP-FT's probe epoch floors each LR's best-so-far metric, so its LRs tie until one improves)
            cut = score(alive[order[keep - 1]])
            winners = [c for c in alive if score(c) >= cut]
            for i, c in enumerate(alive):
                state = "promoted" if c in winners else "stopped"
                for p, v in zip(members[c], values[c]):
                    states[(p.run_id, rung)] = (state, v)
            alive = winners
        if finished:
            need += [(p, None) for c in alive for p in members[c] if status.get(p.run_id) != "done"]
    return _Decision(need=need, states=states)


def run_halving(plans: Sequence[Any], *, store: ResultsStore, executor: Any, log: Callable[[str], None],
                eta: int, first_rung: int, within: str, progress: str | None = None) -> list[dict]:
    """Train a sweep's plans by successive halving; return the records of the runs trained to the end.

    Every run a decision waits for (to its rung, or to the end) goes to ``executor`` through
    :func:`medtune.runner.run_all`; after each run is stored the decisions are taken again from the
    store, stored, and the runs they newly wait for are added while the others train. A rung is thus a
    barrier only among the configurations that compete (a group's next rung starts as soon as its own
    rung is complete); runs another live process trains are left to it.

    Raises:
        RunsFailedError: some runs failed (the others are stored; the same command resumes).
    """
    from medtune.runner import run_all

    store.set_meta("halving", {"eta": eta, "first_rung": first_rung, "within": within})
    plans = list(plans)
    monitors = {p.run_id: p.config.monitor for p in plans}
    submitted: set[tuple[str, int | None]] = set()

    def next_runs() -> list[Any]:
        decision = decide(plans, store, eta=eta, first_rung=first_rung, within=within)
        stored = {(r["run_id"], r["rung"]): r["state"] for r in store.rungs()}
        for (run_id, rung), (state, value) in decision.states.items():
            if stored.get((run_id, rung)) != state:
                store.decide_rung(run_id, rung, state, value, monitor=monitors[run_id])
        new = [(p, r) for p, r in decision.need if (p.run_id, r) not in submitted]
        if new:
            submitted.update((p.run_id, r) for p, r in new)
            counts: dict[int | None, int] = {}
            for _, r in new:
                counts[r] = counts.get(r, 0) + 1
            log("halving: " + ", ".join(f"{n} runs to " + ("the end" if r is None else f"epoch {r}")
                                        for r, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))))
        return [dataclasses.replace(p, strategy=copy.deepcopy(p.strategy), pause_at=r) for p, r in new]

    first = next_runs()
    if first:
        run_all(first, store=store, executor=executor, log=log, progress=progress, more=next_runs)
        if decide(plans, store, eta=eta, first_rung=first_rung, within=within).need:
            log("the remaining runs are being trained by another live process; run the same command again "
                "once it finishes")
    out = [store.get(p.run_id) for p in plans]
    return [r for r in out if r is not None]


def epochs_trained(store: ResultsStore, run_ids: Sequence[str] | None = None) -> int:
    """Epochs the store's runs have trained: a finished run's history, a paused or stopped run's last rung."""
    wanted = None if run_ids is None else set(run_ids)
    total = 0
    last_rung: dict[str, int] = {}
    for r in store.rungs():
        last_rung[r["run_id"]] = max(last_rung.get(r["run_id"], 0), int(r["epochs"]))
    for row in store.runs(status=None):
        rid = row["run_id"]
        if wanted is not None and rid not in wanted:
            continue
        if row["status"] == "done":
            rec = store.get(rid)
            total += len(rec.get("history") or []) if rec else 0
        else:
            total += last_rung.get(rid, 0)
    return total


def halving_summary(store: ResultsStore) -> dict[str, Any] | None:
    """The halving settings of the store's last halving sweep, its stopped runs (rung, val metric) and its
    cost: epochs trained vs the full grid's budget (every run to its ``epochs``); None if it ran none."""
    settings = store.get_meta("halving")
    if settings is None:
        return None
    rows = store.rungs()
    stopped: dict[str, dict] = {}
    for r in rows:
        if r["state"] == "stopped":
            stopped[r["run_id"]] = r
    status = {r["run_id"]: r for r in store.runs(status=None)}
    not_done = [{**stopped[rid], "config": status[rid]["config"]} for rid in stopped
                if rid in status and status[rid]["status"] != "done"]
    budget = 0
    for rid, row in status.items():
        cfg = row.get("config") or {}
        budget += int(cfg.get("epochs") or 0) if row["status"] in ("done", "paused", "stopped", "running",
                                                                    "pending", "failed") else 0
    return {**settings, "stopped": not_done, "epochs_trained": epochs_trained(store), "epochs_full_grid": budget}


def planned_epochs(plans: Sequence[Any], *, halving: bool, eta: int = 3, first_rung: int = 1,
                   within: str = "lr") -> int:
    """Epochs a sweep trains if no run stops early: every run to its ``epochs``, or, with halving, each
    group's configurations to the rungs they reach (a solved strategy counts one epoch)."""
    if not halving:
        return sum(1 if _solved(p) else p.config.epochs for p in plans)
    total = 0
    groups: dict[str, tuple[int, dict[str, int]]] = {}
    for p in plans:
        if _solved(p):
            total += 1
            continue
        _, members = groups.setdefault(group_key(p.config, within), (p.config.epochs, {}))
        members[_config_key(p.config)] = members.get(_config_key(p.config), 0) + 1
    for epochs, members in groups.values():
        seeds = max(members.values())
        alive, done = len(members), 0
        for rung in rung_epochs(epochs, first_rung, eta):
            if alive <= 1:
                break
            total += alive * seeds * (rung - done)
            done, alive = rung, max(1, alive // eta)
        total += alive * seeds * (epochs - done)
    return total


def _step_seconds(arch: str, img_size: int, batch_size: int, num_classes: int, device: str, steps: int = 3) -> float:
    """Seconds of one full fine-tuning step of ``arch`` at this input and batch size (median of ``steps``
    timed after one warm-up step; random init, so nothing is downloaded)."""
    import time

    import torch

    from medtune._tensors import resolve_device
    from medtune.models import create_model

    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(arch, num_classes=num_classes, weights="none").to(dev)
        x = torch.rand(batch_size, 3, img_size, img_size, device=dev)
        y = torch.randint(0, num_classes, (batch_size,), device=dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def forecast(plans: Sequence[Any], *, halving: bool, eta: int = 3, first_rung: int = 1, within: str = "lr",
             workers: int = 1) -> dict[str, Any]:
    """A sweep's cost before it starts: its runs, the epochs it plans (no early stopping counted) and an
    estimated wall time from a few timed training steps per architecture at each input and batch size.

    The estimate charges every epoch a full fine-tuning pass over the training split plus a forward
    pass (a third of a step) over validation, divided over ``workers``; strategies that freeze part of
    the backbone (and the feature cache) cost less, so it is an upper bound for them."""
    from medtune.runner import prepare_data

    step: dict[tuple, float] = {}
    seconds = 0.0
    for p in plans:
        cfg = p.config
        key = (cfg.arch, cfg.img_size, cfg.batch_size, cfg.device)
        data = prepare_data(cfg)
        if key not in step:
            step[key] = _step_seconds(cfg.arch, cfg.img_size, cfg.batch_size, data.num_classes, cfg.device)
        n_train = int((data.splits == "train").sum())
        n_val = int((data.splits == "val").sum())
        epoch = math.ceil(n_train / cfg.batch_size) * step[key] + math.ceil(n_val / cfg.batch_size) * step[key] / 3
        seconds += epoch * planned_epochs([p], halving=False)
    full = planned_epochs(plans, halving=False)
    epochs = planned_epochs(plans, halving=halving, eta=eta, first_rung=first_rung, within=within)
    seconds *= epochs / max(full, 1)
    return {"runs": len(plans), "epochs": epochs, "epochs_full_grid": full,
            "seconds": seconds / max(1, workers), "step_seconds": {f"{k[0]}@{k[1]}px×{k[2]}": v for k, v in step.items()}}


def format_forecast(f: dict[str, Any]) -> str:
    """The forecast as one line."""
    secs = f["seconds"]
    wall = f"{secs / 3600:.1f} h" if secs >= 3600 else f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s"
    steps = ", ".join(f"{k} {v * 1000:.0f} ms/step" for k, v in f["step_seconds"].items())
    saved = (f" (full grid {f['epochs_full_grid']})" if f["epochs"] != f["epochs_full_grid"] else "")
    return f"forecast: {f['runs']} runs, {f['epochs']} epochs{saved}, about {wall} of training ({steps})"
