"""The frozen-prefix feature cache: same results as without it, invalidated by any change, off when unsafe;
only the cuts in use are stored, in float16 where they fit, within a memory and disk budget."""

from __future__ import annotations

import pytest
import torch

from medtune.models import get_blocks
from medtune.strategies import create_strategy
from medtune.training.cache import FEATURE_CACHE, build_chain
from medtune.training.loop import fit
from tests.conftest import make_tiny


def _fit(spec, cfg, data, seed=0, model=None, cache_cuts=()):
    lines = []
    model = model or make_tiny(data.num_classes, seed=seed)
    strategy = create_strategy(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = fit(model, data, strategy, cfg, blocks=get_blocks(model, granularity=strategy.granularity),
                     log=lines.append, cache_cuts=cache_cuts)
    return model, result, "\n".join(lines)


@pytest.mark.parametrize("spec", ["linear", "top_k:1", "top_k:2", "lp_ft:lp_epochs=2"])
def test_cached_training_equals_uncached(spec, tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    m_off, r_off, log_off = _fit(spec, tiny_cfg.replace(feature_cache="off"), synthetic_data)
    m_on, r_on, log_on = _fit(spec, tiny_cfg.replace(feature_cache="fp32"), synthetic_data)
    assert "feature cache: frozen prefix" in log_on and "feature cache" not in log_off
    for (name, a), (_, b) in zip(m_off.state_dict().items(), m_on.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # tolerance: float reassociation only
    for key, value in r_off.test_metrics.items():
        assert r_on.test_metrics[key] == pytest.approx(value, abs=1e-5), key


def test_only_the_cut_in_use_is_stored_and_changes_invalidate(tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    _fit("top_k:1", tiny_cfg, synthetic_data)  # tiny CNN: trains stages.2 and the head, caches stages.1's output
    assert FEATURE_CACHE.misses == 3 and len(FEATURE_CACHE.keys()) == 3  # one cut, one entry per split
    entries = [FEATURE_CACHE.get(k).values for k in FEATURE_CACHE.keys()]
    assert sorted(len(t) for t in entries) == sorted(int((synthetic_data.splits == s).sum())
                                                     for s in ("train", "val", "test"))
    assert {tuple(t.shape[1:]) for t in entries} == {(24, 4, 4)}  # stages.1.0's output at 16 px, nothing else
    assert FEATURE_CACHE.nbytes() == 64 * 24 * 4 * 4 * 2  # all 64 images, float16
    misses = FEATURE_CACHE.misses
    _fit("top_k:2", tiny_cfg, synthetic_data)  # same weights, shorter cut: nobody announced it, so not stored
    assert FEATURE_CACHE.misses == misses + 3
    misses = FEATURE_CACHE.misses
    _fit("top_k:2", tiny_cfg, synthetic_data, seed=1)  # another init: other prefix weights must miss
    assert FEATURE_CACHE.misses == misses + 3
    misses = FEATURE_CACHE.misses
    from medtune.data import make_synthetic

    other = make_synthetic(num_samples=64, img_size=16, seed=5)  # other data
    _fit("top_k:2", tiny_cfg, other)
    assert FEATURE_CACHE.misses == misses + 3
    bigger = make_synthetic(num_samples=64, img_size=24, seed=0)  # another transform (input size)
    _fit("top_k:2", tiny_cfg.replace(img_size=24), bigger)
    assert FEATURE_CACHE.misses == misses + 6
    _fit("top_k:2", tiny_cfg.replace(feature_cache="fp32"), synthetic_data)  # another storage precision
    assert FEATURE_CACHE.misses == misses + 9


def test_a_sweep_that_announces_its_cuts_pays_one_pass(tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    num_blocks = len(get_blocks(make_tiny()))
    cuts = [num_blocks - 1 - k for k in range(num_blocks)]  # top_k:k freezes the first B - 1 - k blocks
    _fit("top_k:0", tiny_cfg, synthetic_data, cache_cuts=cuts)  # the longest prefix: its pass stores the shorter cuts too
    assert FEATURE_CACHE.misses == 3
    shapes = {tuple(FEATURE_CACHE.get(k).values.shape[1:]) for k in FEATURE_CACHE.keys()}
    assert shapes == {(32,), (24, 4, 4), (16, 8, 8), (8, 16, 16)}  # the pooled vector and the three stage cuts
    for k in (1, 2, 3):
        _, _, log = _fit(f"top_k:{k}", tiny_cfg, synthetic_data)
        assert "feature cache: frozen prefix" in log
    assert FEATURE_CACHE.misses == 3, "the first pass stored the features of every announced cut"


def test_a_linear_probe_caches_the_pooled_vector_and_solves_the_same_head(tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    m_on, r_on, log = _fit("linear", tiny_cfg, synthetic_data)
    assert "(head.drop)" in log and "training on (32,) features" in log  # pooled, not the 4x4 stage map
    assert r_on.extras["feature_cache"]["linear"]["feature_shape"] == [32]
    assert r_on.extras["feature_cache"]["linear"]["dtype"] == "float32"  # pooled vectors stay float32
    assert FEATURE_CACHE.nbytes() == 64 * 32 * 4
    m_off, r_off, _ = _fit("linear", tiny_cfg.replace(feature_cache="off"), synthetic_data)
    head_on, head_off = m_on.backbone.get_classifier(), m_off.backbone.get_classifier()
    torch.testing.assert_close(head_on.weight, head_off.weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(head_on.bias, head_off.bias, rtol=0, atol=1e-5)
    assert r_on.test_metrics == pytest.approx(r_off.test_metrics, abs=1e-6)


def test_active_dropout_ends_the_frozen_prefix(tiny_cfg, synthetic_data):
    model = make_tiny()
    model.backbone.head.drop.p = 0.5  # random in training: computing it once would change the run
    _, _, log = _fit("top_k:0", tiny_cfg, synthetic_data, model=model)
    assert "(head.global_pool)" in log


@pytest.mark.parametrize("spec", ["top_k:1", "top_k:2"])
def test_float16_storage_stays_within_tolerance_of_float32(spec, tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    _, r32, _ = _fit(spec, tiny_cfg.replace(feature_cache="fp32"), synthetic_data)
    _, r16, _ = _fit(spec, tiny_cfg, synthetic_data)
    phase = next(iter(r16.extras["feature_cache"]))
    assert r16.extras["feature_cache"][phase]["dtype"] == "float16"
    assert r32.extras["feature_cache"][phase]["dtype"] == "float32"
    assert 0 < r16.extras["feature_cache"][phase]["max_abs"] < 65504
    assert {FEATURE_CACHE.get(k).values.dtype for k in FEATURE_CACHE.keys()} == {torch.float16, torch.float32}
    # the stated tolerance: float16 rounds each feature by <= 2^-11 of itself; predictions move by < 1e-3
    assert abs(r16.y_prob - r32.y_prob).max() < 1e-3
    assert r16.test_metrics["auc"] == pytest.approx(r32.test_metrics["auc"], abs=0.01)


def test_features_beyond_float16_range_are_stored_in_float32(tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    model = make_tiny()
    model.std.mul_(1e-6)  # inputs ~1e6 after normalisation: the features overflow float16
    _, result, log = _fit("top_k:1", tiny_cfg, synthetic_data, model=model)
    record = result.extras["feature_cache"]["top_k"]
    assert record["dtype"] == "float32" and record["max_abs"] >= 65504
    assert "stored in float32" in log
    assert {FEATURE_CACHE.get(k).values.dtype for k in FEATURE_CACHE.keys()} == {torch.float32}


def test_features_over_the_budgets_run_uncached_with_one_line(tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    tiny = 1000 / 2**30  # 1000 bytes of memory and of disk: the 64 x 384 x 2 bytes at stages.1 cannot fit
    _, r_on, log = _fit("top_k:1", tiny_cfg.replace(feature_cache_memory_gb=tiny, feature_cache_disk_gb=tiny),
                        synthetic_data)
    lines = [line for line in log.splitlines() if "feature cache" in line]
    assert len(lines) == 1 and "running uncached" in lines[0] and "feature_cache_memory_gb" in lines[0]
    assert "48.0 KiB" in lines[0] and "1000 B in memory and 1000 B on disk" in lines[0]
    assert FEATURE_CACHE.keys() == [] and FEATURE_CACHE.misses == 0  # decided before computing anything
    assert "top_k" not in r_on.extras["feature_cache"] and r_on.extras["feature_seconds"] == 0.0
    assert "would take" in r_on.extras["feature_cache_off"]["top_k"]  # the record says why it ran uncached
    _, r_off, _ = _fit("top_k:1", tiny_cfg.replace(feature_cache="off"), synthetic_data)
    assert r_on.test_metrics == r_off.test_metrics


def test_augmentation_and_moving_prefixes_disable_the_cache_with_a_reason(tiny_cfg, synthetic_data):
    _, _, log = _fit("linear", tiny_cfg.replace(augment=["affine", "hflip"]), synthetic_data)
    assert "feature cache off: random augmentation (hflip, affine)" in log
    _, _, log = _fit("gradual_lf", tiny_cfg, synthetic_data)
    assert "feature cache off: the strategy changes which layers are frozen" in log
    _, _, log = _fit("full", tiny_cfg, synthetic_data)
    assert "feature cache off: nothing before the first trainable layer is frozen" in log


def test_a_model_whose_forward_is_not_a_chain_is_never_cached():
    model = make_tiny()
    x = torch.rand(2, 3, 16, 16)
    assert build_chain(model, x) is not None
    original = model.backbone.forward_features

    model.backbone.forward_features = lambda t: original(t) * 2  # forward now does more than its children
    assert build_chain(model, x) is None


def test_features_over_the_memory_budget_go_to_a_disk_memmap(tiny_cfg, synthetic_data, tmp_path, monkeypatch):
    import numpy as np

    from medtune.training import cache as cache_mod

    small = cache_mod.FeatureCache()
    monkeypatch.setattr(cache_mod, "FEATURE_CACHE", small)
    cfg = tiny_cfg.replace(feature_cache_memory_gb=20_000 / 2**30)  # holds one split (16 x 768 B), not train
    m_on, r_on, log = _fit("top_k:1", cfg, synthetic_data)
    assert "feature cache: frozen prefix" in log
    spilled = list((tmp_path / "store" / "feature-cache").glob("medtune-features-*/features.npy"))
    assert spilled, "features larger than the memory budget are written to disk under STORE/feature-cache"
    assert small.nbytes() <= 20_000 and small.disk_nbytes() > 0
    on_disk = [np.load(path, mmap_mode="r") for path in spilled]  # train (32 x 768 B) and test (val took memory)
    assert sorted(a.shape for a in on_disk) == [(16, 24, 4, 4), (32, 24, 4, 4)]
    assert {a.dtype for a in on_disk} == {np.dtype(np.float16)}
    m_off, r_off, _ = _fit("top_k:1", tiny_cfg.replace(feature_cache="off"), synthetic_data)
    for key, value in r_off.test_metrics.items():
        assert r_on.test_metrics[key] == pytest.approx(value, abs=1e-3), key
    small.clear()
    assert not list((tmp_path / "store" / "feature-cache").glob("medtune-features-*")), "clearing deletes spills"


def test_feature_seconds_do_not_depend_on_run_order(tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    _, first, _ = _fit("top_k:1", tiny_cfg, synthetic_data)  # fills the cache (a miss)
    misses = FEATURE_CACHE.misses
    _, second, _ = _fit("top_k:1", tiny_cfg, synthetic_data)  # same prefix: a hit
    assert FEATURE_CACHE.misses == misses
    assert first.extras["feature_seconds"] == second.extras["feature_seconds"] > 0
    assert first.extras["feature_seconds_eval"] == second.extras["feature_seconds_eval"] > 0
    for result in (first, second):  # the training split's extraction is charged to every run of the prefix
        epochs = sum(h["seconds"] for h in result.history)
        assert result.train_seconds == pytest.approx(epochs + result.extras["feature_seconds"])
    FEATURE_CACHE.clear()
    # announced: the first pass stores top_k:2's cut (the first 2 blocks) too
    _, first, _ = _fit("top_k:1", tiny_cfg, synthetic_data, cache_cuts=[2, 3])
    misses = FEATURE_CACHE.misses
    _, shorter, _ = _fit("top_k:2", tiny_cfg, synthetic_data)  # a cut filled by the first run's pass
    assert FEATURE_CACHE.misses == misses
    assert 0 < shorter.extras["feature_seconds"] <= first.extras["feature_seconds"]
    _, off, _ = _fit("top_k:1", tiny_cfg.replace(feature_cache="off"), synthetic_data)
    assert off.extras["feature_seconds"] == 0.0
    assert off.train_seconds == pytest.approx(sum(h["seconds"] for h in off.history))


def test_a_sweep_announces_its_depths_so_one_pass_fills_every_cut(tmp_path):
    from medtune.sweeps import load_sweep_config, plan_sweep, sweep

    FEATURE_CACHE.clear()
    config = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "img_size": 16, "epochs": 1,
              "batch_size": 16, "device": "cpu", "progress": False, "eval_batch_size": 64,
              "strategy": ["top_k:0", "top_k:1", "top_k:2", "full"], "seeds": [0]}
    plans = plan_sweep(load_sweep_config({**config, "store": str(tmp_path / "store")}))
    assert {p.cache_cuts for p in plans} == {frozenset({4, 3, 2, 0})}  # 5 blocks: top_k:k freezes 4 - k
    config["strategy"] = config["strategy"][:3]
    records = sweep(config, store=tmp_path / "store")
    assert [r["status"] for r in records] == ["done"] * 3
    assert FEATURE_CACHE.misses == 3 and FEATURE_CACHE.hits == 6  # top_k:0's pass (per split) served the others


def test_default_budgets_count_what_the_cache_holds_as_available(monkeypatch, tmp_path):
    from medtune.training import cache as cache_mod

    gib = 1 << 30
    monkeypatch.setattr(cache_mod, "_available_ram", lambda: 4 * gib)
    assert cache_mod.default_memory_bytes() == gib  # 25% of 4 GiB
    assert cache_mod.default_memory_bytes(held=2 * gib) == 1.5 * gib  # what it holds is not lost to it
    monkeypatch.setattr(cache_mod, "_available_ram", lambda: 64 * gib)
    assert cache_mod.default_memory_bytes() == 2 * gib  # capped
    seen = []
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: seen.append(p) or _Usage(free=10 * gib))
    assert cache_mod.default_disk_bytes(tmp_path / "not" / "yet") == 5 * gib  # half the free space
    assert seen == [tmp_path]  # of the nearest existing folder
    assert cache_mod.default_disk_bytes(tmp_path, held=60 * gib) == 32 * gib  # capped


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_under_bf16_autocast_the_prefix_is_cached_in_the_runs_precision(tiny_cfg, synthetic_data):
    # the cached prefix runs under the run's autocast, as the uncached run computes it every epoch
    FEATURE_CACHE.clear()
    bf16 = tiny_cfg.replace(amp="on", device="cpu")
    m_off, r_off, _ = _fit("top_k:1", bf16.replace(feature_cache="off"), synthetic_data)
    m_on, r_on, log_on = _fit("top_k:1", bf16.replace(feature_cache="fp32"), synthetic_data)
    assert "feature cache: frozen prefix" in log_on and r_on.precision == "bf16"
    entries = [FEATURE_CACHE.get(k).values for k in FEATURE_CACHE.keys()]
    assert len(entries) == 3 and all(t.dtype == torch.float32 for t in entries)
    for (name, a), (_, b) in zip(m_off.state_dict().items(), m_on.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    misses = FEATURE_CACHE.misses
    _fit("top_k:1", tiny_cfg.replace(amp="off", device="cpu", feature_cache="fp32"), synthetic_data)
    assert FEATURE_CACHE.misses == misses + 3  # float32 features are other features: their own key
