"""``dcnn3`` (Rama et al.): three convolutions, average pooling over the final maps, K outputs."""

from __future__ import annotations

import pytest
import torch

from medtune.cli import main
from medtune.models import create_model, get_blocks, get_num_params


def _dcnn(num_classes: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model("dcnn3", num_classes=num_classes, weights="none")


@pytest.mark.parametrize("num_classes", [2, 5])
def test_parameter_count_matches_the_layout(num_classes):
    model = _dcnn(num_classes)
    convs = [(3, 32), (32, 64), (64, 128)]  # 3x3 kernels with biases
    expected = sum(o * i * 9 + o for i, o in convs) + 128 * num_classes + num_classes
    assert get_num_params(model) == expected == 93_248 + 129 * num_classes
    convs_found = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs_found] == [(i, o, (3, 3)) for i, o in convs]
    blocks = get_blocks(model)
    assert blocks.names() == ["stage_1", "stage_2", "stage_3", "head"]
    assert [b.num_params for b in blocks] == [896, 18_496, 73_856, 129 * num_classes]


@pytest.mark.parametrize("size", [32, 48])
def test_average_pooling_spans_the_final_maps_at_any_input_size(size):
    model = _dcnn(3).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        maps = model.backbone.forward_features(model.normalize(x))
        assert maps.shape == (2, 128, size // 4, size // 4)
        pooled = model.backbone.forward_head(maps, pre_logits=True)
        torch.testing.assert_close(pooled, maps.mean(dim=(2, 3)))
        torch.testing.assert_close(model(x), model.backbone.get_classifier()(pooled))


def test_dcnn3_trains_from_scratch_through_medtune_sweep_beside_another_backbone(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["sweep", "--data", "synthetic", "--arch", "dcnn3,medtune_tiny_cnn", "--weights", "none",
                 "--strategy", "scratch", "--epochs", "2", "--scratch-epochs", "2", "--img-size", "32",
                 "--batch-size", "16", "--device", "cpu", "--store", str(store), "--seeds", "0"]) == 0
    from medtune.store import ResultsStore

    runs = {r["arch"]: r for r in ResultsStore(store).runs()}
    assert set(runs) == {"dcnn3", "medtune_tiny_cnn"}
    dcnn = runs["dcnn3"]
    assert dcnn["total_params"] == dcnn["trainable_params"] == 93_506
    assert dcnn["num_blocks"] == 4 and 0.0 <= dcnn["metrics"]["auc"] <= 1.0
    assert len(dcnn["history"]) == 2 and dcnn["history"][1]["train_loss"] < dcnn["history"][0]["train_loss"] + 0.05
