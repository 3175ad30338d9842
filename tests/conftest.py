"""Shared fixtures: a tiny registered CNN and a synthetic image set one epoch can learn."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def synthetic_data():
    from medtune.data import make_synthetic

    return make_synthetic(num_samples=64, img_size=16, num_classes=2, seed=0)


@pytest.fixture
def tiny_cfg(tmp_path):
    from medtune.config import RunConfig

    return RunConfig(data="synthetic", arch="medtune_tiny_cnn", weights="none", epochs=2, img_size=16, batch_size=16,
                     lr=1e-2, device="cpu", store=str(tmp_path / "store"), progress=False, eval_batch_size=64)


def make_tiny(num_classes: int = 2, seed: int = 0):
    from medtune.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model("medtune_tiny_cnn", num_classes=num_classes, weights="none")


@pytest.fixture
def tiny_model():
    return make_tiny()


@pytest.fixture()
def bounded_reads(request, monkeypatch) -> list[int]:
    """Reads from the decode cache (``DiskImages``) of more rows than the test module's ``MAX_ROWS``
    raise; returns the size of every read (a whole split read at once fails the test)."""
    from medtune.data.diskcache import DiskImages

    max_rows = request.module.MAX_ROWS
    sizes: list[int] = []
    real = DiskImages._read

    def bounded(self, rows):
        sizes.append(len(rows))
        if len(rows) > max_rows:
            raise AssertionError(f"read {len(rows)} rows at once (a whole split?)")
        return real(self, rows)

    monkeypatch.setattr(DiskImages, "_read", bounded)
    return sizes


@pytest.fixture()
def no_network(monkeypatch) -> None:
    """Refuse every connection off this machine (and tell huggingface_hub it is offline): a test that
    loads weights proves they come from a local file, not the hub, as in CI, which has no internet."""
    import socket

    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network access in a test: {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def write_toy_npz():
    """``write(path, sizes, num_classes=, shape=, step=)``: a MedMNIST-style ``.npz`` of learnable toy images
    (noise in [0, 120) plus ``step`` × class; ``sizes`` the train, val and test counts; ``shape`` (H, W) or
    (H, W, 3)), drawn from ``default_rng(0)``; returns ``path``."""
    import numpy as np

    def write(path, sizes, *, num_classes: int, shape: tuple[int, ...], step: int):
        rng = np.random.default_rng(0)
        arrays = {}
        for split, n in zip(("train", "val", "test"), sizes, strict=True):
            y = np.arange(n) % num_classes
            shift = (step * y).reshape(-1, *[1] * len(shape))
            arrays[f"{split}_images"] = (rng.integers(0, 120, (n, *shape)) + shift).astype(np.uint8)
            arrays[f"{split}_labels"] = y[:, None]
        np.savez(path, **arrays)
        return path

    return write


@pytest.fixture(scope="session")
def write_image_folder():
    """``write(root, per_class, shape=(H, W, 3), shifts=(0, 60), high=160)``: a folder per class (``a``, ``b``,
    …, one per shift) of ``per_class`` PNGs of noise in [0, ``high``) plus the class's shift, drawn from
    ``default_rng(0)``; returns ``root``."""
    import numpy as np
    from PIL import Image

    def write(root, per_class: int, *, shape: tuple[int, ...] = (20, 20, 3), shifts=(0, 60), high: int = 160):
        rng = np.random.default_rng(0)
        for c, shift in zip("abcdefgh", shifts):
            (root / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, high, shape, dtype=np.uint8).astype(np.int64) + shift
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / c / f"{i:02d}.png")
        return root

    return write


@pytest.fixture(scope="session")
def write_medmnist():
    """``write(root, name, sizes=(60, 20, 40), seed=0, size=28)``: ``ROOT/NAME[_SIZE].npz`` as the medmnist
    package writes it (the real key names, uint8 images (N, H, W[, 3]), uint8 labels (N, 1), or (N, 14) for
    ChestMNIST), the label drawn into the pixels so a tiny CNN learns it; for pneumoniamnist, dermamnist,
    chestmnist and retinamnist. Returns the path."""
    import numpy as np

    layout = {"pneumoniamnist": ((28, 28), 1, 2), "dermamnist": ((28, 28, 3), 1, 7),
              "chestmnist": ((28, 28), 14, 2), "retinamnist": ((28, 28, 3), 1, 5)}

    def write(root, name: str, sizes=(60, 20, 40), *, seed: int = 0, size: int = 28):
        shape, width, k = layout[name]
        shape = (size, size, *shape[2:])
        rng = np.random.default_rng(seed)
        arrays = {}
        for split, n in zip(("train", "val", "test"), sizes, strict=True):
            if width == 1:
                y = (np.arange(n) % k).reshape(n, 1)
            else:
                y = rng.integers(0, 2, (n, width))
                y[0], y[1] = 0, 1  # every label present and absent
            level = y[:, :1] if width == 1 else y[:, :1] * (k - 1)
            x = rng.integers(0, 90, (n, *shape)) + (level * (160 // (k - 1))).reshape(-1, *[1] * len(shape))
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = x.astype(np.uint8), y.astype(np.uint8)
        path = root / (f"{name}.npz" if size == 28 else f"{name}_{size}.npz")
        np.savez_compressed(path, **arrays)
        return path

    return write


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped (with the reason) where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu/run_gpu_checks.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
