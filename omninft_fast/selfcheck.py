"""``omninft-fast selfcheck``: run every op on every backend that works here against the float64 oracles."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import omninft_fast as of
from omninft_fast import dispatch, testing


@dataclass
class CheckRow:
    op: str
    backend: str
    case: str
    max_error: float
    tolerance: float
    millis: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, 1e3 * (time.perf_counter() - start)


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).abs().max())


def _check_attention(rows: list[CheckRow], generator: torch.Generator, device: torch.device) -> None:
    b, nq, nk, h, d, grad_scale = 2, 96, 37, 4, 32, 0.9
    q, k, v = (torch.randn(b, n, h, d, generator=generator).to(device) for n in (nq, nk, nk))
    scale = 1 / math.sqrt(d)
    grad_out = torch.randn(b, nq, h, d, generator=generator).to(device)
    leaves = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    want_out, want_mass = testing.explicit_cross_attention(*leaves, scale, grad_scale)
    want_grads = torch.autograd.grad(want_out, leaves, grad_out.double().cpu())
    for backend in dispatch.available_backends("cross_attention", device):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]

        def run(inputs: list[torch.Tensor] = inputs, backend: str = backend) -> tuple:
            out, mass = of.cross_attention(
                *inputs, softmax_scale=scale, kv_grad_scale=grad_scale, return_key_mass=True, backend=backend
            )
            return out, mass, torch.autograd.grad(out, inputs, grad_out)

        (out, mass, grads), millis = _timed(run)
        error = max(
            _max_error(out.cpu(), want_out),
            _max_error(mass.cpu(), want_mass),
            *(_max_error(g.cpu(), w) for g, w in zip(grads, want_grads, strict=True)),
        )
        case = f"B{b} Nq{nq} Nk{nk} H{h} D{d} fwd+bwd+mass"
        rows.append(CheckRow("cross_attention", backend, case, error, 1e-4, millis))


def _check_nft_loss(rows: list[CheckRow], generator: torch.Generator, device: torch.device) -> None:
    b, n, c, beta = 3, 77, 24, 0.1
    v_theta, v_old, target = (torch.randn(b, n, c, generator=generator).to(device) for _ in range(3))
    r = torch.rand(b, generator=generator).to(device)
    token_weight = of.region_weights(torch.rand(b, n, generator=generator)).to(device)
    sample_weight = torch.rand(b, generator=generator).to(device) + 0.5
    times = torch.rand(b, generator=generator).to(device) * 0.9 + 0.05
    for x0_norm_t in (None, times):
        leaf = v_theta.double().cpu().requires_grad_()
        want = testing.explicit_nft_loss(
            leaf, v_old.cpu(), target.cpu(), r.cpu(), beta, token_weight.cpu(), sample_weight.cpu(),
            x0_norm_t=None if x0_norm_t is None else x0_norm_t.cpu(),
        )  # fmt: skip
        (want_grad,) = torch.autograd.grad(want, leaf)
        case = f"B{b} N{n} C{c} weighted{'' if x0_norm_t is None else ' x0-normalised'} fwd+bwd"
        for backend in dispatch.available_backends("nft_loss", device):
            theta = v_theta.clone().requires_grad_()

            def run(theta: torch.Tensor = theta, backend: str = backend, t: torch.Tensor | None = x0_norm_t) -> tuple:
                loss = of.nft_loss(
                    theta,
                    v_old,
                    target,
                    r,
                    beta=beta,
                    token_weight=token_weight,
                    sample_weight=sample_weight,
                    x0_norm_t=t,
                    backend=backend,
                )
                return loss, torch.autograd.grad(loss, theta)[0]

            (loss, grad), millis = _timed(run)
            error = max(_max_error(loss.cpu(), want), _max_error(grad.cpu(), want_grad))
            rows.append(CheckRow("nft_loss", backend, case, error, 1e-5, millis))


def _check_small_ops(rows: list[CheckRow], generator: torch.Generator) -> None:
    rewards = torch.rand(4, 8, generator=generator)
    rewards[2] = 0.25
    got, millis = _timed(lambda: of.group_advantages(rewards))
    rows.append(
        CheckRow(
            "group_advantages",
            "reference",
            "P4 G8, one flat group",
            _max_error(got, testing.explicit_group_advantages(rewards)),
            1e-5,
            millis,
        )
    )
    scores = torch.rand(3, 50, generator=generator)
    got, millis = _timed(lambda: of.region_weights(scores, lam=1.5))
    rows.append(
        CheckRow(
            "region_weights",
            "reference",
            "B3 N50",
            _max_error(got, testing.explicit_region_weights(scores, 1.5)),
            1e-6,
            millis,
        )
    )
    adv = torch.randn(3, 4, 8, generator=generator)
    (video, audio), millis = _timed(lambda: of.route_advantages(adv[0], adv[1], adv[2]))
    error = max(_max_error(video, adv[0] + adv[2]), _max_error(audio, adv[1] + adv[2]))
    rows.append(CheckRow("route_advantages", "reference", "modality, P4 G8", error, 0.0, millis))
    x = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    grad, millis = _timed(lambda: torch.autograd.grad(of.partial_detach(x, 0.1).sum(), x)[0])
    rows.append(
        CheckRow(
            "partial_detach",
            "reference",
            "alpha 0.1 gradient",
            _max_error(grad, torch.full_like(x, 0.9)),
            1e-15,
            millis,
        )
    )


def run_selfcheck(seed: int = 0, device: str = "cpu") -> list[CheckRow]:
    """Every op on every backend usable on ``device`` against the oracles in ``omninft_fast.testing``."""
    generator = torch.Generator().manual_seed(seed)
    rows: list[CheckRow] = []
    target = torch.device(device)
    _check_attention(rows, generator, target)
    _check_nft_loss(rows, generator, target)
    _check_small_ops(rows, generator)
    return rows


def format_rows(rows: list[CheckRow]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| op | backend | case | max abs error | tolerance | ms | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.op} | {row.backend} | {row.case} | {row.max_error:.2e} | {row.tolerance:.0e} | "
            f"{row.millis:.1f} | {'yes' if row.ok else 'NO'} |"
        )
    return "\n".join(lines)
