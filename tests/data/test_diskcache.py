"""The decode cache on disk (data_cache: disk): same data as in memory, decoded once, bounded reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import medtune
from medtune.data import diskcache, load_data
from medtune.data.diskcache import DiskImages


@pytest.fixture(scope="module")
def folder(tmp_path_factory, write_image_folder) -> Path:
    """Two classes of 24 varied PNGs, 40x30 px (so the 16 px resize is real work)."""
    return write_image_folder(tmp_path_factory.mktemp("imgs") / "set", 24, shape=(30, 40, 3))


def _count_decodes(monkeypatch) -> list[str]:
    from medtune.data import _decode

    calls: list[str] = []
    real = _decode.decode_image

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_decode, "decode_image", counting)
    return calls


def test_disk_path_gives_the_memory_paths_images_labels_splits_and_fingerprint(folder, tmp_path):
    mem = load_data(str(folder), img_size=16, data_cache="memory")
    disk = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    assert isinstance(disk.images, DiskImages) and isinstance(mem.images, torch.Tensor)
    assert torch.equal(disk.images[:], mem.images) and disk.images.shape == mem.images.shape
    assert torch.equal(disk.labels, mem.labels) and (disk.splits == mem.splits).all() and disk.ids == mem.ids
    assert disk.fingerprint() == mem.fingerprint()  # from the cache's meta
    disk._fingerprint = None
    assert disk.fingerprint() == mem.fingerprint()  # streamed from the file
    for split in ("train", "val", "test"):  # the views hash (and read) the same as the copies
        assert disk.split(split).fingerprint() == mem.split(split).fingerprint()
    idx = torch.tensor([5, 0, 7, 6, 1, 1])  # unsorted, repeated: read in file order, returned in this order
    assert torch.equal(disk.images[idx], mem.images[idx])
    assert torch.equal(disk.images[3], mem.images[3]) and torch.equal(disk.images[-2:], mem.images[-2:])


def test_a_second_load_decodes_nothing_and_the_cache_is_one_folder(folder, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    first = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    assert len(calls) == 48
    calls.clear()
    second = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    assert calls == [] and second.fingerprint() == first.fingerprint()
    assert [p.name for p in (tmp_path / "data-cache").iterdir()] == [first.images.path.parent.name]
    load_data(str(folder), img_size=24, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    assert len(calls) == 48  # another size is another cache
    os.utime(next((folder / "a").iterdir()), ns=(1, 1))  # a changed file (mtime) is another cache
    calls.clear()
    load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    assert len(calls) == 48


def test_two_decoding_processes_write_the_same_array_as_one(folder, tmp_path):
    one = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path / "one", decode_workers=1)
    two = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path / "two", decode_workers=2)
    a, b = (x.images.path.read_bytes() for x in (one, two))
    assert a == b and two.fingerprint() == one.fingerprint()


def test_subset_is_an_index_view_and_reads_only_its_batch(folder, tmp_path):
    data = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)
    train = data.split("train")
    assert isinstance(train.images, DiskImages) and train.images.path == data.images.path
    assert np.array_equal(train.images.index, data.indices("train"))
    inner = train.subset(np.array([2, 0]))
    assert np.array_equal(inner.images.index, data.indices("train")[[2, 0]])
    assert torch.equal(inner.images[:], data.images[data.indices("train")[[2, 0]]])
    assert isinstance(train.images[torch.arange(4)], torch.Tensor) and train.images[torch.arange(4)].shape == (4, 3,
                                                                                                               16, 16)


@pytest.mark.parametrize("damage", ["truncate", "meta"])
def test_a_damaged_cache_is_decoded_again(folder, tmp_path, monkeypatch, damage):
    first = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    cache = first.images.path.parent
    if damage == "truncate":
        with open(cache / "images.npy", "r+b") as fh:
            fh.truncate(cache.joinpath("images.npy").stat().st_size - 100)
    else:
        (cache / "meta.json").write_text("{not json")
    calls = _count_decodes(monkeypatch)
    with pytest.warns(UserWarning, match="damaged decode cache"):
        again = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    assert len(calls) == 48 and again.fingerprint() == first.fingerprint()
    assert json.loads((cache / "meta.json").read_text())["fingerprint"] == first.fingerprint()


def test_a_killed_decode_leaves_no_cache(folder, tmp_path, monkeypatch):
    from medtune.data import _decode

    def broken(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_decode, "decode_image", broken)
    with pytest.raises(KeyboardInterrupt):
        load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    assert list((tmp_path / "data-cache").iterdir()) == []


def test_an_unwritable_cache_folder_is_one_line_with_the_fix(folder, tmp_path):
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store folder should be")
    with pytest.raises(medtune.errors.DataError, match="cannot write the decode cache.*--data-cache memory"):
        load_data(str(folder), img_size=16, data_cache="disk", cache_dir=blocker)


def test_auto_decodes_to_disk_only_above_the_threshold(folder, tmp_path, monkeypatch):
    assert isinstance(load_data(str(folder), img_size=16, cache_dir=tmp_path).images, torch.Tensor)
    monkeypatch.setattr(diskcache, "DISK_THRESHOLD_BYTES", 48 * 3 * 16 * 16 - 1)
    assert isinstance(load_data(str(folder), img_size=16, cache_dir=tmp_path).images, DiskImages)
    assert isinstance(load_data(str(folder), img_size=16).images, torch.Tensor)  # no cache folder: memory


def test_a_run_on_disk_equals_the_run_in_memory(folder, tmp_path):
    base = {"data": str(folder), "arch": "medtune_tiny_cnn", "weights": "none", "epochs": 2, "img_size": 16,
            "batch_size": 8, "lr": 1e-2, "device": "cpu", "progress": False, "eval_batch_size": 16}
    runs = {}
    for cache in ("memory", "disk"):
        for strategy, fc in (("full", "off"), ("linear", "auto")):
            runs[cache, strategy] = medtune.run({**base, "strategy": strategy, "feature_cache": fc,
                                                 "data_cache": cache, "store": str(tmp_path / cache)})
    assert (tmp_path / "disk" / "data-cache").is_dir() and not (tmp_path / "memory" / "data-cache").exists()
    for strategy in ("full", "linear"):
        mem, disk = runs["memory", strategy], runs["disk", strategy]
        assert disk["run_id"] == mem["run_id"]  # data_cache is not part of what a run computes
        assert _untimed(disk["metrics"]) == _untimed(mem["metrics"])
        np.testing.assert_array_equal([h["train_loss"] for h in disk["history"]],  # bit-identical training
                                      [h["train_loss"] for h in mem["history"]])
        # the validation loss can differ in the last float bit between two runs in one process, whatever the data
        # path (memory vs memory shows it too): equal to float32 precision
        for h_disk, h_mem in zip(disk["history"], mem["history"], strict=True):
            a, b = _untimed(h_disk), _untimed(h_mem)
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == (pytest.approx(b[k], rel=1e-6, nan_ok=True) if isinstance(b[k], float) else b[k])


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(t in k for t in ("second", "per_s", "time")) and k != "phase"}


def test_read_ahead_serves_the_announced_batches_and_falls_back_on_another_order(folder, tmp_path):
    data = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)
    mem = data.images[:]
    images = data.images.view(np.arange(len(data)))
    batches = list(torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).split(5))
    images.prefetch(batches)
    for idx in batches[:3]:
        assert torch.equal(images[idx], mem[idx])
    assert images._ahead is not None and len(images._ahead.pending) == 2  # two batches read ahead
    assert torch.equal(images[batches[5]], mem[batches[5]])  # out of order: a direct read, read-ahead stops
    assert images._ahead is None
    assert torch.equal(images[batches[3]], mem[batches[3]])


def test_a_concurrent_decode_of_the_same_data_uses_the_first_finished_cache(folder, tmp_path, monkeypatch):
    real, calls = diskcache._decode_all, []

    def racing(*args, **kwargs):  # another process finishes the same cache while this one decodes
        calls.append(1)
        if len(calls) == 1:
            load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(diskcache, "_decode_all", racing)
    data = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path, decode_workers=1)
    assert len(calls) == 2 and [p.name for p in (tmp_path / "data-cache").iterdir()] == [data.images.path.parent.name]
    assert data.fingerprint() == load_data(str(folder), img_size=16, data_cache="memory").fingerprint()


def test_the_audit_reads_disk_backed_images(folder, tmp_path):
    from medtune.robustness._common import check_images

    data = load_data(str(folder), img_size=16, data_cache="disk", cache_dir=tmp_path)
    assert torch.equal(check_images(data.split("test").images), data.images[data.indices("test")])


def test_an_npz_on_disk_equals_it_in_memory_and_loads_again_without_resizing(tmp_path, monkeypatch):
    from medtune.data import sources

    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 20), ("val", 8), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 20, 20), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3)[:, None]
    np.savez(tmp_path / "toy_28.npz", **arrays)
    mem = load_data(str(tmp_path / "toy_28.npz"), img_size=16, data_cache="memory")
    disk = load_data(str(tmp_path / "toy_28.npz"), img_size=16, data_cache="disk", cache_dir=tmp_path / "store")
    assert isinstance(disk.images, DiskImages) and torch.equal(disk.images[:], mem.images)
    assert torch.equal(disk.labels, mem.labels) and (disk.splits == mem.splits).all() and disk.ids == mem.ids
    assert disk.fingerprint() == mem.fingerprint() and disk.class_names == mem.class_names
    calls = []
    real = sources.resize_image
    monkeypatch.setattr(sources, "resize_image", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    again = load_data(str(tmp_path / "toy_28.npz"), img_size=16, data_cache="disk", cache_dir=tmp_path / "store")
    assert calls == [] and again.fingerprint() == mem.fingerprint() and torch.equal(again.labels, mem.labels)
