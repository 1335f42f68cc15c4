"""LoRA fine-tuning through peft, with DiffusionNFT's old policy as a second adapter of the same model.

The trained adapter is ``"default"``; the old policy is adapter ``"old"`` (Algorithm 1's ``theta_old``), blended
towards ``"default"`` after each iteration. ``AdapterView`` runs the shared model with one adapter active (or none:
the base model, the KL reference). ``state_dict`` / ``load_state_dict`` hold only the two adapters' weights, so a
LoRA checkpoint leaves out the frozen base (rebuilt from ``model.checkpoint`` on resume).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from omninft_fast.train.model import AVVelocityModel, Condition

TRAINED, OLD = "default", "old"


class LoraAdapters:
    """Inject the ``default`` and ``old`` LoRA adapters into ``model`` (in place) and switch between them.

    Args:
        model: the model to adapt; its own weights are frozen.
        rank, alpha: LoRA rank and scale numerator.
        targets: names of the ``nn.Linear`` modules to adapt (peft's ``target_modules``).
        init: ``default`` (peft's Kaiming-uniform down projection) or ``gaussian`` (std ``1 / rank``).
    """

    def __init__(self, model: nn.Module, *, rank: int, alpha: float, targets: list[str], init: str = "default") -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name in (TRAINED, OLD):
            config = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                target_modules=list(targets),
                lora_dropout=0.0,
                init_lora_weights="gaussian" if init == "gaussian" else True,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, model, adapter_name=name)
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError(f"finetune.lora_targets {targets} match no linear layer of the model")
        for param in model.parameters():
            param.requires_grad_(False)
        self.rebind(model)
        with torch.no_grad():
            for trained, old in self.pairs:
                old.copy_(trained)
        self._activate(TRAINED)

    def rebind(self, model: nn.Module) -> None:
        """Read the two adapters' parameters from ``model`` (again after an engine replaced them with its
        shards)."""
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self.named: dict[str, nn.Parameter] = {}
        named = dict(model.named_parameters())
        for key, param in named.items():
            if f".{TRAINED}." in key and ("lora_A" in key or "lora_B" in key):
                old_key = key.replace(f".{TRAINED}.", f".{OLD}.")
                self.pairs.append((param, named[old_key]))
                self.named[key] = param
                self.named[old_key] = named[old_key]

    def _activate(self, name: str | None) -> None:
        for layer in self.layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ``default`` adapter's weights (the only ones the optimiser sees)."""
        return [trained for trained, _ in self.pairs]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both adapters' LoRA matrices by parameter name (``...lora_A.default.weight``, ``...lora_A.old.weight``)."""
        return {key: param.detach() for key, param in self.named.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy ``state_dict``'s output back; returns the missing and unexpected keys (``strict``: raise on any).
        Nothing is copied unless every key matches, so a failed load leaves the adapters as they were."""
        missing = [key for key in self.named if key not in state]
        unexpected = [key for key in state if key not in self.named]
        if strict and (missing or unexpected):
            raise KeyError(f"LoRA adapter weights do not match: missing {missing}, unexpected {unexpected}")
        if missing or unexpected:
            return missing, unexpected
        for key, param in self.named.items():
            if state[key].shape != param.shape:
                raise ValueError(
                    f"LoRA weight {key!r} has shape {tuple(state[key].shape)} in the checkpoint but "
                    f"{tuple(param.shape)} in the model (finetune.lora_rank or lora_targets changed?)"
                )
        for key, param in self.named.items():
            param.copy_(state[key])
        return missing, unexpected

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run with adapter ``name`` active (``None``: adapters off), then switch back to ``default``."""
        self._activate(name)
        try:
            yield
        finally:
            self._activate(TRAINED)

    @torch.no_grad()
    def blend_old(self, eta: float) -> None:
        """``old <- eta old + (1 - eta) default``."""
        torch._foreach_lerp_([old for _, old in self.pairs], [trained for trained, _ in self.pairs], 1.0 - eta)


class AdapterView(AVVelocityModel):
    """The shared model seen with one adapter active: ``forward`` switches, runs, and switches back.

    Args:
        model: the adapted model.
        adapters: its ``LoraAdapters``.
        name: adapter to run with (``None``: the base model).
    """

    def __init__(self, model: AVVelocityModel, adapters: LoraAdapters, name: str | None) -> None:
        super().__init__()
        self._model = [model]  # not a submodule: the view owns no parameters of its own
        self.adapters = adapters
        self.name = name
        self.num_layers = model.num_layers

    def forward(
        self,
        x_video: torch.Tensor,
        x_audio: torch.Tensor,
        t: torch.Tensor,
        cond: Condition,
        skip_blocks: list[list[int]] | None = None,
        copied_rows: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.adapters.use(self.name):
            return self._model[0](x_video, x_audio, t, cond, skip_blocks, copied_rows)
