#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py): environment, CUDA tests, kernel benchmarks, LTX-2 block and step.
# Usage on a GPU machine: bash scripts/gpu_check.sh [OUT_DIR] [gpu_check.py options]; OUT_DIR defaults to $OUT.
# It installs nothing into the machine's Python: the LTX-2 libraries come from .gpu_wheels/ (made beforehand by
# scripts/gpu_wheels.sh on a machine with the package index) and this package is built from the working tree, both
# into a temporary folder put first on PYTHONPATH. The C++ extension is not built (the GPU path does not use it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:?give an output folder or set OUT}}
shift || true
python=${PYTHON:-python3}
site=$(mktemp -d /tmp/omninft_site.XXXXXX)
pip_target() { "$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$site" "$@"; }
# One at a time: a compiled wheel for another Python (PyYAML) is skipped with a note, the rest still install.
for wheel in .gpu_wheels/*.whl; do
  [ -e "$wheel" ] || continue
  pip_target "$wheel" 2>/dev/null || echo "note: $wheel does not install on this Python; skipped" >&2
done
OMNINFT_NO_EXTENSION=1 pip_target --no-build-isolation .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# A script's own folder (benchmarks/) heads sys.path, so the working tree's omninft_fast/ (which lacks the kernels
# subpackage) does not shadow the built one; the pytest section runs with -P for the same reason.
exec "$python" benchmarks/gpu_check.py --out "$out" "$@"
