"""compute_uap, projection, random controls and the registered attack."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medtune.errors import ConfigError, DataError
from medtune.robustness import (
    UAPAttack,
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
    torch.manual_seed(0)
    images, _ = helpers.make_colour_task(32, seed=5, size=8)
    return helpers.TinyCNN().eval(), images


@pytest.mark.parametrize("norm", [2, "inf"])
@pytest.mark.parametrize("seed,zeta", [(0, 0.02), (1, 0.04), (2, 0.08), (3, 0.3), (4, 1.0)])
def test_perturbation_stays_within_budget(random_setup, norm, seed, zeta):
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
    )
    assert result.xi == pytest.approx(xi)
    assert result.num_passes == 2 or (result.goal_reached and result.fooling_rate_source[-1] == 1.0)
    assert 0 < perturbation_norm(result.perturbation, norm) <= result.xi + 1e-6
    if norm == "inf":  # ten-times steps saturate every pixel the gradient touches
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
    assert result.fooling_rate_source[-1] >= 0.5
    assert all(r < 0.5 for r in result.fooling_rate_source[:-1])


def test_targeted_uaps_per_class(colour_task):
    results = compute_targeted_uaps(
        colour_task["model"], colour_task["train_x"][:60], zeta=0.08, max_passes=1, batch_size=20
    )
    assert sorted(results) == [0, 1, 2]
    assert [r.targeted for r in results.values()] == [0, 1, 2]
    with pytest.raises(ConfigError, match="pass 'classes' instead of 'targeted'"):
        compute_targeted_uaps(colour_task["model"], colour_task["train_x"], targeted=1)


@pytest.mark.parametrize("norm", [2, "inf"])
def test_random_control_has_the_uaps_norm(norm):
    g = torch.Generator().manual_seed(0)
    v = 0.05 * torch.randn(3, 8, 8, generator=g)
    control = random_control(v, norm, seed=1)
    assert control.shape == v.shape
    assert perturbation_norm(control, norm) == pytest.approx(perturbation_norm(v, norm), rel=1e-5)
    assert not torch.allclose(control, v)
    assert torch.equal(control, random_control(v, norm, seed=1))
    assert not torch.equal(control, random_control(v, norm, seed=2))
    if norm == "inf":  # a random corner of the L-inf ball
        assert torch.allclose(control.abs(), torch.full_like(v, v.abs().max()))
    zero = random_control(torch.zeros(3, 2, 2), norm, seed=0)
    assert torch.equal(zero, torch.zeros(3, 2, 2))


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


def test_mask_and_whole_batch_gradients_agree(colour_task):
    # the two exact ways of getting the gradient over the not-yet-fooled images (see _mean_gradient)
    from medtune.robustness.uap import _mean_gradient

    model, x = colour_task["model"], colour_task["train_x"][:32].float() / 255
    v = torch.zeros(1, 3, 16, 16)
    v[:, 1] = 0.05  # fools some images, not all
    clean = model(x).argmax(1)
    grads = [
        _mean_gradient(model, x, v, clean, None, channels_last=cl, whole_batch=wb)
        for wb in (True, False)
        for cl in (True, False)
    ]
    assert 0 < grads[0][1] < 1
    for grad, share in grads[1:]:
        assert share == grads[0][1]
        torch.testing.assert_close(grad, grads[0][0], rtol=1e-4, atol=1e-6)
