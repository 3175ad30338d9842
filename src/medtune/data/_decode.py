"""Decoding one image file (PIL or pydicom) to an RGB uint8 array, and resizing to the model input."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from medtune.errors import ConfigError, DataError, short_repr

__all__ = ["RESIZE_POLICIES", "IMAGE_EXTENSIONS", "decode_image", "to_rgb_uint8", "resize_image", "check_unit_range", "MIN_SIDE",
           "DICOM_WINDOWS", "dicom_to_unit"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm"})
MIN_SIDE = 8


def to_rgb_uint8(array: np.ndarray, *, where: str) -> np.ndarray:
    """Convert a decoded image array to (H, W, 3) uint8.

    Grey → 3 channels by repetition; 16-bit (and other integer) images are scaled by their
    dtype's full range (65535 → 255), so intensities stay comparable across images; float images
    must be in [0, 1] (else DataError); a 4th (alpha) channel is dropped.

    Raises:
        DataError: NaN/inf pixels or an unsupported shape.
    """
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DataError(f"{where}: image has NaN or infinite pixels; clean the file or drop it.")
        check_unit_range(a, where)
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        info = np.iinfo(a.dtype)
        lo = info.min if info.min < 0 else 0
        a = ((a.astype(np.float64) - lo) / (info.max - lo) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] in (1, 2):
        a = np.repeat(a[..., :1], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] >= 3:
        a = a[..., :3]
    else:
        raise DataError(f"{where}: unsupported image shape {a.shape}; medtune reads 2-D grey or RGB images.")
    if min(a.shape[:2]) < MIN_SIDE:
        raise DataError(f"{where}: image is {a.shape[1]}x{a.shape[0]} px, smaller than the minimum "
                        f"{MIN_SIDE}x{MIN_SIDE}; remove it or fix the export.")
    return np.ascontiguousarray(a)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A library's exception text on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def max_image_pixels() -> int:
    """The largest image (width × height) medtune decodes: ``MEDTUNE_MAX_IMAGE_PIXELS``, default PIL's
    ``Image.MAX_IMAGE_PIXELS`` (89,478,485); PIL's own decompression-bomb check stays on as well."""
    value = os.environ.get("MEDTUNE_MAX_IMAGE_PIXELS", "")
    if not value:
        return int(Image.MAX_IMAGE_PIXELS or 89_478_485)
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"MEDTUNE_MAX_IMAGE_PIXELS must be a positive integer. Got {short_repr(value)}.")
    return int(value)


def check_unit_range(a: np.ndarray, where: str) -> None:
    """Float pixels are read on the [0, 1] scale; anything else (0–255 floats) would be clipped to white."""
    if a.size and (float(a.min()) < -1e-6 or float(a.max()) > 1 + 1e-6):
        raise DataError(f"{where}: float pixels range from {float(a.min()):g} to {float(a.max()):g}, but float images "
                        "must be in [0, 1]; convert them first, e.g. x / 255.0 for 0-255 values, or store uint8.")


#: How a DICOM's modality values reach [0, 1] when the file has no window (RunConfig.dicom_window).
DICOM_WINDOWS = ("auto", "percentile", "bits")
#: How an image reaches the model's input size (RunConfig ``resize``; see :func:`resize_image`).
RESIZE_POLICIES = ("resize", "pad", "bucket", "zero_pad", "nearest")
#: ``zero_pad``'s canvas: the ImageNet mean colour, so the padding is zero after normalisation, as MedMNIST+
#: pads after ``Normalize`` (train.py: ``transforms.Pad(..., fill=0)`` after ``transforms.Normalize``).
ZERO_PAD_FILL = (124, 116, 104)  # round(255 · (0.485, 0.456, 0.406))
#: The percentiles of ``dicom_window: percentile``, as nnU-Net clips CT intensities.
DICOM_PERCENTILES = (0.5, 99.5)


def _dicom_luts():
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _has_voi(ds) -> str | None:
    """``lut`` (a VOI LUT Sequence table), ``window`` (Window Center/Width) or None: the VOI transform
    pydicom's ``apply_voi_lut`` applies (it prefers the table when both are present)."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def dicom_to_unit(ds, px: np.ndarray, window: str = "auto") -> np.ndarray:
    """A single-frame grey DICOM's stored values → floats in [0, 1], through pydicom's LUTs.

    1. pydicom's ``apply_modality_lut`` (Modality LUT Sequence, or Rescale Slope/Intercept) gives
       the modality values (e.g. Hounsfield units).
    2. If the file has a VOI transform (its first VOI LUT Sequence table, else its first Window
       Center/Width with its VOI LUT Function), pydicom's ``apply_voi_lut`` applies it, and the
       transform's output range (PS3.3 C.11.2: ``0 … 2**bits − 1`` of a table; for a window, the
       values pydicom gives below and above it) maps linearly to [0, 1]. ``window: bits`` ignores
       the file's window.
    3. Without one, a fixed range maps linearly to [0, 1]: ``auto``/``bits``: the range of the
       stored bits (BitsStored, PixelRepresentation) through the modality LUT, so 12-bit data in
       16-bit words spans 0 … 4095, not 0 … 65535, and never the image's own min–max;
       ``percentile``: the image's 0.5th–99.5th percentiles (``DICOM_PERCENTILES``).
    4. Values outside [0, 1] are clipped; ``MONOCHROME1`` (0 is white) is inverted to ``1 − x``.

    medtune then stores ``floor(255 · x + 0.5)`` as uint8 (:func:`to_rgb_uint8`).
    """
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    values = apply_modality_lut(px, ds)
    voi = _has_voi(ds) if window != "bits" else None
    if voi == "lut":
        if np.issubdtype(values.dtype, np.floating) and np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)  # a table is indexed by integers (pydicom warns on floats)
        values = apply_voi_lut(values, ds).astype(np.float64)
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif voi == "window":
        values = apply_voi_lut(values, ds)
        # the window's output range is pydicom's own: what it gives far below and far above the window
        lo, hi = (float(v) for v in apply_voi_lut(np.array([-np.inf, np.inf]), ds))
    elif window == "percentile":
        values = np.asarray(values, dtype=np.float64)
        lo, hi = (float(v) for v in np.percentile(values, DICOM_PERCENTILES))
    else:
        values = np.asarray(values, dtype=np.float64)
        modality_seq = ds.get("ModalityLUTSequence")
        if modality_seq:  # PS3.3 C.11.1.1.1: a modality table's output is unsigned, 2**bits values
            lo, hi = 0.0, float(2 ** int(modality_seq[0].LUTDescriptor[2]) - 1)
        else:
            bits = int(ds.get("BitsStored") or px.dtype.itemsize * 8)
            signed = int(ds.get("PixelRepresentation") or 0) == 1
            raw = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2 ** bits - 1])
            lo, hi = (float(v) for v in apply_modality_lut(raw, ds))
    values = np.asarray(values, dtype=np.float64)
    # lo > hi under a negative slope: the mapping still sends "below the window" to 0
    unit = (values - lo) / (hi - lo) if hi != lo else np.zeros_like(values)
    unit = np.clip(unit, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _decode_dicom(path: Path, window: str = "auto") -> tuple[np.ndarray, str]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({_one_line(exc)}); check it with `medtune data check`.") from None
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (PixelData); remove it from the data folder.")
    try:
        px = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported transfer syntaxes
        raise DataError(f"{path}: cannot decode the DICOM pixel data ({_one_line(exc)}); convert it to PNG or install the "
                        "pydicom pixel handlers (pylibjpeg).") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if px.ndim == 3 and photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        raise DataError(f"{path}: a {px.shape[0]}-frame DICOM; medtune classifies 2-D images, give one slice per file.")
    if px.ndim == 2:
        try:
            px = dicom_to_unit(ds, px, window)
        except (ValueError, TypeError, AttributeError, NotImplementedError, KeyError, IndexError) as exc:
            raise DataError(f"{path}: bad DICOM rescale or window attributes ({_one_line(exc)}); fix the header, or "
                            "convert the image to PNG.") from None
    return px, f"DICOM {photometric}"


def decode_image(path: str | Path, dicom_window: str = "auto") -> tuple[np.ndarray, str, tuple[int, int]]:
    """Read an image file; return (RGB uint8 (H, W, 3), original mode, original (H, W)).

    A ``.dcm`` file is scaled by :func:`dicom_to_unit` with ``dicom_window``.

    Raises:
        DataError: unreadable, truncated, too small, or without pixel data.
    """
    path = Path(path)
    try:
        mode_bits = os.stat(path).st_mode
    except OSError as exc:
        what = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror or exc})"
        raise DataError(f"{path}: {what}; fix the path or remove the entry.") from None
    if not stat.S_ISREG(mode_bits):  # a FIFO would block its reader forever
        raise DataError(f"{path}: not a regular file (a folder, FIFO, socket or device); remove the entry.")
    if path.suffix.lower() == ".dcm":
        px, mode = _decode_dicom(path, dicom_window)
        return to_rgb_uint8(px, where=str(path)), mode, tuple(px.shape[:2])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                limit = max_image_pixels()
                if img.size[0] * img.size[1] > limit:  # read from the header, before any pixel is decoded
                    raise DataError(f"{path}: image is {img.size[0]}x{img.size[1]} px, over the limit of {limit:,} "
                                    "pixels (a decompression bomb?); shrink it, or raise MEDTUNE_MAX_IMAGE_PIXELS.")
                img.load()
                mode = img.mode
                if mode in ("RGBA", "LA", "P", "PA"):
                    # transparency is composited on black, the background of most medical images
                    rgba = img.convert("RGBA")
                    base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                    img2 = Image.alpha_composite(base, rgba).convert("RGB")
                    array = np.asarray(img2)
                elif mode in ("CMYK", "YCbCr", "HSV", "LAB", "1"):
                    array = np.asarray(img.convert("RGB" if mode != "1" else "L"))
                elif mode.startswith("I;16") or mode == "I":
                    array = np.asarray(img)
                    if mode == "I" and array.max(initial=0) <= 65535 and array.min(initial=0) >= 0:
                        array = array.astype(np.uint16)
                else:
                    array = np.asarray(img)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({type(exc).__name__}: {_one_line(exc)}); "
                        "re-export it or remove it (see `medtune data check`).") from None
    return to_rgb_uint8(array, where=str(path)), mode, tuple(array.shape[:2])


def resize_image(rgb: np.ndarray, size: int, policy: str) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, size, size) uint8 by ``resize`` (bilinear, antialiased), ``nearest``
    (nearest-neighbour; MedMNIST v2), ``pad`` (longer side scaled to ``size``, zero padding centred) or
    ``zero_pad`` (MedMNIST+: not scaled when it fits, centred on a canvas of :data:`ZERO_PAD_FILL`,
    split as theirs: ``total // 2`` left and top; a larger image is scaled down first, as ``pad``)."""
    x = torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1)[None].float()
    h, w = rgb.shape[:2]
    if policy in ("resize", "bucket", "nearest"):  # one image alone has no size distribution: bucket = resize
        if (h, w) != (size, size):
            if policy == "nearest":
                x = F.interpolate(x, size=(size, size), mode="nearest-exact")
            else:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        scale = size / max(h, w)
        if policy == "zero_pad" and scale >= 1:
            scale = 1.0
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (size - nh) // 2, (size - nw) // 2
        pad = (left, size - nw - left, top, size - nh - top)
        if policy == "zero_pad":
            canvas = torch.tensor(ZERO_PAD_FILL, dtype=x.dtype).view(1, 3, 1, 1).expand(1, 3, size, size).clone()
            canvas[:, :, top:top + nh, left:left + nw] = x
            x = canvas
        else:
            x = F.pad(x, pad, value=0.0)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def choose_buckets(sides, max_size: int, num_buckets: int = 3, multiple: int = 8) -> tuple[int, ...]:
    """The "optimal size set" of a multi-size dataset (Liu et al.): a few square sides from its own sizes.

    The sides are the ``(k + 0.5) / num_buckets`` quantiles (k = 0 … num_buckets − 1) of the
    images' native side ``sqrt(h · w)``, rounded to a multiple of ``multiple``, at least 16 and at
    most ``max_size`` (the run's ``img_size``); duplicates collapse, so a dataset of one size
    has one bucket.

    Args:
        sides: native sides ``sqrt(h · w)`` in pixels, one per image.
        max_size: the largest side fed to the model.
        num_buckets: at most this many sides.
        multiple: sides are rounded to a multiple of this.

    Returns:
        Increasing bucket sides.
    """
    arr = np.asarray(list(sides), dtype=float)
    qs = np.quantile(arr, [(k + 0.5) / num_buckets for k in range(num_buckets)])
    out = sorted({int(min(max_size, max(16, multiple * round(q / multiple)))) for q in qs})
    return tuple(out)


def nearest_bucket(side: float, buckets) -> int:
    """The bucket side nearest to ``side`` on a log scale (so scaling up and down count alike)."""
    return int(min(buckets, key=lambda b: abs(np.log(b) - np.log(max(side, 1e-6)))))
