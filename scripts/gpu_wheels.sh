#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with the pure-Python wheels the GPU check needs and the GPU machines lack:
# ltx-core, diffusers and those of their dependencies (pinned in requirements/ltx2.txt) that the machines' image
# does not have. Packages the image has stay as they are there (torch imports several of them: filelock, fsspec,
# typing-extensions, packaging), and so do the compiled ones (numpy, Pillow, regex, safetensors, hf-xet).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
on_image='^(numpy|pillow|regex|safetensors|hf-xet|charset-normalizer|einops|filelock|fsspec|tqdm|packaging'
on_image+='|typing-extensions|requests|urllib3|certifi|idna|click|h11|anyio|zipp)=='
mapfile -t pins < <(grep -Ev '^\s*(#|$)' requirements/ltx2.txt | grep -Eiv "$on_image")
rm -rf .gpu_wheels
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation py --platform any -d .gpu_wheels "${pins[@]}"
# The trainer (the GPU check's iteration section; it draws no figure, so no matplotlib): its configuration libraries,
# PyYAML as a CPython 3.12 manylinux wheel (the GPU machines' Python), at the versions pinned in requirements/.
pin() { grep -hiE "^($1)==" requirements/*.txt; }
mapfile -t pure < <(pin 'omegaconf|ruamel\.yaml')
mapfile -t compiled < <(pin 'pyyaml')
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation py --platform any -d .gpu_wheels "${pure[@]}"
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 -d .gpu_wheels "${compiled[@]}"
ls .gpu_wheels
du -sh .gpu_wheels
