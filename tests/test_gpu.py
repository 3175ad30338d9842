"""The CUDA path: bf16 autocast, channels_last, data on the device, the feature cache and the UAP on a GPU.

Every test here is marked ``gpu`` and skipped where torch sees no CUDA device (tests/conftest.py), so
CI (CPU-only) collects and skips them; ``benchmarks/gpu/run_gpu_checks.sh`` runs them on a GPU machine
(``python -m pytest -m gpu tests/test_gpu.py``). Comparisons with the CPU switch TF32 off, so only
float reassociation separates the two devices.
"""

from __future__ import annotations

import pytest
import torch

from medtune.models import get_blocks
from medtune.strategies import create_strategy
from medtune.training.cache import FEATURE_CACHE
from medtune.training.loop import fit
from tests.conftest import make_tiny

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls in full precision (cuDNN uses TF32 for convolutions by default)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _fit(spec, cfg, data, *, on_model=None):
    """Train the seeded tiny CNN on ``cfg.device``; returns (model, result, log text, initial state,
    names of the parameters the strategy freezes). ``on_model(model)`` may register hooks first."""
    model = make_tiny(data.num_classes).to(cfg.device)
    strategy = create_strategy(spec)
    blocks = get_blocks(model, granularity=strategy.granularity)
    strategy.set_trainable(blocks)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    if on_model is not None:
        on_model(model)
    lines: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = fit(model, data, strategy, cfg, blocks=blocks, log=lines.append)
    return model, result, "\n".join(lines), initial, frozen


def test_amp_channels_last_fit_trains_and_leaves_frozen_params_bit_identical(tiny_cfg, synthetic_data):
    inputs, conv_out = [], []

    def hooks(model):
        model.register_forward_pre_hook(lambda m, args: inputs.append(args[0]) if m.training else None)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, _a, out: conv_out.append(out.dtype) if m.training else None)

    cfg = tiny_cfg.replace(device="cuda", amp="on", channels_last="on", feature_cache="off", epochs=3)
    model, result, _, initial, frozen = _fit("top_k:1", cfg, synthetic_data, on_model=hooks)
    assert frozen and len(frozen) < len(dict(model.named_parameters()))
    state = model.state_dict()
    for name in frozen:  # frozen weights, and the BatchNorm statistics of frozen layers, to the last bit
        assert torch.equal(state[name], initial[name]), name
    for name, t in state.items():
        if "running_" in name and name.rsplit(".", 1)[0] + ".weight" in frozen:
            assert torch.equal(t, initial[name]), name
    assert any(not torch.equal(state[n], initial[n]) for n, _ in model.named_parameters() if n not in frozen)
    assert all(t.device.type == "cuda" for t in state.values())
    # batches reach the model on the GPU as float32 NHWC, and the forward runs under bf16 autocast
    assert inputs and all(x.device.type == "cuda" and x.dtype == torch.float32 for x in inputs)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in inputs)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert set(conv_out) == {torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16}
    assert torch.isfinite(torch.as_tensor(result.y_prob)).all()
    _, r_fp32, _, _, _ = _fit("top_k:1", cfg.replace(amp="off"), synthetic_data)
    assert result.test_metrics["auc"] == pytest.approx(r_fp32.test_metrics["auc"], abs=0.1)


def test_cuda_and_cpu_give_the_same_run(tiny_cfg, synthetic_data, no_tf32):
    cfg = tiny_cfg.replace(amp="off", channels_last="off", feature_cache="off")
    _, on_cpu, _, _, _ = _fit("full", cfg.replace(device="cpu"), synthetic_data)
    _, on_gpu, _, _, _ = _fit("full", cfg.replace(device="cuda"), synthetic_data)
    torch.testing.assert_close(torch.as_tensor(on_gpu.y_prob), torch.as_tensor(on_cpu.y_prob), rtol=0, atol=1e-4)
    for key, value in on_cpu.test_metrics.items():
        assert on_gpu.test_metrics[key] == pytest.approx(value, abs=1e-3), key


@pytest.mark.parametrize("spec", ["linear", "top_k:1"])
def test_feature_cache_on_cuda_equals_uncached(spec, tiny_cfg, synthetic_data, no_tf32):
    FEATURE_CACHE.clear()
    cfg = tiny_cfg.replace(device="cuda", amp="off", channels_last="on")
    m_off, r_off, log_off, _, _ = _fit(spec, cfg.replace(feature_cache="off"), synthetic_data)
    m_on, r_on, log_on, _, _ = _fit(spec, cfg, synthetic_data)
    assert "feature cache: frozen prefix" in log_on and "feature cache" not in log_off
    assert FEATURE_CACHE.misses >= 1
    for (name, a), (_, b) in zip(m_off.state_dict().items(), m_on.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for key, value in r_off.test_metrics.items():
        assert r_on.test_metrics[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize("norm", [2, "inf"])
def test_uap_on_cuda_stays_within_its_budget(synthetic_data, norm):
    from medtune.robustness import apply_perturbation, budget_xi, compute_uap, perturbation_norm

    model = make_tiny(synthetic_data.num_classes).cuda().eval()
    images = synthetic_data.images[:32]
    xi = budget_xi(images, 0.04, norm)
    result = compute_uap(model, images, zeta=0.04, norm=norm, step_size=10 * xi, max_passes=2, goal_rate=1.0,
                         batch_size=8, device="cuda")
    v = result.perturbation
    assert v.device.type == "cpu" and v.dtype == torch.float32 and v.shape == images.shape[1:]
    assert 0 < perturbation_norm(v, norm) <= result.xi + 1e-6
    if norm == "inf":  # ten-times steps saturate every pixel the gradient touches
        assert perturbation_norm(v, norm) == pytest.approx(xi, rel=1e-5)
    perturbed = apply_perturbation(images, v)
    assert perturbed.min() >= 0 and perturbed.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_a_run_through_the_api_on_cuda(tiny_cfg):
    import medtune

    record = medtune.run(tiny_cfg.replace(device="cuda", strategy="full"))
    assert record["device"].startswith("cuda")
    assert 0.0 <= record["metrics"]["auc"] <= 1.0
    assert record["images_per_s"] > 0
