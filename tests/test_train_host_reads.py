"""The trainer's model reads no tensor value on the host: its forwards (guided rollout with the STG shared prefix and
the Eq 10 capture, training with Eq 8 surgery, FP8 layers) run on the meta device, where any value read raises, and
every host <-> device copy they make is ltx-core's own RoPE set-up (on a GPU, a synchronisation each)."""

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
# embeddings: 4 copies per model forward, before the first block.
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


def test_guided_rollout_reads_nothing_on_the_host() -> None:
    """Two steps of a batch whose last two samples are the STG pass of the first two (blocks 0-1 shared), with the
    region capture armed on the last step."""
    model, inputs = _model()
    transfers = _Transfers()
    with torch.no_grad(), transfers, model._handle.capture_region_scores(num_steps=2, last_steps=1) as capture:
        for step in range(2):
            capture.step = step
            model(*inputs, skip_blocks=[[], [], [2], [2]], copied_rows=2)
        scores = capture.scores()
    assert scores.shape == (BATCH, inputs[0].shape[1]) and scores.device == META
    assert transfers.sources == {"transformer/rope.py": 2 * ROPE_COPIES}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-layers", "fp8-layers"])
def test_training_step_reads_nothing_on_the_host(fp8: bool) -> None:
    model, inputs = _model(fp8)
    transfers = _Transfers()
    with ScaledMMCounter() as gemms, transfers:
        v_video, v_audio = model(*inputs)
        (v_video.sum() + v_audio.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert transfers.sources == {"transformer/rope.py": ROPE_COPIES}
    assert (gemms.calls > 0) == fp8
