"""End to end through the public API and the CLI on synthetic data and the tiny CNN."""

from __future__ import annotations

import json

import pytest

import medtune
from medtune.cli import main
from medtune.store import ResultsStore

BASE = {"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 2, "img_size": 16,
        "batch_size": 16, "lr": 0.01, "device": "cpu", "num_threads": 1}


def test_sweep_runs_the_grid_once_and_skips_done_runs(tmp_path):
    store = ResultsStore(tmp_path)
    cfg = {**BASE, "strategy": ["linear", "top_k:all"], "seeds": [0, 1]}
    records = medtune.sweep(cfg, store=store)
    labels = sorted({r["label"] for r in records})
    # top_k:all is k = 1 … S: k = 0 is linear and k = S + 1 is full, which run on their own
    assert labels == ["linear", "top_k:1", "top_k:2", "top_k:3"]
    assert len(records) == 8 and len({r["run_id"] for r in records}) == 8
    again = medtune.sweep(cfg, store=store)
    assert [r["run_id"] for r in again] == [r["run_id"] for r in records]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]
    r = records[0]
    for key in ("config", "versions", "data_fingerprint", "history", "metrics", "val_metrics", "trainable_params",
                "total_params", "train_seconds", "images_per_s", "predictions", "val_predictions"):
        assert key in r, key
    # the exact validation probabilities (for paired tests on validation) reproduce the validation AUC
    from sklearn.metrics import roc_auc_score
    import numpy as np

    vp = r["val_predictions"]
    y, p = np.asarray(vp["y_true"]), np.asarray(vp["y_prob"])
    assert roc_auc_score(y, p[:, 1] if p.shape[1] == 2 else p, multi_class="ovr") == pytest.approx(r["val_metrics"]["auc"], abs=1e-12)
    with np.load(r["artifacts"]["predictions"], allow_pickle=False) as z:
        np.testing.assert_array_equal(z["val_y_prob"], p.astype(z["val_y_prob"].dtype))
    assert (tmp_path / "artifacts" / r["run_id"] / "best.safetensors").exists()
    by_label = {x["label"]: x["trainable_params"] for x in records}
    assert by_label["linear"] < by_label["top_k:1"] < by_label["top_k:2"] < by_label["top_k:3"]


def test_same_config_same_result_on_cpu(tmp_path):
    a = medtune.run({**BASE, "strategy": "full"}, store=ResultsStore(tmp_path / "a"))
    b = medtune.run({**BASE, "strategy": "full"}, store=ResultsStore(tmp_path / "b"))
    assert a["run_id"] == b["run_id"] and a["metrics"] == b["metrics"]


def test_cli_results_json_is_one_parseable_record_per_run(two_run_store, capsys):
    store = two_run_store
    capsys.readouterr()
    assert main(["results", "--store", str(store), "--format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["strategy"] for r in lines} == {"linear", "full"}
    assert all({"run_id", "config", "metrics", "strategy"} <= set(r) for r in lines)


@pytest.mark.parametrize("argv,match", [
    (["sweep", "--data", "synthetic", "--arch", "resnet5"], "Unknown arch 'resnet5'"),
    (["sweep", "--data", "synthetic", "--arch", "medtune_tiny_cnn", "--strategy", "top_k:9"], "top_k k=9 is out of range"),
    (["sweep", "--data", "synthetic", "--strategy", "lpft"], "Did you mean 'lp_ft'"),
    (["run", "--data", "/nonexistent/folder"], "nonexistent"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, match, capsys, tmp_path):
    assert main(argv + ["--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("medtune: error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err)
    import re

    assert re.search(match, errors[0])


def test_config_key_typo_in_yaml(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: [full]\nepohcs: 3\n")
    assert main(["sweep", str(cfg), "--store", str(tmp_path)]) == 2
    assert "unknown config key 'epohcs'. Did you mean 'epochs'" in capsys.readouterr().err


def test_attack_and_report_on_a_stored_run(tmp_path):
    store = ResultsStore(tmp_path)
    rec = medtune.run({**BASE, "strategy": "full", "epochs": 3}, store=store)
    attacks = medtune.attack([rec["run_id"][:8]], store=store, sources=("train", "natural"), zetas=(0.08,),
                             num_source_images=32, max_passes=3, device="cpu")
    assert {a["source"] for a in attacks} == {"train", "natural"}
    for a in attacks:
        assert a["xi"] > 0 and 0 <= a["fooling_rate"] <= 1
        from safetensors.torch import load_file

        v = load_file(a["perturbation_file"])["v"]
        assert float(v.flatten().norm()) <= a["xi"] + 1e-6
    # stored, and not recomputed
    assert len(store.attacks(rec["run_id"])) == 2
    again = medtune.attack([rec["run_id"]], store=store, sources=("train", "natural"), zetas=(0.08,),
                           num_source_images=32, max_passes=3, device="cpu")
    assert [a["attack_id"] for a in again] == [a["attack_id"] for a in attacks]
    out = medtune.report(str(tmp_path), out_path=str(tmp_path / "r.html"))
    html = open(out).read()
    assert "<img" in html and "full" in html


def test_presets_are_plain_yaml_sweeps_that_expand(capsys):
    from medtune.presets import get_preset, list_presets
    from medtune.sweeps import load_sweep_config

    assert list_presets() == ["davila2024", "dutt2024", "kandel2020", "medmnist_plus", "medmnist_v2", "tajbakhsh2016"]
    dutt = load_sweep_config(get_preset("dutt2024"))
    assert {"bitfit", "norm", "lora", "knn", "linear", "full"} <= {s.name for s in dutt.strategy}
    assert dutt.train_per_class == (5, 20, 100, 0) and dutt.lr == (1e-4, 1e-3, 1e-2)
    davila = load_sweep_config(get_preset("davila2024"))
    assert {str(s) for s in davila.strategy} == {"full", "linear", "gradual_lf", "gradual_fl", "lp_ft", "l1_sp", "l2_sp", "auto_rgn"}
    assert davila.arch == ("resnet50", "densenet121", "vgg19")
    # each strategy at its own best learning rate: a log-scale grid, chosen on validation
    assert davila.lr == (1e-4, 1e-3, 1e-2)
    kandel = load_sweep_config(get_preset("kandel2020"))
    assert kandel.lr == (3e-5, 1e-4, 3e-4) and kandel.arch == ("vgg16", "vgg19", "inception_v3")
    assert load_sweep_config(get_preset("tajbakhsh2016")).train_fraction == (0.1, 0.25, 0.5, 1.0)
    assert main(["preset", "show", "kandel2020"]) == 0
    assert "top_k:all" in capsys.readouterr().out
    assert main(["preset", "show", "kandel"]) == 2
    assert "Did you mean 'kandel2020'" in capsys.readouterr().err


def test_deft_mask_strategy_trains_exactly_the_masked_blocks(tiny_cfg, synthetic_data):
    import torch

    from medtune.models import get_blocks
    from medtune.strategies import create_strategy
    from medtune.training.loop import fit
    from tests.conftest import make_tiny

    model = make_tiny()
    blocks = get_blocks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, synthetic_data, create_strategy("deft:1010"), tiny_cfg, blocks=blocks)
    for idx, block in enumerate(blocks):
        changed = any(not torch.equal(p, before[f"backbone.{n}"]) for n, p in zip(block.param_names, blocks.parameters(idx)))
        assert changed == (idx in (0, 2, blocks.head_idx)), block.name
    with pytest.raises(medtune.ConfigError, match="has 3 bits but this model has 4 non-head blocks"):
        create_strategy("deft:101").set_trainable(blocks)



@pytest.fixture(scope="module")
def two_run_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("results") / "s"
    assert main(["sweep", "--data", "synthetic", "--arch", "medtune_tiny_cnn", "--weights", "none", "--strategy",
                 "linear,full", "--epochs", "1", "--img-size", "16", "--device", "cpu", "--store", str(store)]) == 0
    return store


def test_cli_results_output_file_and_parquet_without_an_engine(two_run_store, tmp_path, capsys, monkeypatch):
    import sys

    store = two_run_store
    capsys.readouterr()
    for per_run in ([], ["--runs"]):
        assert main(["results", "--store", str(store), "--format", "csv", *per_run]) == 0
        printed = capsys.readouterr().out
        assert main(["results", "--store", str(store), "--format", "csv", "-o", str(tmp_path / "r.csv"), *per_run]) == 0
        assert (tmp_path / "r.csv").read_text() == printed and len(printed.splitlines()) == 3
    assert main(["results", "--store", str(store), "--format", "parquet"]) == 2
    assert "give it with -o FILE.parquet" in capsys.readouterr().err
    with monkeypatch.context() as m:  # no parquet engine installed: one line naming the extra
        m.setitem(sys.modules, "pyarrow", None)
        m.setitem(sys.modules, "fastparquet", None)
        assert main(["results", "--store", str(store), "--format", "parquet", "-o", str(tmp_path / "r.parquet")]) == 2
        err = capsys.readouterr().err
        assert "needs pyarrow: pip install -e '.[parquet]'" in err and len(err.strip().splitlines()) == 1


def test_cli_results_parquet_holds_the_csv_rows(two_run_store, tmp_path):
    import pandas as pd

    pytest.importorskip("pyarrow")
    for per_run in ([], ["--runs"]):
        assert main(["results", "--store", str(two_run_store), "--format", "csv", "-o", str(tmp_path / "r.csv"),
                     *per_run]) == 0
        assert main(["results", "--store", str(two_run_store), "--format", "parquet", "-o",
                     str(tmp_path / "r.parquet"), *per_run]) == 0
        table = pd.read_parquet(tmp_path / "r.parquet")
        pd.testing.assert_frame_equal(table, pd.read_csv(tmp_path / "r.csv"), check_dtype=False)
        assert len(table) == 2 and set(table["strategy"]) == {"linear", "full"}
