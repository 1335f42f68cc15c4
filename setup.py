"""Build and install omninft-fast.

``kernels/`` installs as ``omninft_fast.kernels``; the tiny base policy of the CPU default
(``omninft_fast/checkpoints/``) installs with the package. Where a C++ compiler is present, the CPU extension in
``csrc/`` builds as ``omninft_fast._C``; without one (or with ``OMNINFT_NO_EXTENSION=1``) the package installs
without it and the PyTorch reference runs instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import sysconfig

from setuptools import find_packages, setup

EXTRAS = {
    "gpu": ["flash-attn>=2.6", "transformer-engine[pytorch]>=2.0"],
    "dist": ["deepspeed==0.19.8"],
    "ltx2": ["ltx-core==1.0.0", "diffusers==0.42.1", "einops", "safetensors"],
    "train": ["matplotlib>=3.8", "tensorboard", "peft"],
    "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
}


def _extensions() -> tuple[list, dict]:
    sources = sorted(glob.glob("csrc/*.cpp"))
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if not sources or compiler is None or os.environ.get("OMNINFT_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = ["-O3", "-fopenmp", "-std=c++20"]
    if sysconfig.get_platform().endswith("x86_64"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    extension = CppExtension("omninft_fast._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="omninft-fast",
    version="0.1.0",
    description="Kernel-level training engine for OmniNFT (audio-video diffusion RL) on LTX-2",
    python_requires=">=3.10",
    packages=[*find_packages(include=["omninft_fast", "omninft_fast.*"]), "omninft_fast.kernels"],
    package_dir={"omninft_fast.kernels": "kernels"},
    package_data={"omninft_fast": ["checkpoints/*.safetensors", "task/*.jsonl"]},
    install_requires=["torch>=2.5", "nvtx", "omegaconf>=2.4", "ruamel.yaml>=0.18"],
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["omninft-fast=omninft_fast.cli:main"]},
)
