"""The core attention of both LTX-2 drop-ins (ltx-core and diffusers), backed by ``omninft_fast.cross_attention``.

ltx-core's ``Attention`` modules call ``self.attention_function(q, k, v, heads, mask)`` on ``(B, T, H*D)`` tensors.
An instance of ``CrossAttentionFunction`` can be assigned there, e.g. for the shallow A2V layers of Eq 8::

    block.audio_to_video_attn.attention_function = CrossAttentionFunction(kv_grad_scale=1 - alpha)

and, for region weights (Eq 10), on a V2A module with a sink that receives the ``(B, Nk)`` key mass::

    scores = []
    block.video_to_audio_attn.attention_function = CrossAttentionFunction(key_mass_sink=scores.append)

diffusers' processor (``omninft_fast.ltx2.diffusers``) keeps the library's projections and calls ``attend`` of the
same class, so both libraries cast, reshape, dispatch and capture the key mass in one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from omninft_fast import dispatch
from omninft_fast._checks import check_scalar, check_tensor
from omninft_fast.ops.attention import cross_attention


class CrossAttentionFunction:
    """Callable ``(q, k, v, heads, mask=None) -> out`` with ltx-core's ``AttentionCallable`` signature.

    Args:
        kv_grad_scale: gradient scale for ``k`` and ``v`` in ``[0, 1]`` (``1 - alpha`` of Eq 8); the forward is
            unchanged.
        backend: ``auto`` | ``triton`` | ``reference``; default (None) from ``$OMNINFT_BACKEND`` on
            every call.
        key_mass_sink: called with the ``(B, Nk)`` float32 key mass (no gradient) after every call; ``None``
            (the default) skips the key-mass pass entirely.
        softmax_scale: logit scale, default ``1 / sqrt(D)`` as in ltx-core and diffusers.
        check_values: ``cross_attention``'s per-call value checks (None: its default, on for CPU tensors); a caller
            that validates what the attention produces once per iteration (the trainer) passes False.

    Attributes of the same names may be changed between calls (e.g. a sink only during the last sampling steps).
    """

    def __init__(
        self,
        kv_grad_scale: float = 1.0,
        backend: str | None = None,
        key_mass_sink: Callable[[torch.Tensor], object] | None = None,
        softmax_scale: float | None = None,
        check_values: bool | None = None,
    ) -> None:
        self.kv_grad_scale = check_scalar("kv_grad_scale", kv_grad_scale, low=0.0, high=1.0)
        dispatch.check_op_backend("cross_attention", backend)
        if key_mass_sink is not None and not callable(key_mass_sink):
            raise TypeError(f"key_mass_sink must be callable or None, got {type(key_mass_sink).__name__}")
        self.backend = backend
        self.key_mass_sink = key_mass_sink
        self.softmax_scale = softmax_scale
        self.check_values = check_values

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ltx-core's call: ``attend`` without a mask."""
        if mask is not None:
            raise ValueError("mask: CrossAttentionFunction supports mask=None only (LTX-2's A2V and V2A use none)")
        return self.attend(q, k, v, heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """Attention of ``q (B, Tq, H*D)`` over ``k, v (B, Tk, H*D)`` with ``heads`` heads -> ``(B, Tq, H*D)``.

        ``q`` and ``k`` are cast to ``v``'s dtype first, as the libraries' own attention does under autocast
        (ltx-core applies RoPE in float32; under CUDA autocast diffusers' q/k RMSNorm returns float32 beside
        bfloat16 values). The result has ``v``'s dtype.
        """
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, x, ndim=3)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if q.shape[-1] % heads:
            raise ValueError(f"q's last dimension {q.shape[-1]} is not divisible by heads={heads}")
        batch, n_q, width = q.shape
        for name, x in (("k", k), ("v", v)):
            if x.shape[0] != batch or x.shape[2] != width:
                raise ValueError(
                    f"{name} must have shape ({batch}, Tk, {width}) (q's batch and width), got {tuple(x.shape)}"
                )
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must have as many tokens, got {k.shape[1]} and {v.shape[1]}")
        head_dim = width // heads
        q4, k4, v4 = (x.to(v.dtype).reshape(batch, x.shape[1], heads, head_dim) for x in (q, k, v))
        sink = self.key_mass_sink
        result = cross_attention(
            q4,
            k4,
            v4,
            softmax_scale=self.softmax_scale,
            kv_grad_scale=self.kv_grad_scale,
            return_key_mass=sink is not None,
            backend=self.backend,
            check_values=self.check_values,
        )
        if sink is None:
            out = result
        else:
            out, key_mass = result
            sink(key_mass)
        return out.reshape(batch, n_q, width)

    def __repr__(self) -> str:
        sink = "set" if self.key_mass_sink is not None else "None"
        return (
            f"CrossAttentionFunction(kv_grad_scale={self.kv_grad_scale}, backend={self.backend!r}, "
            f"key_mass_sink={sink})"
        )
