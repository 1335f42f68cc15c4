"""The fused NFT loss on CPU: the ``omninft_fast._C`` extension behind ``torch.library`` and autograd.

Importing ``omninft_fast._C`` registers the op ``omninft_fast::nft_loss_cpp_forward`` (CPU kernel in C++);
``FusedNFTLossBackend`` adds its fake implementation, for ``torch.compile`` and ``opcheck``, and runs it under the
shared autograd wrapper of the fused losses.
"""

from __future__ import annotations

from omninft_fast import _C  # noqa: F401  (registers torch.ops.omninft_fast.nft_loss_cpp_forward)
from omninft_fast.ops.nft_loss import FusedNFTLossBackend

# ``nft_loss`` backend for CPU tensors, called like ``nft_loss_reference``.
nft_loss_cpp = FusedNFTLossBackend("omninft_fast::nft_loss_cpp_forward")
nft_loss_cpp_forward = nft_loss_cpp.op
