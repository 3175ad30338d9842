"""How exposed: a natural-image fooling rate is stated with the number of images it came from."""

from __future__ import annotations

from medtune.reporting.plots import plot_source_curve
from medtune.reporting.report import exposure_phrase
from medtune.reporting.stats import fooling_at


def _attack(source: str, *, rate: float, num: int | None, photos: str | None, curve=None) -> dict:
    return {"attack_id": f"a-{source}", "run_id": "r1", "source": source, "zeta": 0.04, "xi": 1.0, "norm": "2",
            "targeted": None, "fooling_rate": rate, "fooling_ci_low": rate - 0.05, "fooling_ci_high": rate + 0.05,
            "random_fooling_rate": 0.08, "num_source_images": num,
            "num_distinct_natural_images": num if photos else None, "num_photos": num if photos else None,
            "natural_photos": photos, "source_curve": curve or [[num or 1, rate]]}


RUNS = [{"run_id": "r1", "label": "full", "dataset": "demo", "arch": "resnet18"}]


def test_bundled_photos_read_not_measured_at_the_papers_scale():
    fool = fooling_at([_attack("natural", rate=0.09, num=16, photos="builtin"),
                       _attack("train", rate=0.3, num=240, photos=None)], RUNS, "full", 0.04)
    assert fool["natural"]["num_images"] == 16 and fool["natural"]["builtin_photos"]
    text = exposure_phrase("natural", fool["natural"])
    assert text.startswith("from natural images not measured at the papers' scale (9% from 16 natural images")
    assert "Minagi et al. needed ≥ 10,000 for a rate well above random" in text
    assert exposure_phrase("train", fool["train"]) == "from train images 30% (from 240 train images)"


def test_a_large_folder_is_at_the_papers_scale_and_old_records_say_unrecorded():
    fool = fooling_at([_attack("natural", rate=0.7, num=50_000, photos="/data/val")], RUNS, "full", 0.04)
    assert exposure_phrase("natural", fool["natural"]).startswith("from natural images 70% (from 50,000 natural images;")
    old = _attack("natural", rate=0.09, num=None, photos=None)
    fool = fooling_at([old], RUNS, "full", 0.04)
    assert "not measured at the papers' scale (9% from an unrecorded number of images" in exposure_phrase(
        "natural", fool["natural"])


def test_source_curve_is_plotted():
    curve = [[1000, 0.06], [10_000, 0.18], [50_000, 0.69]]
    assert plot_source_curve([_attack("natural", rate=0.69, num=50_000, photos="/data", curve=curve)], RUNS) is not None
    assert plot_source_curve([], RUNS) is None
