"""``omninft-fast merge-lora``: a LoRA run's trained adapter folded into the base weights, written as safetensors in
the base checkpoint's key layout.

For the synthetic task's tiny model that is ``save_weights``' layout (``model.checkpoint`` can point at the result);
for ``model.kind=ltx`` it is the released file's transformer layout (``model.diffusion_model.<LTXModel key>``) with
the release's ``config`` metadata, so ltx-core's loader reads the transformer from it (the file holds only the
transformer: VAEs and the vocoder stay in the released file).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from omninft_fast.generate import load_policy, resolve_config
from omninft_fast.media import write_new

RELEASED_PREFIX = "model.diffusion_model."


@torch.no_grad()
def merged_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """``model``'s state dict without LoRA wrappers: each adapted layer's ``weight`` is ``W + scale B A`` of
    ``adapter`` (peft's ``get_delta_weight``); the model itself is left unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" not in key:
            state[key.replace(".base_layer.", ".")] = value.detach().clone()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            key = f"{name}.weight"
            state[key] = (state[key].float() + module.get_delta_weight(adapter).float()).to(state[key].dtype)
    return {key: value.cpu().contiguous() for key, value in state.items()}


def merge_lora(run: str | Path, out: str | Path, config_path: str | None = None, overrides: Sequence[str] = ()) -> int:
    """Write ``out`` from the LoRA run ``run``; returns the number of tensors. Refuses an existing ``out`` and a run
    that is not a LoRA run."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out (nothing is overwritten)")
    config = resolve_config(config_path, str(run), list(overrides))
    if config.finetune.mode != "lora":
        raise ValueError(f"{run} is a finetune.mode={config.finetune.mode} run: its checkpoint holds full weights")
    loaded = load_policy(config, run)
    state = merged_state_dict(loaded.model.model)
    metadata = {"merged_from": str(run)}
    if config.model.kind == "ltx":
        state = {RELEASED_PREFIX + key: value for key, value in state.items()}
        metadata["config"] = json.dumps(loaded.task.config)
    else:
        metadata["metadata"] = json.dumps({"merged_from": str(run)})
    write_new(out, lambda tmp: save_file(state, str(tmp), metadata=metadata), hint="; choose another --out")
    return len(state)


def _run(args: argparse.Namespace) -> int:
    count = merge_lora(args.run, args.out, args.config, args.overrides)
    print(f"merged the LoRA adapter of {args.run} into the base weights; wrote {count} tensors to {args.out}")
    return 0


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``merge-lora`` on the CLI's subcommands."""
    parser = commands.add_parser(
        "merge-lora", parents=[common], help="fold a LoRA run's adapter into the base weights (safetensors)"
    )
    parser.add_argument("--run", required=True, help="the LoRA run's output_dir")
    parser.add_argument("--out", required=True, help="safetensors file to write (never overwritten)")
    parser.add_argument("--config", default=None, help="YAML config (default: the run's config.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.set_defaults(func=_run)
