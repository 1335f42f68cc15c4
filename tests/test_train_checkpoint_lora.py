"""Checkpoints: LoRA runs store only the two adapters (the frozen base is rebuilt on resume) and resume
bit-identically; full fine-tuning stores the policy, the old policy and the KL reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")
pytest.importorskip("peft")

from safetensors.torch import load_file, save_file

from omninft_fast.train.config import load_config
from omninft_fast.train.trainer import CHECKPOINT, Trainer

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
LORA = ("finetune.mode=lora", "finetune.lora_rank=4", "nft.eta_rate=0.3")


def micro(out: Path, *overrides: str, resume: bool = False) -> Trainer:
    return Trainer(load_config(MICRO, [f"output_dir={out}", *overrides]), resume=resume)


def _model_keys(checkpoint: Path) -> set[str]:
    return {key for key in load_file(str(checkpoint)) if not key.startswith(("optim.", "rng."))}


def test_lora_checkpoint_holds_only_the_adapters(tmp_path: Path) -> None:
    trainer = micro(tmp_path, *LORA)
    trainer.iteration(0)
    trainer.save(0)
    path = tmp_path / CHECKPOINT
    stored = load_file(str(path))
    model_keys = _model_keys(path)
    adapters = {f"lora.{key}" for key in trainer.policies.adapters.named}
    assert model_keys == adapters
    assert any(".lora_A.default." in key for key in model_keys) and any(".lora_B.old." in key for key in model_keys)
    base = {key for key in trainer.policy.model.state_dict() if ".lora_" not in key}
    assert base and not any(key.split(".", 1)[1] in base for key in model_keys)
    for key in adapters:
        assert torch.equal(stored[key], trainer.policies.adapters.named[key[len("lora.") :]])
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainer.policies.adapters.named.values())
    base_bytes = sum(v.numel() * v.element_size() for k, v in trainer.policy.model.state_dict().items() if k in base)
    optim_bytes = sum(v.numel() * v.element_size() for k, v in stored.items() if k.startswith("optim."))
    assert optim_bytes <= 2 * adapter_bytes + 64 * len(
        trainer.policies.adapters.pairs
    )  # Adam moments of the trained adapter
    assert path.stat().st_size < adapter_bytes + optim_bytes + 64 * 1024 < base_bytes + adapter_bytes
    assert not list(tmp_path.glob("*.tmp"))


def test_lora_resume_reproduces_the_next_iteration_bit_identically(tmp_path: Path) -> None:
    straight = micro(tmp_path / "straight", *LORA)
    first = straight.iteration(0)
    second = straight.iteration(1)
    third = straight.iteration(2)

    interrupted = micro(tmp_path / "resumed", *LORA)
    assert interrupted.iteration(0)["loss/video"] == first["loss/video"]
    interrupted.iteration(1)
    interrupted.save(1)
    resumed = micro(tmp_path / "resumed", *LORA, resume=True)
    assert resumed.start_iteration == 2
    for key, value in interrupted.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[key], value), key
    again = resumed.iteration(2)
    assert again["eta"] == third["eta"] > 0  # the old adapter is blended, not a copy of the trained one
    for key in third:
        if not key.startswith(("time/", "samples_per_second")):
            assert again[key] == third[key], key
    for key, value in straight.policies.adapters.state_dict().items():
        assert torch.equal(resumed.policies.adapters.state_dict()[key], value), key
    assert second["loss/video"] != third["loss/video"]


def test_lora_resume_names_missing_adapter_keys(tmp_path: Path) -> None:
    trainer = micro(tmp_path, *LORA)
    trainer.save(0)
    path = tmp_path / CHECKPOINT
    stored = load_file(str(path))
    dropped = next(key for key in stored if key.startswith("lora.") and ".lora_B.old." in key)
    save_file({k: v for k, v in stored.items() if k != dropped}, str(path), metadata=_header(path))
    with pytest.raises(KeyError, match=rf"does not match 'lora': missing 1 \({dropped[len('lora.') :]}\)"):
        micro(tmp_path, *LORA, resume=True)


def test_lora_rank_change_and_mode_change_are_named(tmp_path: Path) -> None:
    micro(tmp_path / "lora", *LORA).save(0)
    with pytest.raises(ValueError, match=r"--resume cannot change finetune.lora_rank \(4 in the checkpoint, 2 now\)"):
        micro(tmp_path / "lora", *LORA, "finetune.lora_rank=2", resume=True)
    with pytest.raises(ValueError, match=r"finetune.mode \('lora' in the checkpoint, 'full' now\)"):
        micro(tmp_path / "lora", resume=True)
    micro(tmp_path / "full").save(0)
    with pytest.raises(ValueError, match=r"finetune.mode \('full' in the checkpoint, 'lora' now\)"):
        micro(tmp_path / "full", *LORA, resume=True)


def test_full_finetune_checkpoint_keeps_every_weight(tmp_path: Path) -> None:
    trainer = micro(tmp_path, "nft.kl_weight=0.01")
    trainer.iteration(0)
    trainer.save(0)
    expected = {
        f"{prefix}.{key}"
        for prefix, module in (("policy", trainer.policy), ("old", trainer.policies.old), ("ref", trainer.policies.ref))
        for key in module.state_dict()
    }
    assert _model_keys(tmp_path / CHECKPOINT) == expected
    resumed = micro(tmp_path, "nft.kl_weight=0.01", resume=True)
    for key, value in trainer.policies.old.state_dict().items():
        assert torch.equal(resumed.policies.old.state_dict()[key], value), key


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize(("init", "std"), [("default", None), ("gaussian", 1 / 8)])
def test_lora_initialisation(tmp_path: Path, init: str, std: float | None) -> None:
    """``gaussian`` (the release's): down projections with std 1 / rank; the default is peft's Kaiming-uniform
    (std 1 / sqrt(3 fan_in)). Up projections start at zero either way, and the old adapter equals the trained one."""
    trainer = micro(tmp_path, "finetune.mode=lora", "finetune.lora_rank=8", f"finetune.lora_init={init}")
    named = trainer.policies.adapters.named
    downs = [p.detach() for k, p in named.items() if "lora_A" in k]
    scaled = torch.cat([p.flatten() / (std if std is not None else (3 * p.shape[1]) ** -0.5) for p in downs])
    assert abs(float(scaled.std()) - 1) < 0.1
    assert all(not bool(p.any()) for k, p in named.items() if "lora_B" in k)
    assert all(torch.equal(trained, old) for trained, old in trainer.policies.adapters.pairs)
