"""Atomic safetensors checkpoints: model state (the whole policy and old policy, or only the LoRA adapters),
optimiser state and RNG state in one file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from omninft_fast.media import link_new, temporary_beside, with_umask


class Stateful(Protocol):
    """What a checkpoint stores under a prefix: an ``nn.Module`` or ``LoraAdapters`` (the adapters alone)."""

    def state_dict(self) -> Mapping[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any: ...


def _names(keys: list[str], limit: int = 8) -> str:
    """``"3 (a, b, c)"``: the count and the first ``limit`` keys."""
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def write_atomically(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, replace: bool = True
) -> None:
    """Write a fresh temporary file beside ``path``, flush it to disk, give it the user's umask, then rename it over
    ``path`` (``replace``) or link it there only while ``path`` does not exist (``FileExistsError``): a kill at any
    point leaves either the old file or the new one, and no other file is touched."""
    with temporary_beside(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        with_umask(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            link_new(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def header_metadata(path: Path, what: str) -> dict[str, str]:
    """The header metadata of a safetensors file; ``ValueError`` naming ``path`` if it is unreadable or truncated."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file ({error})") from None


def _tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; ``ValueError`` naming ``path`` if it is unreadable or truncated."""
    header_metadata(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file ({error})") from None


def _check_shapes(path: Path, what: str, prefix: str, module: Stateful, stored: dict[str, torch.Tensor]) -> None:
    """``ValueError`` naming the first key whose stored shape differs from the model's, with both shapes."""
    for key, value in module.state_dict().items():
        if key in stored and stored[key].shape != value.shape:
            name = f"{prefix}.{key}" if prefix else key
            raise ValueError(
                f"{what} {str(path)!r} fit another model size: {name} is {tuple(stored[key].shape)} there, "
                f"{tuple(value.shape)} in this model"
            )


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
    """Write ``path`` atomically (a temporary file flushed to disk and renamed over it): every module's state dict
    under its prefix, the optimiser state, the trainer generator's and torch's RNG states, and JSON ``metadata``.
    Pass a module's ``LoraAdapters`` instead of the module to store only the adapters."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"metadata": json.dumps(metadata), "optimizer": json.dumps(optim_meta)}
    write_atomically(Path(path), tensors, meta)


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, Stateful],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns the JSON metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is unreadable or truncated, or a stored shape differs from the model's (both named).
        KeyError: stored keys differ from the model's (missing and unexpected ones named).
    """
    path = Path(path)
    metadata = checkpoint_metadata(path)
    header = header_metadata(path, "checkpoint")
    tensors = load_modules(path, modules)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, json.loads(header["optimizer"])))
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return metadata


def load_full_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of a ``save_checkpoint`` file and its optimiser state dict (parameters by index), unchecked: for
    an engine that shards them as it loads."""
    path = Path(path)
    tensors = _tensors(path, "checkpoint")
    return tensors, _unflatten_optimizer(tensors, json.loads(header_metadata(path, "checkpoint")["optimizer"]))


def load_modules(path: str | Path, modules: dict[str, Stateful]) -> dict[str, torch.Tensor]:
    """Load the ``modules`` (by prefix) of a ``save_checkpoint`` file, with the same checks as ``load_checkpoint``
    but leaving the optimiser and RNG states alone; returns every tensor of the file.

    Raises:
        ValueError: ``path`` is unreadable or truncated, or a stored shape differs from the model's.
        KeyError: stored keys differ from the model's.
    """
    path = Path(path)
    tensors = _tensors(path, "checkpoint")
    for prefix, module in modules.items():
        own = {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
        if not own and module.state_dict():
            stored = sorted({key.split(".", 1)[0] for key in tensors} - {"optim", "rng"})
            raise KeyError(
                f"checkpoint {str(path)!r} holds no {prefix!r} weights (it holds {stored}; was it written with "
                "another finetune.mode?)"
            )
        _check_shapes(path, "checkpoint", prefix, module, own)
        missing, unexpected = module.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise KeyError(
                f"checkpoint {str(path)!r} does not match {prefix!r}: missing {_names(list(missing))}, "
                f"unexpected {_names(list(unexpected))}"
            )
    return tensors


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a ``save_checkpoint`` file (its header only: nothing else is read)."""
    path = Path(path)
    header = header_metadata(path, "checkpoint")
    if "metadata" not in header or "optimizer" not in header:
        raise ValueError(f"checkpoint {str(path)!r} was not written by the trainer (no metadata in its header)")
    return json.loads(header["metadata"])


def save_weights(path: str | Path, module: torch.nn.Module, metadata: dict[str, Any] | None = None) -> None:
    """Write a module's state dict atomically as safetensors to a new file (``FileExistsError`` if ``path`` exists;
    the committed base policy uses this)."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    write_atomically(Path(path), tensors, {"metadata": json.dumps(metadata or {})}, replace=False)


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    """Load ``save_weights``' output into ``module`` with strict key checking."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights {str(path)!r} do not exist (run `omninft-fast pretrain` to create them)")
    tensors = _tensors(path, "weights")
    _check_shapes(path, "weights", "", module, tensors)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise KeyError(f"weights {str(path)!r} do not match the model: missing {missing}, unexpected {unexpected}")
