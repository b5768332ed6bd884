#!/usr/bin/env bash
# The GPU checks of the Triton backend in one run: the codegen tests with compiled kernels
# (TRITON_INTERPRET=0, the `gpu` tests included), then benchmarks/gpu.py. Logs go to $OUT.
#
#   benchmarks/gpu_check.sh fetch   here, once: the test oracles' wheels into .whl/ (ignored by git)
#   benchmarks/gpu_check.sh run     on the GPU machine, e.g. the device tool's
#                                   run(command="benchmarks/gpu_check.sh run", carry=[".whl"])
#
# The GPU machine has torch and triton but no network and no gfloat (the tests' oracle), so the
# wheels travel with the tree. PY picks the interpreter (default: python3, which holds torch there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-gpu_check}
case "${1:-}" in
fetch)
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .whl \
        "gfloat==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gfloat"))')" \
        array-api-compat more-itertools
    ls .whl ;;
run)
    mkdir -p "$OUT"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
    status=0
    "$PY" -m pytest -q -p no:cacheprovider tests/codegen 2>&1 | tee "$OUT/tests.txt" || status=1
    "$PY" benchmarks/gpu.py --runs 7 2>&1 | tee "$OUT/gpu.txt" || status=1
    exit $status ;;
*)
    echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac
