"""What the cross-attention kernels share: tile configurations, the split heuristic, constants, row loads.

Nothing here imports the rest of the package: kernels are leaves.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

# Streaming multiprocessors assumed when the tensors are not on a GPU (an H100 SXM).
DEFAULT_SM_COUNT = 132
# A split must walk at least this many blocks, so its partial write stays small next to its work.
MIN_BLOCKS_PER_SPLIT = 4
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch configuration: ``block_m`` query rows and ``block_n`` key rows per tile, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    @property
    def launch(self) -> dict[str, int]:
        """The ``num_warps`` / ``num_stages`` launch options."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def tile_config(head_dim: int, dtype: torch.dtype, kernel: str = "attention") -> TileConfig:
    """The launch configuration of ``kernel`` (``attention``: forward, dQ and dK/dV; ``key_mass``) per head dim and
    dtype: a fixed table, so results never depend on timing.

    Half types: 64 x 64 tiles, 2 stages, 8 warps above head dim 64. The key mass at head dims up to 64 takes
    128 x 64 tiles with 3 stages (all 126 audio queries in one tile): the GPU check's tile sweep on an H200
    (``benchmarks/results/gpu_h200_2026-11-26*.md``, bf16, V2A 126 x 6144) timed it at 0.079 ms against 0.158 ms for
    64 x 64 in both runs (128 x 32 was 0.074 ms but spills registers). The forward and backward at B = 1 are
    launch-bound (40-150 us kernels) and their sweep times moved up to 2x between runs, so they keep the default.
    float32 inputs (three TF32 products per dot, twice the bytes per tile) take 32 x 32 single-stage tiles and 8 warps
    above head dim 32; half types compile without spills, float32 still spills a little at head dims 32 and 128
    (``benchmarks/results/cross_attention_cpu.md``). Every launcher also takes an explicit ``tile=``.
    """
    if kernel not in ("attention", "key_mass"):
        raise ValueError(f"kernel must be 'attention' or 'key_mass', got {kernel!r}")
    if dtype == torch.float32:
        return TileConfig(32, 32, 8 if head_dim > 32 else 4, 1)
    if head_dim <= 64 and kernel == "key_mass":
        return TileConfig(128, 64, 4, 3)
    return TileConfig(64, 64, 8 if head_dim > 64 else 4, 2)


def choose_split(parallel_programs: int, walked_blocks: int, sm_count: int = DEFAULT_SM_COUNT) -> int:
    """How many chunks to cut the walked axis into, so the grid fills about two waves of the GPU.

    A kernel that runs ``parallel_programs`` programs, each walking ``walked_blocks`` blocks, is left alone when
    it already has at least ``sm_count`` programs. Otherwise the walked axis is split into
    ``ceil(2 * sm_count / parallel_programs)`` chunks, but never so many that a chunk walks fewer than
    ``MIN_BLOCKS_PER_SPLIT`` blocks. Examples on an H100 (132 SMs), 32 heads, B = 1, 64-wide blocks:
    A2V dK/dV of a 5 s clip (2 key blocks x 32 heads, 96 query blocks) -> 5 splits; V2A forward at 1280x704
    (2 query blocks x 32 heads, 220 key blocks) -> 5 splits; A2V forward (96 x 32 programs) -> 1 (no split).
    """
    if parallel_programs >= sm_count:
        return 1
    wanted = triton.cdiv(2 * sm_count, parallel_programs)
    return max(1, min(wanted, walked_blocks // MIN_BLOCKS_PER_SPLIT))


def split_chunk(length: int, split: int, block: int) -> tuple[int, int]:
    """``(rows per chunk, number of chunks)`` cutting ``length`` rows into ``split`` block-aligned, non-empty chunks."""
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    chunk = triton.cdiv(triton.cdiv(length, split), block) * block
    return chunk, triton.cdiv(length, chunk)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``DEFAULT_SM_COUNT`` off the GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 inputs use three TF32 products (near-float32 accuracy on tensor cores;
    plain ``ieee`` float32 dots fall back to FMA loops that spill heavily), half types are exact anyway."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def head_dim_block(head_dim: int) -> int:
    """The power-of-two tile width covering ``head_dim`` (at least 16, the smallest ``tl.dot`` size)."""
    return max(16, triton.next_power_of_2(head_dim))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What these kernels add to ``cross_attention``'s checks: dtype, head dim and device; bfloat16 is refused under
    the interpreter, whose ``tl.dot`` multiplies bfloat16's raw bits (its results would be garbage)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: the triton backend takes float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q: the triton backend takes head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.device.type == "cpu" and not interpreting():
        raise RuntimeError("q: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError(
            "q: the Triton interpreter (TRITON_INTERPRET=1) multiplies bfloat16 raw bits; give float32 or float16 "
            "CPU tensors, another backend, or CUDA tensors"
        )


@triton.jit
def load_rows(base, rows, row_stride, cols, mask):
    """The masked tile ``base[rows[:, None] * row_stride + cols[None, :]]``, zero where masked."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
