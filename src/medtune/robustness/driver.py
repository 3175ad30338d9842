"""``medtune attack``: UAP audits of stored runs, read from and written back to the results store.

The store side of :func:`medtune.robustness.audit.audit`: resolve the runs, load each run's best
weights (safetensors) and data from its stored config, and store one record per (source, ζ,
target) with the perturbation and its random control (``.safetensors``) and two PNGs (the UAP
amplified for visibility; clean vs perturbed examples) in ``artifacts/RUN_ID/uap/``. A run whose
audit (same :meth:`AuditConfig.semantic_dict`) is already stored is read back, not recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medtune._tensors import resolve_device
from medtune.config import RunConfig, load_config
from medtune._safepaths import is_regular
from medtune.errors import ConfigError, StoreError
from medtune.robustness.config import AuditConfig
from medtune.store import ResultsStore

__all__ = ["attack", "load_run_model", "resolve_runs", "transfer_zeta"]

# Keys of the run record copied into each of its attack records (``seed`` is the run's, not the UAP's).
_RUN_KEYS = ("run_id", "label", "arch", "strategy", "seed", "dataset")


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
    if not is_regular(path):
        raise ConfigError(f"Run {record['run_id']} has no stored weights at {path}; re-run it to audit it.")
    num_classes = record.get("num_classes") or len(record["predictions"]["class_names"])
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        raise StoreError(f"The stored weights {path} of run {record['run_id']} are unreadable "
                         f"({type(exc).__name__}); delete the run's row and artifacts and re-run it.") from None
    with torch.random.fork_rng(devices=[]):
        model = create_model(record["arch"], num_classes=num_classes, weights="none")
    from medtune.strategies import get_strategy_class, list_strategies

    if record.get("strategy") in list_strategies():  # e.g. the kNN probe's head, rebuilt from the stored buffers
        get_strategy_class(record["strategy"]).restore_model(model.backbone, state)
    try:
        model.backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise StoreError(f"The stored weights {path} do not fit run {record['run_id']}'s {record['arch']} "
                         f"({' '.join(str(exc).split())[:200]}); re-run it.") from None
    return model.to(device).eval()


def attack(runs: str | Sequence[str] = "all", config: AuditConfig | Mapping | str | None = None, *,
           store: ResultsStore | str | Path | None = None, log: Callable[[str], None] | None = None,
           **overrides: Any) -> list[dict]:
    """Audit stored runs with UAPs; return the attack records (also written to the store).

    Args:
        runs: run ids (unique prefixes) or ``"all"``.
        config: an :class:`AuditConfig`, a dict of its keys or a YAML path; default its defaults.
        store: the results store or its folder (default: the config's ``store``).
        log: receives one-line progress messages.
        **overrides: AuditConfig keys replacing the config's (``sources``, ``zetas``, ``norm``, ...).

    Returns:
        Per run, one record per (source, ζ, target) in the audit's order; with ``transfer`` and
        two or more runs of one dataset, last the transfer records (see :func:`_transfer`).

    Raises:
        ConfigError: an invalid or unknown config key (before any run is read), a run id that
            matches no finished run or several, no finished runs, or a run without stored weights.
    """
    if isinstance(store, (str, Path)):  # a folder, as from --store: it is a config key
        overrides["store"], store = str(store), None
    cfg = load_config(AuditConfig, config, **overrides)
    store = store or ResultsStore(cfg.store)
    log = log or (lambda _m: None)
    records = resolve_runs(store, runs)
    if not records:
        raise ConfigError(f"No finished runs in {store.root} to attack; run `medtune sweep` first.")
    device = resolve_device(cfg.device)
    out: list[dict] = []
    for record in records:
        out += _stored_audit(store, record, cfg, log) or _audit_run(store, record, cfg, device, log)
    if cfg.transfer:
        out += _transfer(store, records, out, cfg, device, log)
    return out


def _load_run(store: ResultsStore, record: dict, device: torch.device):
    """(model, data) of a stored run: its best weights and the data of its stored config."""
    from medtune.runner import prepare_data

    data = prepare_data(RunConfig.from_dict(record["config"]))
    return load_run_model(store, record, device), data


def _stored_audit(store: ResultsStore, record: dict, cfg: AuditConfig, log: Callable[[str], None]) -> list[dict]:
    done = [a for a in store.attacks(record["run_id"]) if a.get("params") == cfg.semantic_dict()]
    lost = [a.get("perturbation_file", "(none)") for a in done
            if not a.get("perturbation_file") or not is_regular(a["perturbation_file"])]
    if lost:  # a deleted UAP file: audit the run again (its records are replaced)
        log(f"{record['run_id']} {record['label']}: stored audit lacks {len(lost)} UAP file(s), e.g. {lost[0]}; "
            "auditing again")
        return []
    if done:
        log(f"{record['run_id']} {record['label']}: audit already stored")
    return done


def _audit_run(store: ResultsStore, record: dict, cfg: AuditConfig, device: torch.device,
               log: Callable[[str], None]) -> list[dict]:
    """Audit one run and store its records and artifacts."""
    from medtune.robustness.audit import audit

    run_id = record["run_id"]
    model, data = _load_run(store, record, device)
    test = data.split("test")
    log(f"{run_id} {record['label']}: UAP audit ({', '.join(cfg.sources)}; ζ={', '.join(map(str, cfg.zetas))}; "
        f"L{cfg.norm})")
    result = audit(model, cfg, test_images=test.images, test_labels=test.labels, train_images=data.split("train").images,
                   class_names=data.class_names, device=device)
    folder = store.run_dir(run_id, "uap")  # inside the store (a link out of it is refused)
    attacks = []
    for rec in result.records:
        key = rec["perturbation_key"]
        aid = cfg.attack_id(run_id, key=key)
        files = _write_artifacts(folder, aid, rec, result.perturbations[key], result.random_perturbations[key],
                                 test.images[:4], root=store.root)
        full = {**rec, "attack_id": aid, **{k: record[k] for k in _RUN_KEYS}, "params": cfg.semantic_dict(), **files}
        store.put_attack(aid, run_id, full)
        attacks.append(full)
    best = max((r for r in result.records if r.get("targeted") is None), key=lambda r: r["zeta"], default=None)
    if best is not None:
        log(f"{run_id}: fooling {best['fooling_rate']:.3f} at ζ={best['zeta']} ({best['source']}) vs random "
            f"{best['random_fooling_rate']:.3f} (max {best['random_fooling_rate_max']:.3f}; McNemar "
            f"p={best['mcnemar_p']:.2g})")
    return attacks


def _write_artifacts(folder: Path, aid: str, rec: dict, v: torch.Tensor, control: torch.Tensor,
                     examples: torch.Tensor, root: Path | None = None) -> dict[str, str]:
    """Write ``AID.safetensors`` (v and its random control), ``AID.png`` and ``AID_examples.png`` (each by a
    temporary file and a rename inside ``root``: a link in a crafted store is replaced, never written through)."""
    from safetensors.torch import save_file

    from medtune._safepaths import atomic_write
    from medtune.robustness.plots import save_examples_png, save_perturbation_png
    from medtune.robustness.uap import apply_perturbation

    vfile, png, shown = folder / f"{aid}.safetensors", folder / f"{aid}.png", folder / f"{aid}_examples.png"
    atomic_write(vfile, lambda p: save_file({"v": v.contiguous(), "random": control.contiguous()}, str(p)), root=root)
    atomic_write(png, lambda p: save_perturbation_png(v, p, title=f"{rec['source']} ζ={rec['zeta']}"), root=root)
    atomic_write(shown, lambda p: save_examples_png(examples, apply_perturbation(examples, v), p), root=root)
    return {"perturbation_file": str(vfile), "uap_png": str(png), "examples_png": str(shown)}


def _transfer_groups(chosen: Sequence[dict], by_id: Mapping[str, dict],
                     log: Callable[[str], None]) -> dict[tuple, dict]:
    """The UAPs of ``chosen`` attacks by (fingerprint, H, W) and target: {key: {target: {run_id: (attack, v)}}}."""
    from safetensors.torch import load_file

    groups: dict[tuple, dict] = {}
    for a in chosen:
        try:
            if not is_regular(a.get("perturbation_file", "")):
                raise FileNotFoundError(a.get("perturbation_file"))
            v = load_file(a["perturbation_file"])["v"]
        except Exception as exc:  # deleted or damaged file (FileNotFoundError, SafetensorError, KeyError)
            log(f"transfer: skipped the UAP of run {a['run_id']}: {a.get('perturbation_file')} is missing or unreadable "
                f"({type(exc).__name__}); re-run `medtune attack {a['run_id']}` to write it again")
            continue
        run = by_id[a["run_id"]]
        key = (run.get("data_fingerprint") or run.get("dataset"), *v.shape[-2:])
        groups.setdefault(key, {}).setdefault(a.get("targeted"), {})[a["run_id"]] = (a, v)
    return groups


def transfer_zeta(zetas: Sequence[float]) -> float:
    """The ζ of the transfer matrix: the middle of the audit's sorted ζ (the lower middle for an even count)."""
    ordered = sorted(zetas)
    return ordered[(len(ordered) - 1) // 2]


def _transfer(store: ResultsStore, records: Sequence[dict], attacks: Sequence[dict], cfg: AuditConfig,
              device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Transfer records: per dataset (data fingerprint and input size) with two or more audited runs and per
    target, the rate of each run's UAP (first source, :func:`transfer_zeta`) on each run's test set.

    Each record has ``matrix`` ({run of the UAP: {run evaluated on: rate}}), ``ci_low``/``ci_high``
    (95% Wilson, same shape), ``random`` ({run evaluated on: mean rate of its own random controls}),
    ``metric`` (``fooling_rate`` or ``targeted_success``), ``targeted``, ``zeta``, ``uap_source``,
    ``data_fingerprint``, ``img_size`` and ``labels``. Runs that cannot be compared are logged, never
    dropped silently.
    """
    from medtune.robustness.evaluate import rate_ci, transfer_matrix

    zeta, source = transfer_zeta(cfg.zetas), cfg.sources[0]
    by_id = {r["run_id"]: r for r in records}
    chosen = [a for a in attacks if a.get("source") == source and a.get("zeta") == zeta and a.get("run_id") in by_id]
    groups = _transfer_groups(chosen, by_id, log)
    out = []
    for (fingerprint, height, width), per_target in groups.items():
        for target, members in per_target.items():
            if len(members) < 2:
                log(f"transfer: skipped dataset {by_id[next(iter(members))]['dataset']} ({fingerprint}, "
                    f"{height}x{width} px): one audited run only; the matrix compares runs of one dataset")
                continue
            matrix: dict[str, dict[str, float]] = {rid: {} for rid in members}
            low: dict[str, dict[str, float]] = {rid: {} for rid in members}
            high: dict[str, dict[str, float]] = {rid: {} for rid in members}
            for target_id in members:
                model, data = _load_run(store, by_id[target_id], device)
                test = data.split("test")
                rates = transfer_matrix({target_id: model}, {k: v for k, (_, v) in members.items()}, test.images,
                                        targeted=target, device=device)[target_id]
                n = int(test.images.shape[0])
                for source_id, rate in rates.items():
                    matrix[source_id][target_id] = float(rate)
                    low[source_id][target_id], high[source_id][target_id] = rate_ci(int(round(rate * n)), n)
            random_key = "random_fooling_rate" if target is None else "random_targeted_success"
            tid = cfg.attack_id("transfer", runs=sorted(members), target=target, data=fingerprint)
            record = {"attack_id": tid, "run_id": "transfer", "source": "transfer", "uap_source": source,
                      "zeta": zeta, "norm": cfg.norm, "targeted": target,
                      "metric": "fooling_rate" if target is None else "targeted_success",
                      "data_fingerprint": fingerprint, "img_size": [int(height), int(width)],
                      "matrix": matrix, "ci_low": low, "ci_high": high,
                      "random": {rid: a[random_key] for rid, (a, _) in members.items()},
                      "params": cfg.semantic_dict(), "labels": {k: by_id[k]["label"] for k in members}}
            store.put_attack(tid, "transfer", record)
            out.append(record)
    if not out:
        log(f"transfer: no dataset has two audited runs with a {source} UAP at ζ={zeta}; no matrix")
    return out
