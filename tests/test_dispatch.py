"""The one dispatch point: which backend runs each op, and why a request is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omninft_fast import dispatch
from omninft_fast.dispatch import BackendError

CPU = torch.device("cpu")


def test_every_op_has_a_reference_and_known_backends() -> None:
    for op, impls in dispatch.IMPLEMENTATIONS.items():
        assert "reference" in impls, op
        assert set(impls) <= set(dispatch.BACKENDS) - {"auto"}, op


def test_argument_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNINFT_BACKEND", "triton")
    assert dispatch.requested_backend("reference") == "reference"
    assert dispatch.requested_backend() == "triton"
    monkeypatch.setenv("OMNINFT_BACKEND", " Reference ")
    assert dispatch.requested_backend() == "reference"
    monkeypatch.delenv("OMNINFT_BACKEND")
    assert dispatch.requested_backend() == "auto"


def test_unknown_backend_names_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackendError, match="backend='gpu' is not one of auto, triton, cpp, reference"):
        dispatch.requested_backend("gpu")
    monkeypatch.setenv("OMNINFT_BACKEND", "fast")
    with pytest.raises(BackendError, match="OMNINFT_BACKEND='fast'"):
        dispatch.requested_backend()


def test_reference_runs_anywhere() -> None:
    name, impl = dispatch.select("nft_loss", CPU, "reference")
    assert name == "reference" and impl.__name__ == "nft_loss_reference"


def test_unknown_op() -> None:
    with pytest.raises(BackendError, match="unknown op 'softmax'"):
        dispatch.select("softmax", CPU)


def test_missing_backend_says_which_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackendError, match=r"^backend='cpp': op 'cross_attention' has no such backend \(it has: auto,"):
        dispatch.select("cross_attention", CPU, "cpp")
    monkeypatch.setenv("OMNINFT_BACKEND", "cpp")
    with pytest.raises(BackendError, match=r"^op 'cross_attention' has no 'cpp' backend \(OMNINFT_BACKEND='cpp'; it"):
        dispatch.select("cross_attention", CPU)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        dispatch.select("cross_attention", CPU, "triton")
    assert "triton" not in dispatch.available_backends("cross_attention", CPU)


def test_cpp_refuses_other_devices() -> None:
    with pytest.raises(BackendError, match="the C\\+\\+ extension runs on CPU tensors, got meta tensors"):
        dispatch.select("nft_loss", torch.device("meta"), "cpp")


def test_auto_on_cpu_prefers_cpp_else_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNINFT_BACKEND", raising=False)
    if dispatch.cpp_extension_error() is None:
        assert dispatch.select("nft_loss", CPU)[0] == "cpp"
        return
    dispatch._WARNED.clear()
    with pytest.warns(UserWarning, match="using the PyTorch reference because the C\\+\\+ extension"):
        assert dispatch.select("nft_loss", CPU)[0] == "reference"
    with pytest.raises(BackendError, match="omninft_fast._C is not built"):
        dispatch.select("nft_loss", CPU, "cpp")


def test_auto_on_cpu_attention_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNINFT_BACKEND", raising=False)
    assert dispatch.select("cross_attention", CPU)[0] == "reference"


def test_environment_reaches_the_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    import omninft_fast as of

    monkeypatch.setenv("OMNINFT_BACKEND", "cpp")
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(BackendError, match="has no 'cpp' backend"):
        of.cross_attention(q, q, q)


def test_environment_steers_every_op_of_a_training_iteration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``OMNINFT_BACKEND=reference omninft-fast train``: the loss and the patched attention both take it."""
    pytest.importorskip("ltx_core")
    from omninft_fast.train.config import load_config
    from omninft_fast.train.trainer import Trainer

    micro = Path(__file__).resolve().parents[1] / "configs" / "micro.yaml"
    chosen = []
    select = dispatch.select

    def spy(op: str, device: torch.device, backend: str | None = None) -> tuple:
        name, impl = select(op, device, backend)
        chosen.append((op, backend, name))
        return name, impl

    monkeypatch.setattr(dispatch, "select", spy)
    monkeypatch.setenv("OMNINFT_BACKEND", "reference")
    Trainer(load_config(str(micro), [f"output_dir={tmp_path}"])).iteration(0)
    assert {op for op, _, _ in chosen} == {"cross_attention", "nft_loss"}
    assert set(chosen) == {("cross_attention", None, "reference"), ("nft_loss", None, "reference")}
