"""Atomic safetensors checkpoints: model state (the whole policy and old policy, or only the LoRA adapters),
optimiser state and RNG state in one file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file


class Stateful(Protocol):
    """What a checkpoint stores under a prefix: an ``nn.Module`` or ``LoraAdapters`` (the adapters alone)."""

    def state_dict(self) -> Mapping[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any: ...


def _names(keys: list[str], limit: int = 8) -> str:
    """``"3 (a, b, c)"``: the count and the first ``limit`` keys."""
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, Stateful],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    metadata: dict[str, Any],
) -> None:
    """Write ``path`` atomically (a temporary file renamed over it): every module's state dict under its prefix,
    the optimiser state, the trainer generator's and torch's RNG states, and JSON ``metadata``. Pass a module's
    ``LoraAdapters`` instead of the module to store only the adapters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"metadata": json.dumps(metadata), "optimizer": json.dumps(optim_meta)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, Stateful],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote (strict keys: a clear ``KeyError`` names missing and unexpected ones);
    returns the JSON metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    tensors = load_file(str(path))
    for prefix, module in modules.items():
        own = {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
        if not own and module.state_dict():
            stored = sorted({key.split(".", 1)[0] for key in tensors} - {"optim", "rng"})
            raise KeyError(
                f"checkpoint {str(path)!r} holds no {prefix!r} weights (it holds {stored}; was it written with "
                "another finetune.mode?)"
            )
        missing, unexpected = module.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise KeyError(
                f"checkpoint {str(path)!r} does not match {prefix!r}: missing {_names(list(missing))}, "
                f"unexpected {_names(list(unexpected))}"
            )
    optimizer.load_state_dict(_unflatten_optimizer(tensors, json.loads(header["optimizer"])))
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(header["metadata"])


def save_weights(path: str | Path, module: torch.nn.Module, metadata: dict[str, Any] | None = None) -> None:
    """Write a module's state dict atomically as safetensors (the committed base policy uses this)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"metadata": json.dumps(metadata or {})})
    os.replace(tmp, path)


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    """Load ``save_weights``' output into ``module`` with strict key checking."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights {str(path)!r} do not exist (run `omninft-fast pretrain` to create them)")
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise KeyError(f"weights {str(path)!r} do not match the model: missing {missing}, unexpected {unexpected}")
