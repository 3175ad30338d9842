"""Contracts over every registered strategy, and the semantics of each one."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from medtune.errors import ConfigError
from medtune.models import get_blocks
from medtune.strategies import create_strategy, get_strategy_class, list_strategies
from medtune.training.loop import fit
from tests.conftest import make_tiny

ALL = list_strategies()
# strategies whose defaults are not runnable on their own get an example spec for the tiny CNN
EXAMPLE_SPECS = {"deft": "deft:0101"}


def spec_of(name: str) -> str:
    return EXAMPLE_SPECS.get(name, name)


def _train(strategy, cfg, data, model=None, **kw):
    model = model or make_tiny(data.num_classes)
    blocks = get_blocks(model, granularity=strategy.granularity)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    result = fit(model, data, strategy, cfg, blocks=blocks, **kw)
    return model, blocks, before, buffers, result


def test_unknown_strategy_lists_close_matches():
    with pytest.raises(ConfigError, match="Unknown strategy 'lpft'. Did you mean 'lp_ft'"):
        create_strategy("lpft")
    with pytest.raises(ConfigError, match="unknown parameter"):
        create_strategy("l2_sp:gamma=1")


@pytest.mark.parametrize("name", ALL)
def test_param_groups_cover_exactly_the_trainable_params_and_are_named(name, tiny_model):
    strategy = create_strategy(spec_of(name))
    blocks = get_blocks(tiny_model, granularity=strategy.granularity)
    for phase in strategy.phases():
        phase.strategy.set_trainable(blocks)
        groups = phase.strategy.param_groups(blocks, 1e-3, 1e-4)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)), "groups must be disjoint"
        assert all(g["name"] for g in groups)
        trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
        if name == "auto_rgn":  # norm layers are left out of the optimiser, by design
            from medtune.models._norm import norm_param_ids
            trainable -= norm_param_ids(tiny_model)
        assert set(ids) == trainable


@pytest.mark.parametrize("name", ALL)
def test_frozen_params_bit_identical_trainable_changed(name, tiny_cfg, synthetic_data):
    strategy = create_strategy(spec_of(name))
    model, blocks, before, buffers, result = _train(strategy, tiny_cfg, synthetic_data)
    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if not torch.equal(p, before[n])}
    if name == "auto_rgn":
        from medtune.models._norm import norm_param_ids
        norm = norm_param_ids(model)
        untouched = {n for n, p in params.items() if id(p) in norm}
        assert untouched and not (trained & untouched), "norm params are outside Auto-RGN's optimiser"
    head = {f"backbone.{n}" for n in blocks[blocks.head_idx].param_names}
    assert head <= trained, "the head must train under every strategy"
    if name in ("linear", "top_k", "layers_k", "surgical", "deft"):
        frozen = set(params) - trained
        assert frozen, "a partial strategy must leave something frozen"
        for n in frozen:
            assert torch.equal(params[n], before[n])
    assert math.isfinite(result.test_metrics["loss"])


def test_frozen_bn_running_stats_unchanged_in_eval_policy(tiny_cfg, synthetic_data):
    model, blocks, before, buffers, _ = _train(create_strategy("linear"), tiny_cfg, synthetic_data)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"{n} changed although its layer is frozen"
    # with bn_mode=train the statistics of frozen layers do move
    model, blocks, before, buffers, _ = _train(create_strategy("linear"), tiny_cfg.replace(bn_mode="train"),
                                               synthetic_data)
    assert any(not torch.equal(b, buffers[n]) for n, b in model.named_buffers() if "running_mean" in n)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_top_k_trains_exactly_the_top_k_blocks(k, tiny_cfg, synthetic_data):
    model, blocks, before, _, _ = _train(create_strategy(f"top_k:{k}"), tiny_cfg, synthetic_data)
    for idx, block in enumerate(blocks):
        changed = any(not torch.equal(p, before[f"backbone.{n}"])
                      for n, p in zip(block.param_names, blocks.parameters(idx)))
        assert changed == (idx >= blocks.head_idx - k), (block.name, k)


def test_top_k_out_of_range_is_a_config_error(tiny_model):
    blocks = get_blocks(tiny_model)
    with pytest.raises(ConfigError, match=f"top_k k=9 is out of range .* has {len(blocks)} blocks"):
        create_strategy("top_k:9").set_trainable(blocks)


def test_surgical_trains_only_its_block_and_the_head(tiny_cfg, synthetic_data):
    model, blocks, before, _, _ = _train(create_strategy("surgical:1"), tiny_cfg, synthetic_data)
    for idx, block in enumerate(blocks):
        changed = any(not torch.equal(p, before[f"backbone.{n}"]) for n, p in zip(block.param_names, blocks.parameters(idx)))
        assert changed == (idx in (1, blocks.head_idx)), block.name


def test_scratch_starts_from_a_fresh_init(tmp_path, synthetic_data):
    from medtune.config import RunConfig
    from medtune.runner import build_run

    cfg = RunConfig(arch="resnet18", weights="none", strategy="scratch", device="cpu")
    _, m0, _ = build_run(cfg, synthetic_data, torch.device("cpu"))
    _, m1, _ = build_run(cfg.replace(seed=1), synthetic_data, torch.device("cpu"))
    _, m0b, _ = build_run(cfg, synthetic_data, torch.device("cpu"))
    w = "backbone.conv1.weight"
    assert torch.equal(dict(m0.named_parameters())[w], dict(m0b.named_parameters())[w]), "same seed, same init"
    assert not torch.equal(dict(m0.named_parameters())[w], dict(m1.named_parameters())[w]), "seed changes init"
    assert get_strategy_class("scratch").pretrained is False and get_strategy_class("full").pretrained is True


@pytest.mark.parametrize("name,top_down", [("gradual_lf", True), ("gradual_fl", False)])
def test_gradual_unfreezing_trainable_set_per_epoch(name, top_down, tiny_cfg, synthetic_data):
    seen = []

    class Spy:
        def on_epoch_end(self, record):
            seen.append({i for i, _ in enumerate(blocks) if blocks.parameters(i)[0].requires_grad})

    model = make_tiny()
    blocks = get_blocks(model)
    cfg = tiny_cfg.replace(epochs=len(blocks) + 1)
    fit(model, synthetic_data, create_strategy(name), cfg, blocks=blocks, callbacks=(Spy(),))
    head = blocks.head_idx
    for epoch, trainable in enumerate(seen):
        n = min(epoch, head)
        extra = set(range(head - n, head)) if top_down else set(range(n))
        assert trainable == extra | {head}, (epoch, trainable)


def test_gradual_keeps_the_optimizer_state_of_blocks_already_training(tiny_cfg, synthetic_data):
    model = make_tiny()
    blocks = get_blocks(model)
    strategy = create_strategy("gradual_lf")
    from medtune.strategies.base import EpochContext

    strategy.set_trainable(blocks)
    opt = torch.optim.AdamW(strategy.param_groups(blocks, 1e-3, 0.0), lr=1e-3)
    model(torch.rand(2, 3, 16, 16)).sum().backward()
    opt.step()
    head_param = blocks.parameters(blocks.head_idx)[0]
    state = copy.deepcopy(opt.state[head_param])
    ctx = EpochContext(model=model, blocks=blocks, optimizer=opt, lr=1e-3, weight_decay=0.0, batches=None,
                       loss_fn=None, build_optimizer=None)
    strategy.on_epoch_start(1, ctx)
    assert ctx.optimizer is opt and len(opt.param_groups) == 2
    assert torch.equal(opt.state[head_param]["exp_avg"], state["exp_avg"])


def test_discriminative_lrs_per_block(tiny_model):
    blocks = get_blocks(tiny_model)
    s = create_strategy("discriminative:factor=2.0")
    s.set_trainable(blocks)
    groups = {g["name"]: g["lr_scale"] for g in s.param_groups(blocks, 1e-3, 0.0)}
    names = [b.name for b in blocks]
    for i, name in enumerate(reversed(names)):
        assert groups[name] == pytest.approx(2.0 ** -i)


@pytest.mark.parametrize("name", ["l2_sp", "l1_sp"])
def test_sp_penalty_equals_formula_and_gradient_equals_autograd(name, tiny_model):
    blocks = get_blocks(tiny_model)
    s = create_strategy(f"{name}:alpha=0.3,beta=0.2")
    s.set_trainable(blocks)
    head = [p for p in blocks.parameters(blocks.head_idx)]
    head_ids = {id(p) for p in head}
    backbone = [p for p in tiny_model.parameters() if id(p) not in head_ids]
    w0 = [p.detach().clone() for p in backbone]
    torch.manual_seed(3)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if name == "l2_sp":
        expected = 0.3 / 2 * sum(((p - w) ** 2).sum() for p, w in zip(backbone, w0))
    else:
        expected = 0.3 * sum((p - w).abs().sum() for p, w in zip(backbone, w0))
    expected = expected + 0.2 / 2 * sum((p ** 2).sum() for p in head)
    penalty = s.extra_loss(tiny_model)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    for p, w in zip(backbone, w0):
        analytic = 0.3 * (p - w) if name == "l2_sp" else 0.3 * torch.sign(p - w)
        torch.testing.assert_close(p.grad, analytic.detach(), rtol=1e-5, atol=1e-6)
    for p in head:
        torch.testing.assert_close(p.grad, 0.2 * p.detach(), rtol=1e-5, atol=1e-6)
    groups = s.param_groups(blocks, 1e-3, 0.05)
    assert all(g["weight_decay"] == 0.0 for g in groups), "no weight decay under *-SP"


def test_auto_rgn_weights_equal_a_direct_computation(tiny_cfg, synthetic_data):
    from medtune.strategies.base import EpochContext
    from medtune.models._norm import norm_param_ids

    model = make_tiny()
    blocks = get_blocks(model)
    s = create_strategy("auto_rgn:num_batches=3")
    s.set_trainable(blocks)
    x = synthetic_data.images.float() / 255
    y = synthetic_data.labels
    batches = [(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]) for i in range(3)]
    loss_fn = torch.nn.functional.cross_entropy
    norm = norm_param_ids(model)
    params = [(n, p) for n, p in model.named_parameters() if id(p) not in norm]
    # direct computation
    ratios = {n: 0.0 for n, _ in params}
    model.train()
    ref = copy.deepcopy(model)
    ref_params = dict(ref.named_parameters())
    for xb, yb in batches:
        ref.zero_grad()
        loss_fn(ref(xb), yb).backward()
        for n, _ in params:
            ratios[n] += (ref_params[n].grad.norm() / ref_params[n].norm()).item() / len(batches)
    top = max(ratios.values())
    expected = {n: r / top for n, r in ratios.items()}
    built = {}

    def build(groups):
        for g in groups:
            built[g["name"]] = g["lr_scale"]
        return torch.optim.AdamW(groups, lr=1e-3)

    ctx = EpochContext(model=model, blocks=blocks, optimizer=None, lr=1e-3, weight_decay=0.0,
                       batches=lambda n: iter(batches[:n]), loss_fn=loss_fn, build_optimizer=build)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    s.on_epoch_start(0, ctx)
    names = {n.removeprefix("backbone.") for n, _ in params}
    assert set(built) == names, "one group per non-norm tensor, norm tensors excluded"
    for n, _ in params:
        assert built[n.removeprefix("backbone.")] == pytest.approx(expected[n], rel=1e-4)
    assert max(built.values()) == pytest.approx(1.0)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), "probing must not move BN statistics"
    assert ctx.record["auto_rgn"][0]["epoch"] == 0 and "head" in ctx.record["auto_rgn"][0]["block_weights"]


def test_lp_ft_phase_two_starts_from_phase_one_head(tiny_cfg, synthetic_data):
    starts = {}

    class Probe:
        def on_epoch_end(self, record):
            pass

    model = make_tiny()
    blocks = get_blocks(model)
    s = create_strategy("lp_ft:lp_epochs=2")
    phases = s.phases()
    assert [p.name for p in phases] == ["lp", "ft"] and phases[1].lr_scale == pytest.approx(0.1)
    ft = phases[1].strategy
    original = ft.set_trainable

    def spy(b):
        starts["head"] = [p.detach().clone() for p in b.parameters(b.head_idx)]
        starts["stem"] = [p.detach().clone() for p in b.parameters(0)]
        original(b)

    ft.set_trainable = spy
    s.phases = lambda: phases
    init_head = [p.detach().clone() for p in blocks.parameters(blocks.head_idx)]
    init_stem = [p.detach().clone() for p in blocks.parameters(0)]
    result = fit(model, synthetic_data, s, tiny_cfg.replace(epochs=2), blocks=blocks)
    assert not all(torch.equal(a, b) for a, b in zip(starts["head"], init_head)), "phase 1 trained the head"
    assert all(torch.equal(a, b) for a, b in zip(starts["stem"], init_stem)), "phase 1 left the backbone alone"
    assert [h["phase"] for h in result.history] == ["lp", "lp", "ft", "ft"]
    assert [p["name"] for p in result.extras["phases"]] == ["lp", "ft"]
