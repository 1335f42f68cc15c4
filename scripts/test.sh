#!/usr/bin/env bash
# The test command: install, lint, then the whole suite (Triton kernels run under the CPU interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
python=${PYTHON:-python3}
"$python" -m ruff check . && "$python" -m ruff format --check .
TRITON_INTERPRET=1 "$python" -m pytest -q tests "$@"
bash scripts/test_cpp.sh
