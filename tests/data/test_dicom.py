"""DICOM decoding through pydicom's modality and VOI LUTs (rescale, window, stored bits, MONOCHROME1)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medtune.config import RunConfig
from medtune.data import load_data
from medtune.data._decode import decode_image
from medtune.errors import DataError

try:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom < 3
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut


def write_dicom(path, pixels, *, bits_stored=12, signed=False, photometric="MONOCHROME2", **attrs):
    """A CT-like single-frame DICOM (16-bit words) with the given extra attributes."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, int(signed)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _to_uint8(unit):
    """medtune's documented last step: floor(255 · x + 0.5) of x in [0, 1]."""
    return (np.clip(unit, 0, 1) * 255.0 + 0.5).astype(np.uint8)


# every stored value 0 … 4095 (12 bits), 64 x 64
RAMP = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("function", ["LINEAR", "SIGMOID"])
def test_rescale_and_window_decode_to_pydicoms_lut_values(tmp_path, photometric, function):
    # slope 0.5, intercept -1024: stored 0 … 4095 -> -1024 … 1023.5; window 40 / 400 (soft tissue): -160 … 240
    path = write_dicom(tmp_path / "ct.dcm", RAMP, photometric=photometric, RescaleSlope="0.5",
                       RescaleIntercept="-1024", WindowCenter="40", WindowWidth="400", VOILUTFunction=function)
    rgb, mode, size = decode_image(path)
    assert mode == f"DICOM {photometric}" and size == (64, 64) and rgb.shape == (64, 64, 3)

    ds = pydicom.dcmread(str(path))
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    # PS3.3 C.11.2.1.2: the window's output spans the stored range through the rescale
    y_min, y_max = 0 * 0.5 - 1024, 4095 * 0.5 - 1024
    unit = (voi - y_min) / (y_max - y_min)
    expected = _to_uint8(1.0 - unit if photometric == "MONOCHROME1" else unit)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert (rgb[..., 0] == rgb[..., 2]).all()
    # the window, not the image's min-max: HU -160 and below is black (white when inverted), 240 and above white
    hu = RAMP * 0.5 - 1024
    dark, light = (0, 255) if photometric == "MONOCHROME2" else (255, 0)
    if function == "LINEAR":
        assert (rgb[..., 0][hu <= -161] == dark).all() and (rgb[..., 0][hu >= 240] == light).all()
        assert len(np.unique(rgb[..., 0])) == 256  # the 400 HU window spreads over every grey level
    assert 0 < (rgb[..., 0] == dark).mean() < 0.9
    # an image inside the window (HU -124 … -92.5) stays mid-grey: nothing is stretched to its own range
    inner = write_dicom(tmp_path / "inner.dcm", RAMP // 64 + 1800, photometric=photometric, RescaleSlope="0.5",
                        RescaleIntercept="-1024", WindowCenter="40", WindowWidth="400", VOILUTFunction=function)
    ds = pydicom.dcmread(str(inner))
    unit = (apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) - y_min) / (y_max - y_min)
    got = decode_image(inner)[0][..., 0]
    np.testing.assert_array_equal(got, _to_uint8(1.0 - unit if photometric == "MONOCHROME1" else unit))
    assert 20 < got.min() and got.max() < 235


def test_twelve_bit_data_without_window_spans_its_stored_bits(tmp_path):
    # a dim 12-bit image (max 3000 of 4095): min-max would stretch it to white; the stored bits keep it dim
    pixels = (RAMP.astype(np.int64) * 3000 // 4095).astype(np.uint16)
    path = write_dicom(tmp_path / "x.dcm", pixels)
    rgb = decode_image(path)[0][..., 0]
    np.testing.assert_array_equal(rgb, _to_uint8(pixels / 4095.0))
    assert rgb.max() == round(3000 / 4095 * 255)
    # signed 12-bit with a rescale: -2048 … 2047 through slope 2, intercept 100
    signed = (RAMP.astype(np.int32) - 2048).astype(np.int16)
    path = write_dicom(tmp_path / "s.dcm", signed, signed=True, RescaleSlope="2", RescaleIntercept="100")
    ds = pydicom.dcmread(str(path))
    hu = apply_modality_lut(ds.pixel_array, ds)
    lo, hi = -2048 * 2 + 100, 2047 * 2 + 100
    np.testing.assert_array_equal(decode_image(path)[0][..., 0], _to_uint8((hu - lo) / (hi - lo)))


def test_percentile_and_bits_options(tmp_path):
    pixels = (RAMP // 4).astype(np.uint16)  # 0 … 1023 in 12 bits
    plain = write_dicom(tmp_path / "p.dcm", pixels)
    lo, hi = np.percentile(pixels.astype(np.float64), [0.5, 99.5])
    np.testing.assert_array_equal(decode_image(plain, "percentile")[0][..., 0], _to_uint8((pixels - lo) / (hi - lo)))
    windowed = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter="512", WindowWidth="256")
    # percentile keeps the file's window; bits ignores it
    np.testing.assert_array_equal(decode_image(windowed, "percentile")[0], decode_image(windowed, "auto")[0])
    np.testing.assert_array_equal(decode_image(windowed, "bits")[0], decode_image(plain, "auto")[0])
    assert not np.array_equal(decode_image(windowed, "bits")[0], decode_image(windowed, "auto")[0])


def test_dicom_window_option_reaches_the_loader_and_keeps_run_ids(tmp_path):
    for c, offset in (("a", 0), ("b", 900)):
        for i in range(6):
            write_dicom(tmp_path / "d" / c / f"{i}.dcm", (RAMP // 8 + offset + i).astype(np.uint16))
    auto = load_data(str(tmp_path / "d"), img_size=16)
    pct = load_data(str(tmp_path / "d"), img_size=16, dicom_window="percentile")
    assert auto.fingerprint() != pct.fingerprint()
    assert RunConfig(dicom_window="percentile").dicom_window == "percentile"
    assert "dicom_window" not in RunConfig().semantic_dict()  # the default leaves existing run ids as they were
    assert RunConfig(dicom_window="bits").semantic_dict()["dicom_window"] == "bits"
    with pytest.raises(Exception, match="dicom_window"):
        RunConfig(dicom_window="minmax")


def test_bad_window_is_one_line(tmp_path):
    path = write_dicom(tmp_path / "bad.dcm", RAMP, WindowCenter="40", WindowWidth="0")
    with pytest.raises(DataError, match="bad.dcm: bad DICOM rescale or window attributes"):
        decode_image(path)
