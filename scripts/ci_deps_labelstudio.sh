#!/usr/bin/env bash
# Dependencies of the Label Studio ML backend and its tests (issue 5). Idempotent.
#  1. The backend's own runtime/test deps go into the CURRENT Python environment
#     (flask, gunicorn, requests, scikit-image for the sample photos of the e2e test).
#  2. label-studio==1.23.2 goes into a SEPARATE virtualenv (it pins its own Django/numpy stack and
#     must never touch the main environment's torch/numpy). The e2e test starts the server from there;
#     label-studio-sdk (a dependency of label-studio) provides the reference RLE encoder for the tests.
set -euo pipefail

PY="${PYTHON:-python3}"
LS_VERSION="1.23.2"
LS_VENV="${RWKVSAM_LS_VENV:-$HOME/.cache/rwkvsam/ls-venv}"

"$PY" -m pip install --quiet "flask>=3.0" "gunicorn>=22" "requests>=2.31" "scikit-image>=0.22" "tqdm>=4.60"

have_ls() {
    [ -x "$LS_VENV/bin/python" ] && \
        "$LS_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$LS_VERSION')" \
        2>/dev/null
}

if have_ls; then
    echo "label-studio $LS_VERSION already installed in $LS_VENV"
else
    mkdir -p "$(dirname "$LS_VENV")"
    "$PY" -m venv "$LS_VENV"
    "$LS_VENV/bin/python" -m pip install --quiet --upgrade pip
    "$LS_VENV/bin/python" -m pip install --quiet "label-studio==$LS_VERSION"
    echo "label-studio $LS_VERSION installed in $LS_VENV"
fi
