#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install pp-ext
# with its test and plotting extras. Sourced by the README's commands.
# Without a GPU, torch is pinned to the CPU build 2.13.0 before anything else
# asks for torch, so no CUDA build is ever pulled.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PP_EXT_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.pp-ext-installed"
want="$(cat "$root/setup.cfg" "$root/launch/env.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "pp-ext: installing into $venv (first run takes a few minutes)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$venv/bin/python" -m pip install -q torch
    else
        "$venv/bin/python" -m pip install -q torch==2.13.0
    fi
    "$venv/bin/python" -m pip install -q -e "$root[test,plot]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
