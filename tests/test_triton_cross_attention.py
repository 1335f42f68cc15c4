"""Triton cross-attention kernels against the float64 explicit-map oracle (interpreter on CPU, or a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton kernels need TRITON_INTERPRET=1 (CPU interpreter) or a CUDA device",
)

import omninft_fast  # noqa: E402
from omninft_fast.kernels.common import TileConfig, choose_split, split_chunk, tile_config  # noqa: E402
from omninft_fast.kernels.cross_attention import cross_attention_triton  # noqa: E402
from omninft_fast.kernels.cross_attention_bwd import attention_backward  # noqa: E402
from omninft_fast.kernels.cross_attention_fwd import attention_forward  # noqa: E402
from omninft_fast.kernels.key_mass import attention_key_mass  # noqa: E402
from omninft_fast.testing import explicit_cross_attention  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (B, Nq, Nk, H, D, dtype, forward split, dK/dV query split, dQ key split): ragged tails everywhere, both split
# paths forced on small shapes; the interpreter costs ~3 ms per program and block step, so shapes stay small.
CASES = [
    pytest.param(2, 100, 70, 2, 32, torch.float32, 1, 1, 1, id="no-split-d32-fp32"),
    pytest.param(1, 150, 40, 2, 64, torch.float16, 1, 3, 1, id="a2v-split-dkdv-d64-fp16"),
    pytest.param(1, 37, 200, 1, 128, torch.float32, 3, 1, 3, id="v2a-split-fwd-dq-d128-fp32"),
]


def _inputs(batch, n_q, n_k, heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q, heads, dim, generator=gen)
    k = torch.randn(batch, n_k, heads, dim, generator=gen)
    v = torch.randn(batch, n_k, heads, dim, generator=gen)
    grad_out = torch.randn(batch, n_q, heads, dim, generator=gen)
    return [x.to(device=DEVICE, dtype=dtype) for x in (q, k, v, grad_out)]


def _reference(q, k, v, grad_out, scale, kv_grad_scale):
    """float64 out, lse, dq, dk, dv, key mass through the materialised map."""
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    out, mass = explicit_cross_attention(qd, kd, vd, scale, kv_grad_scale)
    out.backward(grad_out.cpu().double())
    lse = (torch.einsum("bqhd,bkhd->bhqk", qd.detach(), kd.detach()) * scale).logsumexp(dim=-1)
    dk = torch.zeros_like(kd) if kd.grad is None else kd.grad
    dv = torch.zeros_like(vd) if vd.grad is None else vd.grad
    return out.detach(), lse, qd.grad, dk, dv, mass


def _poisoned(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return torch.full(shape or like.shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


def _close(name, got, want, tol):
    assert torch.isfinite(got).all(), f"{name}: some elements were not written (NaN poison left)"
    err = (got.double().cpu() - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize(("batch", "n_q", "n_k", "heads", "dim", "dtype", "split", "split_q", "split_k"), CASES)
def test_kernels_match_float64(batch, n_q, n_k, heads, dim, dtype, split, split_q, split_k):
    q, k, v, grad_out = _inputs(batch, n_q, n_k, heads, dim, dtype)
    scale = dim**-0.5
    tol = TOL[dtype]

    def forward():
        out, lse = _poisoned(q), _poisoned(q, (batch, heads, n_q), torch.float32)
        return attention_forward(q, k, v, scale, split=split, out=out, lse=lse)

    out, lse = forward()
    out2, lse2 = forward()
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "forward is not bit-identical across runs"
    mass = attention_key_mass(q, k, lse, scale, mass=_poisoned(q, (batch, n_k), torch.float32))
    assert torch.equal(mass, attention_key_mass(q, k, lse, scale)), "key mass is not bit-identical across runs"

    for kv_grad_scale in (0.0, 0.9, 1.0):
        ref_out, ref_lse, ref_dq, ref_dk, ref_dv, ref_mass = _reference(q, k, v, grad_out, scale, kv_grad_scale)

        def backward(kv_grad_scale=kv_grad_scale):
            grads = {"dq": _poisoned(q), "dk": _poisoned(k), "dv": _poisoned(v)}
            return attention_backward(
                grad_out, q, k, v, out, lse, scale, kv_grad_scale, split_q=split_q, split_k=split_k, **grads
            )

        dq, dk, dv = backward()
        _close("out", out, ref_out, tol)
        _close("lse", lse, ref_lse, tol)
        _close("key_mass", mass, ref_mass, tol)
        _close("dq", dq, ref_dq, 4 * tol)
        _close("dk", dk, ref_dk, 4 * tol)
        _close("dv", dv, ref_dv, 4 * tol)
        if kv_grad_scale == 0.0:
            assert not dk.any() and not dv.any(), "kv_grad_scale=0 must give exactly zero dk, dv"
        if kv_grad_scale == 0.9:
            again = backward()
            for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), again, strict=True):
                assert torch.equal(a, b), f"{name} is not bit-identical across runs"


@pytest.mark.parametrize("kv_grad_scale", [0.0, 0.9])
def test_public_op_autograd(kv_grad_scale):
    """Through ``omninft_fast.cross_attention`` with the default split heuristic and autograd."""
    q, k, v, grad_out = _inputs(2, 70, 90, 2, 64, torch.float32, seed=1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, mass = omninft_fast.cross_attention(
        q, k, v, kv_grad_scale=kv_grad_scale, return_key_mass=True, backend="triton"
    )
    out.backward(grad_out)
    ref_out, _, ref_dq, ref_dk, ref_dv, ref_mass = _reference(q, k, v, grad_out, 64**-0.5, kv_grad_scale)
    assert mass.dtype == torch.float32 and mass.shape == (2, 90) and not mass.requires_grad
    for name, got, want in (("out", out, ref_out), ("mass", mass, ref_mass), ("dq", q.grad, ref_dq)):
        _close(name, got.detach(), want, 1e-4)
    _close("dk", k.grad, ref_dk, 1e-4)
    _close("dv", v.grad, ref_dv, 1e-4)
    if kv_grad_scale == 0.0:
        assert not k.grad.any() and not v.grad.any()


def test_env_var_selects_triton(monkeypatch):
    q, k, v, _ = _inputs(1, 20, 30, 1, 32, torch.float16, seed=2)
    monkeypatch.setenv("OMNINFT_BACKEND", "triton")
    out = omninft_fast.cross_attention(q, k, v)
    ref_out, *_ = _reference(q, k, v, torch.zeros_like(q), 32**-0.5, 1.0)
    _close("out", out, ref_out, TOL[torch.float16])
    assert out.dtype == torch.float16


def test_opcheck():
    q, k, v, grad_out = _inputs(1, 20, 24, 1, 32, torch.float32, seed=3)
    ops = torch.ops.omninft_fast
    torch.library.opcheck(ops.cross_attention_fwd.default, (q.requires_grad_(), k.requires_grad_(), v, 0.2, 0.9))
    out, lse = ops.cross_attention_fwd(q.detach(), k.detach(), v, 0.2, 0.9)
    torch.library.opcheck(ops.cross_attention_bwd.default, (grad_out, q.detach(), k.detach(), v, out, lse, 0.2, 0.9))
    torch.library.opcheck(ops.cross_attention_key_mass.default, (q.detach(), k.detach(), lse, 0.2))


def test_split_heuristic():
    # A2V dK/dV at LTX-2's 5 s clip: 2 key blocks x 32 heads underfill 132 SMs; 96 query blocks to walk.
    assert choose_split(2 * 32, 96) == 5
    # V2A forward: 2 query blocks x 32 heads, 220 key blocks.
    assert choose_split(2 * 32, 220) == 5
    # A2V forward already fills the GPU.
    assert choose_split(96 * 32, 2) == 1
    # Never fewer than MIN_BLOCKS_PER_SPLIT blocks per chunk.
    assert choose_split(1, 9) == 2
    for length in (1, 63, 64, 65, 1000):
        for split in (1, 2, 3, 7, 50):
            chunk, count = split_chunk(length, split, 64)
            assert chunk % 64 == 0 and count <= split and (count - 1) * chunk < length <= count * chunk


def test_errors():
    q, k, v, _ = _inputs(1, 8, 8, 1, 16, torch.float32)
    with pytest.raises(TypeError, match="q: the triton backend"):
        cross_attention_triton(q.double(), k.double(), v.double(), 0.25, 1.0, False)
    big = torch.zeros(1, 2, 1, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        cross_attention_triton(big, big, big, 0.25, 1.0, False)
    with pytest.raises(ValueError, match="split must be >= 1"):
        split_chunk(10, 0, 64)


@pytest.mark.skipif(INTERPRET, reason="tl.dot on bfloat16 multiplies raw bits in the triton 3.7 interpreter")
def test_bfloat16_on_gpu():
    q, k, v, grad_out = _inputs(2, 300, 130, 4, 64, torch.bfloat16, seed=4)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, mass = omninft_fast.cross_attention(q, k, v, kv_grad_scale=0.9, return_key_mass=True, backend="triton")
    out.backward(grad_out)
    ref_out, _, ref_dq, ref_dk, ref_dv, ref_mass = _reference(q, k, v, grad_out, 64**-0.5, 0.9)
    tol = TOL[torch.bfloat16]
    for name, got, want in (("out", out, ref_out), ("mass", mass, ref_mass)):
        _close(name, got.detach(), want, tol)
    for name, got, want in (("dq", q.grad, ref_dq), ("dk", k.grad, ref_dk), ("dv", v.grad, ref_dv)):
        _close(name, got, want, 4 * tol)


def _check_launchers(q, k, v, grad_out, kv_grad_scale, tol, tile=None) -> None:
    """Forward, key mass and backward launchers (NaN-poisoned outputs) against the float64 oracle."""
    batch, n_k, scale = q.shape[0], k.shape[1], q.shape[-1] ** -0.5
    out, lse = attention_forward(q, k, v, scale, out=_poisoned(q), tile=tile)
    mass = attention_key_mass(q, k, lse, scale, mass=_poisoned(q, (batch, n_k), torch.float32), tile=tile)
    grads = {"dq": _poisoned(q), "dk": _poisoned(k), "dv": _poisoned(v)}
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, scale, kv_grad_scale, tile=tile, **grads)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv, ref_mass = _reference(q, k, v, grad_out, scale, kv_grad_scale)
    for name, got, want, factor in (
        ("out", out, ref_out, 1),
        ("lse", lse, ref_lse, 1),
        ("key_mass", mass, ref_mass, 1),
        ("dq", dq, ref_dq, 4),
        ("dk", dk, ref_dk, 4),
        ("dv", dv, ref_dv, 4),
    ):
        _close(name, got, want, factor * tol)


@pytest.mark.parametrize("tile", [TileConfig(32, 64, 4, 1), TileConfig(128, 32, 8, 2)], ids=str)
def test_explicit_tile(tile):
    """Any tile configuration computes the same function (the benchmarks sweep them)."""
    q, k, v, grad_out = _inputs(1, 150, 90, 2, 64, torch.float16, seed=5)
    _check_launchers(q, k, v, grad_out, 0.9, TOL[torch.float16], tile=tile)


def test_tile_config_errors():
    assert tile_config(64, torch.bfloat16) == TileConfig(64, 64, 4, 2)
    assert tile_config(64, torch.bfloat16, "key_mass") == TileConfig(128, 64, 4, 3)
    with pytest.raises(ValueError, match="kernel must be"):
        tile_config(64, torch.float16, "forward")
    assert tile_config(128, torch.float32).launch == {"num_warps": 8, "num_stages": 1}
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        TileConfig(48, 64, 4, 2)
    with pytest.raises(ValueError, match="num_warps"):
        TileConfig(64, 64, 3, 2)
    with pytest.raises(ValueError, match="num_stages"):
        TileConfig(64, 64, 4, 0)


@pytest.mark.skipif(INTERPRET, reason="LTX-2 sizes are too slow for the interpreter")
@pytest.mark.parametrize(("n_q", "n_k", "kv_grad_scale"), [(6144, 126, 0.9), (126, 6144, 1.0)], ids=["a2v", "v2a"])
def test_ltx2_shapes_bfloat16_on_gpu(n_q, n_k, kv_grad_scale):
    """LTX-2's 5 s 768x512 cross-modal shapes, 32 heads x 64, with the default split heuristic and tiles."""
    q, k, v, grad_out = _inputs(1, n_q, n_k, 32, 64, torch.bfloat16, seed=6)
    _check_launchers(q, k, v, grad_out, kv_grad_scale, TOL[torch.bfloat16])
