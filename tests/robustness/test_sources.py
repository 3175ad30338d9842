"""Natural-image sources and mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.errors import ConfigError, DataError
from medtune.robustness import BUILTIN_PHOTOS, mixed_source, natural_images


def test_builtin_natural_images():
    images = natural_images(12, 24, seed=3)
    assert images.shape == (12, 3, 24, 24) and images.dtype == torch.uint8
    assert torch.equal(images, natural_images(12, 24, seed=3))
    assert not torch.equal(images, natural_images(12, 24, seed=4))
    # distinct random crops of real photos, not a constant or repeated image
    flat = images.flatten(1).float()
    assert torch.cdist(flat, flat).add(torch.eye(12) * 1e9).min() > 0
    assert images.float().std() > 20
    assert len(BUILTIN_PHOTOS) >= 6 and not {"retina", "ihc", "cell", "microaneurysms"} & set(
        BUILTIN_PHOTOS
    )


def test_non_square_output():
    assert natural_images(2, (8, 12), seed=0).shape == (2, 3, 8, 12)


def test_folder_of_any_size_and_format(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.fromarray(rng.integers(0, 255, (300, 20), dtype=np.uint8)).save(sub / "b.JPG")  # grey
    Image.fromarray(np.full((9, 9, 4), 200, dtype=np.uint8)).save(tmp_path / "c.png")  # RGBA
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    images = natural_images(6, 16, folder=tmp_path, seed=0)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    # every photo is used when num_images >= number of photos: the flat RGBA one gives 200s
    assert any(bool((img == 200).all()) for img in images)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        natural_images(2, 8, folder=tmp_path / "missing")
    with pytest.raises(DataError, match="holds no image file"):
        natural_images(2, 8, folder=tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="Cannot read image file '.*broken.png'"):
        natural_images(2, 8, folder=tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_images": 0}, "'num_images' parameter of natural_images"),
        ({"img_size": -1}, "'img_size' parameter of natural_images"),
        ({"img_size": (1, 2, 3)}, r"must be an int or \(H, W\)"),
    ],
)
def test_natural_images_rejects_bad_sizes(kwargs, match):
    args = {"num_images": 2, "img_size": 8} | kwargs
    with pytest.raises(ConfigError, match=match):
        natural_images(**args)


def test_mixed_source():
    a = torch.zeros(10, 3, 2, 2, dtype=torch.uint8)
    b = torch.full((20, 3, 2, 2), 255, dtype=torch.uint8)
    mixed = mixed_source(a, b, 0.3, seed=0)
    assert mixed.shape == (10, 3, 2, 2)
    assert int((mixed[:, 0, 0, 0] == 255).sum()) == 3
    assert torch.equal(mixed, mixed_source(a, b, 0.3, seed=0))
    assert int((mixed_source(a, b, 0.5, seed=0, num_images=8)[:, 0, 0, 0] == 255).sum()) == 4
    assert bool((mixed_source(a, b, 0.0, seed=1) == 0).all())
    with pytest.raises(ConfigError, match="needs 25 images from 'b' but it has 20"):
        mixed_source(a, b, 1.0, seed=0, num_images=25)
    with pytest.raises(
        ConfigError, match=r"'frac' parameter of mixed_source must be a float in \[0, 1\]"
    ):
        mixed_source(a, b, 1.5)
    with pytest.raises(DataError, match="same dtype and image shape"):
        mixed_source(a, b.float() / 255, 0.5)
