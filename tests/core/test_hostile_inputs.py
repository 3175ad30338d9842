"""Hostile input through the CLI: every case is one line on stderr naming the file or field, exit status 2,
no traceback, and the store keeps what it held."""

from __future__ import annotations

import shutil

import pytest

from medtune.cli import main
from medtune.store import ResultsStore

TINY = ["--data", "synthetic", "--arch", "medtune_tiny_cnn", "--weights", "none", "--epochs", "1", "--img-size", "16",
        "--batch-size", "16", "--device", "cpu", "--progress", "false"]


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory):
    """A store holding one finished run (trained once per module)."""
    root = tmp_path_factory.mktemp("seeded")
    assert main(["run", *TINY, "--store", str(root)]) == 0
    return root


@pytest.fixture
def store(seeded_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(seeded_store, root)
    return root


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *needles: str, code: int = 2) -> str:
    assert status == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("medtune: error:")]
    assert len(lines) == 1, err
    assert len(lines[0]) < 2000, f"message of {len(lines[0])} characters"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_store_kept(root) -> None:
    rows = ResultsStore(root).runs(status=None)
    assert [r["status"] for r in rows] == ["done"], rows
    assert len(ResultsStore(root).runs()) == 1


# -- configuration values -------------------------------------------------------------------------

CONFIG_CASES = {
    "lr_nan": (["--lr", "nan"], ["'lr'", "finite"]),
    "lr_inf": (["--lr", "inf"], ["'lr'", "finite"]),
    "lr_huge": (["--lr", "1e300"], ["'lr'", "<= 10"]),
    "warmup_nan": (["--warmup-epochs", "nan"], ["'warmup_epochs'", "finite"]),
    "warmup_huge": (["--warmup-epochs", "1e30"], ["'warmup_epochs'"]),
    "fraction_nan": (["--train-fraction", "nan"], ["'train_fraction'", "finite"]),
    "val_fraction_nan": (["--val-fraction", "nan"], ["'val_fraction'", "finite"]),
    "smoothing_nan": (["--label-smoothing", "nan"], ["'label_smoothing'", "finite"]),
    "seed_2_64": (["--seed", str(2**64)], ["'seed'", "<= 4294967295"]),
    "split_seed_huge": (["--split-seed", str(10**30)], ["'split_seed'"]),
    "num_threads": (["--num-threads", "100000"], ["'num_threads'", "<= 1024"]),
    "device_tpu": (["--device", "tpu"], ["'device'"]),
    "alpha_nan": (["--strategy", "l2_sp:alpha=nan"], ["'alpha'", "finite"]),
    "synthetic_abc": (["--data", "synthetic:abc"], ["synthetic:K"]),
    "path_too_long": (["--data", "x" * 5000], ["cannot be read", "chars)"]),
    "img_size_28_densenet121": (["--arch", "densenet121", "--img-size", "28"],
                                ["'img_size'", "28 px, too small for densenet121", "--img-size 29 or larger"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_value_is_one_line(case, store, capsys):
    flags, needles = CONFIG_CASES[case]
    status, _, err = cli(["run", *TINY, *flags, "--store", store], capsys)
    assert_one_line_error(status, err, *needles)
    assert_store_kept(store)


def test_device_cuda_without_cuda_is_one_line(store, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, _, err = cli(["run", *TINY, "--device", "cuda", "--store", store], capsys)
    assert_one_line_error(status, err, "no CUDA device", "--device cpu")
    assert_store_kept(store)


SWEEP_CASES = {
    "lr_list_nan": (["--lr", "0.01,nan"], ["'lr'"]),
    "seeds_huge": (["--seeds", f"0,{2**64}"], ["'seeds'"]),
    "fraction_list_nan": (["--train-fraction", "0.5,nan"], ["'train_fraction'"]),
}


@pytest.mark.parametrize("case", sorted(SWEEP_CASES))
def test_bad_sweep_value_is_one_line(case, store, capsys):
    flags, needles = SWEEP_CASES[case]
    status, _, err = cli(["sweep", *TINY, "--strategy", "full", *flags, "--store", store], capsys)
    assert_one_line_error(status, err, *needles)
    assert_store_kept(store)


def _alias_bomb() -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefg", "bcdefgh"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + "\nseeds: *h\n"


YAML_CASES = {
    "alias_bomb": (_alias_bomb(), ["holds more than 100,000 values (aliases expanded)"]),
    "duplicate_key": ("lr: 0.01\nepochs: 1\nlr: 0.02\n", ["duplicate key 'lr' on lines 1 and 3"]),
    "oversized": ("# " + "x" * (1 << 20) + "\nlr: 0.01\n", ["bytes, more than a config needs"]),
    "not_utf8": ("lr: 0.01\n# caf\xe9\n", ["not UTF-8"]),
    "bad_value": ("patience: -1\n", ["cfg.yaml: The 'patience' parameter", ">= 0"]),
    "huge_value_in_error": ("patience: [" + ",".join(["12345"] * 20_000) + "]\n", ["'patience'", "chars)"]),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_bad_yaml_is_one_line_naming_the_file(case, store, tmp_path, capsys):
    text, needles = YAML_CASES[case]
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text.encode("latin-1") if case == "not_utf8" else text.encode())
    status, _, err = cli(["sweep", str(path), *TINY, "--store", store], capsys)
    assert_one_line_error(status, err, *needles)
    assert "cfg.yaml" in err
    assert_store_kept(store)


def test_yaml_1e_minus_3_is_a_float(tmp_path):
    from medtune.config import RunConfig, load_config

    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 1e-3\nwarmup_epochs: 5e-1\n")
    cfg = load_config(RunConfig, path)
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float) and cfg.warmup_epochs == 0.5


def test_duplicate_grid_cells_are_removed_and_said(tmp_path, capsys):
    status, out, err = cli(["sweep", *TINY, "--strategy", "full", "--seeds", "0,0", "--lr", "0.01,1e-2",
                            "--store", tmp_path], capsys)
    assert status == 0, err
    assert "removed 3 duplicate grid cell(s)" in err
    assert len(ResultsStore(tmp_path).runs()) == 1
    row = [line for line in out.splitlines() if "full" in line]
    assert len(row) == 1 and row[0].split()[3] == "1", "n = 1, not the same run counted twice"


def test_train_fraction_list_reaches_the_config_as_numbers(tmp_path, capsys):
    status, out, err = cli(["sweep", *TINY, "--strategy", "full", "--train-fraction", "0.5,1",
                            "--store", tmp_path], capsys)
    assert status == 0, err
    assert sorted(r["train_fraction"] for r in ResultsStore(tmp_path).runs()) == [0.5, 1.0]


# -- data: no silent conversion, bounded inputs ----------------------------------------------------

def _npz(path, *, images=None, labels=None, **extra):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 16, 16), dtype=np.uint8) if images is None \
            else images(split, n)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None] if labels is None else labels(split, n)
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def _huge_header_npz(path):
    """An npz whose train_images header declares 100 GB (the data behind it is a few bytes)."""
    import io
    import zipfile

    import numpy as np

    _npz(path)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                              "shape": (10**6, 100_000)})
    src = zipfile.ZipFile(path)
    members = {name: src.read(name) for name in src.namelist()}
    src.close()
    members["train_images.npy"] = b"\x93NUMPY\x01\x00" + buf.getvalue()[8:] + b"\x00" * 16
    with zipfile.ZipFile(path, "w") as out:
        for name, data in members.items():
            out.writestr(name, data)
    return path


def _png(path, size=16, value=0):
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)


def _csv(root, rows: list[tuple[str, str]], *, header="path,label", encoding="utf-8", prefix=b""):
    for i, (name, _) in enumerate(rows):
        if not (root / name).exists():
            _png(root / name, value=i)
    text = header + "\n" + "".join(f"{p},{lab}\n" for p, lab in rows)
    (root / "labels.csv").write_bytes(prefix + text.encode(encoding))
    return root / "labels.csv"


def _undecodable_dicom(path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG2000Lossless
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([b"\xff\x4f not a JPEG 2000 stream"])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)


def _classes(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"img_{c}_{i}.png", c) for c, n in counts.items() for i in range(n)]


def _data_case(case: str, root):
    import numpy as np

    if case == "npz_float_0_255":
        return _npz(root / "f.npz", images=lambda s, n: np.full((n, 16, 16), 200.0, np.float32)), \
            ["f.npz", "float pixels range from 200 to 200", "x / 255.0"]
    if case == "npz_float_labels":
        return _npz(root / "f.npz", labels=lambda s, n: (np.arange(n) % 2 + 0.7)[:, None]), \
            ["f.npz", "non-integer values (e.g. 0.7", "integers"]
    if case == "npz_one_class":
        return _npz(root / "f.npz", labels=lambda s, n: np.zeros((n, 1), np.int64)), ["f.npz", "one class"]
    if case == "npz_label_gap":
        return _npz(root / "f.npz", labels=lambda s, n: (np.arange(n) % 2 * 2)[:, None]), \
            ["f.npz", "class(es) 1 have no image", "renumber"]
    if case == "npz_object_dtype":
        path = root / "f.npz"
        _npz(path)
        arrays = dict(np.load(path))
        arrays["train_labels"] = np.array([["a"]] * 12, dtype=object)
        np.savez(path, **arrays)
        return path, ["f.npz", "train_labels holds Python objects"]
    if case == "npz_header_100gb":
        return _huge_header_npz(root / "f.npz"), ["f.npz", "declare 100", "more than this machine's memory"]
    if case == "csv_empty_class_name":
        rows = _classes({"a": 8, "b": 8})
        rows[3] = (rows[3][0], "a|")
        return _csv(root, rows), ["labels.csv, line 5", "empty class name"]
    if case == "csv_one_class":
        return _csv(root, _classes({"a": 8})), ["labels.csv", "only one class"]
    if case == "csv_two_per_class":
        return _csv(root, _classes({"a": 8, "b": 2})), ["labels.csv", "b (2)", "at least 3"]
    if case == "csv_three_per_class":  # 6 images: one test image for two classes (scikit-learn refuses)
        return _csv(root, _classes({"a": 3, "b": 3})), ["labels.csv", "cannot be split", "add images"]
    if case == "csv_latin1":
        rows = _classes({"a": 8, "b": 8})
        rows[0] = (rows[0][0], "caf\xe9")
        return _csv(root, rows, encoding="latin-1"), ["labels.csv", "not UTF-8", "iconv"]
    if case == "csv_field_over_limit":
        rows = _classes({"a": 8, "b": 8})
        path = _csv(root, rows)
        path.write_text(path.read_text() + '"' + "x" * 200_000 + '",a\n')
        return path, ["labels.csv, line", "field larger than field limit"]
    if case == "dicom_undecodable":  # compressed pixel data no installed handler decodes: a multi-line library error
        for c in "ab":
            for i in range(8):
                _png(root / "d" / c / f"{i}.png", value=i + (c == "b") * 10)
        _undecodable_dicom(root / "d" / "b" / "bad.dcm")
        return root / "d", ["bad.dcm", "cannot decode the DICOM pixel data"]
    if case == "image_bomb":
        rows = _classes({"a": 8, "b": 8})
        _png(root / rows[0][0], size=64)
        return _csv(root, rows), ["img_a_0.png", "64x64 px, over the limit of 1,000 pixels"]
    raise AssertionError(case)


DATA_CASES = ["npz_float_0_255", "npz_float_labels", "npz_one_class", "npz_label_gap", "npz_object_dtype",
              "npz_header_100gb", "csv_empty_class_name", "csv_one_class", "csv_two_per_class", "csv_three_per_class", "csv_latin1",
              "csv_field_over_limit", "dicom_undecodable", "image_bomb"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_one_line_naming_the_file(case, store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDTUNE_MAX_IMAGE_PIXELS", "1000")
    data, needles = _data_case(case, tmp_path)
    flags = [a for a in TINY if a != "synthetic"]
    flags[flags.index("--data") + 1:flags.index("--data") + 1] = [str(data)]
    status, _, err = cli(["run", *flags, "--store", store], capsys)
    assert_one_line_error(status, err, *needles)
    assert_store_kept(store)


def test_csv_with_a_byte_order_mark_loads(tmp_path):
    from medtune.data import load_data

    path = _csv(tmp_path, _classes({"a": 8, "b": 8}), prefix=b"\xef\xbb\xbf")
    data = load_data(str(path), img_size=16)
    assert data.class_names == ["a", "b"] and len(data) == 16


def test_data_check_lists_an_image_bomb_and_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDTUNE_MAX_IMAGE_PIXELS", "1000")
    data, _ = _data_case("image_bomb", tmp_path)
    status, out, err = cli(["data", "check", data, "--img-size", "16"], capsys)
    assert status == 1 and "Traceback" not in err
    assert "unreadable files: 1" in out and "img_a_0.png: image is 64x64 px" in out
    assert out.rstrip().endswith("PROBLEMS FOUND")
    assert "leakage): 0" in out


def test_data_check_of_clean_data_exits_0(tmp_path, capsys):
    path = _csv(tmp_path, _classes({"a": 8, "b": 8}))
    status, out, _ = cli(["data", "check", path, "--img-size", "16"], capsys)
    assert status == 0 and out.rstrip().endswith("OK")


# -- store state a user (or a crash) left behind ---------------------------------------------------

ATTACK = ["--source", "train", "--zeta", "0.08", "--num-source-images", "8", "--max-passes", "1", "--num-random", "1",
          "--device", "cpu"]


def test_attack_on_corrupt_stored_weights_is_one_line(store, capsys):
    [record] = ResultsStore(store).runs()
    with open(record["artifacts"]["weights"], "r+b") as fh:
        fh.truncate(100)
    status, _, err = cli(["attack", record["run_id"], "--store", store, *ATTACK], capsys)
    assert_one_line_error(status, err, "best.safetensors", record["run_id"], "unreadable")
    assert_store_kept(store)


def test_a_deleted_uap_file_is_audited_again(store, capsys):
    import os

    [record] = ResultsStore(store).runs()
    assert cli(["attack", "all", "--store", store, *ATTACK], capsys)[0] == 0
    [attack] = ResultsStore(store).attacks()
    os.remove(attack["perturbation_file"])
    status, _, err = cli(["attack", "all", "--store", store, *ATTACK], capsys)
    assert status == 0 and "lacks 1 UAP file(s)" in err and "Traceback" not in err
    [again] = ResultsStore(store).attacks()
    assert os.path.isfile(again["perturbation_file"]) and again["fooling_rate"] == attack["fooling_rate"]


def test_artifacts_folder_of_a_run_being_a_file_is_one_line_and_the_run_released(store, capsys):
    import sqlite3

    # train the linear run once to learn its id, then forget it and put a file where its artifacts go
    assert cli(["run", *TINY, "--strategy", "linear", "--store", store], capsys)[0] == 0
    rows = ResultsStore(store).runs(status=None)
    linear = [r for r in rows if r["config"]["strategy"] == "linear"][0]["run_id"]
    with sqlite3.connect(store / "medtune.sqlite") as conn:
        conn.execute("DELETE FROM runs WHERE run_id=?", (linear,))
    shutil.rmtree(store / "artifacts" / linear)
    (store / "artifacts" / linear).write_text("in the way")
    status, _, err = cli(["run", *TINY, "--strategy", "linear", "--store", store], capsys)
    assert_one_line_error(status, err, f"artifacts/{linear}", "move the file")
    statuses = {r["run_id"]: r["status"] for r in ResultsStore(store).runs(status=None)}
    assert statuses[linear] == "pending", "released, not left running"
    assert list(statuses.values()).count("done") == 1


def test_a_sweep_says_which_runs_another_process_is_training(tmp_path, capsys):
    import os
    import socket
    import sqlite3

    from medtune.store import _process_start

    assert cli(["sweep", *TINY, "--strategy", "full", "--seeds", "0,1", "--store", tmp_path], capsys)[0] == 0
    rows = ResultsStore(tmp_path).runs(status=None)
    parent = os.getppid()
    with sqlite3.connect(tmp_path / "medtune.sqlite") as conn:  # the full run: claimed by a live process
        conn.execute("UPDATE runs SET status='running', record=NULL, owner=? WHERE run_id=?",
                     (f"{socket.gethostname()}:{parent}@{_process_start(parent)}", rows[1]["run_id"]))
    status, _, err = cli(["sweep", *TINY, "--strategy", "full", "--seeds", "0,1", "--store", tmp_path], capsys)
    assert status == 0
    assert "1 runs already in the store, 1 being trained by another process, 0 to train" in err
