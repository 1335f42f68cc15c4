"""The Synchformer DeSync reward on a tiny random-weight checkpoint in the released layout.

The checkpoint is written offline, loaded back through the real loading path and scores short fake clips: finite
``(B,)`` scores, deterministic, sensitive to the clip and to an audio shift; missing or mismatched weights fail
naming the path and the keys; the DeSync windows (first and last 4.8 s) are checked by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fixtures import tiny

from omninft_fast.rewards import RewardBatch, build_reward, synchformer
from omninft_fast.rewards._loading import CheckpointError, read_state_dict
from omninft_fast.rewards.synchformer import (
    RELEASE,
    WEIGHTS,
    Synchformer,
    _DividedAttention,
    frame_index_25fps,
    offset_grid,
    segment_count,
    window_segments,
)

assert synchformer.SynchformerReward.name == "synchformer"  # importing the module registers the plugin


def clip(seed: int, seconds: float = 5.44, batch: int = 2, size: tuple[int, int] = (32, 32)) -> RewardBatch:
    """``batch`` random clips of ``seconds`` at 25 fps and 16 kHz."""
    g = torch.Generator().manual_seed(seed)
    frames, samples = round(seconds * 25), round(seconds * 16000)
    return RewardBatch(
        video=torch.rand(batch, frames, 3, *size, generator=g),
        fps=25.0,
        audio=torch.rand(batch, samples, generator=g) * 2 - 1,
        sample_rate=16000,
        prompts=["a dog barks"] * batch,
    )


def cut(batch: RewardBatch, frames: slice, samples: slice) -> RewardBatch:
    return RewardBatch(batch.video[:, frames], batch.fps, batch.audio[:, samples], batch.sample_rate, batch.prompts)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_synchformer(tmp_path_factory.mktemp("synchformer") / "ckpt")


@pytest.fixture(scope="module")
def reward(checkpoint: Path) -> synchformer.SynchformerReward:
    return build_reward("synchformer", checkpoint_dir=str(checkpoint), micro_batch=2, pad=False)


@pytest.fixture(scope="module")
def soft(checkpoint: Path) -> synchformer.SynchformerReward:
    return build_reward("synchformer", checkpoint_dir=str(checkpoint), micro_batch=2, soft=True, pad=False)


def test_scores_are_finite_batched_and_deterministic(reward: synchformer.SynchformerReward) -> None:
    assert reward.modality == "av"
    batch = clip(0, batch=3)
    first, second = reward(batch), reward(batch)
    assert tuple(first) == ("neg_desync",)
    value = first["neg_desync"]
    assert value.shape == (3,) and value.dtype == torch.float32
    assert torch.isfinite(value).all() and (value <= 0).all() and (value >= -2).all()
    torch.testing.assert_close(value, second["neg_desync"], rtol=0, atol=0)
    # the offsets are multiples of 0.2 s, and micro-batching (2 + 1) does not change a sample's score
    torch.testing.assert_close(value * 10, (value * 10).round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(reward(batch.slice(2, 3))["neg_desync"], value[2:], rtol=0, atol=1e-6)


def test_scores_depend_on_the_clip_and_on_an_audio_shift(
    reward: synchformer.SynchformerReward, soft: synchformer.SynchformerReward
) -> None:
    batch = clip(1)
    shifted = RewardBatch(batch.video, batch.fps, batch.audio.roll(6400, dims=1), batch.sample_rate, batch.prompts)
    base = soft(batch)["neg_desync"]
    assert not torch.equal(base, soft(shifted)["neg_desync"])
    assert not torch.equal(base, soft(clip(2))["neg_desync"])
    assert (base <= 0).all() and (base >= -2).all()
    assert not torch.allclose(reward.window_logits(batch), reward.window_logits(shifted))


def test_reloading_gives_the_same_scores(checkpoint: Path, soft: synchformer.SynchformerReward) -> None:
    again = build_reward("synchformer", checkpoint_dir=str(checkpoint), soft=True, pad=False)
    batch = clip(3)
    torch.testing.assert_close(again(batch)["neg_desync"], soft(batch)["neg_desync"])


def test_desync_is_the_mean_over_the_first_and_last_4_8_s(
    reward: synchformer.SynchformerReward, soft: synchformer.SynchformerReward
) -> None:
    # 5.44 s: 16 segments; the windows are segments 0-13 (0 - 4.8 s) and 2-15 (0.64 - 5.44 s)
    batch = clip(4)
    logits = reward.window_logits(batch)
    assert logits.shape == (2, 2, 21)
    first = reward.window_logits(cut(batch, slice(0, 120), slice(0, 76800)))
    last = reward.window_logits(cut(batch, slice(16, 136), slice(10240, 87040)))
    assert first.shape == last.shape == (2, 1, 21)
    torch.testing.assert_close(logits[:, 0], first[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[:, 1], last[:, 0], rtol=1e-4, atol=1e-5)
    grid = offset_grid(21)
    expected = -(grid[logits.argmax(-1)].abs().mean(dim=1))
    torch.testing.assert_close(reward(batch)["neg_desync"], expected)
    expected_soft = -(logits.softmax(-1) @ grid.abs()).mean(dim=1)
    torch.testing.assert_close(soft(batch)["neg_desync"], expected_soft, rtol=1e-5, atol=1e-6)


def test_windows_and_segments_by_hand() -> None:
    assert segment_count(200, 128000) == 24  # 8 s
    assert segment_count(120, 76800) == 14  # 4.8 s
    assert segment_count(136, 80000) == 14  # the audio holds fewer segments than the video
    assert segment_count(15, 20000) == 0
    torch.testing.assert_close(window_segments(24), torch.stack([torch.arange(14), torch.arange(10, 24)]))
    torch.testing.assert_close(window_segments(14), torch.arange(14)[None])
    torch.testing.assert_close(window_segments(5), torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="count must be >= 1"):
        window_segments(0)
    torch.testing.assert_close(offset_grid(21)[[0, 9, 10, 20]], torch.tensor([-2.0, -0.2, 0.0, 2.0]))


def test_frames_are_taken_at_25_fps_by_hand() -> None:
    torch.testing.assert_close(frame_index_25fps(7, 25.0), torch.arange(7))
    torch.testing.assert_close(frame_index_25fps(5, 12.5), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    torch.testing.assert_close(frame_index_25fps(10, 50.0), torch.tensor([0, 2, 4, 6, 8]))
    torch.testing.assert_close(frame_index_25fps(6, 30.0), torch.tensor([0, 1, 2, 3, 4]))


def test_short_clips_other_rates_and_padding(checkpoint: Path, reward: synchformer.SynchformerReward) -> None:
    g = torch.Generator().manual_seed(5)
    tiny_clip = RewardBatch(
        torch.rand(2, 3, 3, 40, 48, generator=g), 8.0, torch.rand(2, 2000, generator=g), 8000, ["a"] * 2
    )
    assert reward.window_logits(tiny_clip).shape == (2, 1, 21)  # 0.375 s: zero-padded to one segment, repeated
    assert torch.isfinite(reward(tiny_clip)["neg_desync"]).all()
    padded = build_reward("synchformer", checkpoint_dir=str(checkpoint), pad=True, max_length_s=5.44)
    assert padded.window_logits(clip(6, seconds=2.0)).shape == (2, 2, 21)
    with pytest.raises(ValueError, match="max_length_s must be >= 0.64"):
        build_reward("synchformer", checkpoint_dir=str(checkpoint), max_length_s=0.5)


def test_default_pads_to_8_s_and_scores_the_authors_two_windows(checkpoint: Path) -> None:
    # LTX-2's 121 frames at 24 fps (5.04 s) become 8 s: 200 frames, 24 segments, windows 0-13 and 10-23
    both = build_reward("synchformer", checkpoint_dir=str(checkpoint), scores=["neg_desync", "inv_desync"])
    g = torch.Generator().manual_seed(9)
    batch = RewardBatch(
        torch.rand(1, 121, 3, 32, 32, generator=g), 24.0, torch.rand(1, 80640, generator=g) - 0.5, 16000, ["a"]
    )
    video, audio = both._streams(batch)
    assert video.shape[1] == 200 and audio.shape[1] == 128_000
    assert not video[:, 126:].any() and not audio[:, 80640:].any()  # black frames and silence after 5.04 s
    windows = window_segments(segment_count(video.shape[1], audio.shape[1]))
    torch.testing.assert_close(windows, torch.stack([torch.arange(14), torch.arange(10, 24)]))
    logits = both.window_logits(batch)
    d = both.grid.abs()[logits.argmax(dim=-1)].mean(dim=1)
    scores = both(batch)
    torch.testing.assert_close(scores["neg_desync"], -d)
    torch.testing.assert_close(scores["inv_desync"], 1 / (1 + d))
    assert set(build_reward("synchformer", checkpoint_dir=str(checkpoint))(batch)) == {"neg_desync"}
    with pytest.raises(ValueError, match="scores must be a non-empty subset"):
        build_reward("synchformer", checkpoint_dir=str(checkpoint), scores=["desync"])


def test_divided_attention_matches_a_masked_reference_in_float64() -> None:
    torch.manual_seed(0)
    frames, patches, dim, heads = 3, 4, 8, 2
    attention = _DividedAttention(dim, heads).double()
    x = torch.randn(2, 1 + frames * patches, dim, dtype=torch.float64)
    q, k, v = attention.qkv(x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # (B, H, L, d) each
    frame = torch.cat([torch.tensor([-1]), torch.arange(frames * patches) // patches])
    position = torch.cat([torch.tensor([-1]), torch.arange(frames * patches) % patches])
    for axis, same in (("time", position), ("space", frame)):
        allowed = (same[:, None] == same[None, :]) | (same[:, None] == -1) | (same[None, :] == -1)
        scores = (q @ k.transpose(-1, -2)) / (dim // heads) ** 0.5
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        expected = attention.proj((weights @ v).transpose(1, 2).flatten(2))
        torch.testing.assert_close(attention(x, frames, axis), expected, rtol=1e-12, atol=1e-12)


def test_released_architecture_shapes() -> None:
    with torch.device("meta"):
        state = Synchformer(RELEASE).state_dict()
    assert sum(v.numel() for v in state.values()) == 237_460_245
    shapes = {
        "vfeat_extractor.pos_embed": (1, 197, 768),
        "vfeat_extractor.temp_embed": (1, 8, 768),
        "vfeat_extractor.patch_embed_3d.proj.weight": (768, 3, 2, 16, 16),
        "vfeat_extractor.blocks.11.timeattn.qkv.weight": (2304, 768),
        "afeat_extractor.ast.embeddings.position_embeddings": (1, 74, 768),
        "afeat_extractor.ast.encoder.layer.11.intermediate.dense.weight": (3072, 768),
        "afeat_extractor.freq_attn_agg.self_attn.in_proj_weight": (2304, 768),
        "transformer.pos_emb_cfg.pos_emb": (1, 198, 768),
        "transformer.blocks.2.mlp.2.weight": (768, 3072),
        "transformer.off_head.weight": (21, 768),
    }
    assert {key: tuple(state[key].shape) for key in shapes} == shapes


def test_missing_checkpoint_and_weights_name_the_path(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="needs checkpoint_dir"):
        build_reward("synchformer")
    absent = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"checkpoint directory {absent} does not exist"):
        build_reward("synchformer", checkpoint_dir=str(absent))
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    (copy / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {copy} lacks \\['synchformer_state_dict.pth'\\]"):
        build_reward("synchformer", checkpoint_dir=str(copy))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("transformer.off_head.bias"), r"missing keys \[transformer.off_head.bias\]"),
        (lambda s: s.update({"stray.weight": torch.zeros(2)}), r"unexpected keys \[stray.weight\]"),
        (
            lambda s: s.update({"transformer.pos_emb_cfg.pos_emb": torch.zeros(1, 197, 24)}),
            r"mis-shaped keys \[transformer.pos_emb_cfg.pos_emb \(1, 197, 24\) != \(1, 198, 24\)\]",
        ),
    ],
)
def test_mismatched_weights_name_the_path_and_keys(checkpoint: Path, tmp_path: Path, edit, message: str) -> None:
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    state = read_state_dict(copy / WEIGHTS, "test")
    edit(state)
    torch.save(state, copy / WEIGHTS)
    with pytest.raises(CheckpointError, match=message) as error:
        build_reward("synchformer", checkpoint_dir=str(copy))
    assert str(copy / WEIGHTS) in str(error.value)


@pytest.mark.parametrize("use_soft", [False, True], ids=["hard", "soft"])
def test_a_non_finite_clip_scores_nan(
    reward: synchformer.SynchformerReward, soft: synchformer.SynchformerReward, use_soft: bool
) -> None:
    """A window without finite logits has no offset (argmax would call it class 0, a 2 s offset): the sample's
    reward is NaN, which the trainer reports or drops; the other samples keep their scores."""
    plugin = soft if use_soft else reward
    batch = clip(5, batch=2)
    clean = plugin(batch)["neg_desync"]
    batch.audio[0, 100] = float("nan")
    out = plugin(batch)["neg_desync"]
    assert bool(out[0].isnan()) and torch.equal(out[1:], clean[1:])
