"""Compile Triton kernels for an H100 (sm_90a) without a GPU and report their register, spill and shared-memory use.

Triton lowers a ``@triton.jit`` function to PTX for ``GPUTarget("cuda", 90, 32)`` and assembles it with its bundled
``ptxas``; no driver is needed. Under ``TRITON_INTERPRET=1`` the decorator returns interpreter objects that cannot
be compiled, so kernels are named by ``"module:function"`` and compiled in a child process with
``TRITON_INTERPRET=0``; in a process that is not interpreting, a kernel compiles in place.

Example (a test or a benchmark, interpreter on or off)::

    from omninft_fast.kernels.compile_check import KernelSpec, compile_for_sm90, compile_specs_for_sm90

    res = compile_for_sm90(
        "omninft_fast.kernels.cross_attention_fwd:_attn_fwd_kernel",  # or the kernel object itself
        signature={"Q": "*fp16", "n_q": "i32", "qk_scale": "fp32"},  # every runtime argument: type string
        constexprs={"BLOCK_M": 128, "HEAD_DIM": 64},  # every constexpr argument: value
        num_warps=4,
        num_stages=3,
    )
    assert res.spill_stores == 0, res

Type strings are Triton's: ``*fp16``, ``*bf16``, ``*fp32``, ``i32``, ``i64``, ``fp32``. Many kernels compile
faster through ``compile_specs_for_sm90([KernelSpec(...), ...])`` (one child process for all of them).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SM90 = ("cuda", 90, 32)
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of a kernel to compile.

    Attributes:
        kernel: ``"package.module:function"`` of a ``@triton.jit`` function.
        signature: runtime argument name -> Triton type string (``*fp16``, ``i32``, ``fp32``, ...).
        constexprs: constexpr argument name -> value.
        num_warps, num_stages: launch options, as given to the kernel launch.
        label: free text carried into the result (e.g. the shape it stands for).
        aligned: arguments known to be multiples of 16 (Triton's launch-time specialisation, which lets loads
            vectorise); ``None`` means every pointer argument, as for tensors allocated by PyTorch.
    """

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    aligned: list[str] | None = None


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel uses per thread (registers, spills) and per block (shared memory), on sm_90a."""

    name: str
    label: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int
    num_stages: int

    @property
    def spills(self) -> int:
        """Bytes spilled to local memory (stores + loads); 0 for a healthy kernel."""
        return self.spill_stores + self.spill_loads


def kernel_path(kernel: Any) -> str:
    """``"module:function"`` of a ``@triton.jit`` kernel (compiled or interpreted), or ``kernel`` if a string."""
    if isinstance(kernel, str):
        if ":" not in kernel:
            raise ValueError(f"kernel must look like 'package.module:function', got {kernel!r}")
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None or not hasattr(fn, "__module__"):
        raise TypeError(f"kernel must be a @triton.jit function or a 'module:function' string, got {kernel!r}")
    return f"{fn.__module__}:{fn.__name__}"


def compile_for_sm90(
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any] | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    label: str = "",
    aligned: list[str] | None = None,
) -> KernelResources:
    """Compile one kernel specialisation for sm_90a and return its resources; see the module docstring."""
    spec = KernelSpec(
        kernel_path(kernel), dict(signature), dict(constexprs or {}), num_warps, num_stages, label, aligned
    )
    return compile_specs_for_sm90([spec])[0]


def compile_specs_for_sm90(specs: Sequence[KernelSpec]) -> list[KernelResources]:
    """Compile every spec for sm_90a, in a child process with ``TRITON_INTERPRET=0`` when this one interprets.

    Raises ``RuntimeError`` with the compiler's message when a kernel does not compile.
    """
    if not _interpreting():
        try:
            return [_compile_here(spec) for spec in specs]
        except Exception as err:
            raise RuntimeError(f"compiling for sm_90a failed: {err}") from err
    payload = json.dumps([dataclasses.asdict(spec) for spec in specs])
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", __name__], input=payload, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compiling for sm_90a failed:\n{proc.stderr.strip()[-4000:]}")
    return [KernelResources(**row) for row in json.loads(proc.stdout)]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _compile_here(spec: KernelSpec) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, _, name = spec.kernel.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{spec.kernel} is not a compilable @triton.jit function (TRITON_INTERPRET must be 0)")
    signature = dict(spec.signature)
    for arg in spec.constexprs:
        signature[arg] = "constexpr"
    missing = [arg for arg in fn.arg_names if arg not in signature]
    if missing:
        raise ValueError(f"{spec.kernel}: signature lacks arguments {missing}")
    aligned = (
        [arg for arg, ty in spec.signature.items() if ty.startswith("*")] if spec.aligned is None else spec.aligned
    )
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
    source = ASTSource(fn, signature, spec.constexprs, attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton.compile(source, target=GPUTarget(*SM90), options=options)
    registers, stores, loads = _ptxas_usage(compiled.asm["ptx"])
    return KernelResources(
        name=name,
        label=spec.label,
        registers=registers,
        spill_stores=stores,
        spill_loads=loads,
        shared_bytes=int(compiled.metadata.shared),
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
    )


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """Assemble ``ptx`` for sm_90a with Triton's ptxas in verbose mode: ``(registers, spill stores, spill loads)``."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "kernel.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    usage, spills = _PTXAS_USAGE.search(log), _PTXAS_SPILLS.search(log)
    if usage is None or spills is None:
        raise RuntimeError(f"could not read register use from ptxas output:\n{log}")
    return int(usage.group(1)), int(spills.group(1)), int(spills.group(2))


def _main() -> None:
    specs = [KernelSpec(**row) for row in json.loads(sys.stdin.read())]
    json.dump([dataclasses.asdict(_compile_here(spec)) for spec in specs], sys.stdout)


if __name__ == "__main__":
    _main()
