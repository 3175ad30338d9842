"""Image sources a UAP can be computed from when the medical training data is not at hand.

Hirano et al. (2021) and Minagi et al. (2022) show that UAPs made from *natural* images still fool
medical classifiers; these helpers build such attack inputs as random crops of natural photos.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from medtune._checks import check_choice, check_fraction, check_positive_int
from medtune.errors import ConfigError, DataError
from medtune.robustness._common import check_images

__all__ = ["natural_images", "natural_image_chunks", "NaturalChunk", "mixed_source", "rgb_to_grey", "BUILTIN_PHOTOS",
           "IMAGE_SUFFIXES", "count_photos"]

# Natural photographs the dependencies ship (public domain / CC0 / BSD sample data), loaded offline:
# ``package:name``. Grey photos are repeated over three channels. Left out on purpose: the
# medical-looking images scikit-image also ships (immunohistochemistry — the demo's slide —, retina,
# cell, microaneurysms, skin), binary or synthetic images (horse, checkerboard, colorwheel, logo) and
# text pages; ``cat`` is ``chelsea`` again.
BUILTIN_PHOTOS = (
    "skimage:astronaut",
    "skimage:brick",
    "skimage:camera",
    "skimage:chelsea",
    "skimage:clock",
    "skimage:coffee",
    "skimage:coins",
    "skimage:grass",
    "skimage:gravel",
    "skimage:hubble_deep_field",
    "skimage:moon",
    "skimage:rocket",
    "skimage:stereo_motorcycle",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
    "matplotlib:grace_hopper.jpg",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm")

# Crop side as a fraction of the photo's shorter side, drawn uniformly.
CROP_SCALE = (0.25, 1.0)
# ITU-R BT.601 luma weights, as Pillow's convert("L"): how a natural photo becomes grey.
_LUMA = (0.299, 0.587, 0.114)


def _load_builtin(name: str) -> torch.Tensor:
    package, item = name.split(":", 1)
    if package == "skimage":
        import skimage.data

        image = getattr(skimage.data, item)()
        if item == "stereo_motorcycle":
            image = image[0]  # (left, right, disparity)
        return _to_chw_uint8(image)
    if package == "sklearn":
        import sklearn.datasets

        return _read_file(Path(sklearn.datasets.__file__).parent / "images" / item)
    import matplotlib

    return _read_file(Path(matplotlib.get_data_path()) / "sample_data" / item)


def _to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _read_file(path: Path) -> torch.Tensor:
    from medtune.data._decode import max_image_pixels

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > max_image_pixels():  # from the header, before decoding
                raise Image.DecompressionBombError(f"{im.size[0]}x{im.size[1]} px is over the limit of "
                                                   f"{max_image_pixels():,} pixels (MEDTUNE_MAX_IMAGE_PIXELS)")
            image = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"Cannot read image file {str(path)!r} in the natural-image folder: {' '.join(str(err).split())}. "
            "Remove or replace the file."
        ) from None
    return _to_chw_uint8(image)


def rgb_to_grey(images: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R BT.601, as Pillow's ``convert("L")``) of uint8 images, repeated over 3 channels.

    Args:
        images: uint8 (N, 3, H, W).

    Returns:
        uint8 (N, 3, H, W) with R = G = B.
    """
    weights = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    luma = (images.float() * weights).sum(dim=1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    return luma.expand(-1, 3, -1, -1).contiguous()


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


@dataclass
class NaturalChunk:
    """One chunk of a streamed natural-image source.

    Attributes:
        images: uint8 (n, 3, H, W) crops, shuffled.
        num_photos: photos whose first crop is in this chunk (their sum over the chunks counts
            the distinct photos used).
    """

    images: torch.Tensor
    num_photos: int


def _photo_list(folder: str | Path | None) -> tuple[list, Callable[[Any], torch.Tensor]]:
    if folder is None:
        return list(BUILTIN_PHOTOS), _load_builtin
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"The natural-image folder {str(root)!r} does not exist or is not a folder.")
    from medtune._safepaths import walk_files, warn_unreadable

    names, unreadable = walk_files(root, suffixes=set(IMAGE_SUFFIXES), skip_hidden=False)  # never /proc or a FIFO
    warn_unreadable(root, unreadable)
    if not names:
        raise DataError(
            f"The natural-image folder {str(root)!r} holds no image file (looked for {', '.join(IMAGE_SUFFIXES)})."
        )
    return names, _read_file


def count_photos(folder: str | Path | None) -> int:
    """The number of photos a natural-image folder holds (None: the bundled ``BUILTIN_PHOTOS``)."""
    return len(_photo_list(folder)[0])


def _resized_whole(photo: torch.Tensor, count: int, size: tuple[int, int], rng: np.random.Generator) -> list[torch.Tensor]:
    """The whole photo resized to the output size (aspect not kept), as the papers' ``load_img(target_size=...)``;
    ``count`` copies of it."""
    image = TF.resize(photo, list(size), antialias=True)
    return [image] * count


def _check_size(img_size: int | tuple[int, int], owner: str) -> tuple[int, int]:
    sizes = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if len(sizes) != 2:
        raise ConfigError(f"The 'img_size' parameter of {owner} must be an int or (H, W). Got {img_size!r}.")
    return (check_positive_int(sizes[0], "img_size", owner), check_positive_int(sizes[1], "img_size", owner))


def natural_image_chunks(
    num_images: int,
    img_size: int | tuple[int, int],
    *,
    folder: str | Path | None = None,
    seed: int = 0,
    chunk_size: int = 1024,
    grey: bool = False,
    resize: str = "crop",
) -> Iterator[NaturalChunk]:
    """Natural photos resized to the model input, whole or as random crops, streamed in chunks.

    A crop has the output's aspect ratio, a height uniform in [0.25, 1] × the largest that fits and a
    uniform position, resized (antialiased) to the output. Images are spread evenly over the photos in a
    seeded order (every photo when ``num_images`` ≥ their number); photos are read one at a time, so a
    folder of 100k photos runs in the memory of one chunk.

    Args:
        num_images: number of crops N in all.
        img_size: output side S in pixels, or (H, W).
        folder: a folder (searched recursively) of image files of any size and format Pillow reads
            (suffixes in ``IMAGE_SUFFIXES``); None uses ``BUILTIN_PHOTOS``.
        seed: seeds the choice of photos and crops.
        chunk_size: crops per chunk (the last one may be smaller).
        grey: convert every crop to grey (:func:`rgb_to_grey`), for grey tasks.
        resize: ``crop`` (as above) or ``whole`` (each photo resized whole, as the papers' code).

    Yields:
        :class:`NaturalChunk` of at most ``chunk_size`` uint8 crops (n, 3, S, S).

    Raises:
        ConfigError: num_images, chunk_size or img_size is not a positive int (or pair of them).
        DataError: the folder does not exist, holds no image file, or a file cannot be read (named).
    """
    owner = "natural_images"
    check_choice(resize, "resize", ("crop", "whole"), owner=owner)
    num_images = check_positive_int(num_images, "num_images", owner)
    chunk_size = check_positive_int(chunk_size, "chunk_size", owner)
    size = _check_size(img_size, owner)
    names, load = _photo_list(folder)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    counts = np.bincount(order[np.arange(num_images) % len(names)], minlength=len(names))
    pending: list[torch.Tensor] = []
    photos_in_chunk = 0
    for idx in order:  # photos in the seeded order, each read once
        if counts[idx] == 0:
            continue
        make = _resized_whole if resize == "whole" else _random_crops
        crops = make(load(names[idx]), int(counts[idx]), size, rng)
        photos_in_chunk += 1
        while crops:
            room = chunk_size - len(pending)
            pending.extend(crops[:room])
            crops = crops[room:]
            if len(pending) == chunk_size:
                yield _finish_chunk(pending, photos_in_chunk, rng, grey)
                pending, photos_in_chunk = [], 0
    if pending:
        yield _finish_chunk(pending, photos_in_chunk, rng, grey)


def _finish_chunk(crops: list[torch.Tensor], num_photos: int, rng: np.random.Generator, grey: bool) -> NaturalChunk:
    images = torch.stack(crops)[torch.from_numpy(rng.permutation(len(crops)))]
    return NaturalChunk(images=rgb_to_grey(images) if grey else images, num_photos=num_photos)


def natural_images(
    num_images: int,
    img_size: int | tuple[int, int],
    *,
    folder: str | Path | None = None,
    seed: int = 0,
    grey: bool = False,
    resize: str = "crop",
) -> torch.Tensor:
    """All the images of :func:`natural_image_chunks` as one tensor (one chunk of ``num_images``).

    Args:
        num_images: number of crops N.
        img_size: output side S in pixels, or (H, W).
        folder: a folder of photos; None uses ``BUILTIN_PHOTOS``.
        seed: seeds the choice of photos and crops.
        grey: convert every crop to grey.
        resize: ``crop`` or ``whole``.

    Returns:
        uint8 tensor (N, 3, S, S) (or (N, 3, H, W)).

    Raises:
        ConfigError: num_images or img_size is not a positive int (or pair of them).
        DataError: as :func:`natural_image_chunks`.
    """
    num_images = check_positive_int(num_images, "num_images", "natural_images")
    chunks = natural_image_chunks(num_images, img_size, folder=folder, seed=seed, chunk_size=num_images, grey=grey,
                                  resize=resize)
    return next(chunks).images


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
        a: images (N_a, C, H, W), uint8 or float in [0, 1], or a ``DiskImages`` (only the drawn rows are read).
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
    a, b = check_images(a, "a", stream=True), check_images(b, "b", stream=True)  # only the drawn rows are read
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
