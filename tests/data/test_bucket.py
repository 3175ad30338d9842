"""``resize: bucket`` (Liu et al.): a few sizes from the data's own size distribution, each image fed
at the nearest one, a bucket per batch; compared with ``resize`` and ``pad`` in one sweep."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from medtune.cli import main
from medtune.data import load_data
from medtune.data._decode import choose_buckets, nearest_bucket
from medtune.training.loop import bucket_batches, predict_proba


def _multi_size_folder(root, num_per_class: int = 24, seed: int = 0):
    """Two classes (a bright disc or a bright square, scaled with the image), sides spread over 3x."""
    rng = np.random.default_rng(seed)
    for c, shape in enumerate(("disc", "square")):
        (root / shape).mkdir(parents=True)
        for i in range(num_per_class):
            side = int(rng.uniform(24, 72))
            h, w = side, int(side * rng.uniform(0.8, 1.25))
            yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
            cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), 0.22
            m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2) if c == 0 else ((abs(yy - cy) < r * 0.8) & (abs(xx - cx) < r * 0.8))
            img = 40 + 160 * m + rng.normal(0, 12, (h, w))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / shape / f"{i}.png")
    return root


def test_choose_buckets_from_quantiles_and_nearest_on_a_log_scale():
    sides = np.linspace(24, 72, 101)
    assert choose_buckets(sides, 64) == (32, 48, 64)  # quantiles 32, 48, 64 of the native sides
    assert choose_buckets(sides, 40) == (32, 40)  # capped at img_size
    assert choose_buckets([50] * 10, 64) == (48,)
    assert nearest_bucket(39, (32, 48)) == 32 and nearest_bucket(40, (32, 48)) == 48  # sqrt(32*48) = 39.2


def test_bucket_data_feeds_each_image_at_its_nearest_size(tmp_path):
    root = _multi_size_folder(tmp_path / "d")
    data = load_data(str(root), img_size=64, resize="bucket")
    buckets = data.meta["buckets"]
    assert len(buckets) == 3 and max(buckets) <= 64 and data.images.shape[-1] == max(buckets)
    for i in range(len(data)):
        with Image.open(data.ids[i]) as im:
            w, h = im.size
        side = int(data.sizes[i])
        assert side == nearest_bucket(np.sqrt(h * w), buckets)
        assert data.images[i, :, side:, :].sum() == 0 and data.images[i, :, :, side:].sum() == 0
    test = data.split("test")
    assert test.sizes is not None and len(test.sizes) == len(test)
    # batches hold one size each, and every index exactly once
    batches = bucket_batches(torch.randperm(len(data)), data.sizes, 8, torch.Generator().manual_seed(0))
    assert all(len({int(data.sizes[j]) for j in b}) == 1 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(data)))


def test_predict_proba_by_bucket_equals_feeding_each_image_alone(tmp_path):
    from tests.conftest import make_tiny

    data = load_data(str(_multi_size_folder(tmp_path / "d", num_per_class=6)), img_size=64, resize="bucket")
    model = make_tiny().eval()
    prob, _ = predict_proba(model, data.images, task="binary", batch_size=4, sizes=data.sizes)
    with torch.no_grad():
        for i in range(len(data)):
            s = int(data.sizes[i])
            one = torch.softmax(model(data.images[i:i + 1, :, :s, :s].float() / 255), 1).numpy()
            np.testing.assert_allclose(prob[i], one[0], rtol=1e-4, atol=1e-5)


def test_sweep_compares_resize_pad_and_bucket_and_data_check_prints_the_buckets(tmp_path, capsys):
    root = _multi_size_folder(tmp_path / "d", num_per_class=16)
    assert main(["data", "check", str(root), "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    print(out)
    buckets = load_data(str(root), img_size=64, resize="bucket").meta["buckets"]
    assert len(buckets) >= 2
    assert f"resize: bucket at img_size 64 feeds sizes {', '.join(map(str, buckets))}" in out
    store = tmp_path / "store"
    assert main(["sweep", "--data", str(root), "--arch", "medtune_tiny_cnn", "--weights", "none", "--strategy", "full",
                 "--resize", "resize,pad,bucket", "--epochs", "2", "--img-size", "64", "--batch-size", "8",
                 "--lr", "0.01", "--device", "cpu", "--store", str(store), "--seeds", "0"]) == 0
    capsys.readouterr()
    assert main(["results", "--store", str(store)]) == 0
    table = capsys.readouterr().out
    print(table)
    from medtune.store import ResultsStore

    runs = {r["config"]["resize"]: r for r in ResultsStore(store).runs()}
    assert set(runs) == {"resize", "pad", "bucket"}
    assert {r["label"] for r in runs.values()} == {"full", "full [pad]", "full [bucket]"}
    assert all(0 <= r["metrics"]["auc"] <= 1 for r in runs.values())
    assert "full [bucket]" in table and "full [pad]" in table
