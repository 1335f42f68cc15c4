"""Value checks (ranges, NaN, zero weight sums): when the ops run them, and the public helpers that run them alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import omninft_fast as of
from omninft_fast._checks import CHECK_VALUES_ENV, value_checks_on

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")


def _nft_args(**change: object) -> dict:
    g = torch.Generator().manual_seed(0)
    kwargs = {name: torch.randn(2, 3, 4, generator=g) for name in ("v_theta", "v_old", "target")}
    return kwargs | {"r": torch.full((2,), 0.5), "beta": 0.5, "backend": "reference"} | change


def _qkv(bad: str | None = None) -> dict:
    g = torch.Generator().manual_seed(1)
    qkv = {name: torch.randn(1, 3, 2, 4, generator=g) for name in ("q", "k", "v")}
    if bad is not None:
        qkv[bad][0, 2, 1, 3] = float("nan")
    return qkv


NAN_2x2 = torch.tensor([[0.0, 1.0], [float("nan"), 2.0]])

# (name, op call with bad values, the same check through the public helper, expected message)
CASES: list[tuple[str, Callable[..., object], Callable[[], None], str]] = [
    (
        "nft_loss r",
        lambda **kw: of.nft_loss(**_nft_args(r=torch.tensor([0.5, 1.5])), **kw),
        lambda: of.check_nft_loss_values(torch.tensor([0.5, 1.5])),
        r"r\[1\] = 1.5 is outside \[0.0, 1.0\]",
    ),
    (
        "nft_loss token_weight sum",
        lambda **kw: of.nft_loss(**_nft_args(token_weight=torch.tensor([[1.0, 1, 1], [0, 0, 0]])), **kw),
        lambda: of.check_nft_loss_values(torch.full((2,), 0.5), token_weight=torch.tensor([[1.0, 1, 1], [0, 0, 0]])),
        r"token_weight\[1\] sums to 0",
    ),
    (
        "nft_loss sample_weight",
        lambda **kw: of.nft_loss(**_nft_args(sample_weight=torch.tensor([1.0, float("inf")])), **kw),
        lambda: of.check_nft_loss_values(torch.full((2,), 0.5), sample_weight=torch.tensor([1.0, float("inf")])),
        r"sample_weight\[1\] is not finite",
    ),
    (
        "nft_loss x0_norm_t",
        lambda **kw: of.nft_loss(**_nft_args(x0_norm_t=torch.tensor([0.5, 0.0])), **kw),
        lambda: of.check_nft_loss_values(torch.full((2,), 0.5), x0_norm_t=torch.tensor([0.5, 0.0])),
        r"x0_norm_t\[1\] = 0.0 must be > 0",
    ),
    (
        "cross_attention",
        lambda **kw: of.cross_attention(**_qkv("k"), backend="reference", **kw),
        lambda: of.check_cross_attention_values(**_qkv("k")),
        r"k\[0, 2, 1, 3\] is not finite",
    ),
    (
        "region_weights",
        lambda **kw: of.region_weights(NAN_2x2, **kw),
        lambda: of.check_region_weights_values(NAN_2x2),
        r"scores\[1, 0\] is not finite",
    ),
    (
        "group_advantages",
        lambda **kw: of.group_advantages(NAN_2x2, **kw),
        lambda: of.check_group_advantages_values(NAN_2x2),
        r"rewards\[1, 0\] is not finite",
    ),
    (
        "route_advantages",
        lambda **kw: of.route_advantages(torch.zeros(2, 2), torch.zeros(2, 2), NAN_2x2, **kw),
        lambda: of.check_route_advantages_values(torch.zeros(2, 2), torch.zeros(2, 2), NAN_2x2),
        r"adv_av\[1, 0\] is not finite",
    ),
]
IDS = [case[0] for case in CASES]


@pytest.fixture(autouse=True)
def _no_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)


@pytest.mark.parametrize(("name", "call", "helper", "match"), CASES, ids=IDS)
def test_cpu_default_and_helper_raise_the_same_error(name: str, call, helper, match: str) -> None:
    with pytest.raises(ValueError, match=match) as from_op:
        call()
    with pytest.raises(ValueError, match=match) as from_helper:
        helper()
    assert str(from_op.value) == str(from_helper.value)
    with pytest.raises(ValueError, match=match):
        call(check_values=True)


@pytest.mark.parametrize(("name", "call", "helper", "match"), CASES, ids=IDS)
def test_checks_off_by_argument_or_environment(
    name: str, call, helper, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    call(check_values=False)
    monkeypatch.setenv(CHECK_VALUES_ENV, "0")
    call()
    with pytest.raises(ValueError, match=match):
        call(check_values=True)


def test_the_policy() -> None:
    assert value_checks_on(None, CPU) and not value_checks_on(None, CUDA) and not value_checks_on(None, META)
    assert value_checks_on(True, CUDA) and not value_checks_on(False, CPU)


def test_environment_turns_checks_on_for_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")
    assert value_checks_on(None, CUDA) and not value_checks_on(False, CUDA)
    monkeypatch.setenv(CHECK_VALUES_ENV, "yes")
    with pytest.raises(ValueError, match="OMNINFT_CHECK_VALUES='yes' must be 0 or 1"):
        value_checks_on(None, CPU)


def test_check_values_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="check_values must be a bool or None, got int"):
        of.region_weights(torch.zeros(1, 2), check_values=1)


def test_the_public_value_checks_name_a_bad_argument() -> None:
    with pytest.raises(TypeError, match="^r must be a torch.Tensor, got list$"):
        of.check_nft_loss_values([0.5])
    with pytest.raises(
        ValueError, match=r"^token_weight must have r's 2 samples in its first dimension, got shape \(3, 4\)$"
    ):
        of.check_nft_loss_values(torch.rand(2), token_weight=torch.rand(3, 4))
    with pytest.raises(TypeError, match="^rewards must be a torch.Tensor, got NoneType$"):
        of.check_group_advantages_values(None)
    of.check_group_advantages_values(torch.arange(4))  # integer rewards are finite


def test_default_never_reads_values_off_the_cpu() -> None:
    """Meta tensors carry no data, so any value check (a GPU sync on CUDA) would raise; the ops run through."""
    v_theta = torch.empty(2, 3, 4, device=META)
    weights = torch.empty(2, 3, device=META)
    loss = of.nft_loss(v_theta, v_theta, v_theta, torch.empty(2, device=META), beta=0.5, token_weight=weights)
    assert loss.device == META and loss.shape == ()
    q = torch.empty(1, 3, 2, 4, device=META)
    assert of.cross_attention(q, q, q, backend="reference").device == META
    assert of.region_weights(weights).device == META
    assert of.group_advantages(weights).device == META
    assert of.route_advantages(weights, weights, weights, mode="gdpo")[0].device == META
    with pytest.raises(ValueError, match="^scores is on the meta device, which holds no values to check$"):
        of.region_weights(weights, check_values=True)
