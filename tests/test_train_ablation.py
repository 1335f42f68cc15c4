"""The ablation ladder's flags change exactly what they claim (Table 3's rows)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("ltx_core")

from omninft_fast.task import all_prompts
from omninft_fast.train import stages
from omninft_fast.train.config import load_config
from omninft_fast.train.model import Condition
from omninft_fast.train.trainer import Trainer

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def micro(tmp_path: Path, *overrides: str) -> Trainer:
    """A micro trainer in a fresh folder under ``tmp_path`` (a run never overwrites another)."""
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    return Trainer(load_config(MICRO, [f"output_dir={out}", *overrides]))


def _scores(trainer: Trainer, gen: torch.Generator) -> stages.Scores:
    batch = trainer.config.prompts_per_iter * trainer.config.group_size
    values = {
        "colour": torch.randn(batch, generator=gen),
        "pitch": torch.rand(batch, generator=gen),
        "sync": torch.randn(batch, generator=gen),
    }
    rewards = dict(zip(values, trainer.rewards, strict=True))
    return stages.Scores(values, {n: r.modality for n, r in rewards.items()}, {n: r.weight for n, r in rewards.items()})


def _advantages(trainer: Trainer, gen: torch.Generator) -> stages.Advantages:
    config = trainer.config
    return stages.advantages(_scores(trainer, gen), config.prompts_per_iter, config.advantage, trainer.device)


@pytest.mark.parametrize(
    ("rung", "routing", "surgery", "reweight"),
    [
        ("vanilla", "gdpo", False, False),
        ("routing", "modality", False, False),
        ("surgery", "modality", True, False),
        ("full", "modality", True, True),
    ],
)
def test_ladder_presets(rung: str, routing: str, surgery: bool, reweight: bool) -> None:
    config = load_config(MICRO, [f"ladder={rung}"])
    assert (config.advantage.routing, config.surgery.enabled, config.reweight.enabled) == (routing, surgery, reweight)


def test_shared_routing_gives_both_branches_the_same_r(tmp_path: Path, gen: torch.Generator) -> None:
    shared = micro(tmp_path, "advantage.routing=shared")
    adv = _advantages(shared, gen)
    torch.testing.assert_close(adv.r_video, adv.r_audio, rtol=0, atol=0)
    gen.manual_seed(1234)
    routed = micro(tmp_path, "advantage.routing=modality")
    adv = _advantages(routed, gen)
    assert not torch.equal(adv.r_video, adv.r_audio)


def _a2v_kv_grads(trainer: Trainer) -> list[torch.Tensor]:
    """Gradients of every block's A2V key/value projections (which read the audio stream) for a fixed loss."""
    gen = torch.Generator().manual_seed(0)
    spec = trainer.task.spec
    texts = trainer.prompts[:3]
    cond = Condition(*trainer.task.encode(texts))
    xv = torch.randn((3, spec.video_tokens, spec.video_channels), generator=gen)
    xa = torch.randn((3, spec.audio_tokens, spec.audio_channels), generator=gen)
    vv, va = trainer.policy(xv, xa, torch.tensor([0.3, 0.6, 0.9]), cond)
    trainer.policy.zero_grad()
    (vv.square().mean() + va.square().mean()).backward()
    grads = []
    for block in trainer.policy.model.transformer_blocks:
        grads += [
            block.audio_to_video_attn.to_k.weight.grad.clone(),
            block.audio_to_video_attn.to_v.weight.grad.clone(),
        ]
    return grads


def test_surgery_scales_only_shallow_a2v_kv_gradients(tmp_path: Path) -> None:
    plain = _a2v_kv_grads(micro(tmp_path, "surgery.enabled=false"))
    cut = _a2v_kv_grads(micro(tmp_path, "surgery.enabled=true", "surgery.alpha=0.25", "surgery.boundary=1"))
    # micro: 2 blocks, boundary 1 -> block 0 (entries 0, 1) scaled by 1 - alpha, block 1 untouched.
    for k in (0, 1):
        torch.testing.assert_close(cut[k], 0.75 * plain[k], rtol=1e-5, atol=1e-9)
    for k in (2, 3):
        torch.testing.assert_close(cut[k], plain[k], rtol=1e-5, atol=1e-9)
    assert plain[0].abs().sum() > 0


def test_surgery_off_leaves_gradients_unscaled(tmp_path: Path) -> None:
    off = micro(tmp_path, "surgery.enabled=false")
    assert off.policies.policy_handle is None
    plain = _a2v_kv_grads(off)
    zero = _a2v_kv_grads(micro(tmp_path, "surgery.enabled=true", "surgery.alpha=0.0"))
    for a, b in zip(plain, zero, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_reweighting_flag_switches_region_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import omninft_fast

    seen: list[torch.Tensor | None] = []
    original = omninft_fast.nft_loss

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(kwargs.get("token_weight"))
        return original(*args, **kwargs)

    monkeypatch.setattr(omninft_fast, "nft_loss", spy)
    micro(tmp_path, "reweight.enabled=false").iteration(0)
    assert all(w is None for w in seen)
    seen.clear()
    micro(tmp_path, "reweight.enabled=true").iteration(0)
    video_weights = seen[0::2]
    assert all(w is not None and w.min() >= 1.0 and w.max() <= 2.5 for w in video_weights)
    assert all(w is None for w in seen[1::2])  # the audio loss is never reweighted (Eq 12)


def _ladder_module() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_ladder.py"
    spec = importlib.util.spec_from_file_location("ablation_ladder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_quantile_and_interval() -> None:
    ladder = _ladder_module()
    for df, expected in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (9, 2.2622), (30, 2.0423)):
        assert ladder.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert ladder.t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-4)
    mean, half = ladder.interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(3.1824 * (5 / 3) ** 0.5 / 2, abs=1e-4)
    assert ladder.interval([0.7]) == (0.7, 0.0)


def _eval(offset: float, prompts: list[str]) -> dict:
    per_prompt = {
        "colour": [offset + 0.01 * i for i in range(len(prompts))],
        "pitch": [offset - 0.02 * i for i in range(len(prompts))],
    }
    mean = {k: sum(v) / len(v) for k, v in per_prompt.items()}
    return {
        "mean": mean,
        "stderr": {k: 0.01 for k in mean},
        "count": 8 * len(prompts),
        "prompts": prompts,
        "prompt_mean": per_prompt,
    }


def test_ladder_tables_and_plot(tmp_path: Path) -> None:
    ladder = _ladder_module()
    prompts = all_prompts()[:4]
    conflicts = set(prompts[1::2])
    rows = [
        {
            "rung": rung,
            "seed": seed,
            "seconds": 60.0 + seed,
            "before": _eval(0.1, prompts),
            "after": _eval(0.5 + 0.1 * k + 0.03 * seed, prompts),
            "curve": {"colour": [0.1, 0.3 + 0.1 * k + 0.01 * seed], "pitch": [0.2, 0.4]},
        }
        for seed in range(3)
        for k, rung in enumerate(("vanilla", "full"))
    ]
    summary = ladder.summarise(rows, conflicts)
    assert list(summary) == ["vanilla", "full"]
    mean, half = summary["full"]["colour (conflict)"]
    assert mean == pytest.approx(0.6 + 0.03 + (0.01 + 0.03) / 2)
    assert half == pytest.approx(ladder.t_quantile(0.975, 2) * 0.03 / 3**0.5)
    curves = ladder.summarise(rows, conflicts, curves=True)
    assert curves["full"]["colour"][0] == pytest.approx(0.255) and curves["full"]["pitch"] == (pytest.approx(0.3), 0.0)
    markdown = ladder.to_markdown(rows, "configs/x.yaml", "python benchmarks/ablation_ladder.py", conflicts, "p.png")
    assert "| + reweighting (full) | 0.645 +- " in markdown and "pitch (conflict)" in markdown
    assert markdown.count("| vanilla (GDPO) | ") == 5  # two summary rows, three runs
    (step,) = ladder.paired_steps(rows, conflicts).items()
    assert step[0] == "+ reweighting (full) - vanilla (GDPO)"
    assert step[1]["colour"][0] == pytest.approx(0.1) and step[1]["colour"][1] == pytest.approx(0.0, abs=1e-9)
    assert "| + reweighting (full) - vanilla (GDPO) | +0.100 +- 0.000 |" in markdown
    ladder.plot_ladder(tmp_path / "ladder.png", rows, conflicts)
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"


def test_ladder_script_runs_the_rungs(tmp_path: Path) -> None:
    ladder = _ladder_module()
    args = ["--config", MICRO, "--seeds", "0,1", "--rungs", "vanilla,full", "--runs-dir", str(tmp_path / "runs")]
    assert ladder.main([*args, "--name", "micro", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ablation_micro.json").read_text())
    assert [(row["rung"], row["seed"]) for row in rows] == [("vanilla", 0), ("full", 0), ("vanilla", 1), ("full", 1)]
    after = rows[0]["after"]
    assert after["prompts"] == all_prompts()
    for name, per_prompt in after["prompt_mean"].items():  # equal samples per prompt: the mean of the means
        assert sum(per_prompt) / len(per_prompt) == pytest.approx(after["mean"][name], abs=1e-6)
    assert [len(v) for v in rows[0]["curve"].values()] == [2, 2, 2]  # micro: 2 iterations, 3 rewards
    assert rows[0]["after"]["mean"] != rows[2]["after"]["mean"]  # seeds differ
    markdown = (tmp_path / "ablation_micro.md").read_text()
    assert "## Mean over 2 seeds, 95% t interval" in markdown and "(conflict)" not in markdown
    assert (tmp_path / "ablation_micro.png").exists()
    again = ladder.main([*args, "--from-runs", "--name", "again", "--results-dir", str(tmp_path)])
    assert again == 0 and json.loads((tmp_path / "ablation_again.json").read_text()) == rows


def test_ablation_diagnostics_measure_conflicts_and_the_beacon() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_diagnostics.py"
    spec = importlib.util.spec_from_file_location("ablation_diagnostics", path)
    diagnostics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnostics)
    result = diagnostics.diagnose(MICRO, None, overrides=["task.beacon=true", "task.conflict_fraction=0.5"])
    assert set(result) == {
        "opposite share (conflict)",
        "colour-pitch corr (conflict)",
        "opposite share (other)",
        "colour-pitch corr (other)",
        "beacon share of Eq 10 score",
        "beacon is top token",
    }
    assert 0 < result["beacon share of Eq 10 score"] < 1 and 0 <= result["beacon is top token"] <= 1
    assert all(0 < result[f"opposite share ({k})"] < 1 for k in ("conflict", "other"))
    assert all(-1 <= result[f"colour-pitch corr ({k})"] <= 1 for k in ("conflict", "other"))
    plain = diagnostics.diagnose(MICRO, None)
    assert set(plain) == {"opposite share (other)", "colour-pitch corr (other)"}
