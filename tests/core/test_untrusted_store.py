"""A results store is untrusted input (issue 26): a crafted store (links, absolute and ``..`` run ids, foreign
image paths, FIFOs) makes no command read or write outside it; no output path destroys the store; a full
disk is one line with every claim released; the decode cache verifies itself; folder walks never block."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from medtune.cli import main
from medtune.store import ResultsStore

TINY = ["--data", "synthetic", "--arch", "medtune_tiny_cnn", "--weights", "none", "--epochs", "1", "--img-size", "16",
        "--batch-size", "16", "--device", "cpu", "--progress", "false"]
ATTACK = ["--source", "train", "--zeta", "0.08", "--num-source-images", "8", "--max-passes", "1", "--num-random", "1",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded") / "store"
    assert main(["run", *TINY, "--store", str(root)]) == 0
    return root


@pytest.fixture
def store(seeded_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(seeded_store, root, symlinks=True)
    return root


def cli(argv, capsys):
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_line(status, err, *needles, code=2):
    assert status == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("medtune: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks forever)."""
    def boom(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every file and folder under ``folder`` (links not followed) with its type, size, mtime and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if any(here == s or s in here.parents for s in skip):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if p in skip:
                continue
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


# -- a crafted store -------------------------------------------------------------------------------

def _craft(store: Path, outside: Path) -> str:
    """Links to ``outside``, run ids that are paths, and records naming files outside the store."""
    from PIL import Image

    [record] = ResultsStore(store).runs()
    run_id = record["run_id"]
    outside.mkdir()
    (outside / "victim.json").write_text('{"mine": 1}')
    (outside / "victim_report.html").write_text("<p>mine</p>")
    (outside / "uapdir").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "foreign.png")
    run_dir = store / "artifacts" / run_id
    os.symlink(outside / "victim.json", run_dir / "config.json")  # export writes config.json
    os.symlink(outside / "victim_report.html", store / "report.html")
    os.symlink(outside / "uapdir", run_dir / "uap")  # attack writes into uap/
    os.symlink(outside / "victim.json", run_dir / "model.safetensors")
    # explain.json of another run folder whose gallery is a file outside, plus a FIFO explain.json
    (store / "artifacts" / "0123456789abcdef" / "explain").mkdir(parents=True)
    (store / "artifacts" / "0123456789abcdef" / "explain" / "explain.json").write_text(json.dumps(
        {"run_id": "0123456789abcdef", "gallery_png": str(outside / "foreign.png"), "scores": {}}))
    (store / "artifacts" / "fedcba9876543210" / "explain").mkdir(parents=True)
    os.mkfifo(store / "artifacts" / "fedcba9876543210" / "explain" / "explain.json")
    conn = sqlite3.connect(store / "medtune.sqlite")
    text, config = conn.execute("SELECT record, config FROM runs WHERE run_id=?", (run_id,)).fetchone()
    for bad in (str(outside / "abs-run"), "../../dotdot-run"):
        forged = {**json.loads(text), "run_id": bad}
        conn.execute("INSERT INTO runs (run_id, status, config, record, created, updated) VALUES (?, 'done', ?, ?, "
                     "'t', 't')", (bad, config, json.dumps(forged)))
    attack = {"attack_id": "a1", "run_id": run_id, "source": "train", "zeta": 0.08, "uap_png": str(outside / "foreign.png"),
              "perturbation_file": "../../" + str(outside / "victim.json"), "fooling_rate": 0.5}
    conn.execute("INSERT INTO attacks VALUES ('a1', ?, ?, 't')", (run_id, json.dumps(attack)))
    conn.commit()
    conn.close()
    return run_id


def test_a_crafted_store_is_never_written_or_read_outside(store, tmp_path, capsys):
    """Every command that reads a store, on a store with links out of it, run ids that are paths and records
    naming foreign files: the files outside the store are the same before and after each command."""
    outside = tmp_path / "outside"
    run_id = _craft(store, outside)
    exports = tmp_path / "exports"
    exports.mkdir()
    commands = [
        ["results", "--store", store],
        ["results", "--store", store, "--runs", "--format", "json"],
        ["results", "--store", store, "--export", "tensorboard", exports / "tb"],
        ["report", store],
        ["export", run_id, "--store", store],
        ["export", run_id, "--store", store, "--format", "onnx"],
        ["attack", "all", "--store", store, *ATTACK],
        ["predict", run_id, "synthetic", "--store", store, "-o", exports / "p.csv"],
    ]
    import importlib.util

    if importlib.util.find_spec("captum") is not None:  # explain needs captum
        commands.append(["explain", run_id, "--store", store, "--max-overlays", "1"])
    before = snapshot(tmp_path, skip=(store, exports))
    for argv in commands:
        with deadline(240), warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            status, _, err = cli(argv, capsys)
        assert "Traceback" not in err, (argv, err)
        assert status in (0, 2), (argv, err)
        assert snapshot(tmp_path, skip=(store, exports)) == before, f"{argv[0]} changed files outside the store"
    assert (outside / "victim.json").read_text() == '{"mine": 1}'
    assert (outside / "victim_report.html").read_text() == "<p>mine</p>"
    assert not list((outside / "uapdir").iterdir())
    assert not (store.parent.parent / "dotdot-run").exists() and not (outside / "abs-run").exists()
    # the links the commands met were replaced by medtune's own files, inside the store
    assert (store / "report.html").is_file() and not (store / "report.html").is_symlink()
    assert not (store / "artifacts" / run_id / "config.json").is_symlink()
    html = (store / "report.html").read_text()
    assert hashlib.sha256((outside / "foreign.png").read_bytes()).hexdigest() not in html


def test_path_run_ids_are_skipped_with_one_warning_naming_the_record(store, tmp_path):
    _craft(store, tmp_path / "outside")
    with pytest.warns(UserWarning) as seen:
        runs = ResultsStore(store).runs()
    assert len(runs) == 1
    text = " ".join(str(w.message) for w in seen)
    assert "../../dotdot-run" in text and "abs-run" in text
    [attack] = ResultsStore(store).attacks()
    assert "uap_png" not in attack and "perturbation_file" not in attack  # foreign files dropped


def test_run_dir_refuses_a_non_run_id_and_a_link_out(store, tmp_path):
    from medtune.errors import StoreError

    db = ResultsStore(store)
    for bad in ("../x", "/tmp/x", "abc", "0123456789ABCDEF"):
        with pytest.raises(StoreError, match="run id"):
            db.run_dir(bad)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", store / "artifacts" / "00000000000000aa")
    with pytest.raises(StoreError, match="outside the results store"):
        db.run_dir("00000000000000aa", "uap")
    assert not list((tmp_path / "elsewhere").iterdir())


def test_report_skips_an_image_over_the_pixel_limit(store, monkeypatch, capsys):
    from PIL import Image

    import medtune._safepaths as sp

    [record] = ResultsStore(store).runs()
    big = store / "artifacts" / record["run_id"] / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big)
    conn = sqlite3.connect(store / "medtune.sqlite")
    attack = {"attack_id": "a1", "run_id": record["run_id"], "source": "train", "zeta": 0.08,
              "uap_png": f"artifacts/{record['run_id']}/big.png", "fooling_rate": 0.5}
    conn.execute("INSERT INTO attacks VALUES ('a1', ?, ?, 't')", (record["run_id"], json.dumps(attack)))
    conn.commit()
    monkeypatch.setattr(sp, "MAX_EMBED_PIXELS", 1000)  # 64 x 64 = 4096 px: over it
    with pytest.warns(UserWarning, match="attack record a1: image .*big.png not shown .*above the report's limit"):
        status, _, err = cli(["report", store], capsys)
    assert status == 0, err


# -- output paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["results", "--store", "{s}", "-o", "{s}/medtune.sqlite"],
    ["results", "--store", "{s}", "--format", "csv", "-o", "{s}/medtune.sqlite-wal"],
    ["report", "{s}", "-o", "{s}/medtune.sqlite"],
    ["report", "{s}", "-o", "{s}/checkpoints/r.html"],
    ["predict", "{r}", "synthetic", "--store", "{s}", "-o", "{s}/medtune.sqlite"],
    ["export", "{r}", "--store", "{s}", "-o", "{s}/checkpoints"],
    ["export", "{r}", "--store", "{s}", "-o", "{s}"],
    ["results", "--store", "{s}", "--export", "tensorboard", "{s}/artifacts"],
], ids=lambda a: "_".join(x.strip("-{}/") for x in a[:1] + a[-2:]))
def test_no_output_path_destroys_the_store(argv, store, capsys):
    [record] = ResultsStore(store).runs()

    def dump() -> list[str]:  # the database's content (its bytes move when SQLite checkpoints its WAL)
        conn = sqlite3.connect(store / "medtune.sqlite")
        try:
            return list(conn.iterdump())
        finally:
            conn.close()

    database = dump()
    argv = [a.format(s=store, r=record["run_id"]) for a in argv]
    status, _, err = cli(argv, capsys)
    one_line(status, err, "results store", "destroy")
    assert dump() == database
    assert [r["run_id"] for r in ResultsStore(store).runs()] == [record["run_id"]]


def test_an_existing_output_file_is_named_as_replaced(store, tmp_path, capsys):
    out = tmp_path / "runs.csv"
    out.write_text("old\n")
    status, _, err = cli(["results", "--store", store, "--format", "csv", "-o", out], capsys)
    assert status == 0 and f"replaced {out} (4 bytes)" in err
    assert out.read_text().startswith("strategy") or "," in out.read_text()


def test_output_into_a_missing_folder_is_refused_before_any_work(store, tmp_path, capsys, monkeypatch):
    import medtune

    monkeypatch.setattr(medtune, "predict", lambda *a, **k: pytest.fail("predicted before checking -o"))
    [record] = ResultsStore(store).runs()
    status, _, err = cli(["predict", record["run_id"], "synthetic", "--store", store, "-o", tmp_path / "no" / "p.csv"],
                         capsys)
    one_line(status, err, "does not exist")


# -- a full disk -------------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_releases_every_claim_and_resumes(tmp_path, capsys, monkeypatch):
    """SQLITE_FULL simulated (no tmpfs can be mounted in a test): the record write of the first finished run
    fails as SQLite's "database or disk is full"; the sweep stops with one line and no run is left running;
    the same command on a disk with room finishes every run, and an earlier stored run is kept as it was."""
    import medtune.store as store_module

    root = tmp_path / "store"
    assert main(["run", *TINY, "--strategy", "linear", "--store", str(root)]) == 0
    [earlier] = ResultsStore(root).runs()
    real = store_module.dumps

    def full(obj):
        if isinstance(obj, dict) and "metrics" in obj:
            raise sqlite3.OperationalError("database or disk is full")
        return real(obj)

    monkeypatch.setattr(store_module, "dumps", full)
    sweep = ["sweep", *TINY, "--strategy", "linear,full", "--store", root]
    status, _, err = cli(sweep, capsys)
    one_line(status, err, "disk is full", "run the same command again")
    assert {r["status"] for r in ResultsStore(root).runs(status=None)} <= {"done", "pending"}
    monkeypatch.setattr(store_module, "dumps", real)
    status, _, err = cli(sweep, capsys)
    assert status == 0, err
    runs = ResultsStore(root).runs()
    assert len(runs) == 2 and {r["status"] for r in ResultsStore(root).runs(status=None)} == {"done"}
    assert [r for r in runs if r["run_id"] == earlier["run_id"]][0]["metrics"] == earlier["metrics"]


def test_a_read_only_database_is_one_line(tmp_path):
    from medtune.errors import StoreError
    from medtune.store import _disk_error, _is_disk_error

    exc = sqlite3.OperationalError("attempt to write a readonly database")
    assert _is_disk_error(exc) and "read-only" in str(_disk_error(tmp_path, exc))
    assert isinstance(_disk_error(tmp_path, exc), StoreError)


def test_an_unwritable_tracker_folder_never_stops_a_sweep(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    root = tmp_path / "store"
    root.mkdir()
    (root / "tensorboard").write_text("a file where the tracker's folder goes")
    status, _, err = cli(["sweep", *TINY, "--strategy", "linear,full", "--tracker", "tensorboard", "--store", root],
                         capsys)
    assert status == 0, err
    assert err.count("tracker logs are not written") == 1
    assert len(ResultsStore(root).runs()) == 2


def test_results_export_into_a_file_is_one_line(store, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    (tmp_path / "f").write_text("x")
    status, _, err = cli(["results", "--store", store, "--export", "tensorboard", tmp_path / "f"], capsys)
    one_line(status, err, "is a file")


# -- export of torchvision runs ------------------------------------------------------------------

def test_timm_export_of_a_torchvision_run_is_refused_before_any_file(store, capsys):
    conn = sqlite3.connect(store / "medtune.sqlite")
    [(run_id, text)] = conn.execute("SELECT run_id, record FROM runs").fetchall()
    conn.execute("UPDATE runs SET record=? WHERE run_id=?", (json.dumps({**json.loads(text), "arch": "tv:alexnet"}),
                                                            run_id))
    conn.commit()
    before = sorted(os.listdir(store / "artifacts" / run_id))
    status, _, err = cli(["export", run_id, "--store", store], capsys)
    one_line(status, err, "tv:alexnet", "--format onnx")
    assert sorted(os.listdir(store / "artifacts" / run_id)) == before


@pytest.mark.parametrize("in_hw, out_hw", [((1, 1), (6, 6)), ((5, 7), (3, 2)), ((13, 13), (6, 6)), ((4, 4), (2, 2))])
def test_fixed_adaptive_pool_equals_torch(in_hw, out_hw):
    from medtune.exporters import _FixedAdaptiveAvgPool

    x = torch.randn(2, 3, *in_hw)
    assert torch.allclose(_FixedAdaptiveAvgPool(in_hw, out_hw)(x), torch.nn.AdaptiveAvgPool2d(out_hw)(x), atol=1e-6)


def test_onnx_export_of_a_pool_onnx_refuses_matches_torch(tmp_path):
    """AlexNet's 6x6 adaptive pool on a 1x1 map (a 64 px input): torch's ONNX exporter refuses it as is."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from medtune.exporters import _onnx_ready

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=8), torch.nn.AdaptiveAvgPool2d(6),
                                torch.nn.Flatten(), torch.nn.Linear(144, 2)).eval()
    probe = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(probe).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_onnx_ready(model, probe), (probe,), str(tmp_path / "m.onnx"), dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0] - reference).max() < 1e-5


# -- the decode cache and FIFOs ------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory, write_image_folder) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imgs") / "set", 12)


def test_a_same_size_corruption_of_the_decode_cache_is_decoded_again(folder, tmp_path):
    from medtune.data import load_data

    memory = load_data(str(folder), img_size=16)
    first = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)
    npy = first.images.path
    with open(npy, "r+b") as fh:  # same size, other pixels
        fh.seek(-50, os.SEEK_END)
        fh.write(b"\xff" * 50)
    with pytest.warns(UserWarning, match="does not match the checksum"):
        again = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)
    assert again.fingerprint() == memory.fingerprint() == first.fingerprint()
    assert torch.equal(again.images[:], memory.images)


def test_an_unchanged_cache_is_not_hashed_again(folder, tmp_path, monkeypatch):
    from medtune.data import diskcache, load_data

    load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)
    monkeypatch.setattr(diskcache, "_checksum", lambda path: pytest.fail("hashed an unchanged cache"))
    load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)


@pytest.mark.parametrize("name", ["images.npy", "meta.json"])
def test_a_fifo_in_the_decode_cache_never_blocks(folder, tmp_path, name):
    from medtune.data import load_data

    first = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)
    target = first.images.path.parent / name
    target.unlink()
    os.mkfifo(target)
    with deadline(60), pytest.warns(UserWarning, match="damaged decode cache"):
        again = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)
    assert again.fingerprint() == first.fingerprint()


def test_folder_walk_skips_fifos_and_counts_unreadable_entries(folder, tmp_path, monkeypatch):
    from medtune._safepaths import walk_files
    from medtune.data import load_data

    data = tmp_path / "set"
    shutil.copytree(folder, data)
    os.mkfifo(data / "a" / "pipe.png")
    os.symlink(tmp_path / "missing.png", data / "b" / "broken.png")
    with deadline(60), pytest.warns(UserWarning, match="skipped 1 unreadable entry"):
        loaded = load_data(str(data), img_size=16)
    assert len(loaded) == 24
    assert walk_files("/proc") == ([], 0), "a special filesystem is never walked"


def test_natural_folder_on_a_special_filesystem_is_one_line():
    from medtune.errors import DataError
    from medtune.robustness.sources import _photo_list

    with pytest.raises(DataError, match="holds no image file"):
        _photo_list("/proc")


# -- explain's ground truth -----------------------------------------------------------------------

def _bbox_csv(tmp_path: Path, boxes: list[str], bom: bool = False) -> Path:
    from PIL import Image

    rows = ["path,label,bbox"]
    for i, box in enumerate(boxes):
        Image.fromarray(np.full((20, 40, 3), 30 * (i % 2), np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]}" + (f",{box}" if box is not None else ""))
    path = tmp_path / "d.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(rows) + "\n").encode())
    return path


def test_explain_reads_a_bom_csv_and_short_rows_as_training_does(tmp_path):
    from medtune.data import load_data
    from medtune.localisation import _csv_ground_truth

    path = _bbox_csv(tmp_path, ["8 4 16 12"] * 6 + [None] * 6, bom=True)
    data = load_data(str(path), img_size=16)
    boxes, _ = _csv_ground_truth(str(path), data, 16, "resize")
    assert np.isfinite(boxes).all(axis=1).sum() == 6


@pytest.mark.parametrize("box", ["0 0 1000 1000", "inf 0 4 4", "10 4 5 12", "nan 1 2 3", "1 2 3"])
def test_explain_refuses_a_bad_box_naming_its_line(tmp_path, box):
    from medtune.data import load_data
    from medtune.errors import DataError
    from medtune.localisation import _csv_ground_truth

    path = _bbox_csv(tmp_path, ["8 4 16 12"] * 11 + [box])
    data = load_data(str(path), img_size=16)
    with pytest.raises(DataError, match=r"d.csv, line 13: bbox"):
        _csv_ground_truth(str(path), data, 16, "resize")


# -- offline weights and presets ------------------------------------------------------------------

def test_offline_hub_weights_fail_at_once_after_one_attempt(monkeypatch):
    import socket

    from medtune.errors import ConfigError
    from medtune.models import _weights

    attempts = []

    def unreachable(*args, **kwargs):
        attempts.append(args)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(_weights, "_HUB_UNREACHABLE", [])
    monkeypatch.setattr(_weights, "_cached_weights", lambda arch: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for arch in ("resnet50", "densenet121", "resnet50"):
        with pytest.raises(ConfigError, match="efficientnet_lite0"):
            _weights.check_hub_reachable(arch)
    assert len(attempts) == 1


def test_a_preset_without_data_is_refused(tmp_path, capsys):
    status, _, err = cli(["sweep", "--preset", "davila2024", "--store", tmp_path / "s"], capsys)
    one_line(status, err, "--preset davila2024", "--data")
    assert not (tmp_path / "s").exists()


def test_a_checkpoints_link_out_of_the_store_is_one_line_and_releases_the_claim(tmp_path, capsys):
    root = tmp_path / "store"
    ResultsStore(root).close()
    (root / "checkpoints").rmdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "checkpoints")
    status, _, err = cli(["run", *TINY, "--store", root], capsys)
    one_line(status, err, "outside the results store")
    assert [r["status"] for r in ResultsStore(root).runs(status=None)] == ["pending"]
    assert not list((tmp_path / "elsewhere").iterdir())
