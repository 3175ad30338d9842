"""torchvision backbones (``tv:NAME``): partitions, weights, logits equal to torchvision's, strategies."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from medtune.cli import main
from medtune.errors import ConfigError
from medtune.models import create_model, get_blocks, get_num_params
from medtune.strategies import create_strategy, list_strategies
from medtune.training.loop import fit

EXAMPLE_SPECS = {"deft": "deft:010"}  # one bit per non-head block: AlexNet has 3


def _alexnet(num_classes: int = 2, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model("tv:alexnet", num_classes=num_classes, weights="none")


@pytest.mark.parametrize("arch,granularity", [
    ("tv:alexnet", "block"), ("tv:alexnet", "layer"), ("tv:resnet18", "block"), ("tv:resnet18", "layer"),
    ("tv:vgg11_bn", "layer"), ("tv:squeezenet1_0", "block"), ("tv:squeezenet1_0", "layer"),
    ("tv:densenet121", "block")])
def test_every_parameter_in_exactly_one_block_and_layer_in_forward_order(arch, granularity):
    with torch.random.fork_rng(devices=[]):
        model = create_model(arch, num_classes=3, weights="none")
    blocks = get_blocks(model, granularity=granularity)
    names = [n for n, _ in model.backbone.named_parameters()]
    listed = [n for block in blocks for n in block.param_names]
    assert sorted(listed) == sorted(names) and len(listed) == len(set(listed))
    assert listed == names, "blocks run input to output"
    assert blocks.num_params == get_num_params(model)
    assert set(blocks[blocks.head_idx].param_names) == {
        f"{n}" for n, p in model.backbone.named_parameters() if any(p is q for q in model.backbone.get_classifier().parameters())
    } or granularity == "block"


def test_alexnet_blocks_are_conv_blocks_between_max_pools_and_layers_five_convs_three_fcs():
    model = _alexnet()
    blocks = get_blocks(model)
    assert blocks.names() == ["stage_1", "stage_2", "stage_3", "head"]
    assert [sorted({n.rsplit(".", 1)[0] for n in b.param_names}) for b in blocks] == [
        ["features.0"], ["features.3"], ["features.10", "features.6", "features.8"],
        ["classifier.1", "classifier.4", "classifier.6"]]
    assert [b.reduction for b in blocks] == [4, 8, 17, None]
    layers = get_blocks(model, granularity="layer")
    assert layers.names() == ["features.0", "features.3", "features.6", "features.8", "features.10",
                              "classifier.1", "classifier.4", "head"]
    assert layers[-1].param_names == ("classifier.6.weight", "classifier.6.bias")
    # 5 conv layers and 3 fully connected layers (fc8 with 2 outputs): AlexNet's parameter count
    convs = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
    fcs = [(256 * 6 * 6, 4096), (4096, 4096), (4096, 2)]
    expected = sum(o * i * k * k + o for i, o, k in convs) + sum(i * o + o for i, o in fcs)
    assert [b.num_params for b in layers] == [o * i * k * k + o for i, o, k in convs] + [i * o + o for i, o in fcs]
    assert get_num_params(model) == expected == 57_012_034


def test_medtune_blocks_tv_alexnet_prints_the_partition(capsys):
    assert main(["blocks", "tv:alexnet"]) == 0
    out = capsys.readouterr().out
    print(out)
    rows = [line.split() for line in out.splitlines() if line.strip().split()[:1] and line.split()[0].isdigit()]
    assert [r[1] for r in rows] == ["stage_1", "stage_2", "stage_3", "head"]
    assert sum(int(r[2].replace(",", "")) for r in rows) == 57_012_034
    assert "57,012,034" in out.splitlines()[-1]


@pytest.mark.parametrize("num_classes", [1000, 2])
def test_alexnet_logits_equal_torchvisions_own_model_with_the_same_weights(num_classes, tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("tv:alexnet", num_classes=num_classes, weights=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        if num_classes == 1000:
            assert torch.equal(model(x), reference((x - mean) / std))
        else:  # the same features, a fresh 2-class head
            feats = {}
            model.backbone.get_classifier().register_forward_pre_hook(lambda m, a: feats.__setitem__("ours", a[0]))
            reference.classifier[6].register_forward_pre_hook(lambda m, a: feats.__setitem__("ref", a[0]))
            assert model(x).shape == (2, 2)
            reference((x - mean) / std)
            assert torch.equal(feats["ours"], feats["ref"])
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_tv_weights_file_with_pickled_objects_is_refused_and_unknown_arch_suggests(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1), "evil": object()}, path)
    with pytest.raises(ConfigError, match="Refused to load weights file"):
        create_model("tv:alexnet", num_classes=2, weights=str(path))
    with pytest.raises(ConfigError, match="Did you mean 'tv:alexnet'"):
        create_model("tv:alexnt", num_classes=2, weights="none")


def test_offline_imagenet_download_failure_is_one_config_error(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("weights") is not None:
            raise OSError("no network")
        return original(*args, **kwargs)

    original = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ConfigError, match=r"Offline\? .*weights=alexnet.pth"):
        create_model("tv:alexnet", num_classes=2, weights="imagenet")


@pytest.fixture(scope="module")
def data64():
    from medtune.data import make_synthetic

    return make_synthetic(num_samples=16, img_size=64, num_classes=2, seed=0)


# AlexNet has 57M parameters: an optimiser step takes a second on a CPU, so the strategies that
# train everything for several epochs are marked slow; the partial ones (frozen bits) run always
_PARTIAL = ("top_k", "layers_k")  # a block and a layer strategy


@pytest.mark.parametrize("name", [n if n in _PARTIAL else pytest.param(n, marks=pytest.mark.slow)
                                  for n in list_strategies()])
def test_every_strategy_freezes_and_trains_as_specified_on_alexnet(name, data64, tmp_path):
    from medtune.config import RunConfig

    cfg = RunConfig(data="synthetic", arch="tv:alexnet", weights="none", epochs=1, img_size=64, batch_size=16,
                    lr=1e-3, device="cpu", store=str(tmp_path / "s"), progress=False, eval_batch_size=64,
                    scratch_epochs=1)
    strategy = create_strategy(EXAMPLE_SPECS.get(name, name))
    model = _alexnet()
    blocks = get_blocks(model, granularity=strategy.granularity)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit(model, data64, strategy, cfg, blocks=blocks)
    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if not torch.equal(p, before[n])}
    head = {f"backbone.{n}" for n in blocks[blocks.head_idx].param_names}
    if name == "knn":  # the classifier is replaced by the neighbours' votes; fc6/fc7 stay frozen features
        assert not trained and result.trainable_params == 0
    else:
        assert head <= trained, "the head must train under every strategy"
    if name in ("linear", "top_k", "layers_k", "surgical", "deft"):
        frozen = set(params) - trained
        assert frozen
        for n in frozen:
            assert torch.equal(params[n], before[n])
        trainable_blocks = {i for i, b in enumerate(blocks) if any(f"backbone.{n}" in trained for n in b.param_names)}
        expected = {"linear": {blocks.head_idx}, "top_k": {blocks.head_idx - 1, blocks.head_idx},
                    "layers_k": {blocks.head_idx - 1, blocks.head_idx}, "surgical": {0, blocks.head_idx},
                    "deft": {1, blocks.head_idx}}[name]
        assert trainable_blocks == expected, (name, blocks.names())
    assert math.isfinite(result.test_metrics["loss"])


def test_tajbakhsh_preset_uses_alexnet_with_its_eight_layers():
    from medtune.presets import get_preset
    from medtune.sweeps import load_sweep_config

    sweep = load_sweep_config(get_preset("tajbakhsh2016"))
    assert sweep.arch == ("tv:alexnet",)
    assert len(get_blocks(_alexnet(), granularity="layer")) == 8  # conv1..5, fc6, fc7, fc8: layers_k k = 0..7


@pytest.mark.parametrize("arch", ["tv:alexnet", "tv:resnet18"])
def test_feature_cache_sees_tv_models_as_a_plain_chain(arch):
    from medtune.training.cache import build_chain

    with torch.random.fork_rng(devices=[]):
        model = create_model(arch, num_classes=2, weights="none")
    chain = build_chain(model, torch.rand(2, 3, 64, 64))  # None unless the chain equals model(x)
    assert chain is not None and "flatten" in [name for name, _ in chain]
    assert "flatten" not in " ".join(model.state_dict())
