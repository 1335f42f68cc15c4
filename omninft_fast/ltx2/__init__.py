"""Drop-in OmniNFT support for loaded LTX-2 models (ltx-core ``LTXModel``, diffusers ``LTX2VideoTransformer3DModel``).

``patch(model)`` routes every block's A2V and V2A core attention to ``omninft_fast.cross_attention``, applies
Eq 8-9's per-layer ``kv_grad_scale`` to A2V and captures Eq 10's V2A key mass inside
``handle.capture_region_scores``. Needs the ``ltx2`` extra (``requirements/ltx2.txt``).
"""

from omninft_fast.ltx2.patch import EQ9, PatchHandle, RegionCapture, patch

__all__ = ["EQ9", "PatchHandle", "RegionCapture", "patch"]
