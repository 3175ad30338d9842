"""Per-sample batch augmentation: every image its own draw, reproducible from the generator."""

from __future__ import annotations

import pytest
import torch

from medtune.config import RunConfig
from medtune.data.augment import AUGMENTATIONS, augment_batch
from medtune.errors import ConfigError


def _batch(n: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16).clamp(0.05, 0.95)
    return x.repeat(n, 1, 1, 1)  # one image, many times: only the draws can tell the copies apart


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_image_gets_its_own_draw_and_the_generator_repeats_it(name):
    x = _batch()
    out = augment_batch(x, [name], torch.Generator().manual_seed(1))
    again = augment_batch(x, [name], torch.Generator().manual_seed(1))
    assert torch.equal(out, again), "same generator state, same transforms"
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    distinct = {tuple(img.flatten().round(decimals=5).tolist()) for img in out}
    assert len(distinct) > (1 if "flip" in name else 32), "per-sample, not one draw for the whole batch"
    if "flip" in name:  # about half the images flipped, each exactly the flip of the original or the original
        flipped = torch.tensor([torch.equal(img, x[0]) for img in out])
        assert 10 < int((~flipped).sum()) < 54
        assert all(torch.equal(img, x[0]) or torch.equal(img, x[0].flip(1 if name == "vflip" else 2)) for img in out)


def test_color_jitter_keeps_a_grey_image_grey_and_affine_keeps_the_centre():
    grey = _batch()[:, :1].repeat(1, 3, 1, 1)
    out = augment_batch(grey, ["color"], torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    flat = torch.full((8, 3, 32, 32), 0.5)
    moved = augment_batch(flat, ["affine"], torch.Generator().manual_seed(0))
    assert torch.allclose(moved[:, :, 12:20, 12:20], flat[:, :, 12:20, 12:20])  # small moves: the centre stays


def test_augment_config_takes_a_list_or_text_in_a_canonical_order():
    assert RunConfig(augment=["affine", "hflip"]).augment == ("hflip", "affine")
    assert RunConfig(augment="vflip, hflip").augment == ("hflip", "vflip")
    assert RunConfig(augment="none").augment == () == RunConfig().augment
    cfg = RunConfig(augment=["color", "hflip"])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["augment"] == ["hflip", "color"]
    with pytest.raises(ConfigError, match="'augment' parameter of RunConfig must be one of hflip, vflip, affine, color"):
        RunConfig(augment=["hflip", "rotate"])
