"""``fp8.*`` in the trainer: which models run FP8 layers, and an iteration that trains through them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")


from omninft_fast import fp8
from omninft_fast.cli import main
from omninft_fast.train import Trainer
from omninft_fast.train.config import ConfigError, load_config

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def _fp8_layers(model: torch.nn.Module) -> int:
    return sum(getattr(m, "_omninft_fp8_cache", None) is not None for m in model.modules())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_an_iteration_trains_through_fp8_layers(tmp_path: Path, mode: str) -> None:
    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path}", f"finetune.mode={mode}", "fp8.enabled=true"]))
    policies = trainer.policies
    assert _fp8_layers(policies.policy) > 0
    if mode == "full":
        assert _fp8_layers(policies.old) == _fp8_layers(policies.policy)
    before = [p.detach().clone() for p in policies.trainable]
    with fp8.ScaledMMCounter() as counter:
        trainer.iteration(0)
    assert counter.calls > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, policies.trainable, strict=True))


def test_cache_weights_reaches_every_fp8_layer(tmp_path: Path) -> None:
    overrides = [f"output_dir={tmp_path}", "fp8.enabled=true", "nft.kl_weight=0.1", "fp8.cache_weights=false"]
    policies = Trainer(load_config(MICRO, overrides)).policies
    models = (policies.policy, policies.old, policies.ref)
    caches = [m._omninft_fp8_cache for p in models for m in p.modules() if hasattr(m, "_omninft_fp8_cache")]
    assert caches and not any(c.enabled for c in caches)
    with pytest.raises(ConfigError, match="fp8.cache_weights=false applies to fp8.backend=torch"):
        load_config(MICRO, [*overrides, "fp8.backend=te", "fp8.recipe=current"])


def test_rollout_only_keeps_the_trained_policy_and_refuses_lora(tmp_path: Path) -> None:
    overrides = [f"output_dir={tmp_path}", "fp8.enabled=true", "fp8.rollout_only=true"]
    trainer = Trainer(load_config(MICRO, overrides))
    assert _fp8_layers(trainer.policies.policy) == 0 and _fp8_layers(trainer.policies.old) > 0
    with pytest.raises(ConfigError, match="fp8.rollout_only needs finetune.mode=full"):
        load_config(MICRO, [*overrides, "finetune.mode=lora"])
    with pytest.raises(ConfigError, match="fp8.recipe must be one of"):
        load_config(MICRO, [f"output_dir={tmp_path}", "fp8.recipe=blockwise"])


def test_fp8_modules_selects_the_layers_of_all_three_models(tmp_path: Path) -> None:
    ffn_only = r"transformer_blocks\.\d+\..*\.(net\.0\.proj|net\.2)$"
    overrides = [f"output_dir={tmp_path}", "fp8.enabled=true", "nft.kl_weight=0.1", f"fp8.modules={ffn_only}"]
    policies = Trainer(load_config(MICRO, overrides)).policies
    for model in (policies.policy, policies.old, policies.ref):
        names = [n for n, m in model.named_modules() if getattr(m, "_omninft_fp8_cache", None) is not None]
        assert names and all(n.endswith(("net.0.proj", "net.2")) for n in names)
    with pytest.raises(ValueError, match=r"^modules: no nn.Linear of this LTXModel matches 'nothing'$"):
        Trainer(load_config(MICRO, [f"output_dir={tmp_path / 'b'}", "fp8.enabled=true", "fp8.modules=nothing"]))


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine imports")
def test_te_backend_without_transformer_engine_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--config", MICRO, f"output_dir={tmp_path}", "fp8.enabled=true", "fp8.backend=te"]
    assert main([*args, "fp8.recipe=current"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train: backend: 'te' needs Transformer Engine, which does not import here "
        "(No module named 'transformer_engine')"
    ]
    assert main(args) == 2
    assert "fp8.recipe must be one of ['delayed', 'current', 'block'], got 'rowwise'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_compiled_fp8_transformer_trains_like_eager(tmp_path: Path, mode: str) -> None:
    """``fp8.enabled`` with ``model.compile=all``: Dynamo traces through the FP8 layers (with LoRA: the adapters'
    wrappers around them; ``aot_eager``: the forward and backward graphs inductor would compile) and the iteration's
    rewards and losses equal the eager FP8 run's."""
    torch._dynamo.reset()
    common = ["fp8.enabled=true", f"finetune.mode={mode}", "iterations=1", "sampling.num_steps=2", "nft.mini_batch=8"]
    eager = Trainer(load_config(MICRO, [f"output_dir={tmp_path / 'eager'}", *common]))
    compiled = Trainer(
        load_config(
            MICRO,
            [f"output_dir={tmp_path / 'compiled'}", *common, "model.compile=all", "model.compile_backend=aot_eager"],
        )
    )
    a, b = eager.iteration(0), compiled.iteration(0)
    for key in ("reward/colour/mean", "reward/pitch/mean", "loss/video", "loss/audio"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)

    # The compiled graphs read prepared FP8 copies of frozen weights: LoRA's base (W for rollouts, W^T for the
    # backward through it); a full fine-tune's trained weights have none, its old policy's frozen ones W.
    def prepared(model) -> set[frozenset[bool]]:
        return {frozenset(m._omninft_fp8_cache.compiled) for m in getattr(model.model, fp8._MARK).layers.values()}

    if mode == "lora":
        assert prepared(compiled.policies.policy) == {frozenset({False, True})}
    else:
        assert prepared(compiled.policies.policy) == {frozenset()}
        assert prepared(compiled.policies.old) == {frozenset({False})}


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_with_gradient_checkpointing_trains_identically(tmp_path: Path, recipe: str) -> None:
    """Checkpointed blocks recompute their FP8 layers in backward (with what each keeps for it: the FP8 input
    tensorwise, the input rowwise; the shared input copy rebuilt in the recompute): losses and the gradient norm equal
    the run without checkpointing."""
    results = []
    for checkpointing in ("false", "true"):
        overrides = [
            f"output_dir={tmp_path / checkpointing}",
            "fp8.enabled=true",
            f"fp8.recipe={recipe}",
            f"model.gradient_checkpointing={checkpointing}",
            "iterations=1",
            "sampling.num_steps=2",
        ]
        trainer = Trainer(load_config(MICRO, overrides))
        with fp8.ScaledMMCounter() as counter:
            metrics = trainer.iteration(0)
        results.append([counter.calls] + [metrics[k] for k in ("loss/video", "loss/audio", "grad_norm/total")])
    (plain_calls, *plain), (checkpointed_calls, *checkpointed) = results
    assert checkpointed_calls > plain_calls  # the blocks' FP8 layers ran again in backward
    assert plain == checkpointed
