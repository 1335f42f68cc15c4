"""The installed package (not the repository) runs the main job from any folder: the base policy ships inside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ltx_core")

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = """\
threads: 1
iterations: 1
prompts_per_iter: 2
group_size: 2
output_dir: run
progress: false
tensorboard: false
sampling:
  num_steps: 3
reweight:
  last_steps: 2
nft:
  timesteps_per_sample: 1
eval:
  samples_per_prompt: 1
  write_samples: 1
"""


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` of a copy of the sources (without the C++ extension) into a fresh target folder."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("omninft_fast", "kernels"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    command += ["--disable-pip-version-check", "--target", str(target), str(source)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMNINFT_NO_EXTENSION": "1"})
    return target


def _run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(target), "OMNINFT_BACKEND": "reference"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_package_trains_from_another_folder(installed: Path, tmp_path: Path) -> None:
    shipped = installed / "omninft_fast" / "checkpoints" / "tiny_t2av_base.safetensors"
    assert shipped.is_file()
    where = _run(installed, tmp_path, "-c", "import omninft_fast; print(omninft_fast.__file__)")
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    (tmp_path / "small.yaml").write_text(SMALL_RUN)
    result = _run(installed, tmp_path, "-m", "omninft_fast", "train", "--config", "small.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| colour | video |" in result.stdout
    assert "checkpoint: checkpoints/tiny_t2av_base.safetensors" in (tmp_path / "run" / "config.yaml").read_text()
    assert (tmp_path / "run" / "reward_curve.png").is_file()
