"""The ltx-core-compatible adapter: shapes, gradients with kv_grad_scale, key-mass sink, errors."""

from __future__ import annotations

import os

import pytest
import torch

from omninft_fast.dispatch import BackendError
from omninft_fast.ltx_attention import CrossAttentionFunction
from omninft_fast.testing import explicit_cross_attention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["reference"]
if INTERPRET:
    BACKENDS.append("triton")


def _flat(batch, tokens, heads, dim, seed, dtype=torch.float32):
    return torch.randn(batch, tokens, heads * dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_with_gradients_and_key_mass(backend):
    heads, dim = 2, 32
    q, k, v = _flat(2, 45, heads, dim, 0), _flat(2, 30, heads, dim, 1), _flat(2, 30, heads, dim, 2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    sink = []
    fn = CrossAttentionFunction(kv_grad_scale=0.5, backend=backend, key_mass_sink=sink.append)
    out = fn(q, k, v, heads)
    grad = _flat(2, 45, heads, dim, 3)
    out.backward(grad)

    split = [x.detach().double().view(2, -1, heads, dim).requires_grad_() for x in (q, k, v)]
    ref, ref_mass = explicit_cross_attention(*split, dim**-0.5, 0.5)
    ref.backward(grad.double().view(2, 45, heads, dim))
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref.reshape(2, 45, -1), atol=1e-5, rtol=1e-5)
    for x, r in zip((q, k, v), split, strict=True):
        torch.testing.assert_close(x.grad.double(), r.grad.reshape(x.shape), atol=1e-5, rtol=1e-5)
    assert len(sink) == 1 and sink[0].shape == (2, 30) and sink[0].dtype == torch.float32
    torch.testing.assert_close(sink[0].double(), ref_mass, atol=1e-5, rtol=1e-5)


def test_casts_q_and_k_to_v_dtype_and_sink_is_optional():
    q, k = _flat(1, 8, 2, 16, 0), _flat(1, 5, 2, 16, 1)
    v = _flat(1, 5, 2, 16, 2).to(torch.bfloat16)
    fn = CrossAttentionFunction(backend="reference")
    out = fn(q, k, v, 2)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 8, 32)
    assert "key_mass_sink=None" in repr(fn)


def test_check_values_reaches_the_op():
    """By default a CPU call checks values (a NaN in ``q`` is named); ``check_values=False`` leaves that to a caller
    that validates once per iteration (the NaN then reaches the output of its row only)."""
    heads, dim = 2, 16
    q, k, v = _flat(1, 5, heads, dim, 0), _flat(1, 4, heads, dim, 1), _flat(1, 4, heads, dim, 2)
    q[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^q\[0, 2, 0, 3\] is not finite"):
        CrossAttentionFunction(backend="reference")(q, k, v, heads)
    out = CrossAttentionFunction(backend="reference", check_values=False)(q, k, v, heads)
    assert out[0, 2, :dim].isnan().all() and not out[0, 2, dim:].isnan().any()
    assert not out[0, [0, 1, 3, 4]].isnan().any()


def test_errors():
    q = _flat(1, 4, 2, 8, 0)
    fn = CrossAttentionFunction(backend="reference")
    with pytest.raises(ValueError, match="mask"):
        fn(q, q, q, 2, mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="not divisible by heads"):
        fn(q, q, q, 3)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        fn(q, q, q, 0)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        fn(q[0], q, q, 2)
    with pytest.raises(ValueError, match="kv_grad_scale"):
        CrossAttentionFunction(kv_grad_scale=1.5)
    with pytest.raises(TypeError, match="key_mass_sink"):
        CrossAttentionFunction(key_mass_sink=3)
    other = _flat(2, 4, 2, 8, 1)
    with pytest.raises(
        ValueError, match=r"^k must have shape \(1, Tk, 16\) \(q's batch and width\), got \(2, 4, 16\)$"
    ):
        fn(q, other, q, 2)
    with pytest.raises(ValueError, match=r"^v must have shape \(1, Tk, 16\) \(q's batch and width\), got \(1, 4, 8\)$"):
        fn(q, q, q[..., :8], 2)
    with pytest.raises(ValueError, match="^k and v must have as many tokens, got 4 and 3$"):
        fn(q, q, q[:, :3], 2)
    with pytest.raises(BackendError, match=r"^backend='cpp': op 'cross_attention' has no such backend"):
        CrossAttentionFunction(backend="cpp")


def test_the_backend_variable_names_itself_for_an_op_without_that_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    q = _flat(1, 4, 2, 8, 0)
    monkeypatch.setenv("OMNINFT_BACKEND", "cpp")
    with pytest.raises(BackendError, match=r"^op 'cross_attention' has no 'cpp' backend \(OMNINFT_BACKEND='cpp';"):
        CrossAttentionFunction()(q, q, q, 2)


def test_drop_in_for_an_ltx_core_attention_module():
    attention = pytest.importorskip("ltx_core.model.transformer.attention", reason="ltx-core is not installed")
    torch.manual_seed(0)
    module = attention.Attention(query_dim=32, context_dim=24, heads=2, dim_head=16)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    module.attention_function = attention.AttentionFunction.PYTORCH
    expected = module(x, context)
    module.attention_function = CrossAttentionFunction(backend="reference")
    torch.testing.assert_close(module(x, context), expected, atol=1e-6, rtol=1e-6)
