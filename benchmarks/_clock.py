"""The clock and threads of the CPU benchmarks (``--threads``, ``--clock wall|cpu``), one home for the scripts.

``--clock cpu`` times by this process's CPU seconds (``time.process_time``), and points medtune's loop
timer there too, so ``fit``'s own epoch seconds use the same clock: robust to other jobs on shared
cores (use it with ``--threads 1``, where no thread spins waiting for a descheduled one).
"""

from __future__ import annotations

import argparse
import time
import types
from collections.abc import Callable

import torch


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"))


def setup(args: argparse.Namespace) -> Callable[[], float]:
    """Apply ``--threads`` and return the clock of ``--clock``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        from medtune.training import loop

        loop.time = types.SimpleNamespace(perf_counter=time.process_time)  # fit's epoch timer (a benchmark)
        return time.process_time
    return time.perf_counter
