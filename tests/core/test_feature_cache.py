"""The frozen-prefix feature cache: same results as without it, invalidated by any change, off when unsafe."""

from __future__ import annotations

import pytest
import torch

from medtune.models import get_blocks
from medtune.strategies import create_strategy
from medtune.training.cache import FEATURE_CACHE, build_chain
from medtune.training.loop import fit
from tests.conftest import make_tiny


def _fit(spec, cfg, data, seed=0, model=None):
    lines = []
    model = model or make_tiny(data.num_classes, seed=seed)
    strategy = create_strategy(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = fit(model, data, strategy, cfg, blocks=get_blocks(model, granularity=strategy.granularity),
                     log=lines.append)
    return model, result, "\n".join(lines)


@pytest.mark.parametrize("spec", ["linear", "top_k:1", "top_k:2", "lp_ft:lp_epochs=2"])
def test_cached_training_equals_uncached(spec, tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    m_off, r_off, log_off = _fit(spec, tiny_cfg.replace(feature_cache="off"), synthetic_data)
    m_on, r_on, log_on = _fit(spec, tiny_cfg, synthetic_data)
    assert "feature cache: frozen prefix" in log_on and "feature cache" not in log_off
    for (name, a), (_, b) in zip(m_off.state_dict().items(), m_on.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # tolerance: float reassociation only
    for key, value in r_off.test_metrics.items():
        assert r_on.test_metrics[key] == pytest.approx(value, abs=1e-5), key


def test_one_pass_fills_every_boundary_and_changes_invalidate(tiny_cfg, synthetic_data):
    FEATURE_CACHE.clear()
    _fit("top_k:0", tiny_cfg, synthetic_data)
    misses = FEATURE_CACHE.misses
    assert misses == 3  # one pass per split (train, val, test) for the longest prefix
    _fit("top_k:2", tiny_cfg, synthetic_data, seed=1)  # another init: other prefix weights must miss
    assert FEATURE_CACHE.misses == misses + 3
    misses = FEATURE_CACHE.misses
    _fit("top_k:2", tiny_cfg, synthetic_data)  # same weights as the first run, shorter cut: filled by its pass
    assert FEATURE_CACHE.misses == misses, "the first pass stored the features of every block boundary"
    from medtune.data import make_synthetic

    other = make_synthetic(num_samples=64, img_size=16, seed=5)  # other data
    _fit("top_k:2", tiny_cfg, other)
    assert FEATURE_CACHE.misses == misses + 3
    bigger = make_synthetic(num_samples=64, img_size=24, seed=0)  # another transform (input size)
    _fit("top_k:2", tiny_cfg.replace(img_size=24), bigger)
    assert FEATURE_CACHE.misses == misses + 6


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

    small = cache_mod.FeatureCache(budget_bytes=1024, spill_dir=str(tmp_path))
    monkeypatch.setattr(cache_mod, "FEATURE_CACHE", small)
    m_on, r_on, log = _fit("top_k:1", tiny_cfg, synthetic_data)
    assert "feature cache: frozen prefix" in log
    spilled = list(tmp_path.glob("medtune-features-*/features.npy"))
    assert spilled, "features larger than the budget are written to disk"
    assert small.nbytes() <= 1024
    assert np.load(spilled[0], mmap_mode="r").shape[0] in (32, 16)
    m_off, r_off, _ = _fit("top_k:1", tiny_cfg.replace(feature_cache="off"), synthetic_data)
    for key, value in r_off.test_metrics.items():
        assert r_on.test_metrics[key] == pytest.approx(value, abs=1e-5), key


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
    _, shorter, _ = _fit("top_k:2", tiny_cfg, synthetic_data)  # a cut filled by the first run's pass
    assert FEATURE_CACHE.misses == misses
    assert 0 < shorter.extras["feature_seconds"] <= first.extras["feature_seconds"]
    _, off, _ = _fit("top_k:1", tiny_cfg.replace(feature_cache="off"), synthetic_data)
    assert off.extras["feature_seconds"] == 0.0
    assert off.train_seconds == pytest.approx(sum(h["seconds"] for h in off.history))
