#!/usr/bin/env bash
# Fetch the wheels xctl and its GPU tests need, for a GPU machine that cannot reach PyPI.
#
#   scripts/gpu/fetch_wheels.sh [DIR] [PYTHON_VERSION]     (defaults: .whl 3.12)
#
# Run it where pip can reach an index; copy DIR to the GPU machine and run
# scripts/gpu/verify.sh there (it installs from DIR when xctl's dependencies are missing).
set -euo pipefail
dir=${1:-.whl}
pyver=${2:-3.12}
mkdir -p "$dir"
platforms=()
for n in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17 2014 1; do
  case $n in 2014) platforms+=(--platform manylinux2014_x86_64) ;; 1) platforms+=(--platform manylinux1_x86_64) ;;
    *) platforms+=(--platform "manylinux_${n}_x86_64") ;; esac
done
# xctl's runtime dependencies, [gpu], and what the gpu tests import (pytest + its needs).
# rich needs markdown-it-py, mdurl and pygments; pytest needs pluggy, iniconfig, packaging.
pkgs=(pyzmq msgpack psutil pyyaml click rich markdown-it-py mdurl pygments prometheus-client
      nvidia-ml-py pytest pluggy iniconfig packaging pytest-timeout)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dir" "${pkgs[@]}"
ls -1 "$dir"
