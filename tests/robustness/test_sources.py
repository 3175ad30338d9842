"""Natural-image sources and mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.errors import ConfigError, DataError
from medtune.robustness import BUILTIN_PHOTOS, is_grey, mixed_source, natural_image_chunks, natural_images, rgb_to_grey


def test_builtin_natural_images():
    images = natural_images(12, 24, seed=3)
    assert images.shape == (12, 3, 24, 24) and images.dtype == torch.uint8
    assert torch.equal(images, natural_images(12, 24, seed=3))
    assert not torch.equal(images, natural_images(12, 24, seed=4))
    # distinct random crops of real photos, not a constant or repeated image
    flat = images.flatten(1).float()
    assert torch.cdist(flat, flat).add(torch.eye(12) * 1e9).min() > 0
    assert images.float().std() > 20
    names = {p.split(":")[1] for p in BUILTIN_PHOTOS}
    assert len(BUILTIN_PHOTOS) >= 15 and {p.split(":")[0] for p in BUILTIN_PHOTOS} == {"skimage", "sklearn",
                                                                                       "matplotlib"}
    assert not {"retina", "immunohistochemistry", "cell", "microaneurysms", "skin"} & names


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


def test_every_builtin_photo_loads_offline():
    from medtune.robustness.sources import _load_builtin

    for name in BUILTIN_PHOTOS:
        photo = _load_builtin(name)
        assert photo.dtype == torch.uint8 and photo.shape[0] == 3 and min(photo.shape[1:]) >= 150, name


def test_a_folder_streams_in_bounded_chunks(tmp_path, monkeypatch):
    from medtune.robustness import sources

    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(tmp_path / f"p{i:02d}.png")
    reads = []
    real = sources._read_file
    monkeypatch.setattr(sources, "_read_file", lambda path: reads.append(path) or real(path))
    chunks = natural_image_chunks(45, 8, folder=tmp_path, seed=0, chunk_size=10)
    first = next(chunks)
    assert first.images.shape == (10, 3, 8, 8) and len(reads) <= 10  # photos are read as the chunks are made
    rest = list(chunks)
    assert [c.images.shape[0] for c in rest] == [10, 10, 10, 5]
    assert sum(c.num_photos for c in [first, *rest]) == 30 == len(set(reads))  # each photo read once
    again = torch.cat([c.images for c in natural_image_chunks(45, 8, folder=tmp_path, seed=0, chunk_size=10)])
    assert torch.equal(again, torch.cat([first.images, *[c.images for c in rest]]))  # seeded
    few = list(natural_image_chunks(5, 8, folder=tmp_path, seed=1, chunk_size=10))
    assert len(few) == 1 and few[0].num_photos == 5  # fewer crops than photos: one crop each


def test_grey_natural_images():
    colour = natural_images(6, 16, seed=0)
    grey = natural_images(6, 16, seed=0, grey=True)
    assert not is_grey(colour) and is_grey(grey)
    assert torch.equal(grey, rgb_to_grey(colour))
    pil = np.asarray(Image.fromarray(colour[0].permute(1, 2, 0).numpy()).convert("L"))
    assert np.abs(grey[0, 0].numpy().astype(int) - pil.astype(int)).max() <= 1  # Pillow's luma
