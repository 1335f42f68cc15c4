"""generate -> eval round trip through the CLI, from the base policy and from a LoRA run; nothing is overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")
pytest.importorskip("av")

from omninft_fast.cli import main
from omninft_fast.evaluation import load_samples
from omninft_fast.generate import load_policy, read_prompts, resolve_config
from omninft_fast.train.builders import load_prompts
from omninft_fast.train.config import load_config
from omninft_fast.train.trainer import Trainer

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def _prompts(tmp_path: Path) -> tuple[Path, list[str]]:
    texts = load_prompts(load_config(MICRO, []))[:2]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{k}", "prompt": t}) + "\n" for k, t in enumerate(texts)))
    return path, texts


def test_generate_then_eval_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts, texts = _prompts(tmp_path)
    out = tmp_path / "samples"
    args = ["generate", "--config", MICRO, "--prompts", str(prompts), "--out", str(out), "--samples-per-prompt", "2"]
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"p{k}-{s}.{e}" for k in range(2) for s in range(2) for e in ("mp4", "wav")] + ["prompts.jsonl"]
    )
    samples = load_samples(out)
    assert [s.prompt for s in samples] == [texts[0], texts[0], texts[1], texts[1]]
    assert main(["eval", str(out), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "results.json").is_file()
    before = (out / "p0-0.mp4").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate: ") and "already holds" in err and "\n" not in err
    assert (out / "p0-0.mp4").read_bytes() == before


def test_generate_from_a_lora_run_uses_its_adapters(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(load_config(MICRO, [f"output_dir={run}", "finetune.mode=lora", "finetune.lora_rank=4"]))
    with torch.no_grad():
        for p in trainer.policies.adapters.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.save(0)
    loaded = load_policy(resolve_config(None, str(run), []), str(run))
    adapters = loaded.adapters
    for key, param in trainer.policies.adapters.named.items():
        assert torch.equal(adapters.named[key], param)
    prompts, _ = _prompts(tmp_path)
    assert main(["generate", "--run", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "lora")]) == 0
    base = tmp_path / "base"
    assert main(["generate", "--config", MICRO, "--prompts", str(prompts), "--out", str(base)]) == 0
    lora, plain = load_samples(tmp_path / "lora"), load_samples(base)
    assert not torch.equal(lora[0].audio, plain[0].audio)


def test_read_prompts_text_and_errors(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n a dog \n")
    assert read_prompts(text) == [("0000", "a cat"), ("0001", "a dog")]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "../x", "prompt": "a"}\n')
    with pytest.raises(ValueError, match="must be a file name"):
        read_prompts(bad)
    bad.write_text('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n')
    with pytest.raises(ValueError, match="ids repeat"):
        read_prompts(bad)


def test_run_with_another_model_size_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    Trainer(load_config(MICRO, [f"output_dir={run}"])).save(0)
    prompts, _ = _prompts(tmp_path)
    args = [
        "generate",
        "--run",
        str(run),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o"),
        "model.num_layers=3",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"generate: the weights of --run {run} fix model.num_layers (2 in the checkpoint, 3 now); leave them as the "
        "run has them\n"
    )


def test_trainer_moves_earlier_samples_aside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path}"]))
    _, samples = trainer.evaluate()
    trainer._write_samples("after", samples)
    first = (tmp_path / "samples" / "after" / "0000.mp4").read_bytes()
    trainer._write_samples("after", samples)
    assert "moved earlier samples" in capsys.readouterr().out
    assert (tmp_path / "samples" / "after.replaced-1" / "0000.mp4").read_bytes() == first
    assert (tmp_path / "samples" / "after" / "prompts.jsonl").is_file()


def test_a_full_run_loads_only_its_policy_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(load_config(MICRO, [f"output_dir={run}"]))
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.01)
    trainer.save(0)
    loaded = load_policy(resolve_config(None, str(run), []), str(run))
    assert loaded.policies is None and loaded.adapters is None
    expected = trainer.policy.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
