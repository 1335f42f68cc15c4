#!/usr/bin/env bash
# Install omninft-fast with its pinned CPU stack into the current Python. Safe to run again.
# torch comes first; triton and the optional libraries go in with --no-deps, so nothing can pull another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
pip_install() { "$python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install torch==2.13.0
pip_install --no-deps triton==3.7.1
pip_install -r requirements/cpu.txt
# LTX-2 libraries, reward models and trainer extras: pinned, never allowed to resolve dependencies (ltx-core
# declares torchaudio and peft declares torch: either would replace this torch).
pip_install --no-deps -r requirements/ltx2.txt -r requirements/rewards.txt -r requirements/train.txt
# DeepSpeed ZeRO: no op compiled at install time.
DS_BUILD_OPS=0 pip_install --no-deps -r requirements/distributed.txt
pip_install --no-build-isolation --no-deps -e .
