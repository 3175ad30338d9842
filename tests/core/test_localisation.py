"""Heat maps (medtune explain): real Grad-CAM of a trained tiny CNN on objects at known places."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

import medtune
from medtune.cli import main
from medtune.localisation import compute_maps, list_explanations, localisation_scores, target_layer
from tests.conftest import make_tiny

pytest.importorskip("captum")


@pytest.fixture(scope="module")
def trained_loc(tmp_path_factory):
    """A tiny CNN trained on ``synthetic_loc`` (disc vs cross at a random place, a bar as distractor)."""
    store = tmp_path_factory.mktemp("loc") / "store"
    record = medtune.run(dict(data="synthetic_loc", arch="medtune_tiny_cnn", weights="none", strategy="full",
                              epochs=8, img_size=32, lr=3e-3, batch_size=16, device="cpu", store=str(store),
                              progress=False))
    return store, record


def test_synthetic_loc_boxes_hold_the_object():
    from medtune.data import load_data

    data = load_data("synthetic_loc", img_size=32)
    assert len(data) == 128 and data.class_names == ["disc", "cross"]
    for i in range(8):
        x0, y0, x1, y1 = (int(v) for v in data.meta["boxes"][data.ids[i]])
        img = data.images[i, 0].float()
        inside = img[y0:y1, x0:x1].mean()
        assert inside > img.mean() + 20  # the object is bright inside its box


def test_gradcam_of_a_trained_tiny_cnn_points_at_the_object_far_above_chance(trained_loc):
    store, record = trained_loc
    e = medtune.explain(record["run_id"], store=str(store))
    sc = e.scores
    print("pointing game", sc["pointing_game"], sc["pointing_game_ci"], "chance", sc["pointing_chance"],
          "IoU", sc["iou"], sc["iou_ci"])
    assert sc["num_images"] == 32 and e.layer == "stages.2.0"
    assert sc["pointing_chance"] < 0.15
    assert sc["pointing_game_ci"][0] > 2 * sc["pointing_chance"], "the maps look at the object"
    assert sc["iou"] > 0.15
    out = e.out_dir
    with np.load(out / "maps.npz", allow_pickle=False) as z:
        assert z["maps"].shape == (32, 32, 32) and np.isclose(z["maps"].max(axis=(1, 2)), 1, atol=1e-3).sum() >= 30
        assert list(z["ids"]) == e.ids
    assert len(list((out / "overlays").glob("*.png"))) == 32 and (out / "gallery.png").is_file()
    assert json.loads((out / "explain.json").read_text())["scores"]["pointing_game"] == sc["pointing_game"]


def test_report_shows_the_localisation_section_with_the_gallery(trained_loc):
    store, record = trained_loc
    medtune.explain(record["run_id"], store=str(store))
    [summary] = list_explanations(store)
    path = medtune.report(str(store))
    html = open(path, encoding="utf-8").read()
    assert 'id="localisation"' in html or "Localisation: heat maps" in html
    section = html[html.index("Localisation: heat maps"):]
    assert f"{summary['scores']['pointing_game']:.2f}" in section and "data:image/png;base64" in section


def test_cli_explain_writes_the_files_and_rejects_a_bad_method(trained_loc, tmp_path, capsys):
    store, record = trained_loc
    assert main(["explain", record["run_id"][:6], "--store", str(store), "-o", str(tmp_path / "x"),
                 "--method", "grad_x_activation", "--max-overlays", "3"]) == 0
    assert len(list((tmp_path / "x" / "overlays").glob("*.png"))) == 3
    assert main(["explain", record["run_id"], "--store", str(store), "--method", "gradcam++"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medtune: error: The 'method' parameter of explain must be one of gradcam")
    assert main(["explain", "ffffff", "--store", str(store)]) == 2


def test_gradcam_equals_the_formula_on_the_last_feature_block():
    model = make_tiny().eval()
    path, layer = target_layer(model)
    assert path == "stages.2.0"
    x = torch.rand(3, 3, 32, 32)
    targets = np.array([0, 1, 1])
    maps = compute_maps(model, x, targets, method="gradcam", layer=layer)
    acts = {}

    def keep(_module, _inputs, output) -> None:
        output.retain_grad()
        acts["a"] = output

    handle = layer.register_forward_hook(keep)
    logits = model(x)
    logits[torch.arange(3), torch.as_tensor(targets)].sum().backward()
    handle.remove()
    a = acts["a"]
    cam = torch.relu((a.grad.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=(32, 32), mode="bilinear")[:, 0]
    cam = cam / cam.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    np.testing.assert_allclose(maps, cam.detach().numpy(), atol=1e-5)


def test_pointing_game_and_iou_exact_values():
    maps = np.zeros((4, 10, 10), np.float32)
    maps[0, 2:6, 2:6] = 0.8
    maps[0, 5, 5] = 1.0  # peak at (x=5, y=5), inside [4, 4, 8, 8]; map box [2, 2, 6, 6]
    maps[1, 0, 0] = 1.0  # peak outside
    maps[3, 4, 4] = 1.0
    boxes = np.array([[4, 4, 8, 8], [4, 4, 8, 8], [4, 4, 8, 8], [np.nan] * 4])  # map 2 is all zero: a miss
    sc = localisation_scores(maps, boxes, threshold=0.5)
    assert sc["num_images"] == 3 and sc["pointing_game"] == pytest.approx(1 / 3)
    ci = stats.binomtest(1, 3).proportion_ci(method="wilson")
    assert sc["pointing_game_ci"] == pytest.approx([ci.low, ci.high])
    assert sc["iou"] == pytest.approx((4 / 28 + 0 + 0) / 3)  # 4 px overlap of two 16 px boxes
    assert sc["pointing_chance"] == pytest.approx(0.16)
    masks = np.zeros((4, 10, 10), bool)
    masks[:, 0, 0] = True
    assert localisation_scores(maps, boxes, masks=masks)["pointing_game"] == pytest.approx(1 / 3)


def test_csv_bbox_ground_truth_is_scaled_to_the_input(tmp_path):
    from PIL import Image

    from medtune.data import load_data
    from medtune.localisation import _csv_ground_truth

    rows = ["path,label,bbox"]
    for i in range(12):
        Image.fromarray(np.full((20, 40, 3), 30 * (i % 2), np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},8 4 16 12")
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    data = load_data(str(tmp_path / "d.csv"), img_size=16)
    boxes, masks = _csv_ground_truth(str(tmp_path / "d.csv"), data, 16, "resize")
    assert masks is None and np.allclose(boxes, [[3.2, 3.2, 6.4, 9.6]] * 12)
    boxes, _ = _csv_ground_truth(str(tmp_path / "d.csv"), data, 16, "pad")  # 40x20 -> 16x8, 4 px above
    assert np.allclose(boxes, [[3.2, 5.6, 6.4, 8.8]] * 12)


def test_explain_on_the_decode_cache_reads_batches_and_equals_the_maps_in_memory(tmp_path, monkeypatch, write_toy_npz):
    """A run trained with data_cache: disk: explain reads its 270-image test split a batch at a time (at most 256
    rows per read) and its maps and probabilities are those of the split in memory."""
    from medtune.data import load_data
    from medtune.data.diskcache import DiskImages
    from medtune.models import get_blocks

    write_toy_npz(tmp_path / "toy_16.npz", (60, 30, 270), num_classes=2, shape=(16, 16, 3), step=80)
    store = tmp_path / "store"
    record = medtune.run(dict(data=str(tmp_path / "toy_16.npz"), arch="medtune_tiny_cnn", weights="none",
                              strategy="full", epochs=1, img_size=16, batch_size=16, device="cpu", store=str(store),
                              progress=False, data_cache="disk"))
    reads = []
    real = DiskImages._read

    def bounded(self, rows):
        reads.append(len(rows))
        if len(rows) > 256:
            raise AssertionError(f"read {len(rows)} rows at once (the whole split?)")
        return real(self, rows)

    monkeypatch.setattr(DiskImages, "_read", bounded)
    e = medtune.explain(record["run_id"], store=str(store), max_overlays=3)
    assert reads and max(reads) <= 256 and (e.out_dir / "gallery.png").is_file()
    test = load_data(str(tmp_path / "toy_16.npz"), img_size=16, data_cache="memory").split("test")
    model = medtune.load_model(record["run_id"], store=str(store))
    _, layer = target_layer(model, get_blocks(model))
    np.testing.assert_array_equal(e.maps, compute_maps(model, test.images, test.labels.numpy(), layer=layer))
    with np.load(e.out_dir / "maps.npz") as z:
        with torch.no_grad():
            probs = torch.softmax(model(test.images.float() / 255.0), dim=1).numpy()
        np.testing.assert_allclose(z["probs"], probs, rtol=1e-5, atol=1e-6)
