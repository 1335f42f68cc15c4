"""The released LTX-2 as the trainer's task: tiny random-weight components in the released single-file layout,
loaded back through ltx-core's configurators and key maps, decoded, and trained for one iteration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")

from safetensors.torch import load_file, save_file

from omninft_fast.rewards import RewardBatch, RewardModel, register_reward
from omninft_fast.train.config import ConfigError, load_config
from omninft_fast.train.ltx_pipeline import (
    GemmaPromptEncoder,
    LTX2Pipeline,
    LTX2Spec,
    MissingWeightsError,
    _audio_vae,
    precompute_text_cache,
    read_text_cache,
    text_cache_prompts,
    write_text_cache,
)
from omninft_fast.train.model import Condition
from omninft_fast.train.trainer import Trainer

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
PROMPTS = ["a dog barks in a park", "rain falls on a tin roof", "a violin plays a slow melody"]
TEXT_LEN, CAPTION_DIM = 8, 12
CLIP = {"frames": 9, "height": 64, "width": 64, "fps": 8.0}

# The released 19B model's config sections, shrunk: the fixed values are those ltx-core's configurators check.
TINY_CONFIG = {
    "transformer": {
        "dropout": 0.0,
        "attention_bias": True,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "use_linear_projection": False,
        "only_cross_attention": False,
        "cross_attention_norm": True,
        "double_self_attention": False,
        "upcast_attention": False,
        "standardization_norm": "rms_norm",
        "norm_elementwise_affine": False,
        "qk_norm": "rms_norm",
        "positional_embedding_type": "rope",
        "use_audio_video_cross_attention": True,
        "share_ff": False,
        "av_cross_ada_norm": True,
        "use_middle_indices_grid": True,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 8,
        "out_channels": 8,
        "cross_attention_dim": 16,
        "audio_num_attention_heads": 2,
        "audio_attention_head_dim": 4,
        "audio_in_channels": 8,
        "audio_out_channels": 8,
        "audio_cross_attention_dim": 8,
        "caption_channels": CAPTION_DIM,
    },
    "vae": {
        "dims": 3,
        "latent_channels": 8,
        "out_channels": 3,
        "patch_size": 4,
        "norm_layer": "pixel_norm",
        "causal_decoder": False,
        "timestep_conditioning": True,
        "decoder_base_channels": 4,
        "spatial_padding_mode": "reflect",
        "decoder_blocks": [
            ["res_x", {"num_layers": 1}],
            ["compress_all", {"multiplier": 2}],
            ["compress_all", {"multiplier": 2}],
            ["compress_all", {"multiplier": 2}],
        ],
    },
    "audio_vae": {
        "model": {
            "params": {
                "sampling_rate": 16000,
                "ddconfig": {
                    "ch": 8,
                    "out_ch": 2,
                    "ch_mult": [1, 2, 4],
                    "num_res_blocks": 1,
                    "attn_resolutions": [],
                    "resolution": 256,
                    "z_channels": 2,
                    "norm_type": "pixel",
                    "causality_axis": "height",
                    "mid_block_add_attention": False,
                    "mel_bins": 64,
                },
            }
        },
        "preprocessing": {"stft": {"hop_length": 160, "causal": True}},
    },
    "vocoder": {
        "resblock_kernel_sizes": [3],
        "upsample_rates": [2, 2],
        "upsample_kernel_sizes": [4, 4],
        "resblock_dilation_sizes": [[1, 3, 5]],
        "upsample_initial_channel": 8,
        "resblock": "1",
        "stereo": True,
        "output_sampling_rate": 400,
    },
}


def _initialise(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Materialise a meta-device module with small random weights (positive latent statistics)."""
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("timestep_scale_multiplier"):
                tensor.fill_(1000.0)
            elif name.endswith("std-of-means"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif tensor.dim() >= 2 or "scale_shift_table" in name or name.endswith("mean-of-means"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def _prefixed(prefix: str, key: str) -> str:
    """Released key of a VAE tensor: statistics beside the decoder (``vae.per_channel_statistics.*``)."""
    return f"{prefix}.{key}" if key.startswith("per_channel_statistics.") else f"{prefix}.decoder.{key}"


def write_tiny_ltx2(path: Path, seed: int = 0) -> Path:
    """A tiny LTX-2 single-file checkpoint: transformer, video/audio VAE decoders and vocoder, ``config`` metadata."""
    from ltx_core.model.transformer.model_configurator import LTXModelConfigurator
    from ltx_core.model.video_vae import VideoDecoderConfigurator

    audio_vae = _audio_vae()
    gen = torch.Generator().manual_seed(seed)
    parts = (
        (LTXModelConfigurator, lambda k: f"model.diffusion_model.{k}"),
        (VideoDecoderConfigurator, lambda k: _prefixed("vae", k)),
        (audio_vae.AudioDecoderConfigurator, lambda k: _prefixed("audio_vae", k)),
        (audio_vae.VocoderConfigurator, lambda k: f"vocoder.{k}"),
    )
    tensors = {}
    for configurator, rename in parts:
        with torch.device("meta"):
            module = configurator.from_config(TINY_CONFIG)
        for key, value in _initialise(module, gen).state_dict().items():
            tensors[rename(key)] = value.contiguous().clone()
    save_file(tensors, str(path), metadata={"config": json.dumps(TINY_CONFIG)})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ltx2")
    gen = torch.Generator().manual_seed(1)
    cache = write_text_cache(
        root / "text.safetensors",
        PROMPTS,
        torch.randn((len(PROMPTS), TEXT_LEN, CAPTION_DIM), generator=gen),
        torch.randn((len(PROMPTS), TEXT_LEN, CAPTION_DIM), generator=gen),
    )
    return {"checkpoint": write_tiny_ltx2(root / "ltx-2-tiny.safetensors"), "cache": cache, "root": root}


@pytest.fixture(scope="module")
def pipeline(files: dict[str, Path]) -> LTX2Pipeline:
    return LTX2Pipeline(files["checkpoint"], text_cache=files["cache"], decode_batch=2, **CLIP)


@pytest.mark.parametrize(
    ("frames", "height", "width", "fps", "video_tokens", "audio_tokens"),
    [(121, 512, 768, 24.0, 6144, 126), (121, 704, 1280, 24.0, 14080, 126), (241, 512, 768, 24.0, 11904, 251)],
)
def test_released_clip_sizes_give_the_known_token_counts(
    frames: int, height: int, width: int, fps: float, video_tokens: int, audio_tokens: int
) -> None:
    spec = LTX2Spec(frames, height, width, fps, 128, 8, 16, 16000 / 160 / 4, 24000)
    assert (spec.video_tokens, spec.audio_tokens, spec.video_channels, spec.audio_channels) == (
        video_tokens,
        audio_tokens,
        128,
        128,
    )


@pytest.mark.parametrize(
    ("frames", "height", "message"),
    [(120, 512, r"ltx.frames must be 8 k \+ 1"), (121, 500, r"ltx.height must be a positive multiple of 32")],
)
def test_bad_clip_sizes_name_the_key(frames: int, height: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LTX2Spec(frames, height, 768, 24.0, 128, 8, 16, 25.0, 24000)


def test_decoders_give_reward_batches(pipeline: LTX2Pipeline) -> None:
    s = pipeline.spec
    assert (s.video_tokens, s.audio_tokens, s.video_channels, s.audio_channels, s.sample_rate) == (8, 28, 8, 8, 400)
    gen = torch.Generator().manual_seed(2)
    video = torch.randn((3, s.video_tokens, s.video_channels), generator=gen)
    audio = torch.randn((3, s.audio_tokens, s.audio_channels), generator=gen)
    frames, waveform = pipeline.decode(video, audio)
    assert frames.shape == (3, 9, 3, 64, 64) and frames.dtype == torch.float32
    assert waveform.shape == (3, (4 * 28 - 3) * 4) and waveform.dtype == torch.float32
    assert bool(torch.isfinite(frames).all()) and float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0
    assert float(frames.std()) > 0 and float(waveform.abs().max()) <= 1.0 and float(waveform.std()) > 0
    again, _ = pipeline.decode(video, audio)
    torch.testing.assert_close(again, frames, rtol=0, atol=0)  # the decoder's noise is seeded
    _, one = pipeline.decode(video[1:2], audio[1:2])
    torch.testing.assert_close(one[0], waveform[1], rtol=1e-5, atol=1e-6)  # audio decoding is per sample
    RewardBatch(frames, s.fps, waveform, s.sample_rate, PROMPTS)


def test_both_tasks_meet_the_trainer_protocol(pipeline: LTX2Pipeline) -> None:
    from omninft_fast.task import SyntheticAVTask, all_prompts

    for task, prompts in ((SyntheticAVTask(), all_prompts()[:2]), (pipeline, PROMPTS[:2])):
        s = task.spec
        video_context, audio_context = task.encode(prompts)
        assert video_context.shape[0] == audio_context.shape[0] == 2
        frames, waveform = task.decode(
            torch.randn((2, s.video_tokens, s.video_channels)), torch.randn((2, s.audio_tokens, s.audio_channels))
        )
        assert len(RewardBatch(frames, s.fps, waveform, s.sample_rate, prompts)) == 2


def test_tiled_video_decoding_matches_on_a_single_tile(files: dict[str, Path], pipeline: LTX2Pipeline) -> None:
    tiled = LTX2Pipeline(files["checkpoint"], text_cache=files["cache"], decode_batch=2, decode_tiling=True, **CLIP)
    video = torch.randn((2, 8, 8), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(tiled.decode_video(video), pipeline.decode_video(video), rtol=1e-5, atol=1e-5)


def test_a_sample_decodes_alike_whatever_its_batch_mates(pipeline: LTX2Pipeline) -> None:
    """The decoder injects seeded noise (timestep conditioning): batched or alone, a sample gets the same frames."""
    assert pipeline.video_decoder.timestep_conditioning
    video = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(5))
    alone = torch.cat([pipeline.decode_video(video[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(pipeline.decode_video(video), alone, rtol=0, atol=0)


def test_policy_is_the_checkpoint_transformer(files: dict[str, Path], pipeline: LTX2Pipeline) -> None:
    policy = pipeline.policy(dtype=torch.float32)
    stored = load_file(str(files["checkpoint"]))
    for key, value in policy.model.state_dict().items():
        torch.testing.assert_close(value, stored[f"model.diffusion_model.{key}"], rtol=0, atol=0)
    s = pipeline.spec
    assert policy.video_positions.shape == (1, 3, s.video_tokens, 2)
    assert policy.audio_positions.shape == (1, 1, s.audio_tokens, 2)
    assert float(policy.audio_positions.max()) == pytest.approx(CLIP["frames"] / CLIP["fps"], abs=0.05)
    cond = Condition(*pipeline.encode(PROMPTS[:2]))
    assert cond.video.shape == (2, TEXT_LEN, CAPTION_DIM) and cond.audio.shape == (2, TEXT_LEN, CAPTION_DIM)
    gen = torch.Generator().manual_seed(3)
    x_video = torch.randn((2, s.video_tokens, s.video_channels), generator=gen)
    x_audio = torch.randn((2, s.audio_tokens, s.audio_channels), generator=gen)
    v_video, v_audio = policy(x_video, x_audio, torch.tensor([0.3, 0.8]), cond)
    assert v_video.shape == x_video.shape and v_audio.shape == x_audio.shape
    assert bool(torch.isfinite(v_video).all() and torch.isfinite(v_audio).all())


def test_missing_weights_and_files_are_named(files: dict[str, Path], tmp_path: Path) -> None:
    stored = load_file(str(files["checkpoint"]))
    for dropped, component, key in (
        ("vocoder.conv_post.weight", "vocoder", "conv_post.weight"),
        ("vae.per_channel_statistics.std-of-means", "video VAE decoder", "per_channel_statistics.std-of-means"),
        ("audio_vae.decoder.conv_in.conv.weight", "audio VAE decoder", "conv_in.conv.weight"),
    ):
        broken = tmp_path / f"no-{component.replace(' ', '-')}.safetensors"
        save_file({k: v for k, v in stored.items() if k != dropped}, str(broken), {"config": json.dumps(TINY_CONFIG)})
        with pytest.raises(MissingWeightsError, match=rf"{component}: 1 weights missing from '{broken}'") as info:
            LTX2Pipeline(broken, text_cache=files["cache"], **CLIP)
        assert str(info.value).endswith(key)
    broken = tmp_path / "no-transformer-block.safetensors"
    kept = {k: v for k, v in stored.items() if not k.startswith("model.diffusion_model.transformer_blocks.1.")}
    save_file(kept, str(broken), {"config": json.dumps(TINY_CONFIG)})
    pipeline = LTX2Pipeline(broken, text_cache=files["cache"], **CLIP)
    with pytest.raises(MissingWeightsError, match=r"transformer: \d+ weights missing .*transformer_blocks\.1\."):
        pipeline.policy()
    no_config = tmp_path / "no-config.safetensors"
    save_file(stored, str(no_config))
    with pytest.raises(ValueError, match="has no 'config' metadata"):
        LTX2Pipeline(no_config, text_cache=files["cache"], **CLIP)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LTX2Pipeline(tmp_path / "absent.safetensors", text_cache=files["cache"], **CLIP)
    with pytest.raises(FileNotFoundError, match="ltx.text_cache"):
        LTX2Pipeline(files["checkpoint"], text_cache=tmp_path / "absent.safetensors", **CLIP)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(files["checkpoint"].read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"^LTX-2 checkpoint '{torn}' is not a readable safetensors file \("):
        LTX2Pipeline(torn, text_cache=files["cache"], **CLIP)
    torn.write_bytes(files["cache"].read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"^ltx.text_cache '{torn}' is not a readable safetensors file \("):
        LTX2Pipeline(files["checkpoint"], text_cache=torn, **CLIP)
    with pytest.raises(ValueError, match=rf"^ltx.text_cache '{torn}' is not a readable safetensors file \("):
        text_cache_prompts(torn)


class _FakeGemma:
    """Stands in for ltx-core's ``GemmaTextEncoder.encode``: 3 layers of left-padded hidden states per prompt."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def encode(self, text: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        self.calls.append(text)
        gen = torch.Generator().manual_seed(len(text))
        length = min(len(text.split()), TEXT_LEN)
        mask = torch.zeros((1, TEXT_LEN), dtype=torch.long)
        mask[:, TEXT_LEN - length :] = 1
        return tuple(torch.randn((1, TEXT_LEN, 6), generator=gen) for _ in range(3)), mask


def test_text_cache_and_on_the_fly_encoding(files: dict[str, Path]) -> None:
    from ltx_core.text_encoders.gemma import EmbeddingsProcessor
    from ltx_core.text_encoders.gemma.embeddings_connector import Embeddings1DConnector
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1

    prompts, video, audio = read_text_cache(files["cache"])
    assert prompts == PROMPTS and video.shape == (3, TEXT_LEN, CAPTION_DIM)
    cached = LTX2Pipeline(files["checkpoint"], text_cache=files["cache"], **CLIP)
    got_video, got_audio = cached.encode([PROMPTS[2], PROMPTS[0], PROMPTS[2]])
    torch.testing.assert_close(got_video, video[[2, 0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(got_audio, audio[[2, 0, 2]], rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"prompt 'a cat' is not in ltx.text_cache .* no text encoder"):
        cached.encode(["a cat"])

    torch.manual_seed(0)
    processor = EmbeddingsProcessor(
        feature_extractor=FeatureExtractorV1(torch.nn.Linear(6 * 3, CAPTION_DIM, bias=False), is_av=True),
        video_connector=Embeddings1DConnector(
            attention_head_dim=4, num_attention_heads=3, num_layers=1, num_learnable_registers=TEXT_LEN
        ),
        audio_connector=Embeddings1DConnector(
            attention_head_dim=4, num_attention_heads=3, num_layers=1, num_learnable_registers=TEXT_LEN
        ),
    ).float()
    gemma = _FakeGemma()
    live = LTX2Pipeline(
        files["checkpoint"], text_cache=files["cache"], prompt_encoder=GemmaPromptEncoder(gemma, processor), **CLIP
    )
    new_video, new_audio = live.encode(["a cat", PROMPTS[1], "a cat", "an owl hoots"])
    assert gemma.calls == ["a cat", "an owl hoots"]  # cached prompts are read, new ones encoded once
    assert new_video.shape == (4, TEXT_LEN, CAPTION_DIM) and new_audio.shape == (4, TEXT_LEN, CAPTION_DIM)
    torch.testing.assert_close(new_video[1], video[1], rtol=0, atol=0)
    torch.testing.assert_close(new_video[0], new_video[2], rtol=0, atol=0)
    assert bool(torch.isfinite(new_video).all()) and not torch.equal(new_video[0], new_audio[0])
    live.encode(["a cat"])
    assert gemma.calls == ["a cat", "an owl hoots"]

    written = precompute_text_cache(
        GemmaPromptEncoder(_FakeGemma(), processor), ["a cat", "an owl hoots", "a cat", ""], files["root"] / "t.st"
    )
    # As the trainer looks them up: duplicates once, the empty prompt (guidance's unconditional pass) kept.
    prompts, video, _ = read_text_cache(written)
    assert prompts == ["a cat", "an owl hoots", ""]
    torch.testing.assert_close(video[:2], new_video[[0, 3]], rtol=0, atol=0)
    cached = LTX2Pipeline(files["checkpoint"], text_cache=written, **CLIP)
    torch.testing.assert_close(cached.unconditional(2)[0], video[[2, 2]], rtol=0, atol=0)


@register_reward("test_ltx_brightness")
class _Brightness(RewardModel):
    """Mean frame brightness (judges any decoded frames)."""

    modality = "video"

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        return {"brightness": batch.video.mean(dim=(1, 2, 3, 4))}


@register_reward("test_ltx_loudness")
class _Loudness(RewardModel):
    """Root-mean-square level of the waveform (judges any decoded audio)."""

    modality = "audio"

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        return {"loudness": batch.audio.square().mean(dim=1).sqrt()}


def _ltx_overrides(files: dict[str, Path], out: Path) -> list[str]:
    return [
        f"output_dir={out}",
        "model.kind=ltx",
        f"model.checkpoint={files['checkpoint']}",
        f"ltx.text_cache={files['cache']}",
        "ltx.frames=9",
        "ltx.height=64",
        "ltx.width=64",
        "ltx.fps=8",
        "ltx.dtype=float32",
        "ltx.decoder_dtype=float32",
        "ltx.decode_batch=4",
        "rewards=[{name: test_ltx_brightness}, {name: test_ltx_loudness}]",
        "iterations=1",
        "prompts_per_iter=2",
        "group_size=2",
        "sampling.num_steps=2",
    ]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_trainer_runs_one_iteration_on_the_tiny_released_layout(
    files: dict[str, Path], tmp_path: Path, finetune: str
) -> None:
    if finetune == "lora":
        pytest.importorskip("peft")
    config = load_config(MICRO, [*_ltx_overrides(files, tmp_path), f"finetune.mode={finetune}", "finetune.lora_rank=2"])
    trainer = Trainer(config)
    assert trainer.prompts == PROMPTS  # drawn from the text cache
    assert trainer.policy.num_layers == 2 and trainer.task.spec.video_tokens == 8
    before = {k: v.detach().clone() for k, v in trainer.policy.named_parameters()}
    before_eval, after_eval = trainer.run()
    assert set(before_eval.mean) == {"brightness", "loudness"} and after_eval.count == len(PROMPTS)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.policy.named_parameters())
    (line,) = [json.loads(text) for text in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/video", "loss/audio", "grad_norm/total", "reward/brightness/mean", "reward/loudness/std"):
        assert torch.isfinite(torch.tensor(line[key])), key
    assert "| brightness | video |" in (tmp_path / "eval_table.md").read_text()
    assert list((tmp_path / "samples" / "after").glob("*.mp4")) and list((tmp_path / "samples" / "after").glob("*.wav"))
    resumed = Trainer(config, resume=True)  # the checkpoint holds the released transformer's keys
    assert resumed.start_iteration == 1
    for key, value in trainer.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[key], value, rtol=0, atol=0)


def test_ltx_config_errors_name_the_key(files: dict[str, Path], tmp_path: Path) -> None:
    base = _ltx_overrides(files, tmp_path)
    cases = (
        (["ltx.text_cache=null"], r"needs ltx.text_cache or ltx.gemma_root"),
        (["ltx.frames=10"], r"ltx.frames must be 8 k \+ 1"),
        (["ltx.width=100"], r"ltx.width must be a multiple of 32"),
        (["ltx.dtype=int8"], r"ltx.dtype must be one of"),
        (["model.checkpoint=null"], r"model.checkpoint must name"),
        (["prompts=[]"], r"prompts must not be empty"),
    )
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(MICRO, [*base, *extra])
