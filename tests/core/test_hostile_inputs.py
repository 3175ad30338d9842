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
    "huge_value_in_error": ("patience: [" + ",".join(["12345"] * 20_000) + "]\n", ["'patience'", "chars)"]),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_bad_yaml_is_one_line_naming_the_file(case, store, tmp_path, capsys):
    text, needles = YAML_CASES[case]
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text.encode("latin-1") if case == "not_utf8" else text.encode())
    status, _, err = cli(["sweep", str(path), *TINY, "--store", store], capsys)
    assert_one_line_error(status, err, *needles)
    if case != "huge_value_in_error":
        assert "cfg.yaml" in err
    assert_store_kept(store)


def test_yaml_1e_minus_3_is_a_float(tmp_path):
    from medtune.config import RunConfig, load_config

    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 1e-3\nwarmup_epochs: 5e-1\n")
    cfg = load_config(RunConfig, path)
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float) and cfg.warmup_epochs == 0.5


def test_duplicate_grid_cells_are_removed_and_said(tmp_path, capsys):
    status, out, err = cli(["sweep", *TINY, "--strategy", "linear", "--seeds", "0,0", "--lr", "0.01,1e-2",
                            "--store", tmp_path], capsys)
    assert status == 0, err
    assert "removed 3 duplicate grid cell(s)" in err
    assert len(ResultsStore(tmp_path).runs()) == 1
    row = [line for line in out.splitlines() if "linear" in line]
    assert len(row) == 1 and row[0].split()[3] == "1", "n = 1, not the same run counted twice"


def test_train_fraction_list_reaches_the_config_as_numbers(tmp_path, capsys):
    status, out, err = cli(["sweep", *TINY, "--strategy", "linear", "--train-fraction", "0.5,1",
                            "--store", tmp_path], capsys)
    assert status == 0, err
    assert sorted(r["train_fraction"] for r in ResultsStore(tmp_path).runs()) == [0.5, 1.0]
