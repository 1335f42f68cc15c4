"""The trainer's model reads no tensor value on the host: its forwards (guided rollout with the STG shared prefix and
the Eq 10 capture, training with Eq 8 surgery, FP8 layers) run on the meta device, where any value read raises, and
after the first forward, which computes the rotary embeddings of the model's positions once (ltx-core copies its
host-cached frequency grid to the device for each; on a GPU a synchronisation each), none moves data between the
host and the device."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("ltx_core")

from omninft_fast.fp8 import ScaledMMCounter
from omninft_fast.train.builders import build_policy, build_task, load_prompts
from omninft_fast.train.config import load_config
from omninft_fast.train.model import Condition, LTXAVModel

BATCH = 4
MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
# ltx-core moves its host-cached RoPE frequency grid to the device for the video, audio and both cross-modal
# embeddings: at most 4 copies, in the model's first forward (embeddings with the same arguments are computed once).
ROPE_COPIES = 4
META = torch.device("meta")


class _Transfers(TorchDispatchMode):
    """Counts ops moving data between the host and the meta device, by the last source file of this project or
    ltx-core that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        devices = {t.device.type for t in (*args, *kwargs.values(), *outs) if isinstance(t, torch.Tensor)}
        if {"cpu", "meta"} <= devices:
            frames = [f for f in traceback.extract_stack() if "ltx_core" in f.filename or "omninft_fast" in f.filename]
            self.sources["/".join(frames[-1].filename.split("/")[-2:])] += 1
        return out


def _model(fp8: bool = False) -> tuple[LTXAVModel, tuple[torch.Tensor, torch.Tensor, torch.Tensor, Condition]]:
    """The micro config's policy with 3 blocks (Eq 8 and Eq 10 patched, FP8 layers if asked) and a batch of its
    inputs, on the meta device."""
    config = load_config(MICRO, ["model.num_layers=3"])
    task = build_task(config)
    model = build_policy(config, task)
    model.patch(detach=[0.9, 0.5, 0.0], region_layers=[1, 2])
    if fp8:
        model.patch_fp8(recipe="tensorwise")
    s = task.spec
    inputs = (
        torch.empty(BATCH, s.video_tokens, s.video_channels, device=META),
        torch.empty(BATCH, s.audio_tokens, s.audio_channels, device=META),
        torch.empty(BATCH, device=META),
        Condition(*task.encode(load_prompts(config)[:BATCH])).to(META),
    )
    return model.to(META), inputs


def _first_forward(model: LTXAVModel, inputs: tuple) -> None:
    """The model's first forward: its only host <-> device copies, ltx-core's RoPE set-up."""
    transfers = _Transfers()
    with torch.no_grad(), transfers:
        model(*inputs)
    assert set(transfers.sources) == {"transformer/rope.py"}
    assert 0 < transfers.sources["transformer/rope.py"] <= ROPE_COPIES


def test_guided_rollout_reads_nothing_on_the_host() -> None:
    """Two steps of a batch whose last two samples are the STG pass of the first two (blocks 0-1 shared), with the
    region capture armed on the last step."""
    model, inputs = _model()
    _first_forward(model, inputs)
    transfers = _Transfers()
    with torch.no_grad(), transfers, model._handle.capture_region_scores(num_steps=2, last_steps=1) as capture:
        for step in range(2):
            capture.step = step
            model(*inputs, skip_blocks=[[], [], [2], [2]], copied_rows=2)
        scores = capture.scores()
    assert scores.shape == (BATCH, inputs[0].shape[1]) and scores.device == META
    assert transfers.sources == {}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-layers", "fp8-layers"])
def test_training_step_reads_nothing_on_the_host(fp8: bool) -> None:
    model, inputs = _model(fp8)
    _first_forward(model, inputs)
    transfers = _Transfers()
    with ScaledMMCounter() as gemms, transfers:
        v_video, v_audio = model(*inputs)
        (v_video.sum() + v_audio.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert transfers.sources == {}
    assert (gemms.calls > 0) == fp8


def test_rotary_embeddings_are_ltx_cores_computed_once_for_the_batch() -> None:
    """The cached embeddings equal ltx-core's for every sample, are one tensor expanded over the batch, are reused by
    the next call, and work in a backward after a first call in inference mode; positions that differ per sample
    take ltx-core's own path."""
    config = load_config(MICRO, ["model.num_layers=1"])
    task = build_task(config)
    model = build_policy(config, task)
    pre = model.model.video_args_preprocessor.simple_preprocessor
    kwargs = {
        "inner_dim": pre.inner_dim,
        "max_pos": pre.max_pos,
        "use_middle_indices_grid": pre.use_middle_indices_grid,
        "num_attention_heads": pre.num_attention_heads,
        "x_dtype": torch.float32,
    }
    positions = model.video_positions.expand(3, -1, -1, -1)
    want = type(pre)._prepare_positional_embeddings(pre, positions=positions, **kwargs)
    with torch.inference_mode():
        got = pre._prepare_positional_embeddings(positions=positions, **kwargs)
    again = pre._prepare_positional_embeddings(positions=positions, **kwargs)
    for g, a, w in zip(got, again, want, strict=True):
        assert torch.equal(g, w) and g.stride(0) == 0 and a.data_ptr() == g.data_ptr()
    distinct = positions.clone()
    assert pre._prepare_positional_embeddings(positions=distinct, **kwargs)[0].stride(0) != 0
    s = task.spec
    gen = torch.Generator().manual_seed(0)
    x_video = torch.randn((2, s.video_tokens, s.video_channels), generator=gen)
    x_audio = torch.randn((2, s.audio_tokens, s.audio_channels), generator=gen)
    cond = Condition(*task.encode(load_prompts(config)[:2]))
    v_video, v_audio = model(x_video, x_audio, torch.full((2,), 0.5), cond)
    (v_video.sum() + v_audio.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_host_tensors_keep_their_device_and_values_through_to_device() -> None:
    """On the CPU ``to_device`` is a plain move (the pinned, non-waiting copy to a GPU is tested in ``test_cuda.py``);
    ``Condition.to`` casts after the move."""
    from omninft_fast.train.model import to_device

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert to_device(x, "cpu") is x and to_device(x, META).device == META
    cond = Condition(x, x[:, :2]).to("cpu", torch.float64)
    assert cond.video.dtype == cond.audio.dtype == torch.float64 and torch.equal(cond.audio, x[:, :2].double())
