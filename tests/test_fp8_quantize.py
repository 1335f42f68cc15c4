"""The Triton FP8 quantisation kernel (``kernels/fp8_quantize.py``) against PyTorch's quantisation and float64."""

from __future__ import annotations

import pytest
import torch

from omninft_fast import fp8
from omninft_fast.dispatch import triton_interpreting

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreting()), reason="needs a CUDA device or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = {fp8.E4M3: (3, -6), fp8.E5M2: (2, -14)}  # mantissa bits, smallest normal exponent


def _values(gen: torch.Generator, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Gaussian rows at magnitudes from 1e-6 to 1e2, a few outlier columns 30x larger, one all-zero row."""
    x = torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-6, 3, (shape[0], 1), generator=gen)
    x[:, :: max(1, shape[1] // 5)] *= 30
    x[1] = 0
    return x.to(dtype).to(DEVICE)


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same logical matrix stored row-major and as a transposed view of a row-major copy."""
    return {"rows": x, "transposed view": x.t().contiguous().t()}


@pytest.mark.parametrize("shape", [(37, 70), (5, 2500), (130, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8_dtype", list(FORMATS))
@pytest.mark.parametrize("rowwise", [True, False])
def test_kernel_equals_pytorch_and_float64(
    shape: tuple[int, int], dtype: torch.dtype, fp8_dtype: torch.dtype, rowwise: bool, gen: torch.Generator
) -> None:
    base = _values(gen, shape, dtype)
    want_q, want_scale = fp8.quantize_reference(base, fp8_dtype, rowwise)
    mantissa_bits, min_exponent = FORMATS[fp8_dtype]
    for layout, x in _layouts(base).items():
        q, scale = fp8.quantize(x, fp8_dtype, rowwise, backend="triton")
        assert q.dtype == fp8_dtype and q.shape == shape and q.is_contiguous(), layout
        assert scale.shape == ((shape[0], 1) if rowwise else ()) and scale.dtype == torch.float32, layout
        torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
        # Value for value (an FP8 zero's sign may differ under the interpreter; it does not change any product).
        assert torch.equal(q.float(), want_q.float()), layout
        # Against float64: within half a step of the FP8 grid, relative, or half the subnormal step, absolute.
        exact = base.double()
        dequantised = q.double() * scale.double()
        half_step = 2.0 ** -(mantissa_bits + 1) * exact.abs() + scale.double() * 2.0 ** (
            min_exponent - mantissa_bits - 1
        )
        assert bool(((dequantised - exact).abs() <= half_step * (1 + 1e-9)).all()), layout


@pytest.mark.parametrize("fp8_dtype", list(FORMATS))
@pytest.mark.parametrize("rowwise", [True, False])
def test_non_finite_inputs_stay_non_finite(fp8_dtype: torch.dtype, rowwise: bool, gen: torch.Generator) -> None:
    """A NaN or an infinity makes its row's scale (tensorwise: the scale) what PyTorch's ``amax`` gives, NaN or
    inf, so the FP8 GEMM's output is not finite there: a diverged activation reaches the trainer's loss check.
    The rows left finite are value for value PyTorch's. (The values where PyTorch has NaN are compared on a GPU
    only: the interpreter's own FP8 cast turns NaN into a finite value.)"""
    base = _values(gen, (37, 70), torch.float32)
    base[3, 5], base[7, 1], base[9, 2] = float("nan"), float("inf"), -float("inf")
    want_q, want_scale = fp8.quantize_reference(base, fp8_dtype, rowwise)
    finite_rows = torch.isfinite(want_scale).reshape(-1).expand(37) if rowwise else torch.zeros(37, dtype=torch.bool)
    for layout, x in _layouts(base).items():
        q, scale = fp8.quantize(x, fp8_dtype, rowwise, backend="triton")
        assert torch.equal(scale.isnan(), want_scale.isnan()), layout
        assert torch.equal(scale.nan_to_num(0.0), want_scale.nan_to_num(0.0)), layout
        assert torch.equal(q[finite_rows].float(), want_q[finite_rows].float()), layout
        if DEVICE == "cuda":
            assert torch.equal(q.float().isnan(), want_q.float().isnan()), layout
    assert not bool(torch.isfinite(want_scale).all()) and (not rowwise or bool(finite_rows.sum() == 34))


def test_grid_rounding_ties_to_even_and_saturates() -> None:
    """Values on and halfway between e4m3 neighbours, the largest finite value and beyond it, subnormals."""
    from omninft_fast.kernels.fp8_quantize import quantize_fp8

    scale = torch.tensor(1.0, device=DEVICE)
    x = torch.tensor(
        [[1.0625, 1.1875, 1.125, 448.0, 464.0, -1e6, 2.0**-9, 1.5 * 2.0**-9, 2.0**-11, 3.0]], device=DEVICE
    )
    q, _ = quantize_fp8(x, fp8.E4M3, scale)
    want = [1.0, 1.25, 1.125, 448.0, 448.0, -448.0, 2.0**-9, 2.0**-8, 0.0, 3.0]
    assert q.float().tolist() == [want]


def test_kernel_errors() -> None:
    from omninft_fast.kernels.fp8_quantize import quantize_fp8

    x = torch.ones(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="x must be 2-D"):
        quantize_fp8(x[None], fp8.E4M3)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32"):
        quantize_fp8(x.long(), fp8.E4M3)
    with pytest.raises(ValueError, match="fp8_dtype must be one of"):
        quantize_fp8(x, torch.bfloat16)
    with pytest.raises(ValueError, match="scale must be a float32 scalar tensor"):
        quantize_fp8(x, fp8.E4M3, torch.ones(4, device=DEVICE))


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_linear_is_the_same_through_the_kernel(recipe: str, gen: torch.Generator, monkeypatch) -> None:
    """The layer's output and both gradients are identical whichever quantisation runs."""
    x = (torch.randn(2, 37, 64, generator=gen) * 3).to(DEVICE)
    weight = (torch.randn(48, 64, generator=gen) * 0.1).to(DEVICE)
    bias = torch.randn(48, generator=gen).to(DEVICE)
    grad = torch.randn(2, 37, 48, generator=gen).to(DEVICE)
    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("OMNINFT_BACKEND", backend)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = fp8.fp8_linear(*leaves, recipe=recipe)
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.equal(got, want)
