"""Attention processor for diffusers' LTX-2 A2V/V2A ``LTX2Attention`` modules running on ``cross_attention``.

It keeps the library's projections, q/k RMSNorm, rotary embedding and per-head gating, and swaps only the core
attention (``dispatch_attention_fn`` in ``LTX2AudioVideoAttnProcessor``) for ``CrossAttentionFunction.attend``,
the core the ltx-core drop-in uses too.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb
from torch import nn

from omninft_fast.ltx_attention import CrossAttentionFunction

_ROTATIONS = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}


def context_parallel_error(parallel_config: object) -> str | None:
    """Why a diffusers parallel config cannot run the patched attention, or None when it can.

    Context parallelism shards the token axis and replaces the attention itself (ring / Ulysses exchange); this
    processor would attend to the local shard only, so it is refused. Tensor parallelism only shards weights.
    """
    if getattr(parallel_config, "context_parallel_config", None) is None:
        return None
    return (
        "omninft_fast.ltx2 does not support diffusers' context parallelism (the patched A2V/V2A attention would "
        "only see this rank's token shard); run the model without a context_parallel_config"
    )


class LTX2CrossAttnProcessor:
    """Processor for ``transformer_blocks.{i}.audio_to_video_attn`` / ``.video_to_audio_attn``.

    Args:
        core: the shared core attention (``kv_grad_scale``, ``backend``, ``key_mass_sink``); a default one when
            None.
    """

    # Set by diffusers' ``enable_parallelism`` on every processor that has it; checked on every call.
    _parallel_config = None

    def __init__(self, core: CrossAttentionFunction | None = None) -> None:
        self.core = CrossAttentionFunction() if core is None else core

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
        refusal = context_parallel_error(self._parallel_config)
        if refusal is not None:
            raise RuntimeError(refusal)
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
            rotate = _ROTATIONS.get(attn.rope_type)
            if rotate is None:
                raise ValueError(f"unknown rope_type {attn.rope_type!r} on {type(attn).__name__}")
            query = rotate(query, query_rotary_emb)
            key = rotate(key, query_rotary_emb if key_rotary_emb is None else key_rotary_emb)

        out = self.core.attend(query, key, value, attn.heads).to(query.dtype)
        if attn.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))  # (B, Nq, H)
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))
