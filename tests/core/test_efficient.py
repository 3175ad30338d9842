"""Parameter-efficient strategies (bitfit, norm, lora, knn) and k-shot training sets (train_per_class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import medtune
from medtune.data import make_synthetic, with_train_per_class
from medtune.models import create_model, get_blocks
from medtune.models._norm import norm_param_ids
from medtune.store import ResultsStore
from medtune.strategies import create_strategy
from medtune.training.loop import fit
from tests.conftest import make_tiny

BASE = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 2, "img_size": 16,
        "batch_size": 16, "lr": 0.01, "device": "cpu", "num_threads": 1, "progress": False}


def _trainable_after_set(spec: str, model: nn.Module) -> tuple[int, object]:
    strategy = create_strategy(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        strategy.prepare_model(model)
    blocks = get_blocks(model, granularity=strategy.granularity)
    strategy.phases()[0].strategy.set_trainable(blocks)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), blocks


def _expected_counts(model: nn.Module) -> dict[str, int]:
    """Each strategy's trainable count computed from the architecture, independently of the strategies."""
    blocks = get_blocks(model)
    head = sum(p.numel() for p in blocks.parameters(blocks.head_idx))
    head_ids = {id(p) for p in blocks.parameters(blocks.head_idx)}
    backbone = model.backbone
    biases = sum(p.numel() for n, p in backbone.named_parameters() if n.endswith(".bias") and id(p) not in head_ids)
    norms = sum(p.numel() for p in backbone.parameters() if id(p) in norm_param_ids(backbone) and id(p) not in head_ids)
    lora = 0
    for m in backbone.modules():  # LoRA r=8: A (r, in, kh, kw) and B (out, r, 1, 1) per dense conv; (r, in) + (out, r) per linear
        if any(id(p) in head_ids for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            lora += 8 * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * 8
        elif isinstance(m, nn.Linear):
            lora += 8 * m.in_features + m.out_features * 8
    return {"bitfit": biases + head, "norm": norms + head, "lora:r=8": lora + head,
            "full": sum(p.numel() for p in backbone.parameters())}


@pytest.mark.parametrize("arch", ["resnet50", "tf_efficientnet_lite0"])
def test_trainable_counts_on_real_architectures(arch, capsys):
    import copy

    model = create_model(arch, num_classes=3, weights="none")
    expected = _expected_counts(model)
    counts = {}
    for spec in ("bitfit", "norm", "lora:r=8", "full"):
        counts[spec], _ = _trainable_after_set(spec, copy.deepcopy(model))
    with capsys.disabled():
        print(f"\n{arch} trainable parameters (3 classes): " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    assert counts == expected
    assert counts["bitfit"] < counts["norm"] < counts["lora:r=8"] < counts["full"]


@pytest.mark.parametrize("spec", ["bitfit", "norm", "norm:frozen", "lora:modules=conv,r=2,dropout=0.1"])
def test_frozen_parameters_bit_identical_and_trainable_set_per_block(spec, tiny_cfg, synthetic_data):
    strategy = create_strategy(spec)
    model = make_tiny(synthetic_data.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        strategy.prepare_model(model)
    blocks = get_blocks(model, granularity=strategy.granularity)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    result = fit(model, synthetic_data, strategy, tiny_cfg, blocks=blocks)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"{n} is frozen under {spec} but changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)
    per_block = result.extras["trainable_per_block"]
    assert list(per_block) == blocks.names() and sum(per_block.values()) == result.trainable_params
    assert all(v > 0 for v in per_block.values()), "a parameter-efficient strategy trains a little of every block"
    stats_moved = any(not torch.equal(b, buffers[n]) for n, b in model.named_buffers() if "running_mean" in n)
    # norm/bitfit train their norm layers, which re-estimate the statistics; norm:frozen and lora (frozen norm
    # layers under bn_mode eval) keep the pretrained ones
    assert stats_moved == (spec in ("bitfit", "norm"))


def _tiny_lora(seed: int = 0, spec: str = "lora"):
    model = make_tiny(3).eval()
    strategy = create_strategy(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        strategy.prepare_model(model)
    with torch.no_grad():  # B starts at zero (the adapter is off): give it a trained-looking value
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    return model, strategy


@pytest.mark.parametrize("arch", ["medtune_tiny_cnn", "tf_efficientnet_lite0"])  # lite0: timm's Conv2dSame
def test_lora_merged_logits_equal_unmerged(arch):
    import copy

    if arch == "medtune_tiny_cnn":
        plain_before = make_tiny(3).eval()
        model, strategy = _tiny_lora()
        x = torch.rand(4, 3, 16, 16)
    else:
        model = create_model(arch, num_classes=3, weights="none").eval()
        plain_before = copy.deepcopy(model)
        strategy = create_strategy("lora")
        strategy.prepare_model(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.002)
        x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
    strategy.finalize_model(model)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in model.named_parameters())
    assert set(model.state_dict()) == set(plain_before.state_dict()), "the merged model is the plain architecture"
    with torch.no_grad():
        merged = model(x)
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert (unmerged - plain_before(x)).abs().max().item() > 1e-3  # the adapters did change the function


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-store")
    # bn_mode train: the frozen BatchNorm layers re-estimate their statistics, which peft's adapter files lose
    record = medtune.run({**BASE, "strategy": "lora:r=4", "bn_mode": "train"}, store=ResultsStore(root))
    return root, record


def test_lora_run_stores_merged_weights_with_batchnorm_buffers(lora_run):
    from safetensors.torch import load_file

    root, record = lora_run
    stored = load_file(str(root / "artifacts" / record["run_id"] / "best.safetensors"))
    fresh = make_tiny(2)
    assert set(stored) == set(fresh.backbone.state_dict())
    moved = [k for k in stored if "running_mean" in k and not torch.equal(stored[k], fresh.backbone.state_dict()[k])]
    assert moved, "bn_mode train re-estimates the statistics"
    model = medtune.load_model(record["run_id"], store=root)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, stored[k]), f"{k} did not reload exactly"
    assert record["trainable_params"] == sum(record["extras"]["trainable_per_block"].values())
    assert record["trainable_params"] < record["total_params"] / 2
    # predict on the stored test split reproduces the run's own test probabilities (the merged model)
    preds = medtune.predict(record["run_id"], "synthetic", split="test", store=root)
    np.testing.assert_allclose(preds.y_prob, np.asarray(record["predictions"]["y_prob"]), atol=1e-5)


def test_lora_export_timm_reloads_with_the_same_logits(lora_run, no_network):
    import timm

    root, record = lora_run
    out = medtune.export(record["run_id"], fmt="timm", store=root)
    assert out["max_abs_diff"] < 1e-5
    restored = timm.create_model(f"local-dir:{out['path']}", pretrained=True).eval()
    model = medtune.load_model(record["run_id"], store=root)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        delta = (restored(model.normalize(x)) - model(x)).abs().max().item()
    assert delta < 1e-5


def test_lora_parameters_are_checked():
    with pytest.raises(medtune.errors.ConfigError, match="modules"):
        create_strategy("lora:modules=attention")
    with pytest.raises(medtune.errors.ConfigError, match="'r'"):
        create_strategy("lora:r=0")


@pytest.mark.parametrize("num_classes", [2, 3])
def test_knn_head_equals_sklearn(num_classes):
    from sklearn.neighbors import KNeighborsClassifier

    from medtune.strategies.efficient import KNNHead

    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(60, 12)), rng.normal(size=(25, 12))
    y_train = rng.integers(0, num_classes, 60)
    ref = KNeighborsClassifier(n_neighbors=11, metric="cosine", algorithm="brute").fit(x_train, y_train)
    head = KNNHead(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train), k=11, num_classes=num_classes,
                   multilabel=False)
    prob = head.probabilities(torch.tensor(x_test, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(prob, ref.predict_proba(x_test), atol=1e-6)
    np.testing.assert_array_equal(prob.argmax(1), ref.predict(x_test))


def test_knn_run_predictions_equal_sklearn_on_the_same_features(tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    root = tmp_path / "store"
    record = medtune.run({**BASE, "strategy": "knn:k=5", "data": "synthetic"}, store=ResultsStore(root))
    assert record["trainable_params"] == 0 and record["extras"]["knn"]["k"] == 5
    model = medtune.load_model(record["run_id"], store=root)  # the kNN head rebuilt from the stored buffers
    fresh = make_tiny(2).eval()  # same random-init backbone (weights: none, seed 0)
    from medtune.config import RunConfig
    from medtune.runner import prepare_data

    data = prepare_data(RunConfig(**BASE, strategy="knn:k=5", store=str(root)))

    def features(split):
        images = data.split(split).images.float() / 255
        with torch.no_grad():
            return fresh.backbone.forward_head(fresh.backbone.forward_features(fresh.normalize(images)),
                                               pre_logits=True).numpy()

    train, test = data.split("train"), data.split("test")
    ref = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(features("train"),
                                                                                   train.labels.numpy())
    expected = ref.predict_proba(features("test"))
    np.testing.assert_allclose(np.asarray(record["predictions"]["y_prob"]), expected, atol=1e-6)
    with torch.no_grad():
        reloaded = torch.softmax(model(test.images.float() / 255), 1).numpy()
    np.testing.assert_allclose(reloaded, expected, atol=1e-6)
    assert medtune.export(record["run_id"], fmt="onnx", store=root, out_dir=tmp_path / "onnx")["max_abs_diff"] < 1e-5
    with pytest.raises(medtune.errors.ConfigError, match="kNN probe"):
        medtune.export(record["run_id"], fmt="timm", store=root)


def test_train_per_class_nested_exact_counts_val_test_untouched():
    data = make_synthetic(num_samples=120, img_size=8, num_classes=3, seed=1)
    train = set(data.indices("train").tolist())
    sets = {}
    for k in (2, 5, 10):
        sub = with_train_per_class(data, k, seed=7)
        labels = sub.split("train").labels.numpy()
        assert np.bincount(labels, minlength=3).tolist() == [k, k, k]
        for split in ("val", "test"):
            assert torch.equal(sub.split(split).images, data.split(split).images)
            assert torch.equal(sub.split(split).labels, data.split(split).labels)
        ids = {bytes(img.numpy().tobytes()) for img in sub.split("train").images}
        sets[k] = ids
    assert sets[2] <= sets[5] <= sets[10], "the k-shot sets are nested"
    assert with_train_per_class(data, 5, seed=8).split("train").images.shape[0] == 15
    assert sets[5] != {bytes(i.numpy().tobytes()) for i in with_train_per_class(data, 5, seed=8).split("train").images}
    assert len(train) == len(data.indices("train"))


def test_train_per_class_short_class_takes_all_and_says_so():
    data = make_synthetic(num_samples=60, img_size=8, num_classes=2, seed=0)
    counts = np.bincount(data.split("train").labels.numpy())
    with pytest.warns(UserWarning, match="fewer training images"):
        sub = with_train_per_class(data, 1000, seed=0)
    assert np.bincount(sub.split("train").labels.numpy()).tolist() == counts.tolist()
    assert set(sub.meta["train_per_class_short"].values()) == set(counts.tolist())


def test_train_per_class_is_a_sweep_axis_and_leaves_old_run_ids():
    from medtune.config import RunConfig, SweepConfig
    from medtune.sweeps import expand_sweep

    assert "train_per_class" not in RunConfig().semantic_dict()
    assert RunConfig(train_per_class=5).semantic_dict()["train_per_class"] == 5
    sweep = SweepConfig.from_dict({**BASE, "strategy": ["linear"], "train_per_class": "5,20,all", "seeds": [0, 1]})
    runs = expand_sweep(sweep)
    assert sorted({r.train_per_class for r in runs}) == [0, 5, 20] and len(runs) == 6
    with pytest.raises(medtune.errors.ConfigError, match="train_per_class"):
        RunConfig(train_per_class=-1)


def test_knn_run_resumes_from_its_phase_boundary_checkpoint(tiny_cfg, synthetic_data, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    model = make_tiny(2)
    first = fit(model, synthetic_data, create_strategy("knn"), tiny_cfg, blocks=get_blocks(model), checkpoint_path=ckpt)
    assert ckpt.exists()  # the checkpoint after the solved phase holds the kNN head's buffers
    model = make_tiny(2)
    again = fit(model, synthetic_data, create_strategy("knn"), tiny_cfg, blocks=get_blocks(model), checkpoint_path=ckpt)
    np.testing.assert_array_equal(again.y_prob, first.y_prob)
