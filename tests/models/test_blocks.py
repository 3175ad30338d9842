import csv
import io
import json

import pytest
import timm
import torch
from torch import nn

from medtune.errors import ConfigError
from medtune.models import Blocks, create_model, format_blocks, get_blocks, list_archs

SLOW = {"vgg16", "vgg19", "vgg19_bn"}  # about 1.5 s each to build, plus the forward pass
# timm CNNs beyond the checked list, through the generic rules
GENERIC = ["test_resnet", "test_efficientnet", "test_convnext", "resnet34", "ghostnet_100"]
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a
         for a in list_archs() + GENERIC if not a.startswith("tv:")]  # tv: models: tests/models/test_tv.py


def _execution_order(model: nn.Module, size: int) -> dict[str, int]:
    """Parameter name -> index of the first call of its module in a forward pass."""
    order: dict[str, int] = {}
    owners = {name: module for name, module in model.named_modules() if module._parameters}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            order.setdefault(name, len(order))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in owners.items()]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return {p: order[p.rpartition(".")[0]] for p, _ in model.named_parameters()}


def _check_partition(blocks: Blocks, model: nn.Module, calls: dict[str, int]) -> None:
    named = dict(model.named_parameters())
    flat = [name for block in blocks for name in block.param_names]
    assert sorted(flat) == sorted(named) and len(flat) == len(set(flat)), "every parameter exactly once"
    assert sum(b.num_params for b in blocks) == sum(p.numel() for p in model.parameters())
    for idx, block in enumerate(blocks):
        assert block.num_params == sum(named[n].numel() for n in block.param_names)
        assert all(p is named[n] for p, n in zip(blocks.parameters(idx), block.param_names, strict=True))
    head = blocks[blocks.head_idx]
    assert head.name == "head" and blocks.head_idx == len(blocks) - 1
    classifier = {id(p) for p in model.get_classifier().parameters()}
    pre_logits = {id(p) for n, p in named.items() if n.startswith("pre_logits.")}
    head_ids = {id(p) for p in blocks.parameters(blocks.head_idx)}
    # the classifier, and in the block partition also a pre_logits MLP (VGG's fc6/fc7)
    assert head_ids == (classifier | pre_logits if blocks.granularity == "block" else classifier)
    for earlier, later in zip(blocks[:-1], blocks[1:], strict=True):  # input -> output, as the forward pass runs
        if earlier.param_names and later.param_names:
            assert max(calls[n] for n in earlier.param_names) < min(calls[n] for n in later.param_names), (
                earlier.name,
                later.name,
            )
    reductions = [b.reduction for b in blocks[:-1]]
    assert all(isinstance(r, int) for r in reductions) and reductions == sorted(reductions)
    assert head.reduction is None
    assert len(set(blocks.names())) == len(blocks)


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_and_layers_partition_every_parameter_in_forward_order(arch):
    model = timm.create_model(arch, num_classes=3)
    calls = _execution_order(model, size=80 if arch == "inception_v3" else 64)
    blocks = get_blocks(model)
    layers = get_blocks(model, "layer")
    _check_partition(blocks, model, calls)
    _check_partition(layers, model, calls)
    names = blocks.names()
    stages = [n for n in names if n.startswith("stage_")]
    assert stages == [f"stage_{i}" for i in range(1, len(stages) + 1)] and len(stages) >= 3
    assert names == [*(["stem"] if names[0] == "stem" else []), *stages, "head"]
    assert len(layers) > len(stages) or arch.startswith("medtune") or arch == "dcnn3"  # one conv per block
    for layer in layers:  # layers nest in blocks
        assert len({blocks.block_index(n) for n in layer.param_names}) == 1, layer.name


def _blocks_of(model: nn.Module) -> dict[str, set[str]]:
    return {b.name: set(b.param_names) for b in get_blocks(model)}


def _with_prefix(model: nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_blocks_are_stem_and_layer1_to_4(arch):
    model = timm.create_model(arch)
    blocks = get_blocks(model)
    assert blocks.names() == ["stem", "stage_1", "stage_2", "stage_3", "stage_4", "head"]
    assert [b.reduction for b in blocks] == [2, 4, 8, 16, 32, None]
    got = {b.name: set(b.param_names) for b in blocks}
    assert got["stem"] == {"conv1.weight", "bn1.weight", "bn1.bias"}
    for k in range(1, 5):
        assert got[f"stage_{k}"] == _with_prefix(model, f"layer{k}.")
    assert got["head"] == {"fc.weight", "fc.bias"}
    layers = get_blocks(model, "layer").names()
    depth = 2 if arch == "resnet18" else 3
    assert layers[: 1 + depth] == ["stem", *[f"layer1.{i}" for i in range(depth)]]


@pytest.mark.slow
@pytest.mark.parametrize("arch, num_convs", [("vgg16", 13), ("vgg19_bn", 16)])
def test_vgg_blocks_are_the_conv_blocks_between_max_pools(arch, num_convs):
    model = timm.create_model(arch)
    expected, current = [], set()
    for idx, module in enumerate(model.features):
        if isinstance(module, nn.MaxPool2d):
            expected.append(current)
            current = set()
        else:
            current |= {f"features.{idx}.{n}" for n, _ in module.named_parameters()}
    blocks = get_blocks(model)
    assert blocks.names() == ["stage_1", "stage_2", "stage_3", "stage_4", "stage_5", "head"]
    assert [set(b.param_names) for b in blocks[:5]] == expected
    assert set(blocks[5].param_names) == _with_prefix(model, "pre_logits.", "head.")  # fc6, fc7, fc8
    assert [b.reduction for b in blocks] == [1, 2, 4, 8, 16, None]
    layers = get_blocks(model, "layer")
    assert len(layers) == num_convs + 3  # conv(+BN) layers, fc6, fc7, classifier
    assert layers.names()[-3:] == ["pre_logits.fc1", "pre_logits.fc2", "head"]


@pytest.mark.parametrize(
    "arch", ["efficientnet_b0", "tf_efficientnet_lite0", "mobilenetv3_large_100", "mobilenetv2_100"]
)
def test_efficientnet_family_uses_timms_seven_stages(arch):
    model = timm.create_model(arch)
    got = _blocks_of(model)
    assert list(got) == ["stem", *[f"stage_{k}" for k in range(1, 8)], "head"]
    assert got["stem"] == _with_prefix(model, "conv_stem.", "bn1.")
    for k in range(1, 7):
        assert got[f"stage_{k}"] == _with_prefix(model, f"blocks.{k - 1}.")
    assert got["stage_7"] == _with_prefix(model, "blocks.6.", "conv_head.", "bn2.")
    assert got["head"] == {"classifier.weight", "classifier.bias"}
    reductions = [b.reduction for b in get_blocks(model)]
    assert reductions == [2, 2, 4, 8, 16, 16, 32, 32, None]


def test_densenet_transitions_are_blocks_of_their_own():
    model = timm.create_model("densenet121")
    got = _blocks_of(model)
    assert list(got) == ["stem", *[f"stage_{k}" for k in range(1, 8)], "head"]  # Davila et al.'s 9 blocks
    for k in range(1, 4):
        assert got[f"stage_{2 * k - 1}"] == _with_prefix(model, f"features.denseblock{k}.")
        assert got[f"stage_{2 * k}"] == _with_prefix(model, f"features.transition{k}.")
    assert got["stage_7"] == _with_prefix(model, "features.denseblock4.", "features.norm5.")
    assert got["head"] == {"classifier.weight", "classifier.bias"}
    assert [b.reduction for b in get_blocks(model)] == [2, 4, 8, 8, 16, 16, 32, 32, None]


def test_inception_v3_stages_follow_its_resolution_levels():
    model = timm.create_model("inception_v3")
    blocks = get_blocks(model)
    got = {b.name: set(b.param_names) for b in blocks}
    assert got["stem"] == _with_prefix(model, "Conv2d_1a", "Conv2d_2a", "Conv2d_2b")
    assert got["stage_1"] == _with_prefix(model, "Conv2d_3b", "Conv2d_4a")
    assert got["stage_2"] == _with_prefix(model, "Mixed_5")
    assert got["stage_3"] == _with_prefix(model, "Mixed_6")
    assert got["stage_4"] == _with_prefix(model, "Mixed_7")
    assert [b.reduction for b in blocks] == [2, 4, 8, 16, 32, None]


def test_convnext_head_is_the_classifier_only_and_final_norm_joins_the_last_stage():
    model = timm.create_model("convnext_tiny")
    got = _blocks_of(model)
    assert got["head"] == {"head.fc.weight", "head.fc.bias"}
    assert got["stage_4"] == _with_prefix(model, "stages.3.", "head.norm.")
    assert got["stage_2"] == _with_prefix(model, "stages.1.")  # its downsampling layer opens the stage


def test_get_blocks_accepts_a_normalized_model_and_backbone_prefixed_names():
    model = create_model("medtune_tiny_cnn", num_classes=2, weights="none")
    blocks = get_blocks(model)
    assert blocks.model is model.backbone
    assert blocks.to_rows() == get_blocks(model.backbone).to_rows()
    for name, param in model.named_parameters():
        idx = blocks.block_index(name)  # "backbone.stem.conv.weight"
        assert any(p is param for p in blocks.parameters(idx))
    assert blocks.block_index("head.fc.weight") == blocks.head_idx


def test_blocks_errors():
    blocks = get_blocks(timm.create_model("medtune_tiny_cnn"))
    with pytest.raises(ConfigError, match="Block index 5 is out of range for medtune_tiny_cnn, which has 5 blocks"):
        blocks.parameters(5)
    with pytest.raises(
        ConfigError, match="'stem.conv.weigth' is not a parameter of medtune_tiny_cnn. Did you mean 'stem.conv.weight'"
    ):
        blocks.block_index("stem.conv.weigth")
    with pytest.raises(ConfigError, match="Unknown granularity 'layers'. Did you mean 'layer'"):
        get_blocks(blocks.model, "layers")
    with pytest.raises(ConfigError, match="get_blocks needs a timm model .* got Sequential"):
        get_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_format_blocks_table_json_csv():
    blocks = get_blocks(timm.create_model("resnet18", num_classes=2))
    rows = blocks.to_rows()
    assert [r["name"] for r in rows] == blocks.names()
    assert sum(r["percent"] for r in rows) == pytest.approx(100.0, abs=0.05)
    assert rows[-1]["reduction"] is None and rows[0]["index"] == 0
    assert json.loads(format_blocks(blocks, "json")) == rows
    parsed = list(csv.DictReader(io.StringIO(format_blocks(blocks, "csv"))))
    assert [r["name"] for r in parsed] == blocks.names()
    assert [int(r["num_params"]) for r in parsed] == [b.num_params for b in blocks]
    table = format_blocks(blocks)
    lines = table.splitlines()
    assert lines[0] == "resnet18: 6 blocks"
    assert "stride" in lines[1] and "%" in lines[1]
    assert f"{blocks[4].num_params:,}" in lines[7] and lines[7].split()[1] == "stage_4"
    assert lines[-1].split()[:2] == ["total", f"{sum(p.numel() for p in blocks.model.parameters()):,}"]
    with pytest.raises(ConfigError, match="Unknown format 'yaml'. .*Available: csv, json, table"):
        format_blocks(blocks, "yaml")


def test_list_archs_filters_by_pattern():
    assert {"resnet50", "vgg16", "tf_efficientnet_lite0", "medtune_tiny_cnn"} <= set(list_archs())
    assert list_archs("vgg*") == ["vgg16", "vgg19", "vgg19_bn"]
    assert all(timm.is_model(a) or a.startswith("tv:") for a in list_archs())
    assert list_archs("tv:*") == ["tv:alexnet", "tv:resnet18", "tv:vgg16"]


@pytest.mark.slow
def test_vgg16_linear_trains_fc6_to_fc8_and_top_k_1_adds_conv_block_5(capsys):
    from medtune.strategies import create_strategy

    model = create_model("vgg16", num_classes=2, weights="none")
    blocks = get_blocks(model)
    fc6, fc7, fc8 = 512 * 7 * 7 * 4096 + 4096, 4096 * 4096 + 4096, 4096 * 2 + 2
    conv5 = 3 * (512 * 512 * 9 + 512)
    counts = {}
    for spec in ("linear", "linear:head_only", "top_k:1"):
        create_strategy(spec).set_trainable(blocks)
        counts[spec] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with capsys.disabled():
        print(f"\nVGG16 (2 classes) trainable parameters: {counts}")
    assert counts == {"linear": fc6 + fc7 + fc8, "linear:head_only": fc8, "top_k:1": conv5 + fc6 + fc7 + fc8}
