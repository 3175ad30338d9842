"""Export a stored run's model for use outside medtune.

``timm``: timm's own ``save_for_hf`` layout (``config.json`` + ``model.safetensors``) with the
run's label names, class count, trained input size and the normalisation of its weights, so
``timm.create_model("local-dir:DIR", pretrained=True)`` restores the head, the labels and the input
size (that model takes *normalised* images, as every timm model; ``timm.data.resolve_data_config``
gives the transform). ``onnx``: the medtune model through ``torch.onnx.export``, taking images
(N, 3, H, W) in [0, 1] (the normalisation is inside the graph), with a parity check of its logits
in onnxruntime.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from medtune._safepaths import check_output, is_regular, read_regular
from medtune.errors import ConfigError, StoreError
from medtune.inference import get_run, load_model
from medtune.store import ResultsStore

__all__ = ["export", "EXPORT_FORMATS", "ONNX_TOLERANCE"]

EXPORT_FORMATS = ("timm", "onnx")
#: Largest |logit difference| allowed between the ONNX graph (onnxruntime) and the torch model.
ONNX_TOLERANCE = 1e-4


def _migrate_old_config(folder: Path) -> None:
    """Stores before the rename kept medtune's resolved config as ``config.json`` in the run's folder;
    move it to ``run_config.json`` so timm's ``config.json`` can take the name."""
    old, new = folder / "config.json", folder / "run_config.json"
    if not old.is_symlink() and is_regular(old) and not new.exists() and not new.is_symlink():
        try:
            data = json.loads(read_regular(old, limit=1 << 20))
        except (OSError, ValueError):
            return
        if "architecture" not in data:  # medtune's run config, not a timm export
            old.replace(new)


def export(run_id: str, *, fmt: str = "timm", out_dir: str | Path | None = None,
           store: ResultsStore | str | Path = "./medtune-results", check: bool = True) -> dict:
    """Export the trained model of ``run_id``.

    Args:
        run_id: a run id or a unique prefix.
        fmt: ``timm`` or ``onnx``.
        out_dir: output folder (default: the run's artifact folder ``STORE/artifacts/RUN_ID``, so
            ``timm.create_model("local-dir:STORE/artifacts/RUN_ID", pretrained=True)`` works).
        store: the results store.
        check: reload the export and compare its logits with medtune's model on random images.

    Returns:
        ``{"format", "path", "max_abs_diff"}`` (the parity check's largest |Δ logit|, None without ``check``).

    Raises:
        ConfigError: unknown run or format, missing ``onnx``/``onnxruntime``, an unwritable folder,
            or an ONNX export whose logits differ by more than ``ONNX_TOLERANCE``.
    """
    from medtune._checks import check_choice

    check_choice(fmt, "format", EXPORT_FORMATS, owner="export")
    db = store if isinstance(store, ResultsStore) else ResultsStore(store)
    record = get_run(run_id, store=db)
    if fmt == "timm" and record.get("strategy") == "knn":
        raise ConfigError(f"Run {record['run_id']} is a kNN probe: its head is the training features' votes, not a "
                          "timm classifier, so it has no timm export; use --format onnx or medtune predict.")
    if fmt == "timm" and str(record.get("arch", "")).startswith("tv:"):  # before any file is written
        raise ConfigError(f"Run {record['run_id']} is a torchvision model ({record['arch']}); timm's local-dir "
                          "layout names a timm architecture and timm has no such model: export it with --format "
                          "onnx.")
    own = db.run_dir(record["run_id"])
    if out_dir is not None:
        check_output(out_dir, flag="-o", folder=True, allow=own)
    model = load_model(record["run_id"], store=db, device="cpu")
    folder = Path(out_dir) if out_dir is not None else own
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create the export folder {folder} ({exc.strerror or exc}); give another -o.") \
            from None
    _migrate_old_config(own)
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(4, 3, model.img_size, model.img_size, generator=gen)
    with torch.no_grad():
        reference = model(probe).numpy()
    # written into a fresh folder beside the target, then renamed in file by file: a link in the target
    # folder (a crafted store) is replaced, never written through, and a failed export leaves nothing half-written
    try:
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".export-"))
    except OSError as exc:
        raise ConfigError(f"Cannot write to the export folder {folder} ({exc.strerror or exc}); give another -o.") \
            from None
    try:
        if fmt == "timm":
            path, diff = _export_timm(model, staging, probe, reference if check else None)
        else:
            path, diff = _export_onnx(model, staging, probe, reference if check else None)
        for item in sorted(staging.iterdir()):
            target = folder / item.name
            if target.is_dir() and not target.is_symlink():
                raise StoreError(f"Cannot write {target}: it is a folder; move it away and export again.")
            os.replace(item, target)
    except OSError as exc:
        raise ConfigError(f"Cannot write the export to {folder} ({exc.strerror or exc}); free disk space or give "
                          "another -o.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"format": fmt, "path": str(folder / path.relative_to(staging)) if path != staging else str(folder),
            "max_abs_diff": diff}


def _export_timm(model, folder: Path, probe: torch.Tensor, reference: np.ndarray | None) -> tuple[Path, float | None]:
    import timm

    cfg = model.pretrained_cfg
    data_config = {"input_size": (3, model.img_size, model.img_size), "mean": cfg["mean"], "std": cfg["std"],
                   "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    try:
        timm.models.save_for_hf(model.backbone, str(folder), model_config={"label_names": list(model.class_names)},
                                data_config=data_config, safe_serialization=True)
    except OSError as exc:
        raise ConfigError(f"Cannot write the timm export to {folder} ({exc.strerror or exc}).") from None
    diff = None
    if reference is not None:
        with torch.random.fork_rng(devices=[]):
            restored = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            diff = float(np.abs(restored(model.normalize(probe)).numpy() - reference).max())
    return folder, diff


class _FixedAdaptiveAvgPool(torch.nn.Module):
    """``AdaptiveAvgPool2d`` for one input size as two constant averaging matrices (``P_h x P_wᵀ``): the same
    numbers, in operators ONNX has (its exporter refuses an output size that does not divide the input's,
    e.g. AlexNet's 6×6 pool on a 64 px image)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("p_h", self._matrix(in_hw[0], out_hw[0]))
        self.register_buffer("p_w", self._matrix(in_hw[1], out_hw[1]))

    @staticmethod
    def _matrix(size: int, out: int) -> torch.Tensor:
        m = torch.zeros(out, size)
        for i in range(out):  # PyTorch's bins: [floor(i*size/out), ceil((i+1)*size/out))
            lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.p_h, x), self.p_w.t())


def _onnx_ready(model, probe: torch.Tensor):
    """A copy of ``model`` whose adaptive average pools that ONNX cannot export are fixed-size matrices."""
    import copy

    pools = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)}
    if not pools:
        return model
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: sizes.__setitem__(n, tuple(inp[0].shape[-2:])))
             for n, m in pools.items()]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    model = copy.deepcopy(model)
    fixed: dict[int, torch.nn.Module] = {}
    for name, pool in model.named_modules():
        if not isinstance(pool, torch.nn.AdaptiveAvgPool2d) or name not in sizes:
            continue
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        if None not in out and not all(i % o == 0 for i, o in zip(sizes[name], out)):
            fixed[id(pool)] = _FixedAdaptiveAvgPool(sizes[name], out)
    # a module can sit under two names, and torchvision's wrapper holds its model (whose forward runs) outside
    # its registered children: replace the pool everywhere
    roots = [model, *(m.__dict__["_tv_model"] for m in model.modules() if "_tv_model" in m.__dict__)]
    for root in roots:
        for name, module in list(root.named_modules(remove_duplicate=False)):
            if id(module) in fixed:
                parent, _, leaf = name.rpartition(".")
                setattr(root.get_submodule(parent) if parent else root, leaf, fixed[id(module)])
    return model


def _export_onnx(model, folder: Path, probe: torch.Tensor, reference: np.ndarray | None) -> tuple[Path, float | None]:
    path = folder / "model.onnx"
    try:
        import onnxruntime  # noqa: F401  (checked before the export, which needs onnx too)
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxruntime: pip install 'medtune[onnx]'.") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of the TorchScript exporter
        try:
            # the TorchScript exporter: the dynamo one needs onnxscript, a further dependency
            torch.onnx.export(_onnx_ready(model, probe), (probe,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        except OSError as exc:
            raise ConfigError(f"Cannot write {path} ({exc.strerror or exc}).") from None
    diff = None
    if reference is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        diff = float(np.abs(session.run(None, {"images": probe.numpy()})[0] - reference).max())
        if diff > ONNX_TOLERANCE:
            raise ConfigError(f"The ONNX export of {path} differs from the model by {diff:.2e} > {ONNX_TOLERANCE} "
                              "in its logits; an operator is not exported faithfully. Use --format timm.")
    return path, diff
