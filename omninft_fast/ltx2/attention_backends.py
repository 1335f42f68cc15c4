"""The backend of an ltx-core LTX-2's self- and text-attention: PyTorch SDPA, xformers, FlashAttention-3 or
flash-attn, chosen by name or ``auto`` (the fastest one present that runs on the device).

``set_attention_backend(model, name, device)`` sets the ``attention_function`` of every ltx-core ``Attention`` of
``model`` except the A2V / V2A modules (``ltx2.patch`` owns those) and returns the backend it chose. FlashAttention-3
and flash-attn take no mask and only half precision: a call with a mask (text attention under a padding mask) or in
float32 goes to PyTorch SDPA.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

ATTENTION_BACKENDS = ("auto", "pytorch", "xformers", "flash_attention_3", "flash_attn")
CROSS_MODAL = ("audio_to_video_attn", "video_to_audio_attn")
_MODULES = {"xformers": "xformers", "flash_attention_3": "flash_attn_interface", "flash_attn": "flash_attn"}


def unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (``None``: it can)."""
    if name == "pytorch":
        return None
    if name not in _MODULES:
        raise ValueError(f"model.attention must be one of {list(ATTENTION_BACKENDS)}, got {name!r}")
    if importlib.util.find_spec(_MODULES[name]) is None:
        return f"the {_MODULES[name]} package is not installed"
    if device.type != "cuda":
        return f"it needs a CUDA device (the model is on {device.type})"
    needs = {
        "flash_attention_3": ((9, 0), "FlashAttention-3 needs an sm_90 GPU"),
        "flash_attn": ((8, 0), "flash-attn needs an sm_80 or newer GPU"),
    }.get(name)
    if needs and torch.cuda.get_device_capability(device) < needs[0]:
        return needs[1]
    return None


def resolve(name: str, device: torch.device) -> str:
    """The backend that ``name`` selects on ``device``: ``auto`` takes the first runnable of FlashAttention-3,
    flash-attn, xformers, PyTorch; a named one must be runnable (``ValueError`` saying why not)."""
    if name == "auto":
        return next(n for n in ("flash_attention_3", "flash_attn", "xformers", "pytorch") if not unavailable(n, device))
    reason = unavailable(name, device)
    if reason:
        raise ValueError(f"model.attention={name} cannot run here: {reason}")
    return name


class _WithoutMask:
    """An ltx-core attention callable for a mask-less kernel: ``(B, T, H*D)`` q, k, v -> ``(B, T, H*D)``; calls
    with a mask go to PyTorch SDPA."""

    def __init__(self, name: str) -> None:
        self.name = name
        # The package itself, not ltx-core's FLASH_ATTENTION_3 (which ltx-core disables where xformers is installed);
        # imported here, once: an import inside the call would break a compiled model's graph at every attention.
        self.flash_attn_func = importlib.import_module(_MODULES[name]).flash_attn_func

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        from ltx_core.model.transformer.attention import AttentionFunction

        if mask is not None or v.dtype not in (torch.float16, torch.bfloat16):
            return AttentionFunction.PYTORCH(q, k, v, heads, mask)
        b, _, width = q.shape
        q, k, v = (x.to(v.dtype).view(b, -1, heads, width // heads) for x in (q, k, v))
        out = self.flash_attn_func(q, k, v)
        # Older FlashAttention-3 builds return (out, log-sum-exp).
        return (out[0] if isinstance(out, tuple) else out).reshape(b, -1, width)


def attention_function(name: str) -> Any:
    """The ltx-core attention callable of a resolved backend ``name``."""
    from ltx_core.model.transformer.attention import AttentionFunction

    if name in ("flash_attention_3", "flash_attn"):
        return _WithoutMask(name)
    return AttentionFunction.XFORMERS if name == "xformers" else AttentionFunction.PYTORCH


def set_attention_backend(model: nn.Module, name: str, device: torch.device) -> str:
    """Run the self- and text-attention of ``model`` (an ltx-core ``LTXModel``) through backend ``name`` (or the
    one ``auto`` picks on ``device``); returns the backend used."""
    from ltx_core.model.transformer.attention import Attention

    chosen = resolve(name, device)
    function = attention_function(chosen)
    for path, module in model.named_modules():
        if isinstance(module, Attention) and not any(part in CROSS_MODAL for part in path.split(".")):
            module.attention_function = function
    return chosen
