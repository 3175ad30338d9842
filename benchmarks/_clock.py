"""The clock and threads of the CPU benchmarks (``--threads``, ``--clock wall|cpu``), one home for the scripts.

``--clock cpu`` times by this process's CPU seconds (``time.process_time``), and points medtune's loop,
feature-cache and linear-probe timers there too, so ``fit``'s own charged seconds use the same clock: robust to other jobs on shared
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
        from medtune.strategies import depth, probing
        from medtune.training import cache, loop

        cpu = types.SimpleNamespace(perf_counter=time.process_time)
        for module in (loop, cache, probing, depth):  # fit's epoch timer, the prefix pass's, the probe's (a benchmark)
            module.time = cpu
        return time.process_time
    return time.perf_counter
