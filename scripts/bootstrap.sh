#!/usr/bin/env bash
# Install omninft-fast with its pinned CPU stack into the current Python. Safe to run again.
# torch comes first and triton goes in with --no-deps, so that nothing can pull in another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
pip_install() { "$python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install torch==2.13.0
pip_install --no-deps triton==3.7.1
pip_install -r requirements/cpu.txt
pip_install --no-build-isolation --no-deps -e .
