"""The demo's glue: which runs the audit stage attacks, and its stage names (the stages themselves are
the public API, tested on their own; the whole demo is the README's main job, timed in the closing note)."""

from __future__ import annotations

import pytest

from medtune._demo import DEMO_STAGES, _audited_runs, demo
from medtune.errors import ConfigError


def _record(label, seed, val_auc, test_auc, status="done"):
    return {"run_id": f"{label}-{seed}", "label": label, "seed": seed, "status": status,
            "val_metrics": {"auc": val_auc}, "metrics": {"auc": test_auc}}


def test_the_audit_takes_linear_full_and_the_top_k_best_on_validation_not_test():
    runs = [_record("linear", s, 0.80, 0.80) for s in (0, 1)]
    runs += [_record("top_k:1", s, 0.95, 0.70) for s in (0, 1)]  # best on validation, worst on test
    runs += [_record("top_k:2", s, 0.90, 0.99) for s in (0, 1)]  # best on test
    runs += [_record("full", s, 0.85, 0.85) for s in (0, 1)] + [_record("scratch", 0, 0.99, 0.99)]
    runs.append(_record("top_k:3", 0, 0.99, 0.99, status="failed"))
    runs.append(_record("deft:mask=0011,granularity=block", 1, 0.9, 0.9))
    chosen = _audited_runs(runs, "auc")
    assert [r["run_id"] for r in chosen] == ["linear-0", "top_k:1-0", "full-0", "deft:mask=0011,granularity=block-1"]


def test_an_unknown_stage_is_one_config_error(tmp_path):
    assert DEMO_STAGES == ("sweep", "search", "audit")
    with pytest.raises(ConfigError, match="Unknown demo stage 'attack'"):
        demo(store=str(tmp_path), stages=["attack"])
