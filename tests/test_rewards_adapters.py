"""Real reward adapters on tiny random-weight checkpoints built offline in their released layouts.

Each adapter is loaded back through its real loading path and scores short fake clips: finite ``(B,)`` scores,
deterministic, sensitive to the input; missing or mismatched checkpoints fail naming the path and the keys.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="transformers is not installed (requirements/rewards.txt)")
pytest.importorskip("audiobox_aesthetics", reason="audiobox-aesthetics is not installed (requirements/rewards.txt)")

from fixtures import tiny

from omninft_fast.rewards import (
    RewardBatch,
    audiobox,
    build_reward,
    clap,
    clip_score,
    hpsv3,
    imagebind,
    preprocess,
    qwen2vl,
    videoalign,
)
from omninft_fast.rewards._loading import CheckpointError, read_state_dict
from omninft_fast.rewards.preprocess import resample

REGISTERING = (audiobox, clap, clip_score, hpsv3, imagebind, videoalign)  # importing an adapter registers it


@dataclass(frozen=True)
class Adapter:
    write: Callable[[Path], Path]
    weights: str  # weight file, relative to the checkpoint directory
    modality: str
    keys: tuple[str, ...]
    options: dict[str, Any]
    reads_text: bool


ADAPTERS = {
    "clap": Adapter(tiny.write_clap, "model.safetensors", "audio", ("clap",), {}, True),
    "clip_score": Adapter(tiny.write_clip, "model.safetensors", "video", ("clip_score",), {"num_frames": 3}, True),
    "audiobox": Adapter(
        tiny.write_audiobox, "model.safetensors", "audio", ("ce", "cu", "pc", "pq"), {"window_s": 0.25}, False
    ),
    "videoalign": Adapter(
        tiny.write_videoalign,
        "checkpoint-7/model.safetensors",
        "video",
        ("vq", "mq", "ta", "overall"),
        {"scores": ["vq", "mq", "ta", "overall"]},
        True,
    ),
    "hpsv3": Adapter(tiny.write_hpsv3, "HPSv3.safetensors", "video", ("hpsv3",), {"num_frames": 2}, True),
    "imagebind": Adapter(
        tiny.write_imagebind,
        "imagebind_huge.pth",
        "av",
        ("ib_tv", "ib_ta", "ib_av", "avh", "javis"),
        {"max_frames": 4},
        True,
    ),
}


def fake_batch(seed: int, prompts: list[str] | None = None) -> RewardBatch:
    """Three short random clips: 6 frames of 40x48 at 4 fps, 0.5 s of audio at 8 kHz."""
    g = torch.Generator().manual_seed(seed)
    return RewardBatch(
        video=torch.rand(3, 6, 3, 40, 48, generator=g),
        fps=4.0,
        audio=torch.rand(3, 4000, generator=g) * 2 - 1,
        sample_rate=8000,
        prompts=prompts or ["a dog barks in a park", "rain falls on a tin roof", "a violin plays a slow tune"],
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_checkpoints")
    return {name: adapter.write(root / name) for name, adapter in ADAPTERS.items()}


@pytest.fixture(scope="module")
def rewards(checkpoints: dict[str, Path]) -> dict[str, Any]:
    return {
        name: build_reward(name, checkpoint_dir=str(checkpoints[name]), micro_batch=2, **adapter.options)
        for name, adapter in ADAPTERS.items()
    }


@pytest.mark.parametrize("name", ADAPTERS)
def test_scores_are_finite_batched_and_deterministic(name: str, rewards: dict[str, Any]) -> None:
    reward, adapter = rewards[name], ADAPTERS[name]
    assert reward.modality == adapter.modality
    batch = fake_batch(0)
    first, second = reward(batch), reward(batch)
    assert tuple(first) == adapter.keys
    for key, value in first.items():
        assert value.shape == (3,) and value.dtype == torch.float32
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(value, second[key], rtol=0, atol=0)
    # micro-batching (2 + 1) must not change a sample's score
    alone = reward(batch.slice(2, 3))
    for key, value in alone.items():
        torch.testing.assert_close(value, first[key][2:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ADAPTERS)
def test_scores_depend_on_the_clip(name: str, rewards: dict[str, Any]) -> None:
    reward = rewards[name]
    base, other = reward(fake_batch(0)), reward(fake_batch(1))
    assert any(not torch.equal(base[key], other[key]) for key in base)


@pytest.mark.parametrize("name", [name for name, adapter in ADAPTERS.items() if adapter.reads_text])
def test_text_rewards_depend_on_the_prompt(name: str, rewards: dict[str, Any]) -> None:
    reward = rewards[name]
    base = reward(fake_batch(0))
    other = reward(fake_batch(0, ["a cat", "wind in trees", "a car horn honks twice"]))
    assert any(not torch.equal(base[key], other[key]) for key in base)


@pytest.mark.parametrize("name", ADAPTERS)
def test_reloading_gives_the_same_scores(name: str, checkpoints: dict[str, Path], rewards: dict[str, Any]) -> None:
    again = build_reward(name, checkpoint_dir=str(checkpoints[name]), **ADAPTERS[name].options)
    batch = fake_batch(2)
    for key, value in again(batch).items():
        torch.testing.assert_close(value, rewards[name](batch)[key])


@pytest.mark.parametrize("name", ADAPTERS)
def test_missing_checkpoint_names_the_path(name: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="needs checkpoint_dir"):
        build_reward(name, **ADAPTERS[name].options)
    absent = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"checkpoint directory {absent} does not exist"):
        build_reward(name, checkpoint_dir=str(absent), **ADAPTERS[name].options)


@pytest.mark.parametrize("name", ADAPTERS)
def test_missing_weights_name_the_file(name: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(checkpoints[name], tmp_path / name))
    (copy / ADAPTERS[name].weights).unlink()
    with pytest.raises(CheckpointError, match=str(copy)):
        build_reward(name, checkpoint_dir=str(copy), **ADAPTERS[name].options)


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import save_file

    state = read_state_dict(path, "test")
    edit(state)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("name", ADAPTERS)
def test_mismatched_weights_name_the_keys(name: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(checkpoints[name], tmp_path / name))
    weights = copy / ADAPTERS[name].weights
    dropped = sorted(k for k in read_state_dict(weights, "test") if ".depth." not in k)[-1]
    _rewrite(weights, lambda state: state.pop(dropped))
    with pytest.raises(CheckpointError, match=r"missing keys \[.*") as error:
        build_reward(name, checkpoint_dir=str(copy), **ADAPTERS[name].options)
    assert str(copy) in str(error.value)
    assert dropped.split(".")[-2] in str(error.value)

    def extra(state: dict[str, torch.Tensor]) -> None:
        state["stray.weight"] = torch.zeros(2)

    shutil.rmtree(copy)
    copy = Path(shutil.copytree(checkpoints[name], tmp_path / name))
    _rewrite(copy / ADAPTERS[name].weights, extra)
    with pytest.raises(CheckpointError, match="stray.weight"):
        build_reward(name, checkpoint_dir=str(copy), **ADAPTERS[name].options)


def test_mis_shaped_weights_are_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(checkpoints["audiobox"], tmp_path / "audiobox"))

    def widen(state: dict[str, torch.Tensor]) -> None:
        state["proj_layer.PQ.0.weight"] = torch.zeros(1, 7)

    _rewrite(copy / "model.safetensors", widen)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys \[proj_layer.PQ.0.weight \(1, 7\) != \(1, 32\)\]"):
        build_reward("audiobox", checkpoint_dir=str(copy), window_s=0.25)


def test_audiobox_denormalises_to_the_release_scale(checkpoints: dict[str, Path]) -> None:
    reward = build_reward("audiobox", checkpoint_dir=str(checkpoints["audiobox"]), axes=["pq"], window_s=0.25)
    scores = reward(fake_batch(0))
    assert list(scores) == ["pq"]
    # tiny heads on unit-norm embeddings give small outputs around the PQ mean 8 with std 1.5
    assert ((scores["pq"] - 8.0).abs() < 1.5 * 3).all()
    with pytest.raises(ValueError, match="axes must be a non-empty subset"):
        build_reward("audiobox", checkpoint_dir=str(checkpoints["audiobox"]), axes=["XX"])


def test_audiobox_windows_weight_the_padded_tail(checkpoints: dict[str, Path]) -> None:
    reward = build_reward("audiobox", checkpoint_dir=str(checkpoints["audiobox"]), window_s=0.25)
    batch = fake_batch(3)
    one_window = RewardBatch(
        video=batch.video, fps=4.0, audio=batch.audio[:, :2000], sample_rate=8000, prompts=batch.prompts
    )
    scores = reward(one_window)
    # 0.25 s at 8 kHz is exactly one 0.25 s window at 16 kHz: no padding, weight 1
    model_scores = reward.model({"wav": resample(batch.audio[:, :2000], 8000, 16000)[:, None]})
    expected = model_scores["PQ"] * reward.std["PQ"] + reward.mean["PQ"]
    torch.testing.assert_close(scores["pq"], expected.float(), rtol=1e-5, atol=1e-5)


def test_videoalign_normalisation_and_overall(checkpoints: dict[str, Path]) -> None:
    every = ["vq", "mq", "ta", "overall"]
    normed = build_reward("videoalign", checkpoint_dir=str(checkpoints["videoalign"]), scores=every)
    raw = build_reward("videoalign", checkpoint_dir=str(checkpoints["videoalign"]), scores=every, normalize=False)
    batch = fake_batch(0)
    a, b = normed(batch), raw(batch)
    torch.testing.assert_close(a["vq"], (b["vq"] - 0.5) / 2.0)
    torch.testing.assert_close(a["ta"], (b["ta"] - 0.1) / 0.5)
    torch.testing.assert_close(a["overall"], a["vq"] + a["mq"] + a["ta"])


def test_videoalign_needs_its_prompt_template(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(checkpoints["videoalign"], tmp_path / "va"))
    (copy / "prompt_template.txt").write_text("no tokens here: {text_prompt}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompt_template.txt lacks \['<\|VQ_reward\|>'"):
        build_reward("videoalign", checkpoint_dir=str(copy))


def test_qwen2vl_patchify_layout_by_hand() -> None:
    processor = {
        "patch_size": 2,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 16,
        "max_pixels": 64,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
    }
    frames = torch.rand(3, 3, 4, 8)
    patches, grid = qwen2vl.patchify(frames, processor)
    assert grid == [2, 2, 4]
    assert patches.shape == (16, 3 * 2 * 2 * 2)
    # patch 0 = frames 0-1, rows 0-1, cols 0-1; patch 1 = cols 2-3 (same merge block); patch 2 = rows 2-3, cols 0-1
    torch.testing.assert_close(patches[0], frames[0:2, :, 0:2, 0:2].permute(1, 0, 2, 3).reshape(-1))
    torch.testing.assert_close(patches[1], frames[0:2, :, 0:2, 2:4].permute(1, 0, 2, 3).reshape(-1))
    torch.testing.assert_close(patches[2], frames[0:2, :, 2:4, 0:2].permute(1, 0, 2, 3).reshape(-1))
    # the odd third frame is padded by repeating it
    torch.testing.assert_close(patches[8], frames[[2, 2], :, 0:2, 0:2].permute(1, 0, 2, 3).reshape(-1))
    assert qwen2vl.smart_size(100, 50, 28, 56 * 56, 28 * 28 * 4) == (56, 28)
    assert qwen2vl.smart_size(10, 10, 28, 56 * 56, 28 * 28 * 64) == (56, 56)


def test_released_key_names_map_onto_the_backbone() -> None:
    state = {
        "model.embed_tokens.weight": 1,
        "visual.blocks.0.x": 2,
        "lm_head.weight": 3,
        "rm_head.weight": 4,
        "model.language_model.norm.weight": 5,
        "model.visual.merger.y": 6,
    }
    assert qwen2vl.remap_keys(state) == {
        "backbone.language_model.embed_tokens.weight": 1,
        "backbone.visual.blocks.0.x": 2,
        "rm_head.weight": 4,
        "backbone.language_model.norm.weight": 5,
        "backbone.visual.merger.y": 6,
    }


def test_imagebind_sets_aside_unused_modalities_only(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    state = read_state_dict(checkpoints["imagebind"] / "imagebind_huge.pth", "test")
    assert "modality_trunks.depth.blocks.0.norm_1.weight" in state  # loads although the model has no depth trunk
    copy = Path(shutil.copytree(checkpoints["imagebind"], tmp_path / "ib"))

    def rename(state: dict[str, torch.Tensor]) -> None:
        state["modality_trunks.vision.blocks.0.attn.in_proj_weight_v2"] = state.pop(
            "modality_trunks.vision.blocks.0.attn.in_proj_weight"
        )

    _rewrite(copy / "imagebind_huge.pth", rename)
    with pytest.raises(CheckpointError, match=r"missing keys \[modality_trunks.vision.blocks.0.attn.in_proj_weight\]"):
        build_reward("imagebind", checkpoint_dir=str(copy))


def test_imagebind_javis_score_with_one_window_is_the_avh_score(checkpoints: dict[str, Path]) -> None:
    reward = build_reward(
        "imagebind", checkpoint_dir=str(checkpoints["imagebind"]), audio_clips=1, window_s=2.0, lowest=1.0
    )
    g = torch.Generator().manual_seed(5)
    batch = RewardBatch(
        video=torch.rand(2, 6, 3, 40, 48, generator=g),
        fps=4.0,
        audio=torch.rand(2, 32000, generator=g) * 2 - 1,
        sample_rate=16000,
        prompts=["a", "b"],
    )
    scores = reward(batch)
    torch.testing.assert_close(scores["javis"], scores["avh"], rtol=1e-5, atol=1e-6)
    only = build_reward("imagebind", checkpoint_dir=str(checkpoints["imagebind"]), scores=["ib_av"], audio_clips=1)
    torch.testing.assert_close(only(batch)["ib_av"], scores["ib_av"])


def test_videoalign_default_scores_and_distinct_keys(rewards: dict[str, Any], checkpoints: dict[str, Path]) -> None:
    default = build_reward("videoalign", checkpoint_dir=str(checkpoints["videoalign"]))
    assert list(default(fake_batch(0))) == ["vq", "mq", "ta"]
    # every adapter's score names differ, so a trainer may combine any of them
    keys = [key for adapter in ADAPTERS.values() for key in adapter.keys]
    assert len(keys) == len(set(keys))


def test_clip_pixels_follow_the_clip_image_processor(rewards: dict[str, Any], checkpoints: dict[str, Path]) -> None:
    import numpy as np
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(str(checkpoints["clip_score"]), local_files_only=True)
    g = torch.Generator().manual_seed(7)
    frame = (torch.rand(1, 1, 3, 40, 48, generator=g) * 255).round() / 255
    ours = rewards["clip_score"].pixels(frame, 1.0)[0, 0]
    image = (frame[0, 0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    theirs = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    # torch's bicubic kernel (a = -0.75) differs from Pillow's (a = -0.5): close on average, not bit-equal
    assert (ours - theirs).abs().mean() < 0.02
    assert (ours - theirs).abs().max() < 0.4


def test_a_fused_clap_scores_each_clip_on_its_own(tmp_path: Path) -> None:
    """The extractor would mark a random clip of each batch as longer (none is, every clip is cut): a clip's score
    must not depend on the call or its batch-mates."""
    reward = build_reward("clap", checkpoint_dir=str(tiny.write_clap(tmp_path / "clap", fusion=True)), micro_batch=3)
    assert reward.model.config.audio_config.enable_fusion
    batch = fake_batch(1)
    first = reward(batch)["clap"]
    for _ in range(3):
        torch.testing.assert_close(reward(batch)["clap"], first, rtol=0, atol=0)
    alone = torch.cat([reward(batch.slice(i, i + 1))["clap"] for i in range(3)])
    torch.testing.assert_close(alone, first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "crop", "want"),
    [
        ({"height": 40, "width": 36}, {"height": 32, "width": 32}, None),
        ({"height": 32, "width": 32}, None, None),
        ({"longest_edge": 32}, None, r"preprocessor_config.json: size must be an int, \{shortest_edge: n\} or"),
    ],
)
def test_clip_sizes_of_every_preprocessor_form(
    checkpoints: dict[str, Path], tmp_path: Path, size: dict, crop: dict | None, want: str | None
) -> None:
    folder = tmp_path / "clip"
    shutil.copytree(checkpoints["clip_score"], folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["size"] = size
    config.pop("crop_size") if crop is None else config.update(crop_size=crop)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    if want is not None:
        with pytest.raises(ValueError, match=want):
            build_reward("clip_score", checkpoint_dir=str(folder), num_frames=2)
        return
    reward = build_reward("clip_score", checkpoint_dir=str(folder), num_frames=2)
    assert reward.pixels(fake_batch(0).video, 4.0).shape == (3, 2, 3, 32, 32)
    assert torch.isfinite(reward(fake_batch(0))["clip_score"]).all()


def test_imagebind_clips_are_cut_as_the_release_cuts_them(rewards: dict[str, Any]) -> None:
    """Video: each 2 s clip's first frame is the first at or after its start (the release decodes frames at
    ``ceil(fps * start)``), its last the last before its end. Audio shorter than a clip: the fbank of the audio
    itself, its spectrogram zero-padded (not the waveform: padded silence has log-mel values of its own)."""
    reward = rewards["imagebind"]
    frames, fps = 121, 24.0  # LTX-2's clip
    video = (torch.arange(frames, dtype=torch.float32) / 1000)[None, :, None, None, None].expand(1, -1, 3, 8, 8)
    seen: list[int] = []
    pixels = reward._pixels

    def spy(clip_frames: torch.Tensor, crops: int = 1) -> torch.Tensor:
        seen.extend(round(float(f.mean()) * 1000) for f in clip_frames)
        return pixels(clip_frames, crops)

    reward._pixels = spy
    try:
        reward._video(video, fps)
    finally:
        del reward._pixels
    assert seen == [0, 47, 19, 66, 37, 84, 55, 102, 73, 120]
    g = torch.Generator().manual_seed(3)
    audio = torch.rand(2, 16000, generator=g) * 2 - 1  # 1 s at 16 kHz
    centred = audio - audio.mean(dim=-1, keepdim=True)
    fbank = preprocess.kaldi_fbank(centred, imagebind.AUDIO_RATE, reward.cfg["mel_bins"]).transpose(1, 2)
    mel = torch.nn.functional.pad(fbank, (0, reward.cfg["audio_frames"] - fbank.shape[-1]))
    mel = ((mel - imagebind.AUDIO_MEAN) / imagebind.AUDIO_STD)[:, None]
    with torch.no_grad():
        want = reward.model.embed_audio(mel)  # every clip of a 1 s audio is the whole audio
        torch.testing.assert_close(reward._audio(audio), want, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(reward._audio(audio[:, :100])).all()  # shorter than one fbank window
