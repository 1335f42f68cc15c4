"""pytest-benchmark micro cases of the NFT loss on CPU at LTX-2 sizes (B=1, 128 channels), forward + backward.

Run: ``python -m pytest benchmarks/test_bench_nft_loss.py --benchmark-enable`` (timings are not asserted).
"""

from __future__ import annotations

import pytest
import torch

from omninft_fast import dispatch
from omninft_fast.ops.nft_loss import nft_loss_reference

CASES = {"audio_126": 126, "video_6144": 6144, "video_14080": 14080}


def _implementations() -> list:
    impls = [pytest.param(nft_loss_reference, id="eager")]
    if dispatch.cpp_extension_error() is None:
        from omninft_fast.ops.nft_loss_cpp import nft_loss_cpp

        impls.append(pytest.param(nft_loss_cpp, id="cpp"))
    return impls


@pytest.mark.parametrize("tokens", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("impl", _implementations())
def test_nft_loss_step(benchmark, impl, tokens: int) -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(1, tokens, 128, generator=g).requires_grad_()
    old, target = torch.randn(1, tokens, 128, generator=g), torch.randn(1, tokens, 128, generator=g)
    r, token_weight = torch.rand(1, generator=g), torch.rand(1, tokens, generator=g) + 0.5

    def step() -> None:
        theta.grad = None
        options = {"token_weight": token_weight, "sample_weight": None, "v_ref": None, "x0_norm_t": None, "kl_t": None}
        impl(theta, old, target, r, beta=1.0, policy_scale=1.0, kl_weight=0.0, **options).backward()

    benchmark(step)
