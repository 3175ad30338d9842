"""Use the chosen model: load_model, predict (external validation), export to timm and ONNX."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medtune
from medtune.cli import main
from medtune.errors import ConfigError
from medtune.store import ResultsStore

BASE = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 2, "img_size": 16,
        "batch_size": 16, "lr": 0.01, "device": "cpu", "num_threads": 1, "progress": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    record = medtune.run({**BASE, "strategy": "full", "label_smoothing": 0.1}, store=ResultsStore(root))
    return root, record


def test_load_model_returns_the_trained_weights(trained):
    from safetensors.torch import load_file

    root, record = trained
    model = medtune.load_model(record["run_id"][:6], store=root)
    stored = load_file(str(root / "artifacts" / record["run_id"] / "best.safetensors"))
    assert not model.training and model.img_size == 16 and model.class_names == record["predictions"]["class_names"]
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, stored[name]), name
    # the run's config no longer takes timm's file name
    assert (root / "artifacts" / record["run_id"] / "run_config.json").is_file()
    assert not (root / "artifacts" / record["run_id"] / "config.json").exists()


def test_predict_on_the_test_split_reproduces_the_stored_test_metrics(trained):
    root, record = trained
    result = medtune.predict(record["run_id"], "synthetic", store=root, split="test", device="cpu")
    with np.load(root / "artifacts" / record["run_id"] / "predictions.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(result.y_true, z["y_true"])
        np.testing.assert_array_equal(result.y_prob, z["y_prob"])  # bit-identical probabilities
    assert result.metrics == record["metrics"]  # every metric, the loss (with label smoothing) included
    assert result.metric_ci == record["metric_ci"]
    assert set(result.splits) == {"test"}


def test_predict_cli_writes_probabilities_and_metrics(trained, tmp_path, capsys):
    root, record = trained
    out = tmp_path / "preds.csv"
    assert main(["predict", record["run_id"], "synthetic", "--store", str(root), "--split", "test", "--device", "cpu",
                 "-o", str(out), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metrics"] == record["metrics"]
    import pandas as pd

    frame = pd.read_csv(out)
    names = record["predictions"]["class_names"]
    assert list(frame.columns) == ["id", "split", "label", "predicted", *[f"prob_{c}" for c in names]]
    np.testing.assert_allclose(frame[[f"prob_{c}" for c in names]].to_numpy(), record["predictions"]["y_prob"],
                               atol=1e-6)


def test_predict_unlabelled_folder(trained, tmp_path):
    from PIL import Image

    root, record = trained
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    result = medtune.predict(record["run_id"], str(folder), store=root, device="cpu")
    assert result.metrics is None and result.y_prob.shape == (3, 2)
    np.testing.assert_allclose(result.y_prob.sum(1), 1.0, rtol=1e-6)


def test_predict_errors_are_one_line(trained, capsys):
    root, _ = trained
    assert main(["predict", "ffffffffff", "synthetic", "--store", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no finished run" in err[0]


def test_export_timm_round_trip_restores_head_labels_and_input_size(trained, tmp_path, no_network):
    import timm

    root, record = trained
    out = medtune.export(record["run_id"], fmt="timm", store=root)
    folder = root / "artifacts" / record["run_id"]
    assert out["path"] == str(folder) and out["max_abs_diff"] < 1e-5
    # local-dir: reads the exported folder (no hub access), as a user of the export would
    restored = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    model = medtune.load_model(record["run_id"], store=root)
    assert restored.num_classes == 2
    assert restored.pretrained_cfg["label_names"] == record["predictions"]["class_names"]
    assert tuple(restored.pretrained_cfg["input_size"]) == (3, 16, 16)
    data_cfg = timm.data.resolve_data_config({}, model=restored)
    assert tuple(data_cfg["mean"]) == model.pretrained_cfg["mean"]
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        # timm models take normalised images; medtune's take [0, 1] pixels and normalise inside
        mean, std = torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), torch.tensor(data_cfg["std"]).view(1, 3, 1, 1)
        delta = (restored((x - mean) / std) - model(x)).abs().max().item()
    assert delta < 1e-5
    # medtune's own config kept its new name beside timm's config.json
    assert json.loads((folder / "run_config.json").read_text())["arch"] == "medtune_tiny_cnn"
    assert json.loads((folder / "config.json").read_text())["architecture"] == "medtune_tiny_cnn"


def test_export_moves_an_old_stores_config_json(trained, tmp_path):
    import shutil

    root, record = trained
    copy = tmp_path / "old"
    shutil.copytree(root, copy)
    folder = copy / "artifacts" / record["run_id"]
    (folder / "run_config.json").rename(folder / "config.json")  # as a store written before the rename
    (folder / "model.safetensors").unlink(missing_ok=True)
    medtune.export(record["run_id"], fmt="timm", store=copy)
    assert json.loads((folder / "run_config.json").read_text())["arch"] == "medtune_tiny_cnn"
    assert "architecture" in json.loads((folder / "config.json").read_text())


def test_export_onnx_parity(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    root, record = trained
    assert main(["export", record["run_id"], "--format", "onnx", "--store", str(root), "-o", str(tmp_path)]) == 0
    assert "parity" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    model = medtune.load_model(record["run_id"], store=root)
    x = torch.rand(7, 3, 16, 16)  # another batch size than the export's probe: the batch axis is dynamic
    with torch.no_grad():
        delta = np.abs(session.run(None, {"images": x.numpy()})[0] - model(x).numpy()).max()
    assert delta < 1e-4


def test_export_unknown_format_is_refused(trained):
    root, record = trained
    with pytest.raises(ConfigError, match="format"):
        medtune.export(record["run_id"], fmt="tflite", store=root)


def test_run_records_calibration_and_predict_reproduces_it(trained):
    root, record = trained
    cal = record["calibration"]
    assert {"ece", "brier", "temperature", "ece_scaled", "brier_scaled", "reliability"} <= set(cal)
    result = medtune.predict(record["run_id"], "synthetic", store=root, split="test", device="cpu")
    assert result.calibration["ece"] == cal["ece"] and result.calibration["brier"] == cal["brier"]
    scaled = medtune.predict(record["run_id"], "synthetic", store=root, split="test", device="cpu", calibrated=True)
    assert scaled.calibration["ece"] == pytest.approx(cal["ece_scaled"], abs=1e-6)
    np.testing.assert_array_equal(scaled.y_prob.argmax(1), result.y_prob.argmax(1))
    assert scaled.metrics["auc"] == result.metrics["auc"] and "loss" not in scaled.metrics


def test_json_output_is_strict():
    from medtune.cli import _strict_json

    text = _strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_predict_external_folder_with_some_classes_only(trained, tmp_path):
    """An external set is not re-split nor checked as a training set: two images of one class are enough,
    and the labels follow the run's class order."""
    from PIL import Image

    from medtune.data._decode import decode_image, resize_image

    root, record = trained
    names = record["predictions"]["class_names"]
    folder = tmp_path / "hospital_b" / names[1]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    result = medtune.predict(record["run_id"], str(tmp_path / "hospital_b"), store=root, device="cpu")
    assert result.y_true.tolist() == [1, 1] and set(result.splits) == {"external"}
    assert result.metrics["accuracy"] == float((result.y_prob.argmax(1) == 1).mean())
    model = medtune.load_model(record["run_id"], store=root)
    x = torch.stack([resize_image(decode_image(p)[0], 16, "resize") for p in sorted(folder.iterdir())]).float() / 255
    with torch.no_grad():
        np.testing.assert_allclose(result.y_prob, torch.softmax(model(x), 1).numpy(), atol=1e-6)
    with pytest.raises(medtune.DataError, match="no images in the 'test' split"):
        medtune.predict(record["run_id"], str(tmp_path / "hospital_b"), store=root, device="cpu", split="test")
    (tmp_path / "other" / "cat").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "other" / "cat" / "0.png")
    with pytest.raises(medtune.DataError, match="not among the known classes"):
        medtune.predict(record["run_id"], str(tmp_path / "other"), store=root, device="cpu")
