"""Progress of long steps: a tqdm bar on a terminal (captured through a pseudo-terminal), one line per
step when stderr is not a terminal, nothing when quiet -- for decoding, a UAP audit and DEFT."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import sys
import termios
import threading

import numpy as np
import pytest
import torch

from medtune import progress
from medtune.progress import progress_bar


class _PtyStderr:
    """sys.stderr replaced by the slave end of a pseudo-terminal (isatty() is True); a thread drains
    the master end so tqdm never blocks on a full buffer."""

    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
        self.stream = os.fdopen(slave, "w", buffering=1, encoding="utf-8")
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        self.stream.flush()
        self.stream.close()
        self.thread.join(timeout=10)
        os.close(self.master)
        return b"".join(self.chunks).decode("utf-8", "replace")


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setenv("MEDTUNE_PROGRESS_DELAY", "0")
    monkeypatch.delenv("MEDTUNE_PROGRESS", raising=False)
    progress.quiet(False)
    tty = _PtyStderr()
    assert tty.stream.isatty()
    yield tty


def _attach(terminal, monkeypatch) -> None:
    """sys.stderr := the terminal, in the test's body (pytest's capture replaces sys.stderr after fixtures)."""
    monkeypatch.setattr(sys, "stderr", terminal.stream)


def _bars(text: str, desc: str) -> list[str]:
    """The distinct bar states tqdm drew for ``desc`` (carriage returns separate redraws)."""
    return [s.strip() for s in re.split(r"[\r\n]", text) if s.strip().startswith(desc)]


def test_decode_draws_a_bar_on_a_terminal(terminal, monkeypatch, tmp_path, write_image_folder):
    _attach(terminal, monkeypatch)
    from medtune.data import load_data

    images = write_image_folder(tmp_path / "imgs", 6, shape=(20, 24, 3), shifts=(0, 0), high=255)
    load_data(str(images), img_size=16, data_cache="memory", val_fraction=0.25,
              test_fraction=0.25)
    bars = _bars(terminal.text(), "decode")
    print("\n".join(bars))  # the captured bars (pytest -s shows them)
    assert bars and re.search(r"decode: 100%\|.*\| 12/12 ", bars[-1]), bars


def test_uap_audit_draws_its_passes_and_uaps(terminal, monkeypatch):
    _attach(terminal, monkeypatch)
    from medtune.robustness import audit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    x = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    audit(model, train_images=x, test_images=x[:12], test_labels=torch.arange(12) % 3, zetas=(0.04, 0.08),
          norm="inf", sources=("train",), num_source_images=24, max_passes=3, goal_rate=1.0, batch_size=8,
          num_random=1)
    text = terminal.text()
    passes, uaps = _bars(text, "UAP ζ="), _bars(text, "audit")
    print("\n".join(passes + uaps))
    assert any(re.search(r"UAP ζ=0\.04: 100%\|.*\| 3/3 .*fooling \d\.\d{3}", b) for b in passes), passes
    assert any(re.search(r"UAP ζ=0\.08: .*fooling", b) for b in passes), passes
    assert re.search(r"audit: 100%\|.*\| 2/2 .*train ζ=0\.08 fooling \d\.\d{3}", uaps[-1]), uaps


def test_deft_draws_one_step_per_generation(terminal, monkeypatch):
    _attach(terminal, monkeypatch)
    from medtune.deft import DEFTSearch, Evaluation

    def evaluator(mask):
        return Evaluation(fitness=sum(mask) / len(mask), trainable_params=10 + 100 * sum(mask), seconds=0.0)

    DEFTSearch(num_units=4, evaluator=evaluator, unit_params=[100] * 4, head_params=10, total_params=410,
               popsize=5, generations=3, seed=0).fit()
    bars = _bars(terminal.text(), "DEFT")
    print("\n".join(bars))
    assert re.search(r"DEFT: 100%\|.*\| 4/4 .*best 1\.0000, \d+ trained", bars[-1]), bars


def test_a_run_draws_its_epochs_on_a_terminal(terminal, monkeypatch, tmp_path):
    _attach(terminal, monkeypatch)
    import medtune

    record = medtune.run({"data": "synthetic", "arch": "medtune_tiny_cnn", "weights": "none", "img_size": 16,
                          "epochs": 3, "batch_size": 16, "device": "cpu", "strategy": "full",
                          "store": str(tmp_path / "s")})
    bars = _bars(terminal.text(), record["run_id"][:8])
    print("\n".join(bars))
    assert bars and re.search(r"full: 3epoch .*val auc \d\.\d{4}", bars[-1]), bars


def test_not_a_terminal_one_line_per_step_and_quiet_is_silent(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDTUNE_PROGRESS_DELAY", "0")
    progress.quiet(False)
    with progress_bar(3, "audit", unit="UAP") as bar:
        for i in range(3):
            bar.set_postfix_str(f"fooling 0.{i}00")
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r" \[\d+s\]$", "", line) for line in lines] == [
        "audit: 1/3 UAP (33%) fooling 0.000", "audit: 2/3 UAP (67%) fooling 0.100", "audit: 3/3 UAP (100%) fooling 0.200"]
    with progress_bar(1000, "decode", unit="img") as bar:  # a step per image is not a line per image
        for _ in range(1000):
            bar.update()
    assert len(capsys.readouterr().err.splitlines()) == 21  # the first, one per 5%, the last
    with progress.scope(False):  # a run's progress: false
        progress_bar(3, "x").update()
    progress.quiet()  # medtune --quiet
    try:
        with progress.scope(True):  # a run cannot turn --quiet back on
            progress_bar(3, "x").update()
    finally:
        progress.quiet(False)
    monkeypatch.setenv("MEDTUNE_PROGRESS", "0")
    progress_bar(3, "x").update()
    assert capsys.readouterr().err == ""
