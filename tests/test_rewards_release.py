"""The reward plugins score like the released models and load the released files as published.

Positions seen by the Qwen2-VL decoder, frame indices and aggregation against hand-computed cases, the released
VideoAlign LoRA ``model.pth`` and Audiobox ``checkpoint.pt`` through the public loading path, the resampler
against scipy, the codec round trip and ``omninft-fast rewards check``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import tiny

from omninft_fast.cli import main
from omninft_fast.rewards import RewardBatch, build_reward, hpsv3, videoalign
from omninft_fast.rewards._loading import CheckpointError, read_state_dict
from omninft_fast.rewards.preprocess import resample


def clip(seed: int, frames: int = 9, fps: float = 8.0) -> RewardBatch:
    g = torch.Generator().manual_seed(seed)
    return RewardBatch(
        video=torch.rand(2, frames, 3, 40, 48, generator=g),
        fps=fps,
        audio=torch.rand(2, 4000, generator=g) * 2 - 1,
        sample_rate=8000,
        prompts=["a dog barks in a park", "rain falls on a tin roof"],
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("released")


@pytest.fixture(scope="module")
def videoalign_dir(root: Path) -> Path:
    return tiny.write_videoalign(root / "videoalign")


@pytest.fixture(scope="module")
def hpsv3_dir(root: Path) -> Path:
    return tiny.write_hpsv3(root / "hpsv3")


@pytest.fixture(scope="module")
def videoalign_lora(root: Path) -> Path:
    return tiny.write_videoalign(root / "videoalign_lora", layout="lora")


@pytest.fixture(scope="module")
def audiobox_meta(root: Path) -> Path:
    return tiny.write_audiobox(root / "audiobox_meta", seed=4, layout="meta")


def spy_positions(reward: object) -> list[torch.Tensor]:
    """Record the ``position_ids`` the text decoder of ``reward`` is called with."""
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["position_ids"])

    reward.model.backbone.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("name", ["videoalign", "hpsv3"])
def test_decoder_sees_sequential_positions_unless_mrope(name: str, videoalign_dir: Path, hpsv3_dir: Path) -> None:
    path = {"videoalign": videoalign_dir, "hpsv3": hpsv3_dir}[name]
    batch = clip(0)
    sequential = build_reward(name, checkpoint_dir=str(path))
    seen = spy_positions(sequential)
    plain = sequential(batch)
    for positions in seen:
        length = positions.shape[-1]
        assert positions.shape[0] == 3
        assert (positions == torch.arange(length)).all()  # 0..L-1 on all three axes, every sample
    mrope = build_reward(name, checkpoint_dir=str(path), positions="mrope")
    seen = spy_positions(mrope)
    rotary = mrope(batch)
    assert any(not (p == torch.arange(p.shape[-1])).all() for p in seen)  # M-RoPE holds the visual block's grid
    assert any(not torch.allclose(plain[key], rotary[key]) for key in plain)
    with pytest.raises(ValueError, match="positions must be one of"):
        build_reward(name, checkpoint_dir=str(path), positions="3d")


def test_videoalign_frames_follow_the_release_sampler() -> None:
    # the authors pass the clip's own 24 fps: 121 frames -> 120 (even), at round(linspace(0, 120, 120))
    assert videoalign.frame_count(121, 24.0, 24.0, None) == 120
    index = videoalign.video_frame_indices(121, 24.0, 24.0, None)
    assert index.tolist() == [round(i * 120 / 119) for i in range(120)]
    # data_config.fps 2.0: 121 / 24 * 2 = 10.08 -> 10 frames; short clips get at least 4, long ones at most 768
    assert videoalign.frame_count(121, 24.0, 2.0, None) == 10
    assert videoalign.frame_count(30, 24.0, 2.0, None) == 4
    assert videoalign.frame_count(2000, 24.0, 24.0, None) == 768
    assert videoalign.frame_count(3, 24.0, 24.0, None) == 2  # the even count the clip holds
    assert videoalign.frame_count(121, 24.0, None, 15) == 16  # an explicit count is rounded to even (half to even)
    assert videoalign.video_frame_indices(9, 8.0, None, 4).tolist() == [0, 3, 5, 8]
    # the pixel budget: max_frame_pixels when the release sets it, else 24576 * 28 * 28 * 2 / n capped
    assert videoalign.frame_pixels(120, 200704) == (100352, 200704)
    assert videoalign.frame_pixels(120, None) == (100352, int(24576 * 784 * 2 / 120))
    assert videoalign.frame_pixels(8, None) == (100352, 768 * 784)
    assert videoalign.frame_pixels(768, None) == (100352, int(100352 * 1.05))


def test_videoalign_sample_fps_choice(videoalign_dir: Path) -> None:
    own = build_reward("videoalign", checkpoint_dir=str(videoalign_dir))
    assert own.frame_indices(121, 24.0).numel() == 120
    release = build_reward("videoalign", checkpoint_dir=str(videoalign_dir), sample_fps="release")
    assert release.frame_indices(121, 24.0).numel() == 10  # data_config.fps = 2.0
    fixed = build_reward("videoalign", checkpoint_dir=str(videoalign_dir), sample_fps=4.0)
    assert fixed.frame_indices(121, 24.0).numel() == 20
    with pytest.raises(ValueError, match="sample_fps must be"):
        build_reward("videoalign", checkpoint_dir=str(videoalign_dir), sample_fps="native")


def test_hpsv3_frames_cap_and_top_2() -> None:
    assert hpsv3.frame_indices(121, 5).tolist() == [0, 30, 60, 90, 120]
    assert hpsv3.frame_indices(10, 5).tolist() == [0, 2, 4, 7, 9]  # round(2.25), round(4.5) = 4, round(6.75)
    scores = torch.tensor([[1.0, 16.0, 3.0, 14.0, 2.0], [5.0, 5.0, 6.0, 4.0, 20.0]])
    torch.testing.assert_close(hpsv3.aggregate(scores, 2, 15.0), torch.tensor([14.5, 10.5]))
    torch.testing.assert_close(hpsv3.aggregate(scores, 2, None), torch.tensor([15.0, 13.0]))
    torch.testing.assert_close(hpsv3.aggregate(scores, 5, None), scores.mean(dim=1))


def test_hpsv3_score_is_the_capped_top_2_of_5_frames(hpsv3_dir: Path) -> None:
    reward = build_reward("hpsv3", checkpoint_dir=str(hpsv3_dir), frame_cap=0.0)
    batch = clip(1)
    frames = reward.frame_scores(batch.slice(0, 2))
    assert frames.shape == (2, 5)
    expected = frames.clamp(max=0.0).topk(2, dim=1).values.mean(dim=1)
    torch.testing.assert_close(reward(batch)["hpsv3"], expected)


def test_videoalign_loads_the_released_lora_model_pth(videoalign_lora: Path, videoalign_dir: Path) -> None:
    lora = videoalign_lora
    assert (lora / "checkpoint-7" / "model.pth").exists()
    assert not (lora / "checkpoint-7" / "model.safetensors").exists()
    state = torch.load(lora / "checkpoint-7" / "model.pth", weights_only=True)
    assert any(".lora_A.default." in key for key in state) and any(".base_layer." in key for key in state)
    batch = clip(2)
    merged = build_reward("videoalign", checkpoint_dir=str(videoalign_dir))(batch)
    released = build_reward("videoalign", checkpoint_dir=str(lora))(batch)
    for key in merged:
        torch.testing.assert_close(released[key], merged[key], rtol=1e-4, atol=1e-4)


def test_videoalign_lora_errors_name_the_file_and_keys(videoalign_lora: Path, tmp_path: Path) -> None:
    lora = Path(shutil.copytree(videoalign_lora, tmp_path / "lora"))
    weights = lora / "checkpoint-7" / "model.pth"
    state = torch.load(weights, weights_only=True)
    key = next(k for k in state if k.endswith("q_proj.lora_B.default.weight"))
    del state[key]
    torch.save(state, weights)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight")
    with pytest.raises(CheckpointError, match=rf"{weights} lacks LoRA keys \['{module}.lora_B'\]"):
        build_reward("videoalign", checkpoint_dir=str(lora))
    config = (lora / "model_config.json").read_text().replace('"lora_alpha"', '"alpha"')
    (lora / "model_config.json").write_text(config)
    with pytest.raises(CheckpointError, match="has no peft_lora_config.lora_alpha"):
        build_reward("videoalign", checkpoint_dir=str(lora))
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"lacks \['checkpoint-<step>/model.pth'"):
        build_reward("videoalign", checkpoint_dir=str(lora))


def test_qwen2vl_base_files_may_live_apart(hpsv3_dir: Path, tmp_path: Path) -> None:
    released = tmp_path / "HPSv3"
    released.mkdir()
    for name in ("HPSv3.safetensors", "prompt_template.txt"):
        shutil.copy(hpsv3_dir / name, released / name)
    with pytest.raises(CheckpointError, match=r"lacks \['config.json', 'preprocessor_config.json', 'tokenizer_conf"):
        build_reward("hpsv3", checkpoint_dir=str(released))
    apart = build_reward("hpsv3", checkpoint_dir=str(released), base_model_dir=str(hpsv3_dir))
    together = build_reward("hpsv3", checkpoint_dir=str(hpsv3_dir))
    batch = clip(3)
    torch.testing.assert_close(apart(batch)["hpsv3"], together(batch)["hpsv3"])


def test_audiobox_loads_metas_checkpoint_pt(root: Path, audiobox_meta: Path) -> None:
    hf = tiny.write_audiobox(root / "audiobox_hf", seed=4)
    meta = audiobox_meta
    assert sorted(p.name for p in meta.iterdir()) == ["checkpoint.pt"]
    batch = clip(4)
    expected = build_reward("audiobox", checkpoint_dir=str(hf), window_s=0.25)(batch)
    got = build_reward("audiobox", checkpoint_dir=str(meta), window_s=0.25)(batch)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_audiobox_checkpoint_errors(audiobox_meta: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"lacks \['checkpoint.pt' or 'config.json' \+ 'model.safetensors'\]"):
        build_reward("audiobox", checkpoint_dir=str(empty))
    broken = Path(shutil.copytree(audiobox_meta, tmp_path / "broken"))
    ckpt = torch.load(broken / "checkpoint.pt", weights_only=True)
    del ckpt["target_transform"]
    ckpt["state_dict"]["model.stray"] = torch.zeros(1)
    torch.save(ckpt, broken / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"lacks the entries \['target_transform'\]"):
        build_reward("audiobox", checkpoint_dir=str(broken))
    ckpt["target_transform"] = {axis: {"mean": 0.0, "std": 1.0} for axis in ("CE", "CU", "PC", "PQ")}
    torch.save(ckpt, broken / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[stray\]"):
        build_reward("audiobox", checkpoint_dir=str(broken))


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pth"])
def test_torn_reward_weights_are_one_line_naming_the_reward_and_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not a checkpoint" * 3)
    with pytest.raises(CheckpointError, match=rf"^reward 'imagebind': cannot read {path}: ") as info:
        read_state_dict(path, "imagebind")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("orig", "new"), [(24000, 16000), (44100, 16000), (16000, 48000), (8000, 16000)])
def test_resampler_matches_scipy_resample_poly_on_non_periodic_signals(orig: int, new: int) -> None:
    signal = pytest.importorskip("scipy.signal")
    t = np.arange(orig // 2) / orig
    band = min(orig, new) / 2
    x = np.exp(-3 * t) * (np.sin(2 * np.pi * 0.11 * band * t + 0.3) + 0.5 * np.sin(2 * np.pi * 0.37 * band * t))
    x = x + 0.2 * t  # a decay and a ramp: nothing periodic over the clip
    g = math.gcd(orig, new)
    expected = signal.resample_poly(x, new // g, orig // g)
    got = resample(torch.tensor(x)[None], orig, new)[0].numpy()
    assert got.shape == (math.ceil(len(x) * new / orig),) == expected.shape
    edge = new // 50  # 20 ms at each end, where the two filters see different zero padding
    np.testing.assert_allclose(got[edge:-edge], expected[edge:-edge], atol=3e-3)
    single = resample(torch.tensor(x)[None].float(), orig, new)  # float32 in, float32 arithmetic
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single[0].numpy(), got, atol=1e-5)


def test_codec_roundtrip_is_an_8_bit_h264_then_jpeg_for_hpsv3(hpsv3_dir: Path) -> None:
    pytest.importorskip("av")
    from omninft_fast.rewards.codec import h264_roundtrip, jpeg_roundtrip

    g = torch.Generator().manual_seed(5)
    video = (torch.rand(1, 4, 3, 17, 22, generator=g) * 0.3 + 0.35).clamp(0, 1)
    decoded = h264_roundtrip(video, 24.0)
    assert decoded.shape == video.shape
    assert ((decoded * 255).round() - decoded * 255).abs().max() < 1e-3  # 8-bit frames
    assert 0 < (decoded - video).abs().mean() < 0.1
    reward = build_reward("hpsv3", checkpoint_dir=str(hpsv3_dir), codec_roundtrip=True)
    batch = clip(6)
    expected = jpeg_roundtrip(h264_roundtrip(batch.video, batch.fps), 75)
    torch.testing.assert_close(reward.roundtrip(batch.video, batch.fps), expected)
    plain = build_reward("hpsv3", checkpoint_dir=str(hpsv3_dir), frame_cap=None, top_k=5)
    through = build_reward("hpsv3", checkpoint_dir=str(hpsv3_dir), frame_cap=None, top_k=5, codec_roundtrip=True)
    decoded_batch = replace(batch, video=expected)
    torch.testing.assert_close(through(batch)["hpsv3"], plain(decoded_batch)["hpsv3"])
    assert not torch.allclose(plain(batch)["hpsv3"], plain(decoded_batch)["hpsv3"])
    with pytest.raises(ValueError, match="3 channels"):
        h264_roundtrip(torch.zeros(1, 2, 1, 8, 8), 24.0)


def test_rewards_check_command(
    audiobox_meta: Path, hpsv3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "rewards"
    folder.mkdir()
    tiny.write_synchformer(folder / "synchformer")
    (folder / "notes").mkdir()  # not a reward: ignored
    assert main(["rewards", "check", str(folder), "--seconds", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "| synchformer | " in out and "| ok | - | neg_desync " in out and "1 usable, 0 unusable" in out
    (folder / "synchformer" / "synchformer_state_dict.pth").unlink()
    base = folder / "hpsv3"  # the release's weights without the base model's files
    base.mkdir()
    for name in ("HPSv3.safetensors", "prompt_template.txt"):
        shutil.copy(hpsv3_dir / name, base / name)
    assert main(["rewards", "check", str(folder), "--seconds", "1.0"]) == 1
    rows = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    weights = folder / "synchformer" / "synchformer_state_dict.pth"
    assert f"| UNUSABLE | {weights} | CheckpointError: " in rows["| synchformer"]
    assert "lacks ['synchformer_state_dict.pth']" in rows["| synchformer"]
    absent = ["config.json", "preprocessor_config.json", "tokenizer_config.json"]
    expected = "; ".join([*(str(base / n) for n in absent), f"{base / 'tokenizer.json'} or {base / 'vocab.json'}"])
    assert f"| UNUSABLE | {expected} | CheckpointError: " in rows["| hpsv3"]
    for seconds in ("0", "-1", "nan", "inf"):
        assert main(["rewards", "check", str(folder), "--seconds", seconds]) == 2
        assert capsys.readouterr().err == f"rewards check: --seconds must be in (0, 60], got {float(seconds)}\n"
    absent = tmp_path / "absent"
    assert main(["rewards", "check", str(absent)]) == 2
    assert capsys.readouterr().err == f"rewards check: {absent} is neither a directory nor a config file\n"
    with pytest.raises(FileNotFoundError, match="is neither a directory nor a config file"):
        main(["rewards", "check", str(absent), "--debug"])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"rewards:\n  - {{name: audiobox, checkpoint_dir: {audiobox_meta}, options: {{window_s: 0.25}}}}\n"
        "  - {name: synthetic_colour}\n",
        encoding="utf-8",
    )
    assert main(["rewards", "check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "| audiobox | " in out and "| ok | - | ce " in out and "1 usable, 0 unusable" in out


def test_imagebind_views_follow_the_release_video_transform() -> None:
    from omninft_fast.rewards.imagebind import short_side_scale, spatial_crops

    frames = torch.rand(2, 3, 6, 9, dtype=torch.float64)
    scaled = short_side_scale(frames, 4)
    assert scaled.shape == (2, 3, 4, 6)  # floor(9 / 6 * 4) = 6
    torch.testing.assert_close(scaled, torch.nn.functional.interpolate(frames, size=(4, 6), mode="bilinear"))
    crops = spatial_crops(scaled, 4, 3)
    assert crops.shape == (2, 3, 3, 4, 4)
    for i, left in enumerate([0, 1, 2]):  # left, centre (ceil(2 / 2) = 1), right
        torch.testing.assert_close(crops[:, i], scaled[..., :, left : left + 4])
    tall = torch.rand(1, 3, 7, 4)
    assert all(bool((spatial_crops(tall, 4, 3)[0, i] == tall[0, :, y : y + 4]).all()) for i, y in enumerate([0, 2, 3]))
    torch.testing.assert_close(spatial_crops(tall, 4, 1)[:, 0], tall[..., 2:6, :])  # ceil(3 / 2) = 2
