"""Data beyond memory: the decode cache's decode time, reuse, and the peak RSS of a run on it.

Generates (once; reused through ``--dir``) a folder of ``--num-images`` varied 2-class PNGs at
``--src-size`` px, then, each step in its own child process (peak RSS from ``os.wait4``):

1. decode into a fresh decode cache with 1 worker process, then with 2 (``load_data``,
   ``data_cache: disk``): wall time each; the decoded size N · 3 · S².
2. load again from the 2-worker cache in a new process: wall time and the number of images
   decoded (goal: 0).
3. a one-epoch ``linear`` run of ``medtune_tiny_cnn`` at ``--img-size`` through the CLI on that
   cache, feature cache on (the default): wall time and peak RSS (goal: below a quarter of the
   decoded size; ``--data-cache disk``, which ``auto`` is above 1 GiB); the same with
   ``--feature-cache off`` (its own results store, the same decode cache through a symlink, so
   both runs decode nothing). ``--eval-batch-size`` sets the runs' (activations grow with it).
4. with ``--audit``: ``medtune attack`` of the feature-cache run (a copy of its store; sources
   ``train,mixed``, ζ = 0.04, 2 passes, 3 random controls), which reads the run's splits from the
   decode cache: peak RSS against the decoded size. ``--audit-src DIR`` runs it with another
   checkout's ``src`` (e.g. one before the audit streamed) for a before/after.

Every step also reports its sampled peak anonymous RSS (``/proc/PID/status`` RssAnon: heap and
tensors, without the mapped library files), and a first row gives what a process importing
medtune holds before any data.

    python benchmarks/bench_data_scale.py [--num-images 30000] [--dir /tmp/medtune-data-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

_LOAD = """
import json, sys, time
from medtune.data import _decode, load_data
calls = []
real = _decode.decode_image
_decode.decode_image = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
t0 = time.perf_counter()
data = load_data(sys.argv[1], img_size=int(sys.argv[2]), data_cache="disk", cache_dir=sys.argv[3],
                 decode_workers=int(sys.argv[4]))
print(json.dumps({"seconds": time.perf_counter() - t0, "decoded_in_process": len(calls), "n": len(data),
                  "kind": type(data.images).__name__}))
"""


def _image(rng: np.random.Generator, cls: int, side: int) -> np.ndarray:
    """A smooth random field with a class-dependent bright disc: varied, cheap to encode."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = np.kron(small, np.ones((side // 8 + 1, side // 8 + 1, 1), dtype=np.uint8))[:side, :side].copy()
    yy, xx = np.mgrid[:side, :side]
    cy, cx, r = rng.integers(side // 4, 3 * side // 4, 2).tolist() + [side // (6 if cls else 10)]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 230
    return img


def _generate_one(args: tuple[str, int, int, int]) -> None:
    from PIL import Image

    root, i, cls, side = args
    rng = np.random.default_rng(i)
    Image.fromarray(_image(rng, cls, side)).save(Path(root) / "ab"[cls] / f"{i:06d}.png", compress_level=1)


def generate(root: Path, num: int, side: int) -> None:
    marker = root / ".generated.json"
    want = {"num_images": num, "src_size": side}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return
    shutil.rmtree(root, ignore_errors=True)
    for c in "ab":
        (root / c).mkdir(parents=True)
    import multiprocessing as mp

    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_generate_one, [(str(root), i, i % 2, side) for i in range(num)], chunksize=256)
    marker.write_text(json.dumps(want))
    print(f"generated {num} images of {side} px in {time.perf_counter() - t0:.0f} s under {root}", flush=True)


def _sample_anon(pid: int, peak: list[int], stop: threading.Event) -> None:
    """The child's largest RssAnon (heap, tensors; not the mapped libraries and files) every 20 ms."""
    while not stop.wait(0.02):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]))


def child(cmd: list[str], env: dict) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS GiB, sampled peak anonymous RSS GiB, stdout) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_sample_anon, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    out = proc.stdout.read()
    stop.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} … failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, peak[0] / 2**20, out  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/medtune-data-scale", help="where the images and stores live")
    ap.add_argument("--num-images", type=int, default=30_000)
    ap.add_argument("--src-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--eval-batch-size", type=int, default=256, help="of the runs (medtune's default: 256)")
    ap.add_argument("--audit", action="store_true", help="also measure `medtune attack` on the run (step 4)")
    ap.add_argument("--audit-src", default=None, help="the src folder medtune attack runs from (default: this one)")
    args = ap.parse_args()
    base = Path(args.dir)
    images = base / f"images-{args.num_images}-{args.src_size}"
    generate(images, args.num_images, args.src_size)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    decoded_gib = args.num_images * 3 * args.img_size ** 2 / 2**30
    rows = {}
    wall, rss, anon, _ = child([sys.executable, "-c", "import medtune, medtune.cli, timm"], env)
    rows["baseline: python importing medtune"] = (wall, rss, anon, "what every run holds before any data")
    for workers in (1, 2):
        store = base / f"store-w{workers}"
        shutil.rmtree(store, ignore_errors=True)
        wall, rss, anon, out = child([sys.executable, "-c", _LOAD, str(images), str(args.img_size), str(store),
                                      str(workers)], env)
        info = json.loads(out.strip().splitlines()[-1])
        rows[f"decode, {workers} worker(s)"] = (info["seconds"], rss, anon, f"{info['kind']}")
    wall, rss, anon, out = child([sys.executable, "-c", _LOAD, str(images), str(args.img_size), str(base / "store-w2"),
                            "1"], env)
    info = json.loads(out.strip().splitlines()[-1])
    rows["second load (same cache, new process)"] = (info["seconds"], rss, anon,
                                                     f"{info['decoded_in_process']} images decoded")
    for fc in ("auto", "off"):
        store = base / f"store-run-{fc}"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        (store / "data-cache").symlink_to((base / "store-w2" / "data-cache").resolve())
        cmd = [sys.executable, "-m", "medtune.cli", "run", "--data", str(images), "--arch", "medtune_tiny_cnn",
               "--weights", "none", "--strategy", "linear", "--epochs", "1", "--img-size", str(args.img_size),
               "--feature-cache", fc, "--data-cache", "disk", "--store", str(store), "--device", "cpu",
               "--format", "json", "--eval-batch-size", str(args.eval_batch_size)]
        wall, rss, anon, _ = child(cmd, env)
        fresh = sorted(p.name for p in (store / "data-cache").iterdir())
        rows[f"linear run, feature cache {fc}"] = (wall, rss, anon, f"peak RSS {rss / decoded_gib:.2f} × the decoded "
                                                                    f"size; decode-cache folders: {len(fresh)}")
    if args.audit:
        store = base / "store-audit"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(base / "store-run-auto", store, symlinks=True)  # the run, not yet audited; its decode cache
        src = Path(args.audit_src).resolve() if args.audit_src else Path(__file__).resolve().parents[1] / "src"
        cmd = [sys.executable, "-m", "medtune.cli", "attack", "all", "--store", str(store), "--sources", "train,mixed",
               "--zetas", "0.04", "--max-passes", "2", "--num-random", "3", "--device", "cpu", "--format", "json"]
        wall, rss, anon, out = child(cmd, {**env, "PYTHONPATH": str(src)})
        fooling = [round(json.loads(line)["fooling_rate"], 4) for line in out.splitlines() if line.startswith("{")]
        rows[f"UAP audit (train, mixed; ζ=0.04), src {src}"] = (
            wall, rss, anon, f"peak RSS {rss / decoded_gib:.2f} × the decoded size; fooling rates {fooling}")
    print(f"\n{args.num_images} images, {args.src_size} px → {args.img_size} px: decoded size {decoded_gib:.2f} GiB; "
          f"goal: run peak RSS < {decoded_gib / 4:.2f} GiB")
    print(f"| step | seconds | peak RSS GiB | peak anonymous RSS GiB (sampled) | note |\n|---|---|---|---|---|")
    for name, (sec, rss, anon, note) in rows.items():
        print(f"| {name} | {sec:.1f} | {rss:.2f} | {anon:.2f} | {note} |")


if __name__ == "__main__":
    main()
