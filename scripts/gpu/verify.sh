#!/usr/bin/env bash
# Verify xctl's NVML probe and a real agent on this machine's NVIDIA GPU(s).
#
#   scripts/gpu/verify.sh [WHEEL_DIR]
#
# Runs `pytest -m gpu tests/gpu` (tests/gpu/test_nvml_real.py): every GPU sampled with its
# identity, the probe's cost per pass and RSS, a CUDA workload (a PyTorch matmul loop where
# torch is installed) in `xctl ps` with its pid and utilisation, a deliberately faulting
# kernel → XID 13/31/43 on its pid, counted once, and `xctl why` blaming the application.
# The faulting kernel kills only its own CUDA context; XCTL_GPU_NO_FAULT=1 leaves it out.
# Figures are printed and written to $OUT (or /tmp)/gpu-junit.xml as junit properties.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
wheels=${1:-.whl}
if ! python3 -c 'import zmq, msgpack, psutil, yaml, click, rich, prometheus_client, pynvml, pytest' 2>/dev/null; then
  [ -d "$wheels" ] || { echo "xctl's dependencies are missing and there is no wheel dir $wheels (see fetch_wheels.sh)" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xctl-site "$wheels"/*.whl
  export PYTHONPATH=/tmp/xctl-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import sys
import pynvml
try:
    pynvml.nvmlInit()
except pynvml.NVMLError as exc:
    sys.exit(f"NVML does not start on this machine ({exc}): no NVIDIA GPU or driver here")
n = pynvml.nvmlDeviceGetCount()
names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(n)]
print(f"NVML {pynvml.nvmlSystemGetDriverVersion()}: {n} GPU(s) {names}")
PY
out=${OUT:-/tmp}
python3 -m pytest -m gpu tests/gpu -s -rA -p no:cacheprovider -o addopts= --junitxml "$out/gpu-junit.xml"
