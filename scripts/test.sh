#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run calls it).
# Installs everything the tests need on a fresh machine, then runs the default suite.
# Nothing has to be started by hand: the napari tests start Xvfb themselves and the Label Studio
# end-to-end tests start a real Label Studio server on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# CPU build of torch (from PyPI; on the project's CI machines pip takes it from local disk).
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[dev,train,labelstudio,napari]"
shopt -s nullglob
for deps in scripts/ci_deps_*.sh; do
    echo "== $deps"
    bash "$deps"
done

set +e
$PY -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests" >&2
    exit 1
fi
exit "$status"
