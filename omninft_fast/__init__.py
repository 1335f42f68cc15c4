"""omninft-fast: kernel-level training engine for OmniNFT on LTX-2.

Public ops (one module per equation of the paper, see ``docs/architecture.md``):

- ``group_advantages``, ``optimality_probability`` (Eq 6), ``route_advantages`` (Eq 7)
- ``nft_loss`` (Eq 3-5, 12), ``adaptive_x0_weight`` (DiffusionNFT's per-sample weight)
- ``partial_detach`` (Eq 8), ``detach_schedule`` (Eq 9)
- ``cross_attention`` (Eq 8 on K/V, Eq 10's inner sum as key mass)
- ``RegionScoreAccumulator`` (Eq 10), ``region_weights`` (Eq 11)
- ``CrossAttentionFunction``: ``cross_attention`` as an ltx-core ``attention_function`` on ``(B, T, H*D)``
"""

from omninft_fast.dispatch import BackendError
from omninft_fast.ltx_attention import CrossAttentionFunction
from omninft_fast.ops.advantages import group_advantages, optimality_probability, route_advantages
from omninft_fast.ops.attention import cross_attention
from omninft_fast.ops.nft_loss import adaptive_x0_weight, nft_loss
from omninft_fast.ops.region import RegionScoreAccumulator, region_weights
from omninft_fast.ops.surgery import detach_schedule, partial_detach

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CrossAttentionFunction",
    "RegionScoreAccumulator",
    "adaptive_x0_weight",
    "cross_attention",
    "detach_schedule",
    "group_advantages",
    "nft_loss",
    "optimality_probability",
    "partial_detach",
    "region_weights",
    "route_advantages",
]
