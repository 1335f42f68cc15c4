"""omninft-fast: kernel-level training engine for OmniNFT on LTX-2.

Public ops (one module per equation of the paper, see ``docs/architecture.md``):

- ``group_advantages``, ``optimality_probability`` (Eq 6), ``route_advantages`` (Eq 7)
- ``nft_loss`` (Eq 3-5, 12), ``adaptive_x0_weight`` (DiffusionNFT's per-sample weight)
- ``partial_detach`` (Eq 8), ``detach_schedule`` (Eq 9)
- ``cross_attention`` (Eq 8 on K/V, Eq 10's inner sum as key mass)
- ``RegionScoreAccumulator`` (Eq 10), ``region_weights`` (Eq 11; ``frame_region_weights``: the release's form)
- ``CrossAttentionFunction``: ``cross_attention`` as an ltx-core ``attention_function`` on ``(B, T, H*D)``

Ops check tensor values (ranges, NaN) only where it costs no GPU synchronisation (CPU tensors, eager) unless told
otherwise (``check_values=``, ``$OMNINFT_CHECK_VALUES``); ``check_<op>_values`` run the same checks on demand.
"""

from omninft_fast.dispatch import BackendError
from omninft_fast.ltx_attention import CrossAttentionFunction
from omninft_fast.ops.advantages import (
    check_group_advantages_values,
    check_route_advantages_values,
    group_advantages,
    optimality_probability,
    route_advantages,
)
from omninft_fast.ops.attention import check_cross_attention_values, cross_attention
from omninft_fast.ops.nft_loss import adaptive_x0_weight, check_nft_loss_values, nft_loss
from omninft_fast.ops.region import (
    RegionScoreAccumulator,
    check_region_weights_values,
    frame_region_weights,
    region_weights,
)
from omninft_fast.ops.surgery import detach_schedule, partial_detach

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CrossAttentionFunction",
    "RegionScoreAccumulator",
    "adaptive_x0_weight",
    "check_cross_attention_values",
    "check_group_advantages_values",
    "check_nft_loss_values",
    "check_region_weights_values",
    "check_route_advantages_values",
    "cross_attention",
    "detach_schedule",
    "frame_region_weights",
    "group_advantages",
    "nft_loss",
    "optimality_probability",
    "partial_detach",
    "region_weights",
    "route_advantages",
]
