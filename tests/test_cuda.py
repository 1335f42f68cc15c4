"""CUDA-only tests: the Triton NFT loss on CUDA tensors and ``torch.compile`` of every public op on CUDA (the FP8
linear included).

They run on a GPU machine (``scripts/gpu_check.sh`` calls them); elsewhere they are skipped. The Triton attention
kernels' CUDA tests live in ``test_triton_cross_attention.py``, which runs on CUDA tensors whenever
``TRITON_INTERPRET`` is off.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import omninft_fast as of
from omninft_fast.testing import explicit_group_advantages, explicit_region_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (loss rtol, gradient tolerance relative to its largest entry): float32 accumulation, half gradients rounded once.
TOLERANCES = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-5, 1e-3), torch.bfloat16: (2e-5, 8e-3)}


def _velocities(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch, tokens, _ = shape
    kw = {name: torch.randn(shape, generator=gen).to(dtype) for name in ("v_theta", "v_old", "target", "v_ref")}
    kw["r"] = torch.rand(batch, generator=gen)
    kw["token_weight"] = torch.rand(batch, tokens, generator=gen) + 0.1
    kw["sample_weight"] = torch.rand(batch, generator=gen) * 2
    kw["x0_norm_t"] = torch.rand(batch, generator=gen) * 0.9 + 0.05
    return kw


def _loss_and_grad(tensors: dict, device: str, backend: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient of ``nft_loss`` on ``device``; ``backend="float64"`` is the reference in float64."""
    float64 = backend == "float64"
    moved = {name: (t.double() if float64 else t).to(device) for name, t in tensors.items()}
    theta = moved.pop("v_theta").clone().requires_grad_()
    loss = of.nft_loss(theta, backend="reference" if float64 else backend, **moved, **options)
    loss.backward()
    return loss.detach().cpu().double(), theta.grad.cpu().double()


# option set -> (tensors passed besides v_theta, v_old, target, r; scalar options)
OPTION_SETS = {
    "plain": ((), {}),
    "weights": (("token_weight", "sample_weight"), {}),
    "kl": (("token_weight", "sample_weight", "v_ref"), {"kl_weight": 0.3}),
    "inverse_beta": ((), {"inverse_beta_scale": True}),
    "x0": (
        ("token_weight", "sample_weight", "v_ref", "x0_norm_t"),
        {"kl_weight": 0.3, "kl_space": "x0", "inverse_beta_scale": True, "policy_scale": 5.0},
    ),
}
CASES = list(itertools.product(DTYPES, (0.1, 1.0), OPTION_SETS))


@pytest.mark.parametrize(("dtype", "beta", "option"), CASES)
def test_triton_nft_loss_matches_float64(dtype: torch.dtype, beta: float, option: str) -> None:
    """The fused loss on CUDA tensors (ragged shape, 3 x 1000 x 200) against float64 on the CPU."""
    kw = _velocities((3, 1000, 200), dtype, seed=CASES.index((dtype, beta, option)))
    extra, options = OPTION_SETS[option]
    tensors = {name: kw[name] for name in ("v_theta", "v_old", "target", "r", *extra)}
    loss, grad = _loss_and_grad(tensors, "cuda", "triton", beta=beta, **options)
    ref_loss, ref_grad = _loss_and_grad(tensors, "cpu", "float64", beta=beta, **options)
    loss_rtol, grad_tol = TOLERANCES[dtype]
    # Gradients of a mean over 600k elements are ~1e-6: float16 stores them as subnormals (spacing 2**-24).
    floor = 2.0**-24 if dtype == torch.float16 else 0.0
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=0.0)
    torch.testing.assert_close(grad, ref_grad, rtol=0.0, atol=grad_tol * float(ref_grad.abs().max()) + floor)


def test_triton_nft_loss_large_and_deterministic() -> None:
    """An LTX-2 video stream at B = 4 (4 x 6144 x 128): loss and gradient bit-identical across calls."""
    kw = _velocities((4, 6144, 128), torch.bfloat16, seed=3)
    base = {name: kw[name].cuda() for name in ("v_theta", "v_old", "target", "r", "token_weight")}
    results = []
    for _ in range(2):
        theta = base["v_theta"].clone().requires_grad_()
        others = {k: v for k, v in base.items() if k != "v_theta"}
        loss = of.nft_loss(theta, beta=1.0, backend="triton", **others)
        loss.backward()
        results.append((loss.detach(), theta.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _compiled_matches_eager(fn, *args, wrt: tuple[torch.Tensor, ...] = ()) -> None:
    """``torch.compile(fn, fullgraph=True)`` gives eager's outputs, and (backward outside the compiled region) the
    same gradients of the first output with respect to ``wrt``."""
    eager = fn(*args)
    compiled = torch.compile(fn, fullgraph=True)(*args)
    for got, want in zip(
        torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(eager), strict=True
    ):
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if wrt:
        grads = [torch.autograd.grad(out[0].float().square().sum(), wrt) for out in (eager, compiled)]
        for got, want in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_nft_loss_on_cuda() -> None:
    kw = {name: t.cuda() for name, t in _velocities((2, 300, 128), torch.bfloat16, seed=4).items()}
    theta = kw["v_theta"].requires_grad_()

    def loss(theta, v_old, target, r, token_weight):
        return (of.nft_loss(theta, v_old, target, r, beta=1.0, token_weight=token_weight, backend="triton"),)

    _compiled_matches_eager(loss, theta, kw["v_old"], kw["target"], kw["r"], kw["token_weight"], wrt=(theta,))


@pytest.mark.parametrize("return_key_mass", [False, True])
def test_compile_cross_attention_on_cuda(return_key_mass: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 4, 64, generator=gen).cuda().to(torch.bfloat16) for n in (300, 90, 90))
    q, k = q.requires_grad_(), k.requires_grad_()

    def attend(q, k, v):
        return of.cross_attention(q, k, v, kv_grad_scale=0.9, return_key_mass=return_key_mass, backend="triton")

    _compiled_matches_eager(attend, q, k, v, wrt=(q, k))


def test_compile_small_ops_on_cuda() -> None:
    """Advantages, routing, optimality probability and region weights: compiled == eager == float64 oracle."""
    gen = torch.Generator().manual_seed(6)
    rewards = [torch.randn(4, 8, generator=gen).cuda() for _ in range(3)]
    scores = torch.rand(8, 500, generator=gen).cuda()

    def small_ops(rv, ra, rav, scores):
        adv = [of.group_advantages(x) for x in (rv, ra, rav)]
        adv_v, adv_a = of.route_advantages(*(a.flatten() for a in adv))
        return of.optimality_probability(adv_v), of.optimality_probability(adv_a), of.region_weights(scores, lam=1.5)

    _compiled_matches_eager(small_ops, *rewards, scores)
    torch.testing.assert_close(
        of.group_advantages(rewards[0]).cpu().double(), explicit_group_advantages(rewards[0].cpu().double())
    )
    torch.testing.assert_close(
        of.region_weights(scores, lam=1.5).cpu().double(), explicit_region_weights(scores.cpu().double(), 1.5)
    )


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_compile_fp8_linear_on_cuda(recipe: str) -> None:
    """Compiled, the FP8 linear quantises in inductor's kernels instead of the Triton one; both round to the same FP8
    values, so outputs and both gradients agree to the bf16 rounding of the results."""
    from omninft_fast import fp8

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 37, 64, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(48, 64, generator=gen) * 0.1).cuda().to(torch.bfloat16).requires_grad_()
    grad = torch.randn(2, 37, 48, generator=gen).cuda().to(torch.bfloat16)
    results = []
    for fn in (fp8.fp8_linear, torch.compile(fp8.fp8_linear, fullgraph=True)):
        out = fn(x, weight, recipe=recipe)
        results.append((out, *torch.autograd.grad(out, (x, weight), grad)))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2 * float(want.abs().max()))


def test_public_ops_pick_triton_on_cuda() -> None:
    """``auto`` on CUDA tensors runs the Triton kernels (same result as asking for them)."""
    kw = {name: t.cuda() for name, t in _velocities((2, 50, 64), torch.float32, seed=7).items()}
    loss = functools.partial(of.nft_loss, kw["v_theta"], kw["v_old"], kw["target"], kw["r"], beta=1.0)
    assert torch.equal(loss(), loss(backend="triton"))


def test_noise_on_cuda_is_drawn_there_from_one_cpu_draw() -> None:
    """``draw_noise`` on a GPU: standard normal, the same for the same CPU generator state, and the CPU generator
    advanced by exactly one draw (so the rest of the run's random stream does not depend on the batch's size)."""
    from types import SimpleNamespace

    from omninft_fast.train.stages import draw_noise

    spec = SimpleNamespace(video_tokens=6144, video_channels=128, audio_tokens=126, audio_channels=128)
    device = torch.device("cuda")
    first, second = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    video, audio = draw_noise(spec, 4, first, device)
    again = draw_noise(spec, 4, second, device)
    assert video.device.type == "cuda" and video.shape == (4, 6144, 128) and audio.shape == (4, 126, 128)
    assert torch.equal(video, again[0]) and torch.equal(audio, again[1])
    assert abs(float(video.mean())) < 0.01 and abs(float(video.std()) - 1) < 0.01
    reference = torch.Generator().manual_seed(7)
    torch.randint(0, 2**62, (), generator=reference)
    assert torch.equal(first.get_state(), reference.get_state())


def test_host_tensors_reach_the_gpu_without_a_synchronisation() -> None:
    """``to_device`` and ``Condition.to`` copy host tensors through pinned memory without waiting for the GPU (CUDA's
    sync debug mode raises on a synchronising copy), with the values and dtypes asked for."""
    from omninft_fast.train.model import Condition, to_device

    gen = torch.Generator().manual_seed(0)
    video, audio = torch.randn((2, 5, 8), generator=gen), torch.randn((2, 3, 4), generator=gen)
    device = torch.device("cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        busy = torch.randn((4096, 4096), device=device)
        for _ in range(8):
            busy = busy @ busy / 64
        moved = to_device(video, device)
        cond = Condition(video, audio).to(device, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), video)
    assert cond.video.dtype == cond.audio.dtype == torch.bfloat16
    assert torch.equal(cond.audio.cpu(), audio.bfloat16()) and torch.equal(cond.video.cpu(), video.bfloat16())
