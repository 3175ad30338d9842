"""Image sources a UAP can be computed from when the medical training data is not at hand.

Hirano et al. (2021) and Minagi et al. (2022) show that UAPs made from *natural* images still fool
medical classifiers; these helpers build such attack inputs as random crops of natural photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from medtune._checks import check_fraction, check_positive_int
from medtune.errors import ConfigError, DataError
from medtune.robustness._common import check_images

__all__ = ["natural_images", "mixed_source", "BUILTIN_PHOTOS", "IMAGE_SUFFIXES"]

# Natural photographs shipped inside scikit-image (public domain / CC0), loaded offline. Colour
# photos first; two grey photos (camera, coins) are repeated over three channels. The medical-looking
# images skimage also ships (ihc, retina, cell, microaneurysms) are deliberately left out.
BUILTIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "stereo_motorcycle",
    "camera",
    "coins",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm")

# Crop side as a fraction of the photo's shorter side, drawn uniformly.
CROP_SCALE = (0.25, 1.0)


def _load_builtin(name: str) -> torch.Tensor:
    import skimage.data

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity)
    return _to_chw_uint8(image)


def _to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _read_file(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(
            f"Cannot read image file {str(path)!r} in the natural-image folder: {err}. "
            "Remove or replace the file."
        ) from err
    return _to_chw_uint8(image)


def _random_crops(
    photo: torch.Tensor, count: int, size: tuple[int, int], rng: np.random.Generator
) -> list[torch.Tensor]:
    _, height, width = photo.shape
    aspect = size[1] / size[0]  # width / height of the output
    max_h = min(height, width / aspect)
    crops = []
    for _ in range(count):
        crop_h = max(1, int(round(rng.uniform(*CROP_SCALE) * max_h)))
        crop_w = max(1, min(width, int(round(crop_h * aspect))))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        crops.append(TF.resized_crop(photo, top, left, crop_h, crop_w, list(size), antialias=True))
    return crops


def natural_images(
    num_images: int,
    img_size: int | tuple[int, int],
    *,
    folder: str | Path | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Random crops of natural photos, resized to the model input.

    Each crop has the output's aspect ratio, a height drawn uniformly in [0.25, 1] × the largest
    such crop that fits the photo, and a uniform position; it is resized (antialiased) to the
    output size. Crops are spread evenly
    over the photos in a seeded random order, so when ``num_images`` ≥ the number of photos every
    photo is used; only the photos used are read.

    Args:
        num_images: number of crops N.
        img_size: output side S in pixels, or (H, W).
        folder: a folder (searched recursively) of image files of any size and format Pillow reads
            (suffixes in ``IMAGE_SUFFIXES``); None uses the photos in ``BUILTIN_PHOTOS`` that ship
            with scikit-image.
        seed: seeds the choice of photos and crops.

    Returns:
        uint8 tensor (N, 3, S, S) (or (N, 3, H, W)).

    Raises:
        ConfigError: num_images or img_size is not a positive int (or pair of them).
        DataError: the folder does not exist, holds no image file, or a file cannot be read (the
            message names it).
    """
    num_images = check_positive_int(num_images, "num_images", "natural_images")
    sizes = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if len(sizes) != 2:
        raise ConfigError(
            f"The 'img_size' parameter of natural_images must be an int or (H, W). Got {img_size!r}."
        )
    size = (
        check_positive_int(sizes[0], "img_size", "natural_images"),
        check_positive_int(sizes[1], "img_size", "natural_images"),
    )
    rng = np.random.default_rng(seed)
    if folder is None:
        names: list = list(BUILTIN_PHOTOS)
        load = _load_builtin
    else:
        root = Path(folder)
        if not root.is_dir():
            raise DataError(
                f"The natural-image folder {str(root)!r} does not exist or is not a folder."
            )
        names = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not names:
            raise DataError(
                f"The natural-image folder {str(root)!r} holds no image file "
                f"(looked for {', '.join(IMAGE_SUFFIXES)})."
            )
        load = _read_file
    order = rng.permutation(len(names))
    counts = np.bincount(order[np.arange(num_images) % len(names)], minlength=len(names))
    crops: list[torch.Tensor] = []
    for idx in np.flatnonzero(counts):
        photo = load(names[idx])
        crops.extend(_random_crops(photo, int(counts[idx]), size, rng))
    out = torch.stack(crops)
    return out[torch.from_numpy(rng.permutation(num_images))]


def mixed_source(
    a: torch.Tensor,
    b: torch.Tensor,
    frac: float,
    seed: int = 0,
    *,
    num_images: int | None = None,
) -> torch.Tensor:
    """A shuffled mix of two image sets: a share ``frac`` from ``b``, the rest from ``a``.

    Images are drawn without replacement from each set.

    Args:
        a: images (N_a, C, H, W), uint8 or float in [0, 1].
        b: images (N_b, C, H, W), same dtype and (C, H, W) as ``a``.
        frac: share of the output taken from ``b``, in [0, 1].
        seed: seeds the draw and the shuffle.
        num_images: output size; default ``len(a)``.

    Returns:
        tensor (num_images, C, H, W) of ``a``'s dtype.

    Raises:
        ConfigError: frac outside [0, 1], num_images not a positive int, or a set too small for
            its share.
        DataError: the two sets differ in dtype or image shape.
    """
    a, b = check_images(a, "a"), check_images(b, "b")
    frac = check_fraction(frac, "frac", "mixed_source", low_open=False)
    if a.dtype != b.dtype or a.shape[1:] != b.shape[1:]:
        raise DataError(
            f"mixed_source needs two sets of the same dtype and image shape. Got {a.dtype} "
            f"{tuple(a.shape[1:])} and {b.dtype} {tuple(b.shape[1:])}."
        )
    total = check_positive_int(
        num_images if num_images is not None else a.shape[0], "num_images", "mixed_source"
    )
    num_b = int(round(frac * total))
    num_a = total - num_b
    for name, need, have in (("a", num_a, a.shape[0]), ("b", num_b, b.shape[0])):
        if need > have:
            raise ConfigError(
                f"mixed_source needs {need} images from {name!r} but it has {have}; lower "
                "num_images or change frac."
            )
    generator = torch.Generator().manual_seed(int(seed))
    pick_a = torch.randperm(a.shape[0], generator=generator)[:num_a]
    pick_b = torch.randperm(b.shape[0], generator=generator)[:num_b]
    out = torch.cat([a[pick_a], b[pick_b]])
    return out[torch.randperm(total, generator=generator)]
