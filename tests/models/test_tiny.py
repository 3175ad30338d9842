import timm
import torch

from medtune.models import create_model, get_blocks, get_num_params
from medtune.models.tiny import TinyCNN


def test_tiny_cnn_is_registered_with_timm_and_has_about_10k_params():
    assert "medtune_tiny_cnn" in timm.list_models("medtune_*")
    model = create_model("medtune_tiny_cnn", num_classes=2, weights="none")
    assert isinstance(model.backbone, TinyCNN)
    assert 5_000 < get_num_params(model) < 20_000
    assert model(torch.rand(3, 3, 16, 16)).shape == (3, 2)


def test_tiny_cnn_timm_interface():
    model = timm.create_model("medtune_tiny_cnn", num_classes=4, in_chans=1, drop_rate=0.1).eval()
    x = torch.rand(2, 1, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 32, 4, 4)
    assert model.forward_head(features, pre_logits=True).shape == (2, 32)
    assert torch.equal(model.forward_head(features), model(x))
    assert model.get_classifier().out_features == 4
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    assert [info["reduction"] for info in model.feature_info] == [1, 2, 4, 8]
    assert model.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert model.pretrained_cfg["std"] == timm.data.IMAGENET_DEFAULT_STD


def test_tiny_cnn_features_only_matches_feature_info():
    model = timm.create_model("medtune_tiny_cnn", features_only=True, depths=(2, 1, 1))
    shapes = [tuple(f.shape) for f in model(torch.rand(1, 3, 32, 32))]
    assert shapes == [(1, 8, 32, 32), (1, 16, 16, 16), (1, 24, 8, 8), (1, 32, 4, 4)]


def test_tiny_cnn_blocks_and_layers():
    model = timm.create_model("medtune_tiny_cnn", depths=(2, 1, 2))
    blocks = get_blocks(model)
    assert blocks.names() == ["stem", "stage_1", "stage_2", "stage_3", "head"]
    assert [b.reduction for b in blocks] == [1, 2, 4, 8, None]
    layers = get_blocks(model, "layer")
    assert layers.names() == ["stem", "stages.0.0", "stages.0.1", "stages.1.0", "stages.2.0", "stages.2.1", "head"]
