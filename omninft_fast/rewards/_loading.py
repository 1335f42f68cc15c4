"""Strict loading of reward-model checkpoints from local directories (nothing is ever fetched).

Every failure names the checkpoint path and, for weights, the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A reward checkpoint is missing or does not match the model it should load into."""


def first_line(error: Exception) -> str:
    """An error's message up to its first line break (unpickling errors add pages of advice)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


def checkpoint_path(checkpoint_dir: str | Path | None, reward: str) -> Path:
    """The existing directory ``checkpoint_dir`` of ``reward``, or ``CheckpointError``."""
    if checkpoint_dir is None:
        raise CheckpointError(f"reward {reward!r} needs checkpoint_dir: a local directory with its weights")
    path = Path(checkpoint_dir).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"reward {reward!r}: checkpoint directory {path} does not exist")
    return path


def require_files(path: Path, reward: str, files: Iterable[str], any_of: Iterable[str] = ()) -> None:
    """Raise ``CheckpointError`` naming ``path`` and the absent files: all of ``files`` and one of ``any_of``."""
    missing = [name for name in files if not (path / name).exists()]
    any_of = list(any_of)
    if any_of and not any((path / name).exists() for name in any_of):
        missing.append(" or ".join(any_of))
    if missing:
        raise CheckpointError(f"reward {reward!r}: checkpoint {path} lacks {missing}")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_state_dict(path: Path, reward: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, a sharded ``.index.json`` or a torch ``.bin``/``.pt``/``.pth`` file."""
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointError(f"reward {reward!r}: checkpoint file {path} does not exist")
    if path.name.endswith(".index.json"):
        shards = sorted(set(read_json(path)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(path.parent / shard, reward))
        return state
    try:
        if path.name.endswith(".safetensors"):
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # each reader has its own errors for a torn or foreign file
        raise CheckpointError(f"reward {reward!r}: cannot read {path}: {first_line(error)}") from error
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    return dict(state)


def check_keys(
    path: Path,
    reward: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[str] = (),
) -> None:
    """Raise ``CheckpointError`` naming ``path`` and every key that does not match."""
    missing, unexpected, mismatched = list(missing), list(unexpected), list(mismatched)
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        parts.append(f"mis-shaped keys {_listing(mismatched)}")
    raise CheckpointError(f"reward {reward!r}: checkpoint {path} does not match the model: {'; '.join(parts)}")


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, reward: str) -> None:
    """Load ``state`` into ``module`` only if the keys and shapes match exactly (else ``CheckpointError``)."""
    expected = module.state_dict()
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    check_keys(path, reward, set(expected) - set(state), set(state) - set(expected), mismatched)
    module.load_state_dict(state, strict=True)


def hf_from_pretrained(model_class: Any, path: Path, reward: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(path)`` from local files only, failing on any missing or unexpected key."""
    require_files(path, reward, ["config.json"], WEIGHT_FILES)
    try:
        model, info = model_class.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True, dtype=dtype, **kwargs
        )
    except Exception as error:  # transformers' and safetensors' errors for torn or foreign files
        raise CheckpointError(f"reward {reward!r}: cannot load checkpoint {path}: {first_line(error)}") from error
    check_keys(
        path,
        reward,
        info.get("missing_keys", ()),
        info.get("unexpected_keys", ()),
        [str(item) for item in info.get("mismatched_keys", ())],
    )
    return model.eval()
