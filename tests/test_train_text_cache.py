"""``omninft-fast text-cache``: the prompt file encoded through ``GemmaPromptEncoder`` (a stand-in Gemma with
ltx-core's real embeddings processor) into a text cache, and the errors for configs it cannot use."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("ltx_core")

from omninft_fast.cli import build_parser, main
from omninft_fast.train.config import load_config
from omninft_fast.train.ltx_pipeline import GemmaPromptEncoder, read_text_cache

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "configs" / "micro.yaml")
EXAMPLE = ROOT / "configs" / "ltx2_19b_example.yaml"
TEXT_LEN, CAPTION_DIM = 8, 12


class _StandInGemma:
    """Stands in for ltx-core's ``GemmaTextEncoder.encode``: 3 layers of left-padded hidden states per prompt."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def encode(self, text: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        self.calls.append(text)
        gen = torch.Generator().manual_seed(sum(map(ord, text)))
        length = min(len(text.split()), TEXT_LEN)
        mask = torch.zeros((1, TEXT_LEN), dtype=torch.long)
        mask[:, TEXT_LEN - length :] = 1
        return tuple(torch.randn((1, TEXT_LEN, 6), generator=gen) for _ in range(3)), mask


def _encoder() -> GemmaPromptEncoder:
    from ltx_core.text_encoders.gemma import EmbeddingsProcessor
    from ltx_core.text_encoders.gemma.embeddings_connector import Embeddings1DConnector
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1

    torch.manual_seed(0)
    connectors = [
        Embeddings1DConnector(attention_head_dim=4, num_attention_heads=3, num_layers=1, num_learnable_registers=8)
        for _ in range(2)
    ]
    processor = EmbeddingsProcessor(
        feature_extractor=FeatureExtractorV1(torch.nn.Linear(6 * 3, CAPTION_DIM, bias=False), is_av=True),
        video_connector=connectors[0],
        audio_connector=connectors[1],
    ).float()
    return GemmaPromptEncoder(_StandInGemma(), processor.eval())


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``GemmaPromptEncoder.from_files`` by the stand-in; record each call's arguments."""
    calls: list[dict[str, Any]] = []

    def from_files(checkpoint: Path, gemma_root: Path, *, device: str, dtype: torch.dtype) -> GemmaPromptEncoder:
        encoder = _encoder()
        calls.append({"checkpoint": checkpoint, "gemma_root": gemma_root, "device": device, "dtype": dtype})
        calls[-1]["encoder"] = encoder
        return encoder

    monkeypatch.setattr(GemmaPromptEncoder, "from_files", staticmethod(from_files))
    return calls


def _ltx(tmp_path: Path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog barks in a park\n\nrain falls on a tin roof\n a dog barks in a park \nan owl hoots\n")
    return [
        "model.kind=ltx",
        f"model.checkpoint={tmp_path / 'ltx-2.safetensors'}",
        f"ltx.gemma_root={tmp_path / 'gemma'}",
        f"prompt_file={prompts}",
        "ltx.dtype=float32",
        *extra,
    ]


def test_text_cache_encodes_the_distinct_prompts(
    tmp_path: Path, loads: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cache" / "text.safetensors"
    overrides = _ltx(tmp_path, "ltx.text_encoder_device=cpu", "ltx.text_cache=null")
    assert main(["text-cache", "--config", MICRO, "--output", str(out), *overrides]) == 0
    assert f"encoded 3 distinct prompts; wrote {out}" in capsys.readouterr().out
    (call,) = loads
    assert call["checkpoint"] == tmp_path / "ltx-2.safetensors" and call["gemma_root"] == tmp_path / "gemma"
    assert call["device"] == "cpu" and call["dtype"] == torch.float32
    prompts, video, audio = read_text_cache(out)
    want = ["a dog barks in a park", "rain falls on a tin roof", "an owl hoots"]
    assert prompts == want and call["encoder"].text_encoder.calls == want
    ref_video, ref_audio = _encoder()(want)
    assert video.shape == audio.shape == (3, TEXT_LEN, CAPTION_DIM)
    torch.testing.assert_close(video, ref_video, rtol=0, atol=0)
    torch.testing.assert_close(audio, ref_audio, rtol=0, atol=0)
    assert bool(torch.isfinite(video).all()) and not torch.equal(video[0], video[1])


def test_text_cache_writes_ltx_text_cache_without_output(
    tmp_path: Path, loads: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "default.safetensors"
    assert main(["text-cache", "--config", MICRO, *_ltx(tmp_path, f"ltx.text_cache={cache}", "device=cpu")]) == 0
    assert loads[0]["device"] == "cpu"
    assert read_text_cache(cache)[0] == ["a dog barks in a park", "rain falls on a tin roof", "an owl hoots"]
    before, calls = cache.read_bytes(), len(loads)
    capsys.readouterr()
    assert main(["text-cache", "--config", MICRO, *_ltx(tmp_path, f"ltx.text_cache={cache}", "device=cpu")]) == 2
    assert (
        capsys.readouterr().err
        == f"text-cache output {cache} exists; choose another --output (nothing is overwritten)\n"
    )
    assert cache.read_bytes() == before and len(loads) == calls  # refused before Gemma loads


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["ltx.gemma_root=null", "ltx.text_cache=cache.safetensors"], r"text-cache needs ltx.gemma_root"),
        (["model.kind=ltx_tiny"], r"text-cache needs model.kind=ltx, got 'ltx_tiny'"),
        (["prompt_file=null", "ltx.text_cache=cache.safetensors"], r"text-cache needs prompts or prompt_file"),
        (["ltx.text_cache=null"], r"text-cache needs --output or ltx.text_cache"),
        (
            ["prompt_file=absent.txt", "ltx.text_cache=c.safetensors"],
            r"text-cache: prompt_file 'absent.txt' does not exist",
        ),
        (["model.checkpoint=null"], r"config error: model.checkpoint must name"),
    ],
)
def test_text_cache_config_errors_name_the_key(
    tmp_path: Path, loads: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["text-cache", "--config", MICRO, *_ltx(tmp_path), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not loads


def test_the_example_config_documents_the_command(tmp_path: Path) -> None:
    comment = re.search(r"#\s+(omninft-fast text-cache .*?)\n#\s+(\S.*)\n", EXAMPLE.read_text())
    assert comment is not None
    argv = shlex.split(comment.group(1).rstrip("\\") + " " + comment.group(2))[1:]
    args = build_parser().parse_args([a if a != "configs/ltx2_19b_example.yaml" else str(EXAMPLE) for a in argv])
    assert args.command == "text-cache" and args.output == "/data/ltx2_text_cache.safetensors"
    config = load_config(args.config, args.overrides)
    assert config.ltx.gemma_root == "/models/gemma-3-12b-it" and config.ltx.text_cache == args.output
