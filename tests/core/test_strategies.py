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
    strategy.prepare_model(model)  # LoRA's adapters (a no-op for the others)
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
    strategy.prepare_model(tiny_model)
    blocks = get_blocks(tiny_model, granularity=strategy.granularity)
    for phase in strategy.phases():
        phase.strategy.set_trainable(blocks)
        groups = phase.strategy.param_groups(blocks, 1e-3, 1e-4)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)), "groups must be disjoint"
        assert all(g["name"] for g in groups)
        trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
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
        assert untouched and not (trained & untouched), "norm params are frozen under Auto-RGN, as the official code"
    head = {f"backbone.{n}" for n in blocks[blocks.head_idx].param_names}
    if name == "knn":  # the head is replaced by the neighbours' votes: nothing trains, nothing else moves
        assert not trained and not (head & set(params)) and result.trainable_params == 0
    else:
        assert head <= trained, "the head must train under every strategy"
    if name in ("linear", "top_k", "layers_k", "surgical", "deft", "bitfit", "norm", "lora"):
        frozen = set(params) - trained
        assert frozen, "a partial strategy must leave something frozen"
        for n in frozen:
            assert torch.equal(params[n], before[n])
    assert math.isfinite(result.test_metrics["loss"])


def test_frozen_bn_running_stats_unchanged_in_eval_policy(tiny_cfg, synthetic_data):
    model, blocks, before, buffers, _ = _train(create_strategy("linear"), tiny_cfg, synthetic_data)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"{n} changed although its layer is frozen"
    # with bn_mode=train the statistics of frozen layers do move (a head trained by epochs: top_k:0;
    # the linear probe reads its features in eval mode whatever bn_mode says, as Kumar et al.)
    model, blocks, before, buffers, _ = _train(create_strategy("top_k:0"), tiny_cfg.replace(bn_mode="train"),
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
@pytest.mark.parametrize("epochs", [3, 6, 10])
def test_gradual_unfreezing_trainable_set_per_epoch(name, top_down, epochs, tiny_cfg, synthetic_data):
    seen = []

    class Spy:
        def on_epoch_end(self, record):
            seen.append({i for i, _ in enumerate(blocks) if blocks.parameters(i)[0].requires_grad})

    model = make_tiny()
    blocks = get_blocks(model)
    fit(model, synthetic_data, create_strategy(name), tiny_cfg.replace(epochs=epochs), blocks=blocks,
        callbacks=(Spy(),))
    head = blocks.head_idx  # 4 non-head blocks; every one unfrozen by epoch U = min(ceil(E/2), E-1)
    full_at = min(math.ceil(epochs / 2), epochs - 1)
    for epoch, trainable in enumerate(seen):
        n = head if epoch >= full_at else math.ceil(head * epoch / full_at)
        extra = set(range(head - n, head)) if top_down else set(range(n))
        assert trainable == extra | {head}, (epoch, trainable)
    assert seen[0] == {head} and seen[-1] == set(range(head + 1))
    assert sum(t == set(range(head + 1)) for t in seen) >= epochs - full_at >= epochs // 2


def _nine_block_cnn(seed: int = 0):
    """The tiny CNN with seven stages: stem, stage_1..7, head (9 blocks, as EfficientNet-Lite0)."""
    import timm

    from medtune.models._builder import NormalizedModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NormalizedModel(timm.create_model("medtune_tiny_cnn", num_classes=2, widths=(8,) * 7, depths=(1,) * 7))


@pytest.mark.parametrize("name", ["gradual_lf", "gradual_fl"])
@pytest.mark.parametrize("epochs", [3, 10])
def test_gradual_trains_every_block_even_with_early_stopping(name, epochs, tiny_cfg, synthetic_data):
    model = _nine_block_cnn()
    blocks = get_blocks(model)
    assert len(blocks) == 9
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit(model, synthetic_data, create_strategy(name), tiny_cfg.replace(epochs=epochs, patience=1, lr=0.05),
                 blocks=blocks)
    for idx, block in enumerate(blocks):
        changed = [not torch.equal(p, before[f"backbone.{n}"]) for n, p in zip(block.param_names, blocks.parameters(idx))]
        assert any(changed), f"{block.name} never trained"
    changed = sum(p.numel() for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert result.trainable_params == changed == sum(p.numel() for p in model.parameters())
    assert create_strategy(name).depth(len(blocks)) == len(blocks) - 1
    kept = result.extras["phases"][0]["best_epoch"]
    assert kept >= min(math.ceil(epochs / 2), epochs - 1), "the kept epoch trained the whole network"


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
                       loss_fn=None, build_optimizer=None, num_epochs=10)
    strategy.on_epoch_start(1, ctx)  # U = 5: one of the 4 blocks unfrozen at epoch 1
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
@pytest.mark.parametrize("tensors", ["weights", "all"])
def test_sp_penalty_equals_formula_and_gradient_equals_autograd(name, tensors, tiny_model):
    blocks = get_blocks(tiny_model)
    s = create_strategy(f"{name}:alpha=0.3,beta=0.2" + ("" if tensors == "weights" else ",tensors=all"))
    s.set_trainable(blocks)
    # Li et al.'s official code (weight_decay_mode 1, the default): kernels only; mode 101: every tensor
    keep = (lambda p: p.dim() >= 2) if tensors == "weights" else (lambda p: True)
    classifier = list(blocks.model.get_classifier().parameters())
    new = [p for p in classifier if keep(p)]
    new_ids = {id(p) for p in classifier}
    pretrained = [p for p in tiny_model.parameters() if id(p) not in new_ids and keep(p)]
    assert [id(p) for p in s.penalised()[0]] == [id(p) for p in pretrained]
    assert [id(p) for p in s.penalised()[1]] == [id(p) for p in new]
    untouched = [p for p in tiny_model.parameters() if not keep(p)]
    assert (len(untouched) > 0) == (tensors == "weights"), "biases and BatchNorm affine parameters"
    w0 = [p.detach().clone() for p in pretrained]
    torch.manual_seed(3)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if name == "l2_sp":
        expected = 0.3 / 2 * sum(((p - w) ** 2).sum() for p, w in zip(pretrained, w0))
    else:
        expected = 0.3 * sum((p - w).abs().sum() for p, w in zip(pretrained, w0))
    expected = expected + 0.2 / 2 * sum((p ** 2).sum() for p in new)
    penalty = s.extra_loss(tiny_model)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    for p, w in zip(pretrained, w0):
        analytic = 0.3 * (p - w) if name == "l2_sp" else 0.3 * torch.sign(p - w)
        torch.testing.assert_close(p.grad, analytic.detach(), rtol=1e-5, atol=1e-6)
    for p in new:
        torch.testing.assert_close(p.grad, 0.2 * p.detach(), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in untouched)
    groups = s.param_groups(blocks, 1e-3, 0.05)
    assert all(g["weight_decay"] == 0.0 for g in groups), "no weight decay under *-SP"


def test_sp_beta_covers_only_the_new_classifier_of_vgg16_and_fc6_fc7_go_towards_w0():
    from medtune.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("tv:vgg16", num_classes=2, weights="none")
    blocks = get_blocks(model)
    fc6, fc7, fc8 = (model.backbone.classifier[i] for i in (0, 3, 6))
    conv1 = model.backbone.features[0]
    head_block = {id(p) for p in blocks.parameters(blocks.head_idx)}
    assert {id(p) for m in (fc6, fc7, fc8) for p in m.parameters()} <= head_block, "the partition's head block"
    for name in ("l2_sp", "l1_sp"):
        # alpha = 0, a huge beta: the penalty must not move fc6 or fc7 (they are pretrained, not new)
        s = create_strategy(f"{name}:alpha=0,beta=1e6,tensors=all")
        s.set_trainable(blocks)
        pretrained, new = s.penalised()
        assert {id(p) for p in new} == {id(fc8.weight), id(fc8.bias)}
        print(f"{name} on tv:vgg16: {sum(p.numel() for p in new):,} parameters under beta (fc8), "
              f"{sum(p.numel() for p in pretrained):,} under alpha")
        assert sum(p.numel() for p in new) == 4096 * 2 + 2
        assert sum(p.numel() for p in pretrained) + sum(p.numel() for p in new) == sum(p.numel() for p in model.parameters())
        watched = {"fc6": fc6.weight, "fc6.bias": fc6.bias, "fc7": fc7.weight, "conv1": conv1.weight, "fc8": fc8.weight}
        grads = torch.autograd.grad(s.extra_loss(model), list(watched.values()), allow_unused=True)
        for k, g in zip(watched, grads):
            assert (g is not None and bool(g.any())) == (k == "fc8"), f"{k}: only the new layer decays under beta"
        # alpha pulls fc6 towards w0: a step away from w0 gives the penalty's gradient alpha·(w - w0) on fc6
        s = create_strategy(f"{name}:alpha=0.5,beta=0")
        s.set_trainable(blocks)
        with torch.no_grad():
            fc6.weight.add_(0.01)
        grad_w, grad_b = torch.autograd.grad(s.extra_loss(model), [fc6.weight, fc6.bias], allow_unused=True)
        expected = torch.full_like(fc6.weight, 0.5 * 0.01 if name == "l2_sp" else 0.5)
        torch.testing.assert_close(grad_w, expected, rtol=1e-3, atol=1e-7)
        assert grad_b is None, "tensors=weights (the default): kernels only, as the official code"


@pytest.mark.parametrize("spec,constant", [("auto_rgn", True), ("auto_rgn:schedule=run", False)])
def test_auto_rgn_keeps_each_epochs_lr_constant_as_the_official_code(spec, constant, tiny_cfg, synthetic_data):
    # the reference rebuilds Adam each epoch at lr * w_i and never schedules it
    strategy = create_strategy(spec)
    cfg = tiny_cfg.replace(epochs=3, warmup_epochs=0.5, patience=0)
    seen = []
    original = strategy.on_epoch_start

    def spy(epoch, ctx):
        original(epoch, ctx)
        seen.append(ctx.optimizer)

    strategy.on_epoch_start = spy

    class LastLRs:
        def on_epoch_end(self, record):
            seen[-1] = [(g["lr"], g["lr_scale"]) for g in seen[-1].param_groups]

    _, _, _, _, result = _train(strategy, cfg, synthetic_data, callbacks=(LastLRs(),))
    assert len(seen) == 3 and all(len(groups) > 3 for groups in seen)
    scales = [s for groups in seen for _, s in groups]
    assert min(scales) < 1.0 == max(scales), "per-tensor weights w_i, the largest 1"
    at_base = all(lr == pytest.approx(cfg.lr * scale) for groups in seen for lr, scale in groups)
    assert at_base == constant
    assert ([h["lr"] for h in result.history] == [cfg.lr] * 3) == constant
    if not constant:
        assert result.history[-1]["lr"] < 0.2 * cfg.lr, "the run's cosine schedule"


def test_auto_rgn_weights_equal_a_direct_computation(tiny_cfg, synthetic_data):
    from medtune.models._norm import norm_param_ids
    from medtune.strategies.base import EpochContext
    from medtune.training.loop import set_train_mode

    model = make_tiny()
    blocks = get_blocks(model)
    s = create_strategy("auto_rgn:num_batches=3")
    s.set_trainable(blocks)
    set_train_mode(model, "eval")  # as the loop does: norm parameters are frozen, so every BN is in eval mode
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = synthetic_data.images.float() / 255
    y = synthetic_data.labels
    batches = [(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]) for i in range(3)]
    loss_fn = torch.nn.functional.cross_entropy
    norm = norm_param_ids(model)
    params = [(n, p) for n, p in model.named_parameters() if id(p) not in norm]
    # direct computation, as the official get_lr_weights: ||grad|| / ||param|| per tensor, mean over batches
    ref = copy.deepcopy(model).eval()
    ref_params = dict(ref.named_parameters())
    ratios = {n: 0.0 for n, _ in params}
    for xb, yb in batches:
        grads = torch.autograd.grad(loss_fn(ref(xb), yb), [ref_params[n] for n, _ in params])
        for (n, _), g in zip(params, grads):
            ratios[n] += (g.norm() / ref_params[n].norm()).item() / len(batches)
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
        assert built[n.removeprefix("backbone.")] == pytest.approx(expected[n], rel=1e-5)
    assert max(built.values()) == pytest.approx(1.0)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), "probing must not move BN statistics"
    assert ctx.record["auto_rgn"][0]["epoch"] == 0 and "head" in ctx.record["auto_rgn"][0]["block_weights"]


def test_auto_rgn_leaves_bn_statistics_bit_identical_and_times_its_probes(tiny_cfg, synthetic_data, monkeypatch):
    import time

    from medtune.strategies.zoo import AutoRGN

    probe = AutoRGN.relative_gradient_norms

    def slow_probe(*args):
        time.sleep(0.3)
        return probe(*args)

    monkeypatch.setattr(AutoRGN, "relative_gradient_norms", staticmethod(slow_probe))
    model, blocks, before, buffers, result = _train(create_strategy("auto_rgn"), tiny_cfg.replace(epochs=3),
                                                    synthetic_data)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"{n} moved: every BatchNorm runs in eval mode"
    from medtune.models._norm import norm_param_ids

    norm = norm_param_ids(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (id(p) in norm), n
    assert [r["epoch"] for r in result.extras["auto_rgn"]] == [0, 1, 2]
    assert all(h["seconds"] >= 0.3 for h in result.history), "the probe passes are training time"
    assert result.train_seconds >= 0.9
    # the extension: norm parameters train too, their BatchNorms in train mode
    model, _, before, buffers, _ = _train(create_strategy("auto_rgn:tune_norm=true"), tiny_cfg, synthetic_data)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if id(p) in norm_param_ids(model))
    assert any(not torch.equal(b, buffers[n]) for n, b in model.named_buffers() if "running_mean" in n)


def test_lp_ft_phase_two_starts_from_phase_one_head(tiny_cfg, synthetic_data):
    starts = {}
    model = make_tiny()
    blocks = get_blocks(model)
    s = create_strategy("lp_ft")
    phases = s.phases()
    assert [p.name for p in phases] == ["lp", "ft"] and phases[1].lr_scale == pytest.approx(0.1)
    assert phases[1].optimizer == "sgd" and phases[1].weight_decay == 0.0, "Kumar et al.: SGD, no weight decay"
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
    assert [h["phase"] for h in result.history] == ["lp", "ft", "ft"], "the probe is solved, then 2 FT epochs"
    assert result.history[0]["c"] == result.extras["linear_probe"]["c"]
    assert [p["name"] for p in result.extras["phases"]] == ["lp", "ft"]


def _modes_seen_in_phase_two(spec, cfg, data):
    """(BatchNorm and dropout ``training`` flags seen in LP-FT's phase 2, buffers before, model)."""
    from medtune.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("medtune_tiny_cnn", num_classes=2, weights="none", drop_rate=0.5)
    seen = {"bn": set(), "dropout": set()}
    kinds = {torch.nn.BatchNorm2d: "bn", torch.nn.Dropout: "dropout"}
    hooks = [m.register_forward_pre_hook(lambda mod, _a, k=kind: seen[k].add(mod.training) if torch.is_grad_enabled()
                                         else None)
             for m in model.modules() for cls, kind in kinds.items() if isinstance(m, cls)]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 1, "the head's dropout"
    s = create_strategy(spec)
    blocks = get_blocks(model)
    buffers_before = {}
    ft = s.phases()[1].strategy
    original = ft.set_trainable

    def at_phase_two(b):  # the probe's weights: what phase 2 starts from
        buffers_before.update({n: x.detach().clone() for n, x in model.named_buffers()})
        original(b)

    phases = s.phases()
    phases[1].strategy.set_trainable = at_phase_two
    s.phases = lambda: phases
    fit(model, data, s, cfg.replace(epochs=2, feature_cache="off"), blocks=blocks)
    for h in hooks:
        h.remove()
    return seen, buffers_before, model


def test_lp_ft_phase_two_runs_in_eval_mode_and_keeps_bn_statistics_bit_identical(tiny_cfg, synthetic_data):
    # Kumar et al.'s README runs LP-FT as lp_then_ft_valmode_experiments: use_net_val_mode, net.eval()
    assert create_strategy("lp_ft").params["ft_mode"] == "eval"
    seen, before, model = _modes_seen_in_phase_two("lp_ft", tiny_cfg, synthetic_data)
    assert seen == {"bn": {False}, "dropout": {False}}, "every BatchNorm and dropout in eval mode while training"
    assert sum("running_mean" in n for n in before) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), f"{n} moved in phase 2"
    # the option: phase 2 in train mode, as `full`; the statistics move
    seen, before, model = _modes_seen_in_phase_two("lp_ft:ft_mode=train", tiny_cfg, synthetic_data)
    assert seen == {"bn": {True}, "dropout": {True}}
    assert all(not torch.equal(b, before[n]) for n, b in model.named_buffers() if "running_mean" in n)
    with pytest.raises(ConfigError, match="ft_mode"):
        create_strategy("lp_ft:ft_mode=frozen")


def _classifier_inputs(model, images):
    with torch.no_grad():
        model.eval()
        return model.backbone.forward_head(model.backbone.forward_features(model.normalize(images.float() / 255)),
                                           pre_logits=True).double().numpy()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("num_classes,spec", [(2, "linear"), (3, "linear:c=1.0")])
def test_linear_probe_head_equals_sklearns_logistic_regression(num_classes, spec, tiny_cfg):
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from medtune.data import make_synthetic
    from medtune.strategies.probing import c_grid

    data = make_synthetic(num_samples=96, img_size=16, num_classes=num_classes, seed=1)
    model, _, before, _, result = _train(create_strategy(spec), tiny_cfg, data)
    probe = result.extras["linear_probe"]
    c = probe["c"]
    grid = [1.0] if "c=" in spec else list(c_grid(50))  # a fixed C (the 3-class case: logits far from 0)
    assert [g["c"] for g in probe["grid"]] == pytest.approx(grid)
    chosen = max(probe["grid"], key=lambda g: (g["val_accuracy"], -g["val_loss"]))
    assert c == chosen["c"], "C is the grid value with the best validation accuracy (ties: lower loss)"
    assert len(result.history) == 1 and result.history[0]["c"] == c
    train, test = data.split("train"), data.split("test")
    x_train, x_test = _classifier_inputs(model, train.images), _classifier_inputs(model, test.images)
    mean, std = x_train.mean(), x_train.std()  # Kumar et al.'s scalar standardisation
    # Kumar et al.'s log_reg_sk.py: one LogisticRegression(warm_start=True, max_iter=200) refitted along
    # the ascending C grid; the head is that classifier's state at the chosen C
    assert create_strategy("linear").params["max_iter"] == 200, "test_log_reg_warm_starting(max_iter=200)"
    ref = LogisticRegression(warm_start=True, max_iter=200)
    for grid_c in grid[:grid.index(pytest.approx(c)) + 1]:
        ref.C = grid_c
        ref.fit((x_train - mean) / std, train.labels.numpy())
    expected = ref.decision_function((x_test - mean) / std)
    with torch.no_grad():
        logits = model.eval()(test.images.float() / 255).double().numpy()
    got = logits[:, 1] - logits[:, 0] if num_classes == 2 else logits
    assert np.abs(expected).max() > 1.0, "a solution away from the all-zero head"
    assert np.abs(got - expected).max() < 1e-3
    for n, p in model.named_parameters():
        if not n.startswith("backbone.head"):
            assert torch.equal(p, before[n])


def test_linear_probe_is_used_only_for_a_single_linear_layer(tiny_cfg, synthetic_data):
    _, _, _, _, result = _train(create_strategy("linear:solver=epochs,patience=2"), tiny_cfg, synthetic_data)
    assert "linear_probe" not in result.extras and len(result.history) >= 3, "trained by epochs to convergence"
    assert all(h["phase"] == "linear" for h in result.history)


def test_sp_strategies_train_with_sgd_by_default(tiny_cfg, synthetic_data, tmp_path):
    from medtune.training.loop import Checkpoint
    from tests.core.test_resume import Crash, CrashAt

    for spec, kind in [("l2_sp", "sgd"), ("l2_sp:optimizer=adamw", "adamw")]:
        ckpt = tmp_path / f"{kind}.pt"
        with pytest.raises(Crash):
            _train(create_strategy(spec), tiny_cfg, synthetic_data, checkpoint_path=ckpt, callbacks=(CrashAt(2),))
        group = Checkpoint.load(ckpt).optimizer["param_groups"][0]
        assert ("momentum" in group and group["momentum"] == 0.9) == (kind == "sgd")
        assert ("betas" in group) == (kind == "adamw") and group["weight_decay"] == 0.0


def test_surgical_runs_every_batchnorm_in_eval_mode_by_default(tiny_cfg, synthetic_data):
    model, blocks, before, buffers, _ = _train(create_strategy("surgical:1"), tiny_cfg, synthetic_data)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"{n} moved: the official configuration never calls model.train()"
    bn = [n for n in blocks[1].param_names if ".bn." in n]
    assert bn and all(not torch.equal(dict(model.named_parameters())[f"backbone.{n}"], before[f"backbone.{n}"])
                      for n in bn), "the tuned block's BN affine parameters still train"
    model, blocks, _, buffers, _ = _train(create_strategy("surgical:1,bn=train"), tiny_cfg, synthetic_data)
    moved = {n for n, b in model.named_buffers() if not torch.equal(b, buffers[n]) and "running_mean" in n}
    assert moved == {f"backbone.{blocks[1].param_names[0].rsplit('.', 2)[0]}.bn.running_mean"}


def test_top_k_all_expands_to_one_through_s_and_layers_k_all_to_every_depth(tiny_model):
    from medtune.strategies import StrategySpec

    blocks = get_blocks(tiny_model)  # stem, stage_1..3, head: S = 3
    specs = StrategySpec.parse("top_k:all", allow_all=True).expand(len(blocks))
    assert [str(s) for s in specs] == ["top_k:1", "top_k:2", "top_k:3"], "k = 0 is linear and k = S+1 is full"
    layers = get_blocks(tiny_model, granularity="layer")
    every = StrategySpec.parse("layers_k:all", allow_all=True).expand(len(layers))
    assert [str(s) for s in every] == [f"layers_k:{k}" for k in range(len(layers))], "Tajbakhsh: every depth"


def test_scratch_has_its_own_epoch_budget(tiny_cfg, synthetic_data):
    _, _, _, _, result = _train(create_strategy("scratch"), tiny_cfg.replace(epochs=1), synthetic_data)
    assert len(result.history) == 4, "scratch_epochs=0: four times the fine-tuning budget"
    _, _, _, _, result = _train(create_strategy("scratch"), tiny_cfg.replace(epochs=1, scratch_epochs=3),
                                synthetic_data)
    assert len(result.history) == 3
