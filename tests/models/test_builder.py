import huggingface_hub.constants
import pytest
import timm
import torch

from medtune.errors import ConfigError
from medtune.models import NormalizedModel, create_model, get_num_params


def test_normalized_model_normalizes_with_the_pretrained_mean_and_std():
    model = create_model("test_resnet", num_classes=3, weights="none").eval()
    cfg = timm.get_pretrained_cfg("test_resnet")
    assert model.pretrained_cfg["mean"] == cfg.mean and model.pretrained_cfg["std"] == cfg.std
    assert model.pretrained_cfg["input_size"] == cfg.input_size
    assert model.pretrained_cfg["interpolation"] == cfg.interpolation
    assert model.pretrained_cfg["crop_pct"] == pytest.approx(cfg.crop_pct)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(model(x), model.backbone((x - mean) / std), atol=1e-6)
    assert model(x).shape == (2, 3) and model.num_classes == 3


def test_normalized_model_buffers_follow_dtype_and_state_dict():
    model = create_model("medtune_tiny_cnn", num_classes=2, weights="none")
    assert {"mean", "std"} <= set(model.state_dict())
    model = model.to(torch.float64)
    assert model.mean.dtype == torch.float64
    assert model(torch.rand(1, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64


def test_gradients_reach_the_input_in_pixel_units():
    model = create_model("medtune_tiny_cnn", num_classes=2, weights="none").eval()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_head_is_reset_to_num_classes_and_drop_rate_is_passed():
    model = create_model("test_efficientnet", num_classes=5, weights="none", drop_rate=0.3)
    assert model.backbone.get_classifier().out_features == 5
    assert model.backbone.drop_rate == pytest.approx(0.3)


def test_get_num_params_counts_all_or_trainable():
    model = create_model("medtune_tiny_cnn", num_classes=2, weights="none")
    total = sum(p.numel() for p in model.parameters())
    assert get_num_params(model) == total
    head = model.backbone.get_classifier()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    assert get_num_params(model, trainable_only=True) == sum(p.numel() for p in head.parameters()) < total


def test_unknown_arch_suggests_close_names_without_listing_all():
    with pytest.raises(ConfigError, match="Unknown arch 'resnet5'.*Did you mean 'resnet50'.*list_models") as info:
        create_model("resnet5", num_classes=2, weights="none")
    assert len(str(info.value)) < 600


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes must be an int >= 1; got 0"),
        (dict(num_classes=2.0), "num_classes must be an int >= 1; got 2.0"),
        (dict(num_classes=2, drop_rate=1.0), r"drop_rate must be a float in \[0, 1\); got 1.0"),
        (dict(num_classes=2, weights="imagnet"), "Unknown weights 'imagnet'. Did you mean 'imagenet'"),
        (dict(num_classes=2, weights=3), "weights must be one of imagenet, none"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model("medtune_tiny_cnn", **kwargs)


def test_imagenet_weights_offline_explain_the_offline_choices(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="Offline\\? Use weights=FILE.*efficientnet_lite0"):
        create_model("test_resnet", num_classes=2, weights="imagenet")


def test_imagenet_weights_for_an_arch_without_weights():
    with pytest.raises(ConfigError, match="timm has no ImageNet weights for arch 'medtune_tiny_cnn'"):
        create_model("medtune_tiny_cnn", num_classes=2, weights="imagenet")


def test_imagenet_weights_with_an_unknown_tag():
    with pytest.raises(ConfigError, match="arch 'resnet18.bogus'.*Invalid pretrained tag"):
        create_model("resnet18.bogus", num_classes=2, weights="imagenet")


def test_returns_a_normalized_model():
    assert isinstance(create_model("medtune_tiny_cnn", num_classes=2, weights="none"), NormalizedModel)
