"""Scaled FP8 quantisation in Triton: ``q = x / scale`` clamped to the format's range and rounded to e4m3 / e5m2,
with one scale per row (found here: the row's largest magnitude times the reciprocal of the format's largest value,
as PyTorch computes ``amax / max`` on a GPU) or one given scale for the whole tensor.

Rows are those of a 2-D view read through its strides, so a transposed view comes out as a contiguous transposed
copy in the same pass (the backward's ``W^T``, ``G^T`` and ``X^T`` operands need no separate transpose). Row-major
input: each program owns ``BLOCK_R`` rows and walks their columns in ``BLOCK_C`` steps, once for the row maxima
(rowwise), once for the scaled cast (a re-read that hits L2 at LTX-2's widths): one launch. Transposed view: a 2-D
grid of (32 rows) x (512-column span) programs, so thousands of programs keep the loads in flight; rowwise maxima
per span, reduced by PyTorch, then the cast. Against PyTorch's five passes for the same expression.

Rounding: the kernel rounds to the FP8 grid itself (nearest, ties to even, subnormals included) in float32, so the
final cast is exact; the result equals PyTorch's ``(x.float() / scale).clamp(-max, max).to(fp8)`` value for value,
on the GPU and under Triton's CPU interpreter (whose own FP8 cast does not round to nearest), non-finite inputs
included (a NaN makes its row's scale NaN, as PyTorch's ``amax`` does). Division is round-to-nearest (``div_rn``), as
in PyTorch.

``quantize_fp8`` is a plain launcher (tensors in, tensors out); ``omninft_fast.fp8`` dispatches to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# FP8 format -> (largest finite value, mantissa bits, smallest normal exponent).
FORMATS: dict[torch.dtype, tuple[float, int, int]] = {
    torch.float8_e4m3fn: (448.0, 3, -6),
    torch.float8_e5m2: (57344.0, 2, -14),
}
SUPPORTED_INPUTS = (torch.float16, torch.bfloat16, torch.float32)
# The scale's floor: float32's smallest normal number (an all-zero row keeps a usable scale).
TINY = 1.1754943508222875e-38
_TINY = tl.constexpr(TINY)
# 1.5 * 2^23: adding and subtracting it rounds a float32 below 2^22 to an integer, ties to even.
_ROUNDER = tl.constexpr(12582912.0)


@triton.jit
def _round_to_fp8_grid(y, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """``y`` (float32, within the format's range) rounded to the nearest FP8 value, ties to even."""
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXPONENT)
    # The spacing of FP8 values around |y|: 2^(exponent - mantissa bits), built from its float32 bits.
    quantum = ((exponent - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
    steps = tl.abs(y) / quantum  # exact: a power of two
    rounded = ((steps + _ROUNDER) - _ROUNDER) * quantum
    return tl.where(bits < 0, -rounded, rounded)


@triton.jit
def _max_with_nan(a, b):
    """``max`` that keeps a NaN (a row holding one gets a NaN scale, as PyTorch's ``amax`` gives)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_amax(amax, x):
    """``amax`` raised to the largest magnitude of each row of the tile ``x``, NaN propagating."""
    return _max_with_nan(amax, tl.reduce(tl.abs(x), 1, _max_with_nan))


# How the cast kernel gets its scales.
FIND_ROW_SCALES, GIVEN_ROW_SCALES, GIVEN_TENSOR_SCALE = 0, 1, 2


@triton.jit
def _fp8_amax_kernel(
    x_ptr, partial_ptr, rows, cols, stride_r, stride_c, col_span, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Largest magnitude of each row within one span of ``col_span`` columns: ``partial[row, span]``."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    span = tl.program_id(1)
    row_ok = r < rows
    x_rows = x_ptr + r[:, None].to(tl.int64) * stride_r
    c_end = tl.minimum(cols, (span + 1) * col_span)
    amax = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(span * col_span, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (c[None, :] < c_end)
        x = tl.load(x_rows + c[None, :].to(tl.int64) * stride_c, mask=mask, other=0.0).to(tl.float32)
        amax = _row_amax(amax, x)
    tl.store(partial_ptr + r * tl.num_programs(1) + span, amax, mask=row_ok)


@triton.jit
def _fp8_quantize_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    rows,
    cols,
    stride_r,
    stride_c,
    col_span,
    fp8_max,
    inv_max,
    SCALES: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The scaled cast of ``BLOCK_R`` rows over one span of ``col_span`` columns; with ``FIND_ROW_SCALES`` (one span
    per row) the rows' scales are found first, in a walk over the same columns."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    span = tl.program_id(1)
    row_ok = r < rows
    x_rows = x_ptr + r[:, None].to(tl.int64) * stride_r
    q_rows = q_ptr + r[:, None].to(tl.int64) * cols
    c_start = span * col_span
    c_end = tl.minimum(cols, c_start + col_span)
    if SCALES == 0:  # FIND_ROW_SCALES (module constants are not visible inside the kernel)
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(c_start, c_end, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (c[None, :] < c_end)
            x = tl.load(x_rows + c[None, :].to(tl.int64) * stride_c, mask=mask, other=0.0).to(tl.float32)
            amax = _row_amax(amax, x)
        scale = _max_with_nan(amax * inv_max, _TINY)
        tl.store(scale_ptr + r, scale, mask=row_ok)
    elif SCALES == 1:  # GIVEN_ROW_SCALES
        scale = tl.load(scale_ptr + r, mask=row_ok, other=1.0)
    else:
        scale = tl.load(scale_ptr + tl.zeros([BLOCK_R], dtype=tl.int32))
    for c0 in range(c_start, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (c[None, :] < c_end)
        x = tl.load(x_rows + c[None, :].to(tl.int64) * stride_c, mask=mask, other=0.0).to(tl.float32)
        y = tl.clamp(tl.math.div_rn(x, scale[:, None]), -fp8_max, fp8_max, propagate_nan=tl.PropagateNan.ALL)
        q = _round_to_fp8_grid(y, MANTISSA_BITS, MIN_EXPONENT)
        tl.store(q_rows + c[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


# Transposed views: tiles of 32 rows (contiguous in memory) x 64 columns, spans of 512 columns per program.
_T_BLOCK_R, _T_BLOCK_C, _T_SPAN = 32, 64, 512


def _row_blocks(cols: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` for rows contiguous in memory: tiles of 2048 elements, up to 1024 columns wide."""
    block_c = min(1024, triton.next_power_of_2(max(cols, 16)))
    return max(1, 2048 // block_c), block_c


def sm90_kernel_specs() -> list:
    """The kernels' specialisations at LTX-2's shapes, for ``compile_check``: the cast for bf16 / float32 inputs, both
    formats, each way of getting scales and its tiles, and the span maxima."""
    from omninft_fast.kernels.compile_check import KernelSpec

    module = "omninft_fast.kernels.fp8_quantize"
    row_blocks = _row_blocks(4096)
    cases = (
        (FIND_ROW_SCALES, row_blocks, "rows, rowwise"),
        (GIVEN_TENSOR_SCALE, row_blocks, "rows, tensorwise"),
        (GIVEN_ROW_SCALES, (_T_BLOCK_R, _T_BLOCK_C), "transposed view, rowwise"),
        (GIVEN_TENSOR_SCALE, (_T_BLOCK_R, _T_BLOCK_C), "transposed view, tensorwise"),
    )
    shape_args = {"rows": "i32", "cols": "i32", "stride_r": "i32", "stride_c": "i32", "col_span": "i32"}
    specs = []
    for in_type in ("bf16", "fp32"):
        specs.append(
            KernelSpec(
                f"{module}:_fp8_amax_kernel",
                {"x_ptr": f"*{in_type}", "partial_ptr": "*fp32", **shape_args},
                {"BLOCK_R": _T_BLOCK_R, "BLOCK_C": _T_BLOCK_C},
                num_stages=1,
                label=f"{in_type} span maxima",
            )
        )
        for fp8_type, dtype in (("fp8e4nv", torch.float8_e4m3fn), ("fp8e5", torch.float8_e5m2)):
            _, mantissa_bits, min_exponent = FORMATS[dtype]
            for scales, (block_r, block_c), label in cases:
                specs.append(
                    KernelSpec(
                        f"{module}:_fp8_quantize_kernel",
                        {
                            "x_ptr": f"*{in_type}",
                            "q_ptr": f"*{fp8_type}",
                            "scale_ptr": "*fp32",
                            **shape_args,
                            "fp8_max": "fp32",
                            "inv_max": "fp32",
                        },
                        {
                            "SCALES": scales,
                            "MANTISSA_BITS": mantissa_bits,
                            "MIN_EXPONENT": min_exponent,
                            "BLOCK_R": block_r,
                            "BLOCK_C": block_c,
                        },
                        num_stages=1,
                        label=f"{in_type} -> {fp8_type}, {label}",
                    )
                )
    return specs


def quantize_fp8(
    x: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the rows of a 2-D tensor to FP8.

    Args:
        x: ``(R, C)`` float16 / bfloat16 / float32, any strides (a transposed view is read in place).
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        scale: ``None`` for one scale per row, found here; else a float32 ``()`` scale for the whole tensor.

    Returns:
        ``(q, scale)``: ``q`` ``(R, C)`` contiguous in ``fp8_dtype`` with ``q * scale ~ x``; ``scale`` float32
        ``(R, 1)`` (rowwise, ``max |row| * (1 / fp8 max)``, at least float32's smallest normal) or the given one.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_INPUTS:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if fp8_dtype not in FORMATS:
        raise ValueError(f"fp8_dtype must be one of {list(FORMATS)}, got {fp8_dtype}")
    rows, cols = x.shape
    top, mantissa_bits, min_exponent = FORMATS[fp8_dtype]
    q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
    rowwise = scale is None
    if rowwise:
        scale = torch.full((rows, 1), TINY, dtype=torch.float32, device=x.device)
    elif scale.dtype != torch.float32 or scale.numel() != 1:
        raise ValueError(f"scale must be a float32 scalar tensor, got {scale.dtype} with {scale.numel()} elements")
    if rows == 0 or cols == 0:
        return q, scale
    if not (x.stride(0) == 1 and x.stride(1) != 1):
        # One program per row tile, walking the whole row: rowwise scales found in the same kernel.
        (block_r, block_c), span = _row_blocks(cols), cols
        mode = FIND_ROW_SCALES if rowwise else GIVEN_TENSOR_SCALE
    else:
        # A transposed view: rows are strided, so they are split into column spans over a 2-D grid (enough programs
        # to fill the GPU); rowwise scales come from per-span maxima reduced by PyTorch (three launches, not one).
        (block_r, block_c), span = (_T_BLOCK_R, _T_BLOCK_C), _T_SPAN
        mode = GIVEN_ROW_SCALES if rowwise else GIVEN_TENSOR_SCALE
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, span))
    if mode == GIVEN_ROW_SCALES:
        partial = torch.empty((rows, grid[1]), dtype=torch.float32, device=x.device)
        _fp8_amax_kernel[grid](x, partial, rows, cols, x.stride(0), x.stride(1), span, BLOCK_R=block_r, BLOCK_C=block_c)
        scale = (partial.amax(dim=1, keepdim=True) * (1.0 / top)).clamp(min=TINY)
    _fp8_quantize_kernel[grid](
        x,
        q,
        scale,
        rows,
        cols,
        x.stride(0),
        x.stride(1),
        span,
        top,
        1.0 / top,
        SCALES=mode,
        MANTISSA_BITS=mantissa_bits,
        MIN_EXPONENT=min_exponent,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return q, scale
