"""Data sources, conversions, splits, checks and the bad-input catalogue."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.data import check_data, load_data, make_demo, make_synthetic, with_train_fraction
from medtune.errors import ConfigError, DataError


def _png(path, size=(20, 16), color=(200, 10, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _folder(root, classes=("a", "b"), n=10, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(n):
            arr = rng.integers(0, 255, (12 + i % 3, 14, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png") if (root / c).exists() else (
                (root / c).mkdir(parents=True), Image.fromarray(arr).save(root / c / f"{i}.png"))
    return root


def test_folder_source_shapes_splits_and_determinism(tmp_path):
    root = _folder(tmp_path / "d")
    data = load_data(str(root), img_size=16, seed=1)
    assert data.images.shape == (20, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.class_names == ["a", "b"] and data.task == "binary"
    assert set(data.splits) == {"train", "val", "test"}
    for split in ("train", "val", "test"):  # stratified: both classes in every split
        assert set(data.labels[torch.from_numpy(data.splits == split)].tolist()) == {0, 1}
    assert load_data(str(root), img_size=16, seed=1).fingerprint() == data.fingerprint()
    assert load_data(str(root), img_size=16, seed=2).fingerprint() != data.fingerprint()


def test_given_split_folders_are_respected(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c in ("x", "y"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", color=(i * 20, 0, 0))
    data = load_data(str(tmp_path), img_size=16)
    assert (data.splits == "train").sum() == 8 and (data.splits == "val").sum() == 4 and (data.splits == "test").sum() == 6


def test_conversions_grey_16bit_rgba_cmyk(tmp_path):
    grey = np.full((16, 16), 100, dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    sixteen = np.full((16, 16), 65535 // 2, dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s.tif")
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    rgba.save(tmp_path / "t.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    from medtune.data._decode import decode_image

    g, _, _ = decode_image(tmp_path / "g.png")
    assert g.shape == (16, 16, 3) and (g == 100).all()
    s, mode, _ = decode_image(tmp_path / "s.tif")
    assert mode.startswith("I;16") and abs(int(s[0, 0, 0]) - 128) <= 1, "16-bit scaled by its full range"
    t, _, _ = decode_image(tmp_path / "t.png")
    assert (t == 0).all(), "fully transparent pixels composite on black"
    c, _, _ = decode_image(tmp_path / "c.jpg")
    assert c[0, 0, 0] > 200 and c[0, 0, 1] < 50, "CMYK red stays red"


def test_pad_policy_keeps_aspect_and_zero_pads():
    from medtune.data._decode import resize_image

    wide = np.full((10, 40, 3), 255, dtype=np.uint8)
    out = resize_image(wide, 16, "pad")
    assert out.shape == (3, 16, 16)
    assert (out[:, 8, :] == 255).all() and (out[:, 0, :] == 0).all() and (out[:, 15, :] == 0).all()
    assert (resize_image(wide, 16, "resize") == 255).all()


def test_csv_with_groups_never_splits_a_patient(tmp_path):
    rows = []
    for p in range(30):
        for j in range(2):
            name = f"img/{p}_{j}.png"
            _png(tmp_path / name, color=(p * 8, j * 50, 0))
            rows.append({"path": name, "label": "pos" if p % 2 else "neg", "group": f"patient{p}"})
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    data = load_data(str(tmp_path / "data.csv"), img_size=16, seed=0, val_fraction=0.2, test_fraction=0.2)
    for g in np.unique(data.groups):
        assert len(set(data.splits[data.groups == g])) == 1


def _npz(path, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3)[:, None]
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_multiclass_and_multilabel(tmp_path):
    data = load_data(str(_npz(tmp_path / "x.npz")), img_size=32)
    assert data.task == "multiclass" and data.num_classes == 3 and data.images.shape[1:] == (3, 32, 32)
    assert (data.splits == "train").sum() == 12
    ml = {f"{s}_labels": (np.random.default_rng(1).random((n, 4)) > 0.5).astype(np.uint8)
          for s, n in (("train", 12), ("val", 4), ("test", 4))}
    data = load_data(str(_npz(tmp_path / "chest.npz", **ml)), img_size=28)
    assert data.task == "multilabel" and data.labels.shape == (20, 4) and data.labels.dtype == torch.float32


def test_with_train_fraction_is_stratified_and_keeps_val_test():
    data = make_synthetic(num_samples=64, img_size=16)
    sub = with_train_fraction(data, 0.25, seed=0)
    assert (sub.splits == "train").sum() == round(0.25 * 16) * 2
    assert (sub.splits == "val").sum() == (data.splits == "val").sum()
    assert set(sub.labels[torch.from_numpy(sub.splits == "train")].tolist()) == {0, 1}
    with pytest.raises(ConfigError, match="train_fraction"):
        with_train_fraction(data, 0.0, seed=0)
    quarter, half = (set(with_train_fraction(data, f, seed=0).ids) for f in (0.25, 0.5))
    assert quarter < half, "subsets of one seed are nested, so learning curves add images"


def test_demo_is_deterministic_balanced_and_splits_share_no_pixels():
    a, b = make_demo(img_size=32, seed=0), make_demo(img_size=32, seed=0)
    assert a.fingerprint() == b.fingerprint()
    assert a.class_names == ["negative", "low", "high"]
    for split in ("train", "val", "test"):
        counts = np.bincount(a.labels[torch.from_numpy(a.splits == split)].numpy(), minlength=3)
        assert counts.min() == counts.max() > 0
    # every patch lies in its split's own strip of the slide
    strips = a.meta["strips"]
    for ident, split in zip(a.ids, a.splits):
        x = int(ident.split("x")[1].split("r")[0])
        lo, hi = strips[split]
        assert int(lo * 512) <= x and x + 48 <= int(hi * 512)


def test_check_data_finds_leaks_and_unreadable_files(tmp_path):
    for n, (split, c, i) in enumerate((s, c, i) for s in ("train", "val", "test") for c in ("a", "b") for i in range(3)):
        _png(tmp_path / split / c / f"{i}.png", color=(10 * n, i * 30, 5))  # 18 distinct images
    leak = tmp_path / "test" / "a" / "leak.png"
    leak.write_bytes((tmp_path / "train" / "b" / "1.png").read_bytes())
    (tmp_path / "val" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = check_data(str(tmp_path))
    assert len(report.unreadable) == 1 and "broken.png" in report.unreadable[0]["file"]
    assert len(report.leaks) == 1 and any("leak.png" in x for x in report.leaks[0])
    assert report.counts["train"] == {"a": 3, "b": 3}
    assert not report.ok


def test_check_data_decodes_each_file_once_and_keeps_no_pixels(tmp_path, monkeypatch):
    """A folder without split folders: the splits load_data would make, from the labels (no second decode)."""
    from medtune.data import _decode, check, sources

    _folder(tmp_path, classes=("a", "b", "c"), n=12)
    expected = load_data(str(tmp_path), img_size=16, data_cache="memory")
    calls = []
    real = _decode.decode_image

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(check, "decode_image", counting)
    monkeypatch.setattr(sources, "decode_image", counting)
    report = check_data(str(tmp_path), img_size=16)
    assert len(calls) == 36 and report.error is None and report.num_images == 36
    for split in ("train", "val", "test"):
        names = expected.labels[torch.from_numpy(expected.splits == split)].tolist()
        assert report.counts[split] == {c: names.count(k) for k, c in enumerate(expected.class_names) if k in names}


def test_check_data_of_an_npz_hashes_image_by_image_and_finds_a_leak(tmp_path, monkeypatch):
    from medtune.data import sources

    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 20, 20), dtype=np.uint8) for s, n in
              (("train", 20), ("val", 8), ("test", 8))}
    arrays["test_images"][3] = arrays["train_images"][5]  # the same image in train and test
    for s, n in (("train", 20), ("val", 8), ("test", 8)):
        arrays[f"{s}_labels"] = (np.arange(n) % 2)[:, None]
    np.savez(tmp_path / "toy_28.npz", **arrays)
    expected = load_data(str(tmp_path / "toy_28.npz"), img_size=16, data_cache="memory")

    def no_load(*_a, **_k):
        raise AssertionError("check_data loaded the whole .npz into memory")

    monkeypatch.setattr(sources, "load_data", no_load)
    report = check_data(str(tmp_path / "toy_28.npz"), img_size=16)
    assert report.leaks == [["train:toy_28.npz:train:5", "test:toy_28.npz:test:3"]]
    assert report.num_images == len(expected) == 36 and report.counts["train"] == {"0": 10, "1": 10}
    assert report.sizes["min_h"] == 16 and report.modes == {"decoded": 36}


# -- bad input catalogue: each is one DataError naming the file and the fix --------------------------------------
def test_empty_class_folder(tmp_path):
    _folder(tmp_path, classes=("a",))
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"b: class folder has no images"):
        load_data(str(tmp_path))


def test_single_class(tmp_path):
    _folder(tmp_path, classes=("only",))
    with pytest.raises(DataError, match="only one class"):
        load_data(str(tmp_path))


def test_truncated_image_names_the_file(tmp_path):
    _folder(tmp_path)
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "0.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"0.png: unreadable or truncated image.*medtune data check"):
        load_data(str(tmp_path))


def test_tiny_image(tmp_path):
    _folder(tmp_path)
    _png(tmp_path / "a" / "dot.png", size=(1, 1))
    with pytest.raises(DataError, match=r"dot.png: image is 1x1 px, smaller than the minimum"):
        load_data(str(tmp_path))


def test_non_image_files_are_skipped_with_a_warning(tmp_path):
    _folder(tmp_path)
    (tmp_path / "a" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match="skipped 1 non-image file"):
        load_data(str(tmp_path), img_size=16)


@pytest.mark.parametrize("content,match", [
    ("file,label\nx.png,a\n", "missing column\\(s\\) path"),
    ("path,label\nmissing.png,a\n", "line 2: file 'missing.png' not found"),
    ("path,label\n../escape.png,a\n", "points outside the data folder"),
    ("path,label\nimg.png,a\nimg.png,b\n", "line 3: duplicate path 'img.png'"),
])
def test_csv_errors(tmp_path, content, match):
    _png(tmp_path / "img.png")
    _png(tmp_path.parent / "escape.png")
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(DataError, match=match):
        load_data(str(tmp_path / "d.csv"))


def test_label_outside_known_classes(tmp_path):
    _folder(tmp_path, classes=("a", "b", "zebra"))
    with pytest.raises(DataError, match="label\\(s\\) 'zebra' are not among the known classes"):
        load_data(str(tmp_path), classes=["a", "b"])


@pytest.mark.parametrize("override,match", [
    ({"val_images": None}, "missing key\\(s\\) val_images"),
    ({"train_images": np.full((12, 28, 28), np.nan, dtype=np.float32)}, "NaN or infinite"),
    ({"train_labels": np.zeros((5, 1), dtype=np.int64)}, "train_labels has shape \\(5, 1\\) but train_images has 12"),
    ({"test_images": np.zeros((0, 28, 28), dtype=np.uint8), "test_labels": np.zeros((0, 1))}, "test split has no images"),
])
def test_npz_errors(tmp_path, override, match):
    with pytest.raises(DataError, match=match):
        load_data(str(_npz(tmp_path / "bad.npz", **override)))


def test_class_only_in_test(tmp_path):
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            for i in range(2):
                _png(tmp_path / split / c / f"{i}.png", color=(i * 40, 0, 0))
    for i in range(2):
        _png(tmp_path / "test" / "rare" / f"{i}.png")
    with pytest.raises(DataError, match="class\\(es\\) rare have no training images"):
        load_data(str(tmp_path))


def test_dicom_with_and_without_pixels(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write(path, pixels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        if pixels is not None:
            ds.Rows, ds.Columns = pixels.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = pixels.astype(np.uint16).tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(str(path), enforce_file_format=True)

    ramp = np.tile(np.arange(16, dtype=np.uint16) * 200, (16, 1))
    for c in ("a", "b"):
        for i in range(6):
            write(tmp_path / "d" / c / f"{i}.dcm", ramp + i)
    data = load_data(str(tmp_path / "d"), img_size=16)
    # no window in the file: scaled by the 12 stored bits (0 … 4095), not stretched to the image's own range
    assert data.images[0, 0, 0, 0] == 0 and data.images[0, 0, 0, -1] == round(3000 / 4095 * 255)
    write(tmp_path / "d" / "a" / "empty.dcm", None)
    with pytest.raises(DataError, match="empty.dcm: DICOM file has no pixel data"):
        load_data(str(tmp_path / "d"))


def _no_network(*_args, **_kw):
    raise OSError("network unreachable (blocked by the test)")


def test_missing_medmnist_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    monkeypatch.setattr("socket.socket.connect", _no_network, raising=True)
    with pytest.raises(DataError, match=f"pathmnist_64.npz is not in {tmp_path} .*put it in {tmp_path}"):
        load_data("medmnist:pathmnist", medmnist_size=64)


def test_csv_with_one_column_per_label_equals_the_pipe_form(tmp_path):
    rng = np.random.default_rng(0)
    names = ["Atelectasis", "Cardiomegaly", "Effusion"]
    flags = rng.integers(0, 2, (24, 3))
    flags[:, 2] = 0  # a label no image has stays a column of zeros
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    cells = [["1.0" if v else ("0" if i % 2 else "0.0") for v in row] for i, row in enumerate(flags)]
    (tmp_path / "wide.csv").write_text("path,Atelectasis,Cardiomegaly,Effusion,split\n" + "".join(
        f"{i}.png,{','.join(c)},{('train', 'val', 'test')[i % 3]}\n" for i, c in enumerate(cells)))
    wide = load_data(str(tmp_path / "wide.csv"), img_size=16)
    assert wide.task == "multilabel" and wide.class_names == names
    np.testing.assert_array_equal(wide.labels.numpy(), flags.astype(np.float32))
    # the same labels written as path,label with a|b: the same images and labels
    (tmp_path / "pipe.csv").write_text("path,label,split\n" + "".join(
        f"{i}.png,{'|'.join(n for n, v in zip(names, row) if v) or 'none'},{('train', 'val', 'test')[i % 3]}\n"
        for i, row in enumerate(flags)))
    pipe = load_data(str(tmp_path / "pipe.csv"), img_size=16, classes=names + ["none"])
    np.testing.assert_array_equal(pipe.labels.numpy()[:, :3], wide.labels.numpy())
    assert torch.equal(pipe.images, wide.images)


@pytest.mark.parametrize("cell,match", [
    ("-1.0", "line 3: label column 'b' is -1 \\(uncertain\\); .*--uncertain-labels zeros\\|ones"),
    ("", "line 3: label column 'b' is blank"),
    ("Female", "line 3: label column 'b' is 'Female'.*drop columns that are not labels"),
])
def test_csv_label_columns_refuse_uncertain_and_blank_cells(tmp_path, cell, match):
    _png(tmp_path / "0.png")
    _png(tmp_path / "1.png")
    (tmp_path / "d.csv").write_text(f"path,a,b\n0.png,1,0\n1.png,0,{cell}\n")
    with pytest.raises(DataError, match=match):
        load_data(str(tmp_path / "d.csv"))
    if cell == "Female":  # not a label whatever uncertain_labels says
        with pytest.raises(DataError, match="is 'Female'"):
            load_data(str(tmp_path / "d.csv"), uncertain_labels="zeros")
    (tmp_path / "one.csv").write_text("path,a\n0.png,1\n")
    with pytest.raises(DataError, match="one label column \\('a'\\) and no 'label' column"):
        load_data(str(tmp_path / "one.csv"))


@pytest.mark.parametrize("val_name", ["valid", "validation"])
def test_valid_and_validation_folders_are_the_val_split(tmp_path, val_name):
    for split, n in (("train", 4), (val_name, 2), ("test", 3)):
        for c in ("x", "y"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", color=(i * 20, 0, 0))
    data = load_data(str(tmp_path), img_size=16)
    assert sorted(set(data.splits)) == ["test", "train", "val"]
    assert [(data.splits == s).sum() for s in ("train", "val", "test")] == [8, 4, 6]
    assert all(f"/{val_name}/" in i for i, s in zip(data.ids, data.splits) if s == "val")
    _png(tmp_path / "val" / "x" / "0.png")
    with pytest.raises(DataError, match=f"has val and {val_name} folders, both read as the validation split"):
        load_data(str(tmp_path), img_size=16)


def test_csv_split_cell_valid_is_val(tmp_path):
    rows = []
    for i in range(12):
        _png(tmp_path / f"{i}.png", color=(i * 20, 0, 0))
        rows.append(f"{i}.png,{'ab'[i % 2]},{('train', 'valid', 'validation', 'test')[i // 3]}")
    (tmp_path / "d.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    data = load_data(str(tmp_path / "d.csv"), img_size=16)
    assert list(data.splits) == ["train"] * 3 + ["val"] * 6 + ["test"] * 3


@pytest.mark.parametrize("policy,expected", [("zeros", [0, 0, 0]), ("ones", [1, 0, 1])])
def test_csv_uncertain_labels_zeros_and_ones(tmp_path, policy, expected):
    """CheXpert's U-Zeros / U-Ones: -1 is absent / present; a blank ("not mentioned") is absent in both."""
    from medtune.config import RunConfig

    rng = np.random.default_rng(1)
    lines = ["path,a,b,c,split"]
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        cells = "-1.0,,-1" if i == 0 else ",".join("01"[(i + k) % 2] for k in range(3))
        lines.append(f"{i}.png,{cells},{('train', 'val', 'test')[i % 3]}")
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    data = load_data(str(tmp_path / "d.csv"), img_size=16, uncertain_labels=policy)
    assert data.labels[0].tolist() == expected and data.labels[1].tolist() == [1, 0, 1]
    from medtune.cli import main

    assert main(["data", "check", str(tmp_path / "d.csv"), "--uncertain-labels", policy]) == 0
    assert main(["data", "check", str(tmp_path / "d.csv")]) == 2  # the default refuses the -1 and blank cells
    assert "uncertain_labels" not in RunConfig().semantic_dict()  # the default keeps existing run ids
    assert RunConfig(uncertain_labels=policy).semantic_dict()["uncertain_labels"] == policy
