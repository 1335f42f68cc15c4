#!/usr/bin/env bash
# Configure, build and run the C++ tests of csrc/ against the libtorch of the installed torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
build=${BUILD_DIR:-build/cmake}
prefix=$("$python" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
cmake -S . -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" --target test_nft_loss bench_nft_loss -j "${JOBS:-2}"
ctest --test-dir "$build" --output-on-failure
