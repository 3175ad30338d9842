"""The UAP audit on images in the decode cache (DiskImages): the in-memory results exactly, without
reading a whole split at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.data import diskcache
from medtune.data.diskcache import DiskImages
from medtune.robustness import (
    audit,
    budget_xi,
    compute_targeted_uaps,
    compute_uap,
    evaluate_perturbation,
    mixed_source,
    rgb_to_grey,
)

MAX_ROWS = 256  # more rows than this in one read fails the test; each split below is larger


@pytest.fixture(scope="module")
def splits(helpers, tmp_path_factory) -> dict:
    """A 300-image train and a 280-image test split of the colour task, in memory and as views of one
    decode-cache file (as ``ImageSet.split`` gives them)."""
    train_x, train_y = helpers.make_colour_task(300, seed=5)
    test_x, test_y = helpers.make_colour_task(280, seed=6)
    path = tmp_path_factory.mktemp("cache") / "images.npy"
    np.save(path, torch.cat([train_x, test_x]).numpy())
    shape, offset = diskcache._read_header(path)
    disk = DiskImages(path, offset, shape)
    return {"train_x": train_x, "test_x": test_x, "test_y": test_y,
            "train_disk": disk.view(np.arange(300)), "test_disk": disk.view(np.arange(300, 580))}


def _same(a, b) -> None:
    assert len(a.records) == len(b.records)
    for ra, rb in zip(a.records, b.records, strict=True):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    assert a.perturbations.keys() == b.perturbations.keys()
    for key in a.perturbations:
        assert torch.equal(a.perturbations[key], b.perturbations[key])
        assert torch.equal(a.random_perturbations[key], b.random_perturbations[key])


@pytest.mark.parametrize("channels, sources", [("auto", ("train", "natural", "mixed")), ("grey", ("mixed",))])
def test_audit_on_disk_equals_the_audit_in_memory(colour_task, splits, bounded_reads, channels, sources):
    kw = dict(test_labels=splits["test_y"], zetas=(0.04,), sources=sources, channels=channels, num_source_images=40,
              chunk_size=16, max_passes=1, num_random=2, batch_size=32, seed=3)
    mem = audit(colour_task["model"], test_images=splits["test_x"], train_images=splits["train_x"], **kw)
    assert not bounded_reads  # the in-memory audit reads nothing from disk
    disk = audit(colour_task["model"], test_images=splits["test_disk"], train_images=splits["train_disk"], **kw)
    _same(mem, disk)
    assert mem.records[0]["num_chunks"] == 3 and mem.records[0]["num_test_images"] == 280  # streamed source, all tests
    assert bounded_reads and max(bounded_reads) <= MAX_ROWS


def test_budget_and_evaluation_on_disk_equal_memory(colour_task, splits, bounded_reads):
    assert budget_xi(splits["train_disk"], 0.04) == budget_xi(splits["train_x"], 0.04)
    v = torch.full((3, 16, 16), 0.03)
    assert (evaluate_perturbation(colour_task["model"], splits["test_disk"], splits["test_y"], v, batch_size=64)
            == evaluate_perturbation(colour_task["model"], splits["test_x"], splits["test_y"], v, batch_size=64))
    mixed = mixed_source(splits["train_disk"], splits["test_x"][:50], 0.25, seed=1, num_images=60)
    assert torch.equal(mixed, mixed_source(splits["train_x"], splits["test_x"][:50], 0.25, seed=1, num_images=60))
    assert max(bounded_reads) <= MAX_ROWS


@pytest.mark.parametrize("algorithm", ["batched", "reference"])
def test_compute_uap_on_disk_equals_memory_and_reads_in_batches(colour_task, splits, bounded_reads, algorithm):
    kw = dict(zeta=0.04, norm=2, max_passes=2, batch_size=32, seed=4, algorithm=algorithm)
    mem = compute_uap(colour_task["model"], splits["train_x"], **kw)
    disk = compute_uap(colour_task["model"], splits["train_disk"], **kw)
    assert torch.equal(mem.perturbation, disk.perturbation) and torch.equal(mem.last_perturbation, disk.last_perturbation)
    assert mem.fooling_rate_source == disk.fooling_rate_source and mem.xi == disk.xi
    assert disk.num_source_images == 300 and max(bounded_reads) <= MAX_ROWS


def test_compute_targeted_uaps_on_disk_equal_memory(colour_task, splits, bounded_reads):
    kw = dict(classes=[1], zeta=0.04, norm="inf", max_passes=1, batch_size=64, seed=2)
    mem = compute_targeted_uaps(colour_task["model"], splits["train_x"], **kw)
    disk = compute_targeted_uaps(colour_task["model"], splits["train_disk"], **kw)
    assert torch.equal(mem[1].perturbation, disk[1].perturbation) and max(bounded_reads) <= MAX_ROWS


def test_an_empty_disk_split_is_one_clear_error(colour_task, splits):
    from medtune.errors import DataError

    with pytest.raises(DataError, match="'test_images' must hold at least one image"):
        audit(colour_task["model"], test_images=splits["test_disk"].view(np.arange(0)), test_labels=splits["test_y"][:0],
              train_images=splits["train_disk"])


def test_the_read_bound_catches_a_whole_split(splits, bounded_reads):
    with pytest.raises(AssertionError, match="read 300 rows at once"):
        splits["train_disk"][:]


def test_rgb_to_grey_leaves_every_grey_pixel_as_it_is():
    """The audit makes a mixed source grey after drawing it, which relies on this."""
    grey = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, -1, -1).contiguous()
    assert torch.equal(rgb_to_grey(grey), grey)


def test_medtune_attack_on_a_disk_run_equals_the_audit_in_memory(tmp_path, bounded_reads, write_toy_npz):
    """The driver end to end: a run trained with data_cache: disk on a .npz whose splits are larger than
    MAX_ROWS is audited from its decode cache; its records and UAPs equal audit() on the same model
    with the splits in memory."""
    import medtune
    from medtune.data import load_data
    from medtune.robustness.config import AuditConfig
    from medtune.store import ResultsStore
    from safetensors.torch import load_file

    write_toy_npz(tmp_path / "toy_16.npz", (300, 30, 270), num_classes=3, shape=(16, 16, 3), step=60)
    store = tmp_path / "store"
    record = medtune.run({"data": str(tmp_path / "toy_16.npz"), "arch": "medtune_tiny_cnn", "weights": "none",
                          "strategy": "full", "epochs": 1, "img_size": 16, "batch_size": 32, "lr": 0.01,
                          "device": "cpu", "num_threads": 1, "progress": False, "data_cache": "disk",
                          "eval_batch_size": 64, "store": str(store)}, store=ResultsStore(store))
    quick = {"sources": ("train", "natural"), "zetas": (0.04,), "num_source_images": 16, "max_passes": 1,
             "num_random": 2}
    attacks = medtune.attack([record["run_id"]], store=store, device="cpu", **quick)
    assert bounded_reads and max(bounded_reads) <= MAX_ROWS
    data = load_data(str(tmp_path / "toy_16.npz"), img_size=16, data_cache="memory")
    train, test = data.split("train"), data.split("test")
    mem = audit(medtune.load_model(record["run_id"], store=store), test_images=test.images, test_labels=test.labels,
                train_images=train.images, class_names=data.class_names, device="cpu",
                **AuditConfig(**quick).semantic_dict())
    assert len(attacks) == len(mem.records) == 2
    skip = {"seconds", "seed"}  # a stored attack's "seed" is its run's seed (the driver's run keys)
    for stored, rec in zip(attacks, mem.records, strict=True):
        assert {k: stored[k] for k in rec if k not in skip} == {k: v for k, v in rec.items() if k not in skip}
        files = load_file(stored["perturbation_file"])
        assert torch.equal(files["v"], mem.perturbations[rec["perturbation_key"]])
        assert torch.equal(files["random"], mem.random_perturbations[rec["perturbation_key"]])


def test_lp_norms_do_not_depend_on_the_batch():
    """lp_norms caps its batch by memory (64 MiB of float64); each image's norm is the same in any batch."""
    from medtune.robustness._common import lp_norms

    images = torch.randint(0, 256, (70, 3, 24, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for norm in ("2", "inf"):
        whole = lp_norms(images, norm)
        assert all(torch.equal(whole, lp_norms(images, norm, batch_size=b)) for b in (1, 7, 64))
