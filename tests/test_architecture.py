"""The house's layering holds: no module imports a higher layer, no import circles
(``python tools/code_metrics.py`` prints the same figures)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _metrics():
    spec = importlib.util.spec_from_file_location("code_metrics", ROOT / "tools" / "code_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_upward_imports_and_no_circles():
    figures = _metrics().measure(ROOT / "src" / "medtune", 60)
    assert figures["modules_without_a_layer"] == [], "place new top-level modules in the layer table"
    assert figures["upward_imports"] == []
    assert figures["circles"] == []


def test_the_metrics_see_an_upward_import_and_a_circle(tmp_path):
    pkg = tmp_path / "medtune"
    (pkg / "training").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "loop.py").write_text("from medtune.config import RunConfig\n")
    (pkg / "config.py").write_text("def f():\n    from medtune.training import loop\n")
    figures = _metrics().measure(pkg, 60)
    assert figures["upward_imports"] == ["medtune.training.loop -> medtune.config"]
    assert figures["circles"] == [["medtune.config", "medtune.training.loop"]]


def test_importing_the_demo_module_keeps_the_api_function():
    import medtune
    from medtune._demo import DEMO_SWEEP  # the module is private: importing it must not shadow medtune.demo

    assert DEMO_SWEEP["strategy"] and callable(medtune.demo) and medtune.demo.__module__ == "medtune"
