#!/usr/bin/env bash
# The pack's suite (or demo) against an existing ComfyUI install, run by that install's
# Python: `make test COMFYUI=/path/to/ComfyUI PYTHON=/path/to/its/python` calls
# `host/external.sh test` (and `make demo ...` calls `host/external.sh demo`).
#
# Nothing is written into that ComfyUI tree or into that Python's environment:
# - ComfyUI runs with a base directory of the harness's own (--base-directory, also set
#   in-process): .host/external/<key>/ holds custom_nodes/ (this pack and the test kit,
#   linked), models/, input/, output/, user/ and the server's database, so other packs
#   installed in the tree are not loaded and its files are left alone;
# - the test tools (pytest, hypothesis and their own dependencies, pinned in
#   host/requirements.txt) go into .host/external/<key>/tools with `pip install --target`,
#   and are put at the end of sys.path: a package that the environment already has wins.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
what=${1:-test}
shift || true
[[ -n "${COMFYUI:-}" ]] || { echo "[external] COMFYUI is not set: make test COMFYUI=/path/to/ComfyUI PYTHON=/path/to/its/python" >&2; exit 2; }
comfy=$(cd "$COMFYUI" 2>/dev/null && pwd) || { echo "[external] COMFYUI=$COMFYUI is not a folder" >&2; exit 2; }
python=${PYTHON:-python3}
if [[ ! -f "$comfy/main.py" || ! -f "$comfy/comfyui_version.py" ]]; then
    echo "[external] $comfy is not a ComfyUI tree (no main.py / comfyui_version.py): set COMFYUI to the folder that holds main.py" >&2
    exit 2
fi
command -v "$python" >/dev/null || { echo "[external] PYTHON=$python is not an executable; give the Python that runs this ComfyUI" >&2; exit 2; }
exe=$("$python" -c 'import sys; print(sys.executable)')
"$python" -c 'import torch' 2>/dev/null || {
    echo "[external] $exe cannot import torch: give the Python environment that runs this ComfyUI (PYTHON=...)" >&2; exit 2; }

key=$(printf '%s\n%s\n' "$comfy" "$exe" | sha256sum | cut -c1-12)
base="$root/.host/external/$key"
tools="$base/tools"
mkdir -p "$base/custom_nodes" "$base/models/checkpoints" "$base/input" "$base/output" "$base/user"
ln -sfn "$root" "$base/custom_nodes/infsplign"
ln -sfn "$root/tests/testkit" "$base/custom_nodes/infsplign_testkit"
version=$(sed -n 's/^__version__ *= *["'"'"']\([^"'"'"']*\).*/\1/p' "$comfy/comfyui_version.py")
echo "[external] ComfyUI $version at $comfy, Python $exe; harness folder $base"

pins=$(grep -E '^(pytest|pluggy|iniconfig|packaging|Pygments|hypothesis|sortedcontainers|attrs)==' "$root/host/requirements.txt")
want=$(printf '%s\n' "$pins" | sha256sum | cut -c1-16)
if [[ ! -f "$tools/.stamp" || "$(cat "$tools/.stamp")" != "$want" ]]; then
    echo "[external] installing the test tools into $tools: $(echo $pins)"
    rm -rf "$tools"
    # shellcheck disable=SC2086
    "$python" -m pip install --disable-pip-version-check -qq --no-deps --target "$tools" $pins
    echo "$want" > "$tools/.stamp"
fi

export INFSPLIGN_COMFYUI="$comfy" INFSPLIGN_PYTHON="$exe" INFSPLIGN_COMFY_BASE="$base" INFSPLIGN_TEST_TOOLS="$tools"
cd "$root"
case "$what" in
    test)
        exec "$python" -c 'import os, sys; sys.path.append(os.environ["INFSPLIGN_TEST_TOOLS"]); import pytest; sys.exit(pytest.main(sys.argv[1:]))' -q "${@:-tests}" ;;
    demo)
        exec "$python" demo/run_demo.py "$@" ;;
    *)
        echo "[external] unknown command $what (test or demo)" >&2; exit 2 ;;
esac
