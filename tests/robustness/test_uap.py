"""compute_uap, projection, random controls and the registered attack."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medtune.errors import ConfigError, DataError
from medtune.robustness import (
    UAPAttack,
    evaluate_perturbation,
    is_grey,
    project_to_grey,
    apply_perturbation,
    budget_xi,
    compute_targeted_uaps,
    compute_uap,
    create_attack,
    list_attacks,
    perturbation_norm,
    project_perturbation,
    random_control,
)


@pytest.fixture(scope="module")
def random_setup(helpers):
    torch.set_num_threads(1)  # per-image loops of tiny tensors crawl when two threads share busy cores
    torch.manual_seed(0)
    images, _ = helpers.make_colour_task(32, seed=5, size=8)
    return helpers.TinyCNN().eval(), images


@pytest.mark.parametrize("algorithm", ["batched", "reference"])
@pytest.mark.parametrize("norm", [2, "inf"])
@pytest.mark.parametrize("seed,zeta", [(0, 0.02), (1, 0.04), (2, 0.08), (3, 0.3), (4, 1.0)])
def test_perturbation_stays_within_budget(random_setup, norm, seed, zeta, algorithm):
    model, images = random_setup
    xi = budget_xi(images, zeta, norm)
    # a step ten times the budget forces the projection after every step
    result = compute_uap(
        model,
        images,
        zeta=zeta,
        norm=norm,
        step_size=10 * xi,
        max_passes=2,
        goal_rate=1.0,
        batch_size=8,
        seed=seed,
        algorithm=algorithm,
    )
    assert result.algorithm == algorithm
    assert result.xi == pytest.approx(xi)
    assert result.num_passes == 2 or (result.goal_reached and result.fooling_rate_source[-1] == 1.0)
    # the reference keeps a step only if it flips an image, which may never happen on a random model
    assert perturbation_norm(result.perturbation, norm) <= result.xi + 1e-6
    assert algorithm == "reference" or perturbation_norm(result.perturbation, norm) > 0
    assert perturbation_norm(result.last_perturbation, norm) <= result.xi + 1e-6
    if norm == "inf" and algorithm == "batched":  # ten-times steps saturate every pixel the gradient touches
        assert perturbation_norm(result.perturbation, norm) == pytest.approx(xi, rel=1e-5)
    perturbed = apply_perturbation(images, result.perturbation)
    assert perturbed.min() >= 0.0 and perturbed.max() <= 1.0
    assert perturbed.dtype == torch.float32 and perturbed.shape == images.shape


def test_budget_is_zeta_times_mean_norm():
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[0] = 255  # ‖x‖₂ = sqrt(12), ‖x‖∞ = 1; the second image is black
    assert budget_xi(images, 0.1, 2) == pytest.approx(0.1 * math.sqrt(12) / 2)
    assert budget_xi(images, 0.1, float("inf")) == pytest.approx(0.05)
    assert budget_xi(images.float() / 255, 0.1, "2") == pytest.approx(0.1 * math.sqrt(12) / 2)


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_projection(norm):
    v = torch.tensor([[3.0, -4.0]])
    projected = project_perturbation(v, 1.0, norm)
    assert perturbation_norm(projected, norm) <= 1.0 + 1e-6
    if norm == "2":
        assert torch.allclose(projected, v / 5, atol=1e-5)
    else:
        assert torch.equal(projected, torch.tensor([[1.0, -1.0]]))
    inside = torch.tensor([[0.1, 0.2]])
    assert torch.equal(project_perturbation(inside, 1.0, norm), inside)


def test_compute_uap_is_deterministic_and_leaves_the_model_alone(random_setup):
    model, images = random_setup
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = compute_uap(model, images, zeta=0.1, max_passes=2, seed=7, batch_size=8)
    second = compute_uap(model, images, zeta=0.1, max_passes=2, seed=7, batch_size=8)
    assert torch.equal(first.perturbation, second.perturbation)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    for key, value in model.state_dict().items():  # BN running stats untouched: ran in eval mode
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert first.perturbation.shape == images.shape[1:] and first.perturbation.device.type == "cpu"
    record = first.to_dict()
    json.dumps(record)
    assert record["num_passes"] == len(record["fooling_rate_source"]) == 2
    assert record["perturbation_shape"] == [3, 8, 8]


def test_goal_rate_stops_early(colour_task):
    result = compute_uap(
        colour_task["model"],
        colour_task["train_x"],
        zeta=0.08,
        norm="inf",
        targeted=1,
        goal_rate=0.5,
        max_passes=10,
        batch_size=16,
    )
    assert result.goal_reached
    assert result.num_passes < 10
    assert result.fooling_rate_source[-1] >= 0.5 and result.source_rate_exact[-1]
    assert all(r < 0.5 for r in result.fooling_rate_source[:-1])
    assert result.best_pass == result.num_passes and result.best_rate == result.fooling_rate_source[-1]


def test_targeted_uaps_per_class(colour_task):
    results = compute_targeted_uaps(
        colour_task["model"], colour_task["train_x"][:60], zeta=0.08, max_passes=1, batch_size=20
    )
    assert sorted(results) == [0, 1, 2]
    assert [r.targeted for r in results.values()] == [0, 1, 2]
    with pytest.raises(ConfigError, match="pass 'classes' instead of 'targeted'"):
        compute_targeted_uaps(colour_task["model"], colour_task["train_x"], targeted=1)


@pytest.mark.parametrize("channels", ["rgb", "grey"])
@pytest.mark.parametrize("norm", [2, "inf"])
def test_random_control_keeps_the_l2_norm_and_stays_in_the_cube(norm, channels):
    g = torch.Generator().manual_seed(0)
    v = 0.05 * torch.randn(3, 8, 8, generator=g)
    control = random_control(v, norm, seed=1, channels=channels)
    assert control.shape == v.shape and control.dtype == torch.float32
    size = perturbation_norm(v, norm)
    assert not torch.allclose(control, v)
    assert torch.equal(control, random_control(v, norm, seed=1, channels=channels))
    assert not torch.equal(control, random_control(v, norm, seed=2, channels=channels))
    assert is_grey(control) == (channels == "grey")
    if norm == 2:  # a uniform direction scaled to ‖v‖₂
        assert perturbation_norm(control, 2) == pytest.approx(size, rel=1e-5)
    else:  # uniform in the cube [-‖v‖∞, ‖v‖∞], as ART's random_sphere: inside, not on the corners
        assert perturbation_norm(control, "inf") <= size * (1 + 1e-6)
        assert 0.2 * size < float(control.abs().mean()) < 0.8 * size  # uniform |r| has mean size/2
        corners = random_control(v, norm, seed=1, channels=channels, linf="corners")
        assert torch.allclose(corners.abs(), torch.full_like(v, size))
    zero = random_control(torch.zeros(3, 2, 2), norm, seed=0)
    assert torch.equal(zero, torch.zeros(3, 2, 2))
    with pytest.raises(ConfigError, match="'linf' parameter of random_control must be one of uniform, corners"):
        random_control(v, norm, seed=0, linf="corner")


def test_random_control_draws_are_uniform_in_direction():
    # the mean of many unit directions is near 0 and their coordinates are spread symmetrically
    v = torch.ones(3, 4, 4)
    draws = torch.stack([random_control(v, 2, seed=s) for s in range(400)]).flatten(1)
    assert float(draws.mean(dim=0).abs().max()) < 0.25 * float(v.norm()) / 48 ** 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"zeta": 4}, r"'zeta' parameter of compute_uap must be a float in \(0, 1\]. Got 4"),
        ({"zeta": 0.0}, "'zeta' parameter"),
        ({"norm": 1}, "'norm' parameter of compute_uap must be 2 or 'inf'. Got 1"),
        ({"targeted": 3}, r"class index in \[0, 2\]. Got 3"),
        ({"targeted": "all"}, "Use compute_targeted_uaps"),
        ({"step_size": -1.0}, "'step_size' parameter of compute_uap must be a positive float"),
        ({"max_passes": 0}, "'max_passes' parameter of compute_uap must be an int >= 1"),
        ({"goal_rate": 1.5}, "'goal_rate' parameter"),
        ({"batch_size": 2.5}, "'batch_size' parameter"),
        ({"algorithm": "art"}, "'algorithm' parameter of compute_uap must be one of batched, reference"),
        ({"channels": "gray"}, "'channels' parameter of compute_uap must be one of rgb, grey. Got 'gray'"),
        ({"step_decay": 0.0}, r"'step_decay' parameter of compute_uap must be a float in \(0, 1\]"),
        ({"xi": -1.0}, "'xi' parameter of compute_uap must be a positive float"),
        ({"norm": "inf", "step_norm": 2}, "'step_norm' parameter of compute_uap must be None or 'inf'"),
        ({"step_norm": "l1"}, "'norm' parameter of compute_uap"),
    ],
)
def test_compute_uap_rejects_bad_parameters(random_setup, kwargs, match):
    model, images = random_setup
    with pytest.raises(ConfigError, match=match):
        compute_uap(model, images, **kwargs)


@pytest.mark.parametrize(
    "images,match",
    [
        (torch.rand(3, 8, 8), "must have 4 dimensions"),
        (torch.rand(2, 3, 8, 8) * 255, r"float pixels in \[0, 1\]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), "must be uint8"),
        (torch.zeros(0, 3, 8, 8), "is empty"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
)
def test_compute_uap_rejects_bad_images(random_setup, images, match):
    with pytest.raises(DataError, match=match):
        compute_uap(random_setup[0], images)


def test_model_must_output_logits(random_setup):
    with pytest.raises(ConfigError, match="must map .* to logits"):
        compute_uap(torch.nn.Identity(), random_setup[1])


def test_registry(random_setup):
    model, images = random_setup
    assert "uap" in list_attacks() and list_attacks("u*") == ["uap"] and list_attacks("x*") == []
    attack = create_attack("uap", zeta=0.1, norm="inf", max_passes=1, batch_size=16)
    assert (
        isinstance(attack, UAPAttack)
        and attack.name == "uap"
        and attack.threat_model == "universal"
    )
    perturbed = attack(model, images)
    assert perturbed.min() >= 0 and perturbed.max() <= 1
    assert perturbation_norm(attack.perturbation_, "inf") <= attack.result_.xi + 1e-6
    with pytest.raises(ConfigError, match="Unknown attack 'uapp'. Did you mean 'uap'"):
        create_attack("uapp")
    with pytest.raises(
        ConfigError, match="Unknown parameter 'zetta' of attack 'uap'. Did you mean 'zeta'"
    ):
        create_attack("uap", zetta=0.1)
    with pytest.raises(ConfigError, match="'targeted' parameter of UAPAttack"):
        create_attack("uap", targeted=-1)
    with pytest.raises(ConfigError, match="'zeta' parameter of UAPAttack"):
        UAPAttack(zeta=8)


def test_registering_a_name_twice_fails():
    from medtune.robustness import register_attack

    with pytest.raises(
        ValueError, match="Attack 'uap' is already registered by medtune.robustness.uap"
    ):
        register_attack("uap")(type("Other", (), {}))


def test_uint8_and_float_images_give_the_same_uap(random_setup):
    model, images = random_setup
    kwargs = {"zeta": 0.1, "max_passes": 1, "batch_size": 8, "seed": 3}
    from_uint8 = compute_uap(model, images, **kwargs)
    from_float = compute_uap(model, images.float() / 255, **kwargs)
    assert from_uint8.xi == pytest.approx(from_float.xi)
    torch.testing.assert_close(from_uint8.perturbation, from_float.perturbation)


@pytest.mark.parametrize("push", ["away", "dominant"])
def test_masked_and_whole_batch_passes_agree(colour_task, push):
    # the two exact ways of stepping on the not-yet-fooled images of a batch (see _batched_pass), and
    # their tallies of the fooled images' classes (the dominant push)
    from medtune.robustness._loop import _batched_pass, _Stepper

    model, images = colour_task["model"], colour_task["train_x"][:64]
    clean = model(images.float() / 255).argmax(1)
    v0 = torch.zeros(1, 3, 16, 16)
    v0[:, 1] = 0.05  # fools some images, not all
    stepper = _Stepper(norm="2", step_norm="2", step=0.2, xi=1.0, grey=False, numel=v0.numel(), targeted=False)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    outs = [_batched_pass(model, images, order, v0, clean, None, stepper, batch_size=16, device=torch.device("cpu"),
                          channels_last=cl, mask_first=mf, push=push)
            for mf in (False, True) for cl in (False, True)]
    assert 0 < int(outs[0][1]) < 64
    if push == "dominant":  # every fooled image met is tallied under its perturbed class
        assert outs[0][3].sum() == outs[0][1]
    else:
        assert outs[0][3] is None
    for v, fooled, updates, counts in outs[1:]:
        assert int(fooled) == int(outs[0][1]) and int(updates) == int(outs[0][2])
        torch.testing.assert_close(v, outs[0][0], rtol=1e-4, atol=1e-6)
        if push == "dominant":
            assert torch.equal(counts, outs[0][3])


def test_the_dominant_push_loss_is_its_formula():
    from medtune.robustness._loop import _push_loss, _tally

    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 2, 1])
    away = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    log_p = torch.log_softmax(logits, dim=1)
    # nothing fooled yet: every image steps away from its label, as ART's FGSM
    torch.testing.assert_close(_push_loss(logits, labels, torch.zeros(4)), away)
    # class 2 dominant: the others ascend log p(2), class 2's images still step away from it
    counts = _tally(None, torch.tensor([2, 3, 2, 0, 2, 1]), torch.tensor([False, False, False, True, False, True]), 4)
    assert counts.tolist() == [0.0, 0.0, 3.0, 1.0]  # fooled images only, by predicted class
    torch.testing.assert_close(_push_loss(logits, labels, counts), torch.where(labels == 2, away, log_p[:, 2]))


def test_targeted_uaps_ignore_the_push(random_setup):
    model, images = random_setup
    common = dict(zeta=0.1, targeted=1, max_passes=2, batch_size=8, seed=3)
    torch.testing.assert_close(compute_uap(model, images, push="dominant", **common).perturbation,
                               compute_uap(model, images, push="away", **common).perturbation, rtol=0, atol=0)


def test_each_algorithm_has_its_own_default_push_and_dominant_is_batched_only(random_setup):
    from medtune.robustness import AuditConfig
    from medtune.robustness.params import UAPParams

    assert UAPParams().push == "dominant" and UAPParams(algorithm="reference").push == "away"
    assert AuditConfig().push == "dominant" and AuditConfig().uap.push == "dominant"
    assert AuditConfig(protocol="hirano2021").uap.push == "away"  # the papers' per-image loop
    # older stores' audits stepped away: an explicit away keeps their ids, the new default is hashed
    assert "push" not in AuditConfig(push="away").semantic_dict()
    assert AuditConfig().semantic_dict()["push"] == "dominant"
    model, images = random_setup
    assert compute_uap(model, images, zeta=0.04, max_passes=1).push == "dominant"
    with pytest.raises(ConfigError, match="'push' parameter of compute_uap .* batched algorithm only"):
        compute_uap(model, images, algorithm="reference", push="dominant")
    with pytest.raises(ConfigError, match="'push' parameter of AuditConfig must be one of away, dominant"):
        AuditConfig(push="towards")


@pytest.mark.parametrize("algorithm", ["batched", "reference"])
def test_the_best_v_is_returned_not_the_last(colour_task, algorithm):
    # L-inf steps as large as the budget overshoot: the source rate rises, then falls again
    model, source = colour_task["model"], colour_task["train_x"]
    xi = budget_xi(source, 0.08, "inf")
    step = 1.0 if algorithm == "batched" else 0.3
    result = compute_uap(model, source, zeta=0.08, norm="inf", step_size=step * xi, max_passes=10, batch_size=32,
                         algorithm=algorithm, exact_rates=True, seed=0, step_scale="fixed",
                         push="away" if algorithm == "batched" else None)
    assert all(result.source_rate_exact)
    assert result.best_rate >= max(result.fooling_rate_source) - 1e-12  # ≥ that of every pass
    assert result.best_rate == result.fooling_rate_source[result.best_pass - 1]
    rate = evaluate_perturbation(model, source, None, result.perturbation)["fooling_rate"]
    assert rate == pytest.approx(result.best_rate)
    last = evaluate_perturbation(model, source, None, result.last_perturbation)["fooling_rate"]
    assert last == pytest.approx(result.fooling_rate_source[-1]) and last == pytest.approx(result.last_rate)
    if algorithm == "batched":  # this run does overshoot, so returning the last v would lose
        assert result.best_pass < result.num_passes and result.best_rate > last + 0.2


def test_default_batched_scoring_counts_and_still_returns_the_best(colour_task):
    # without exact_rates a pass is counted from its own forwards; the returned v is scored exactly
    model, source = colour_task["model"], colour_task["train_x"]
    xi = budget_xi(source, 0.08, "inf")
    result = compute_uap(model, source, zeta=0.08, norm="inf", step_size=xi, max_passes=10, batch_size=32,
                         step_scale="fixed", push="away")  # steps of ξ each: the overshoot this test needs
    assert not all(result.source_rate_exact)  # the overshooting passes are far from the goal
    rate = evaluate_perturbation(model, source, None, result.perturbation)["fooling_rate"]
    assert rate == pytest.approx(result.best_rate)
    assert result.best_rate >= result.last_rate
    exact = [r for r, e in zip(result.fooling_rate_source, result.source_rate_exact) if e]
    assert all(result.best_rate >= r for r in exact)
    assert result.best_rate > result.last_rate + 0.2


@pytest.mark.parametrize("algorithm", ["batched", "reference"])
@pytest.mark.parametrize("norm", [2, "inf"])
def test_grey_uaps_stay_in_the_grey_subspace(grey_task, norm, algorithm):
    model, source = grey_task["model"], grey_task["train_x"]
    result = compute_uap(model, source, zeta=0.08, norm=norm, channels="grey", step_size=0.3 * budget_xi(
        source, 0.08, norm), max_passes=3, batch_size=32, algorithm=algorithm)
    v = result.perturbation
    assert result.channels == "grey" and float(v.abs().max()) > 0
    assert float((v - project_to_grey(v)).norm()) == 0.0 and is_grey(v)  # R = G = B exactly
    assert perturbation_norm(v, norm) <= result.xi + 1e-6
    colour = compute_uap(model, source, zeta=0.08, norm=norm, channels="rgb", max_passes=1, batch_size=32,
                         algorithm=algorithm, step_size=0.3 * result.xi)
    assert not is_grey(colour.perturbation)  # the grey subspace is kept on purpose, not by chance
    with pytest.raises(DataError, match="init is not grey"):
        compute_uap(model, source, channels="grey", init=colour.perturbation, max_passes=1)


@pytest.mark.parametrize("norm", [2, "inf"])
def test_step_size_step_norm_and_decay(random_setup, norm):
    from medtune.robustness._loop import _Stepper

    grad = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    key = "2" if norm == 2 else "inf"
    for step_norm in ([key] if key == "inf" else ["2", "inf"]):
        stepper = _Stepper(norm=key, step_norm=step_norm, step=0.3, xi=10.0, grey=False, numel=192, targeted=False)
        step = stepper.direction(grad)
        # the step's length in the budget's norm is step_size, sign steps included
        assert perturbation_norm(step, norm) == pytest.approx(0.3, rel=1e-5)
        if step_norm == "inf":
            assert torch.equal(step.sign(), grad.sign())
    model, images = random_setup
    decayed = compute_uap(model, images, zeta=0.1, norm=norm, step_decay=0.5, max_passes=3, goal_rate=1.0,
                          batch_size=8)
    fixed = compute_uap(model, images, zeta=0.1, norm=norm, max_passes=3, goal_rate=1.0, batch_size=8)
    assert decayed.step_decay == 0.5 and decayed.step_size == fixed.step_size  # first pass's step
    assert not torch.equal(decayed.last_perturbation, fixed.last_perturbation)


def test_init_and_an_absolute_budget(random_setup):
    model, images = random_setup
    first = compute_uap(model, images, zeta=0.1, xi=0.5, max_passes=1, batch_size=8)
    assert first.xi == 0.5 and first.zeta == 0.1
    assert perturbation_norm(first.perturbation, 2) <= 0.5 + 1e-6
    big = torch.full((3, 8, 8), 1.0)
    resumed = compute_uap(model, images, xi=0.5, init=big, max_passes=1, batch_size=8)
    assert perturbation_norm(resumed.perturbation, 2) <= 0.5 + 1e-6  # init is projected first
    with pytest.raises(DataError, match=r"init has shape \(3, 4, 4\)"):
        compute_uap(model, images, init=torch.zeros(3, 4, 4))


@pytest.mark.parametrize("norm", [2, "inf"])
def test_sqrt_batch_step_is_the_step_times_root_of_the_images_stepped_for(random_setup, norm):
    # one batch of all images, one pass, a budget the step cannot reach: v is exactly the first step
    model, images = random_setup
    common = dict(zeta=0.1, xi=1e3, norm=norm, step_size=0.05, max_passes=1, goal_rate=1.0,
                  batch_size=images.shape[0])
    fixed = compute_uap(model, images, step_scale="fixed", **common)
    scaled = compute_uap(model, images, **common)  # the batched default
    n = images.shape[0]  # none is fooled before the first step: every image is stepped for
    assert fixed.step_scale == "fixed" and scaled.step_scale == "sqrt_batch"
    assert perturbation_norm(fixed.last_perturbation, norm) == pytest.approx(0.05, rel=1e-5)
    assert perturbation_norm(scaled.last_perturbation, norm) == pytest.approx(0.05 * math.sqrt(n), rel=1e-5)
    # the same direction, √n times longer
    torch.testing.assert_close(scaled.last_perturbation, fixed.last_perturbation * math.sqrt(n), rtol=1e-4,
                               atol=1e-6)


def test_each_algorithm_has_its_own_default_step_scale():
    from medtune.robustness import AuditConfig
    from medtune.robustness.params import UAPParams

    assert UAPParams().step_scale == "sqrt_batch" and UAPParams(algorithm="reference").step_scale == "fixed"
    assert AuditConfig().step_scale == "sqrt_batch" and AuditConfig().uap.step_scale == "sqrt_batch"
    assert AuditConfig(algorithm="reference").step_scale == "fixed"
    assert AuditConfig(protocol="minagi2022").uap.step_scale == "fixed"  # the papers' per-image loop
    # the default is hashed under its name: the same attack id as the scale given explicitly, and not
    # the id of the fixed step of older stores
    assert AuditConfig().attack_id("r") == AuditConfig(step_scale="sqrt_batch").attack_id("r")
    assert AuditConfig().attack_id("r") != AuditConfig(step_scale="fixed").attack_id("r")


def test_sqrt_batch_stays_within_budget_and_is_batched_only(random_setup):
    model, images = random_setup
    result = compute_uap(model, images, zeta=0.04, norm=2, step_scale="sqrt_batch", max_passes=2, batch_size=8)
    assert perturbation_norm(result.perturbation, 2) <= result.xi + 1e-6
    with pytest.raises(ConfigError, match="'step_scale' parameter of compute_uap .* batched algorithm only"):
        compute_uap(model, images, algorithm="reference", step_scale="sqrt_batch")
    with pytest.raises(ConfigError, match="'step_scale' parameter of UAPAttack"):
        UAPAttack(step_scale="sqrt")
