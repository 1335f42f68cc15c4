"""The fused NFT loss in Triton: the plain launcher of ``omninft_fast.kernels.nft_loss`` as the ``torch.library``
op ``omninft_fast::nft_loss_triton_forward``, run under the shared autograd wrapper of the fused losses."""

from __future__ import annotations

import torch

from omninft_fast.kernels.nft_loss import nft_loss_forward, scale_gradient_
from omninft_fast.ops.nft_loss import FusedNFTLossBackend

torch.library.custom_op("omninft_fast::nft_loss_triton_forward", nft_loss_forward, mutates_args=())

# ``nft_loss`` backend for CUDA tensors (CPU tensors under TRITON_INTERPRET=1), called like ``nft_loss_reference``;
# eager calls launch the kernels directly and scale the gradient in place in backward, compiled graphs call the
# registered op.
nft_loss_triton = FusedNFTLossBackend(
    "omninft_fast::nft_loss_triton_forward", eager=nft_loss_forward, rescale_=scale_gradient_
)
nft_loss_triton_forward = nft_loss_triton.op
