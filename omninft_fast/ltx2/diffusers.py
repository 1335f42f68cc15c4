"""Attention processor for diffusers' LTX-2 A2V/V2A ``LTX2Attention`` modules running on ``cross_attention``.

It keeps the library's projections, q/k RMSNorm, rotary embedding and per-head gating, and swaps only the core
attention (``dispatch_attention_fn`` in ``LTX2AudioVideoAttnProcessor``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omninft_fast.ops.attention import cross_attention


class LTX2CrossAttnProcessor:
    """Processor for ``transformer_blocks.{i}.audio_to_video_attn`` / ``.video_to_audio_attn``.

    Args:
        kv_grad_scale: gradient scale of the keys/values, ``1 - alpha`` of Eq 8.
        backend: ``cross_attention`` backend.
        key_mass_sink: called with the ``(B, Nk)`` key mass of every forward when given (Eq 10's inner sum).
    """

    def __init__(
        self,
        kv_grad_scale: float = 1.0,
        backend: str | None = None,
        key_mass_sink: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.kv_grad_scale = kv_grad_scale
        self.backend = backend
        self.key_mass_sink = key_mass_sink

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``hidden_states (B, Nq, Dq)`` attends to ``encoder_hidden_states (B, Nk, Dk)``; returns ``(B, Nq, Dq)``."""
        from diffusers.models.transformers.transformer_ltx2 import (
            apply_interleaved_rotary_emb,
            apply_split_rotary_emb,
        )

        if attention_mask is not None:
            raise ValueError(
                "attention_mask is not supported by the omninft_fast LTX-2 A2V/V2A processor (LTX-2 passes none to "
                "its cross-modal attention)"
            )
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(context))
        value = attn.to_v(context)
        if query_rotary_emb is not None:
            rotate = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}.get(attn.rope_type)
            if rotate is None:
                raise ValueError(f"unknown rope_type {attn.rope_type!r} on {type(attn).__name__}")
            query = rotate(query, query_rotary_emb)
            key = rotate(key, query_rotary_emb if key_rotary_emb is None else key_rotary_emb)

        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))  # (B, N, H, D)
        if self.key_mass_sink is None:
            out = cross_attention(q, k, v, kv_grad_scale=self.kv_grad_scale, backend=self.backend)
        else:
            out, key_mass = cross_attention(
                q, k, v, kv_grad_scale=self.kv_grad_scale, return_key_mass=True, backend=self.backend
            )
            self.key_mass_sink(key_mass)
        out = out.flatten(2, 3).to(query.dtype)

        if attn.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))  # (B, Nq, H)
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))
