"""Precision: ``amp`` on a CPU trains and evaluates in bfloat16 autocast, off in float32; the run
record says which; frozen parameters stay bit-identical under bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medtune
from medtune._tensors import cpu_has_native_bf16, resolve_amp_dtype
from medtune.models import get_blocks
from medtune.store import ResultsStore
from medtune.strategies import create_strategy
from medtune.training.loop import fit
from tests.conftest import make_tiny


def _fit_recording_conv_dtypes(cfg, data, strategy="full"):
    """fit with a hook on every conv; returns (result, model, before, {(training, dtype)} seen)."""
    model = make_tiny(data.num_classes)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: set[tuple[bool, torch.dtype]] = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, _i, out: seen.add((mod.training, out.dtype)))
    s = create_strategy(strategy)
    result = fit(model, data, s, cfg, blocks=get_blocks(model, granularity=s.granularity))
    return result, model, before, seen


def test_amp_on_cpu_trains_and_evaluates_in_bf16(tiny_cfg, synthetic_data):
    result, _, _, seen = _fit_recording_conv_dtypes(tiny_cfg.replace(amp="on", feature_cache="off"), synthetic_data)
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}  # training steps and evaluation
    assert result.precision == "bf16"


@pytest.mark.parametrize("amp", ["off", "auto"])
def test_amp_off_and_auto_on_cpu_run_float32(amp, tiny_cfg, synthetic_data):
    result, _, _, seen = _fit_recording_conv_dtypes(tiny_cfg.replace(amp=amp, feature_cache="off"), synthetic_data)
    assert seen == {(True, torch.float32), (False, torch.float32)}
    assert result.precision == "fp32"


def test_frozen_params_bit_identical_under_bf16(tiny_cfg, synthetic_data):
    result, model, before, seen = _fit_recording_conv_dtypes(tiny_cfg.replace(amp="on", feature_cache="off"),
                                                             synthetic_data, strategy="top_k:1")
    assert (True, torch.bfloat16) in seen
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    blocks = get_blocks(model)
    trainable = {f"backbone.{n}" for i in (blocks.head_idx - 1, blocks.head_idx) for n in blocks[i].param_names}
    assert changed == trainable  # the top block and the head moved, every other parameter bit for bit as before
    assert all(p.dtype == torch.float32 for p in params.values())  # autocast keeps float32 master weights


def test_record_stores_the_precision(tmp_path):
    base = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 1, "img_size": 16,
            "batch_size": 16, "device": "cpu", "num_threads": 1, "strategy": "linear", "progress": False}
    on = medtune.run({**base, "amp": "on"}, store=ResultsStore(tmp_path / "a"))
    off = medtune.run({**base, "amp": "off"}, store=ResultsStore(tmp_path / "b"))
    assert (on["precision"], off["precision"]) == ("bf16", "fp32")
    assert ResultsStore(tmp_path / "a").get(on["run_id"])["precision"] == "bf16"


def test_resolve_amp_dtype():
    cpu = torch.device("cpu")
    assert resolve_amp_dtype("off", cpu) is None and resolve_amp_dtype("auto", cpu) is None
    assert resolve_amp_dtype("on", cpu) is torch.bfloat16


def test_native_bf16_query_matches_the_cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert cpu_has_native_bf16() == bool({"amx_tile", "avx512_bf16"} & flags)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_loop_optimiser_updates_bit_identically_to_torch_default(kind, tiny_cfg, synthetic_data):
    """The loop's multi-tensor (foreach) optimiser is a speed-up only: after a few steps with two
    groups at different LRs, the weights equal those of torch's per-parameter default bit for bit."""
    from medtune.training.loop import _Setup

    models = [make_tiny(), make_tiny()]
    opts = []
    for model, setup in zip(models, (True, False)):
        params = list(model.parameters())
        groups = [{"params": params[:2], "lr_scale": 0.5, "weight_decay": 0.1},
                  {"params": params[2:], "lr_scale": 1.0, "weight_decay": 0.0}]
        if setup:
            run = _Setup.create(model, synthetic_data, tiny_cfg.replace(optimizer=kind, feature_cache="off"),
                                get_blocks(model))
            opts.append(run.build_optimizer(groups))
        elif kind == "sgd":
            opts.append(torch.optim.SGD(groups, lr=tiny_cfg.lr, momentum=tiny_cfg.momentum, foreach=False))
        else:
            opts.append(torch.optim.AdamW(groups, lr=tiny_cfg.lr, foreach=False))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for group in opt.param_groups:
                group["lr"] = tiny_cfg.lr * (step + 1) * group["lr_scale"]
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            opt.step()
    assert opts[0].defaults["foreach"] and not opts[1].defaults["foreach"]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
