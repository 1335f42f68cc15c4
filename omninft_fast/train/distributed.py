"""Training on several processes through existing engines: PyTorch FSDP2 (``fully_shard``) or DeepSpeed ZeRO 2/3.

``distributed.backend``: ``none`` (one process), ``fsdp2`` or ``deepspeed`` (``distributed.zero_stage`` 2 or 3),
launched with ``torchrun`` (or DeepSpeed's launcher); without a launcher a backend runs as a world of one. The
process group is gloo on CPU and nccl on CUDA. What this module adds to the single-process trainer:

- ``Dist``: rank, world and device; ``local`` (this rank's contiguous share of a batch) and ``gather`` (the
  batch again, in rank order): rollouts are split by prompt groups and gathered after scoring, so Eq 6 sees every
  rank's rewards and N ranks give the advantages of one process.
- ``wrap``: shards the policy (and, in full fine-tuning, the EMA old policy and the KL reference) with the engine;
  returns the ``Policies`` on the sharded parameters and an ``Engine`` for ``stages.nft_update``: each rank trains on
  its share of every micro-batch, inside the engine's no-sync context until the accumulation boundary.
- ``Engine.update_old_policy``: ``theta_old <- eta theta_old + (1 - eta) theta`` on each rank's own shards (never
  gathering a full parameter); with LoRA the ``old`` adapter, with ZeRO-3 the partitions DeepSpeed holds.
- checkpoints: ``torch.distributed.checkpoint`` folders for FSDP2 (sharded, loadable with another world size, also
  by a one-process run), DeepSpeed's own for ZeRO (plus each rank's old-policy shards); both written to a
  temporary folder and renamed into place. ``Engine.export`` writes one consolidated safetensors file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from omninft_fast._checks import check_device
from omninft_fast.train.builders import STREAMS, Policies, stream_of
from omninft_fast.train.checkpoint import header_metadata, write_atomically
from omninft_fast.train.config import TrainConfig, times_per_sample
from omninft_fast.train.stages import Rollout, Scores, step_if_finite

DCP_CHECKPOINT = "checkpoint.dcp"
DEEPSPEED_CHECKPOINT = "checkpoint.deepspeed"
EXPORT = "export.safetensors"
META = "meta.json"

T = TypeVar("T")


def _destroy_process_group() -> None:
    """Leave torch.distributed's default group, through DeepSpeed where it wraps the group: DeepSpeed then drops the
    groups it built on it, so a later DeepSpeed engine in this process builds its own instead of failing on them."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process in the run: ``backend``, ``rank`` of ``world`` and its ``device``."""

    backend: str
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this rank writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether an engine holds the model (any backend but ``none``, a world of one included)."""
        return self.backend != "none"

    def barrier(self) -> None:
        """Wait for every rank (nothing in one process)."""
        if self.sharded:
            dist.barrier()

    def close(self, *, wait: bool = True) -> None:
        """Leave the process group: after every rank arrives (``wait``), or at once after an error."""
        if self.sharded and dist.is_initialized():
            if wait:
                dist.barrier()
            _destroy_process_group()

    def local(self, batch: Sequence[T] | torch.Tensor) -> Any:
        """This rank's contiguous ``len / world`` rows of ``batch`` (a list or a tensor's first dim)."""
        size = len(batch) // self.world
        return batch[self.rank * size : (self.rank + 1) * size]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(world * b, ...)``: every rank's ``(b, ...)`` ``tensor`` in rank order (``all_gather``)."""
        if self.world == 1:
            return tensor
        local = tensor.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (``all_reduce``)."""
        if self.world == 1:
            return value
        total = value.to(self.device, copy=True)
        dist.all_reduce(total)
        return (total / self.world).to(value.device)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def init(config: TrainConfig) -> Dist:
    """Join the process group of ``config.distributed.backend`` (gloo on CPU, nccl on CUDA) and check that the
    world divides the batch.

    Raises:
        ValueError: deepspeed is not installed, several processes run with ``backend=none``, or the world size
            does not divide ``prompts_per_iter`` or ``nft.mini_batch`` (the message names the setting).
    """
    backend = config.distributed.backend
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if backend == "none":
        if world > 1:
            raise ValueError(
                f"distributed.backend=none runs one process, but {world} were launched: set distributed.backend to "
                "fsdp2 or deepspeed"
            )
        return Dist("none", 0, 1, check_device(config.device, "device"))
    if backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "distributed.backend=deepspeed needs the deepspeed package: "
            "DS_BUILD_OPS=0 pip install --no-deps -r requirements/distributed.txt"
        )
    for key, value in (("prompts_per_iter", config.prompts_per_iter), ("nft.mini_batch", config.nft.mini_batch)):
        if value % world:
            raise ValueError(f"{key} ({value}) must be a multiple of the world size ({world})")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = check_device(config.device, "device")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if world == 1:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        # One process needs no rendezvous: an in-process store instead of a TCP port (another process may take a
        # port between a probe and its use).
        alone = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if world == 1 else {}
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=config.distributed.timeout_s),
            device_id=device if device.type == "cuda" else None,
            **alone,
        )
    return Dist(backend, rank, world, device)


def _collect(policies: Policies, trainable: list[torch.nn.Parameter]) -> Policies:
    """``policies`` with its parameter lists read again from the (now sharded) modules."""
    named = list(policies.policy.named_parameters())
    if policies.adapters is not None:
        policies.adapters.rebind(policies.policy.model)
    streams = {stream: [p for n, p in named if stream_of(n) == stream] for stream in STREAMS}
    return dataclasses.replace(policies, trainable=trainable, parameters=[p for _, p in named], streams=streams)


def _fsdp_shard(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> None:
    """``fully_shard`` every transformer block of ``model``, then the model (its root, also resharded after a
    forward: the old policy and the reference run no backward), with the mixed precision policy: bf16 compute
    from the parameters as built, fp32 gradient reduction (``distributed.mixed_precision``: bf16, or auto on CUDA)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = _bf16(config, device)
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    for block in model.model.transformer_blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)


def _bf16(config: TrainConfig, device: torch.device) -> bool:
    mode = config.distributed.mixed_precision
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def deepspeed_config(config: TrainConfig, world: int, *, optimizer: bool = True) -> dict[str, Any]:
    """DeepSpeed's configuration for ``config``: ZeRO ``distributed.zero_stage``, ``mini_batch / world`` samples
    per rank and micro-batch, the update's micro-batches per optimiser step as accumulation steps, AdamW with the
    run's settings and clipping, bf16 compute with fp32 master weights and gradient accumulation on CUDA."""
    o, nft = config.optim, config.nft
    steps = -(-config.prompts_per_iter * config.group_size * times_per_sample(nft, config.sampling) // nft.mini_batch)
    accumulate = steps if nft.accumulate == "iteration" else 1
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": nft.mini_batch // world,
        "gradient_accumulation_steps": accumulate,
        "train_batch_size": nft.mini_batch * accumulate,
        "zero_optimization": {"stage": config.distributed.zero_stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if optimizer:
        out["gradient_clipping"] = o.grad_clip
        out["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
            },
        }
    if _bf16(config, torch.device(config.device)):
        out["bf16"] = {"enabled": True}
        out["data_types"] = {"grad_accum_dtype": "fp32"}
        out["communication_data_type"] = "fp32"
    return out


def wrap(
    policies: Policies,
    config: TrainConfig,
    world: Dist,
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
) -> tuple[Policies, Engine]:
    """Shard ``policies`` with ``world``'s engine and build the optimiser (``make_optimizer(params)`` for FSDP2,
    DeepSpeed's own for ZeRO). With full fine-tuning the old policy and the KL reference are sharded alike; with
    LoRA they are views of the policy (``old`` adapter, adapters off) and need no copy."""
    lora = policies.adapters is not None
    if world.backend == "fsdp2":
        for model in [policies.policy] + ([] if lora else [m for m in (policies.old, policies.ref) if m is not None]):
            _expose_block_outputs(model)
            _fsdp_shard(model, config, world.device)
        trainable = [p for p in policies.policy.parameters() if p.requires_grad]
        policies = _collect(policies, trainable)
        return policies, FSDPEngine(world, policies, make_optimizer(trainable), config.optim.grad_clip)
    import deepspeed

    if config.distributed.zero_stage == 3:
        for model in [policies.policy] + ([] if lora else [m for m in (policies.old, policies.ref) if m is not None]):
            _expose_block_outputs(model)
    trainable = [p for p in policies.policy.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(
        model=policies.policy, model_parameters=trainable, config=deepspeed_config(config, world.world)
    )
    frozen = []
    if not lora and config.distributed.zero_stage == 3:
        for model in (policies.old, policies.ref):
            if model is not None:
                frozen.append(
                    deepspeed.initialize(model=model, config=deepspeed_config(config, world.world, optimizer=False))[0]
                )
    policies = _collect(policies, trainable)
    return policies, DeepSpeedEngine(world, policies, optimizer, engine, frozen)


@functools.cache
def _tensor_outputs(base: type) -> type:
    """``base`` (an ltx-core transformer block class) whose ``forward`` returns the tensors of its two
    ``TransformerArgs`` as a flat tuple, and whose call rebuilds the dataclasses. The engines hook a module's output
    tensors to gather its parameters again for the backward pass, and find them only in tuples, lists and dicts
    (ZeRO-3; FSDP2 before torch 2.13, whose blocks' backward otherwise ran on freed parameter storage)."""

    class TensorOutputs(base):
        def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
            outputs = base.forward(self, *args, **kwargs)
            self._outputs = outputs
            return tuple(value for out in outputs for value in _tensor_fields(out).values())

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            flat = iter(super().__call__(*args, **kwargs))
            outputs, self._outputs = self._outputs, None
            return tuple(dataclasses.replace(out, **{k: next(flat) for k in _tensor_fields(out)}) for out in outputs)

    TensorOutputs.__name__ = f"TensorOutputs{base.__name__}"
    return TensorOutputs


def _tensor_fields(out: Any) -> dict[str, torch.Tensor]:
    return {
        f.name: getattr(out, f.name) for f in dataclasses.fields(out) if isinstance(getattr(out, f.name), torch.Tensor)
    }


def _expose_block_outputs(model: torch.nn.Module) -> None:
    """Give every transformer block of ``model`` tensor outputs for the engines (``_tensor_outputs``; parameter
    names and weights are unchanged)."""
    for block in model.model.transformer_blocks:
        block.__class__ = _tensor_outputs(type(block))


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this rank holds: a DTensor's local shard, a ZeRO-3 partition, else the tensor."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    if hasattr(param, "to_local"):
        return param.to_local()
    return param.data


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``model``'s parameters and ``optimizer``'s state on this rank (a DTensor's local shard)."""
    optim = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return _storage_bytes([_local(t) for t in [*model.parameters(), *optim]])


def _replace_folder(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` folder to ``final``; the checkpoint it replaces is kept as ``<final>.prev``
    until the rename is done (``checkpoint_folder`` reads it if a kill fell in between)."""
    prev = final.with_name(final.name + ".prev")
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        final.rename(prev)
    tmp.rename(final)
    if prev.exists():
        shutil.rmtree(prev)
    handle = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def checkpoint_folder(out: Path, name: str) -> Path | None:
    """The complete checkpoint folder ``out/name`` (or the ``.prev`` one a kill left alone), else ``None``."""
    for folder in (out / name, out / f"{name}.prev"):
        if (folder / META).is_file():
            return folder
    return None


def folder_metadata(folder: Path) -> dict[str, Any]:
    """The JSON metadata (iteration, config) of a distributed checkpoint folder."""
    return json.loads((folder / META).read_text())


class Engine:
    """What ``stages.nft_update`` and the trainer call on a sharded run; FSDP2 and DeepSpeed fill it in.

    Attributes:
        world: this process.
        policies: the sharded policies.
        optimizer: the optimiser of the trained parameters.
    """

    folder_name = DCP_CHECKPOINT

    def __init__(self, world: Dist, policies: Policies, optimizer: torch.optim.Optimizer) -> None:
        self.world = world
        self.policies = policies
        self.optimizer = optimizer

    def local(
        self, part: torch.Tensor, t: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of a micro-batch: ``(b,)`` sample indices and times, ``(b, N, C)`` noises."""
        w = self.world
        return w.local(part), w.local(t), (w.local(noise[0]), w.local(noise[1]))

    def micro_batch(self, boundary: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's backward; gradients are reduced across ranks only when ``boundary``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, torch.Tensor]:
        """Clip, step and clear the gradients; returns the gradient norms (scalars)."""
        raise NotImplementedError

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """A metric averaged over the ranks."""
        return self.world.mean(value)

    @torch.no_grad()
    def update_old_policy(self, eta: float) -> None:
        """``theta_old <- eta theta_old + (1 - eta) theta`` on this rank's shards."""
        old, new = ([_local(p) for p in group] for group in self._old_pairs())
        if all(o.dtype == n.dtype for o, n in zip(old, new, strict=True)):
            torch._foreach_lerp_(old, new, 1.0 - eta)
            return
        # DeepSpeed ZeRO-2 in bf16 trains a bf16 module and keeps the old policy in float32: one tensor at a time,
        # so no float32 copy of the whole model is made.
        for o, n in zip(old, new, strict=True):
            o.lerp_(n.to(o.dtype), 1.0 - eta)

    def _old_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(old, trained)``: the old policy's parameters (or ``old`` adapter) and the matching trained ones."""
        p = self.policies
        if p.adapters is not None:
            return [old for _, old in p.adapters.pairs], [new for new, _ in p.adapters.pairs]
        return list(p.old.parameters()), list(p.policy.parameters())

    def state_bytes(self) -> int:
        """Bytes of the trained model's parameters and the optimiser state this rank holds (each storage once)."""
        return state_bytes(self.policies.policy, self.optimizer)

    def save(self, out: Path, generator: torch.Generator, metadata: dict[str, Any]) -> None:
        """Checkpoint into ``out/<folder_name>`` through a temporary folder renamed into place (every rank)."""
        final = out / self.folder_name
        tmp = final.with_name(final.name + ".tmp")
        if self.world.main and tmp.exists():
            shutil.rmtree(tmp)
        self.world.barrier()
        self._save(tmp, generator)
        self.world.barrier()
        if self.world.main:
            (tmp / META).write_text(json.dumps(metadata))
            _replace_folder(tmp, final)
        self.world.barrier()

    def _save(self, folder: Path, generator: torch.Generator) -> None:
        raise NotImplementedError

    def load(self, folder: Path, generator: torch.Generator) -> dict[str, Any]:
        """Restore a ``save`` folder; returns its metadata."""
        raise NotImplementedError

    def export(self, path: Path, iteration: int) -> None:
        """Write the consolidated trained weights (LoRA: both adapters; full: the policy) after ``iteration`` as
        ``path`` (safetensors, keys ``lora.*`` or ``policy.*`` like the single-process checkpoint, the iteration in
        its header); rank 0 writes."""
        raise NotImplementedError


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"generator": generator.get_state(), "torch": torch.get_rng_state()}


def _set_rng(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])


def _write_export(path: Path, tensors: dict[str, torch.Tensor], iteration: int) -> None:
    """The run's own ``export.safetensors`` after ``iteration``, written as its checkpoints are."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomically(path, tensors, {"iteration": str(iteration)})


class FSDPEngine(Engine):
    """FSDP2: ``fully_shard`` modules, a torch optimiser over their DTensor shards, DCP checkpoints."""

    def __init__(self, world: Dist, policies: Policies, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
        super().__init__(world, policies, optimizer)
        self.grad_clip = grad_clip

    @contextlib.contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        self.policies.policy.set_requires_gradient_sync(boundary)
        try:
            yield
        finally:
            self.policies.policy.set_requires_gradient_sync(True)

    def step(self) -> dict[str, torch.Tensor]:
        p = self.policies
        norms = {}
        for stream in STREAMS:
            grads = [q.grad for q in p.streams[stream] if q.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            norms[f"grad_norm/{stream}_params"] = _full(norm).detach()
        total = _full(torch.nn.utils.clip_grad_norm_([q for q in p.parameters if q.grad is not None], self.grad_clip))
        step_if_finite(self.optimizer, total)
        return {"grad_norm/total": total.detach(), **norms}

    def _state(self, generator: torch.Generator) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        modules = {prefix: m.state_dict() for prefix, m in self.policies.checkpointed().items()}
        optim = get_optimizer_state_dict(self.policies.policy, self.optimizer)
        return {"modules": modules, "optim": optim, "rng": _rng_state(generator)}

    def _save(self, folder: Path, generator: torch.Generator) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(generator), checkpoint_id=str(folder))

    def load(self, folder: Path, generator: torch.Generator) -> dict[str, Any]:
        """Restore a ``checkpoint.dcp`` folder, or a one-process ``checkpoint.safetensors`` file (its full tensors
        are sharded as they load)."""
        if folder.is_file():
            return self._load_single(folder, generator)
        return load_dcp(folder, self.policies, self.optimizer, generator)

    def _load_single(self, path: Path, generator: torch.Generator) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from omninft_fast.train.checkpoint import checkpoint_metadata, load_full_state

        p = self.policies
        tensors, optim = load_full_state(path)
        full = StateDictOptions(full_state_dict=True)
        for prefix, module in p.checkpointed().items():
            own = {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
            if p.adapters is not None:  # the adapters' keys are the adapted LTXModel's
                own = {f"model.{key}": value for key, value in own.items()}
                module = p.policy
            set_model_state_dict(module, own, options=dataclasses.replace(full, strict=p.adapters is None))
        names = [name for name, param in p.policy.named_parameters() if param.requires_grad]
        optim["state"] = {names[index]: state for index, state in optim["state"].items()}
        for group in optim["param_groups"]:
            group["params"] = [names[index] for index in group["params"]]
        set_optimizer_state_dict(p.policy, self.optimizer, optim, options=full)
        _set_rng({"generator": tensors["rng.generator"], "torch": tensors["rng.torch"]}, generator)
        return checkpoint_metadata(path)

    def export(self, path: Path, iteration: int) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            self.policies.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.world.main:
            _write_export(path, _export_keys(self.policies, full), iteration)


def _full(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's value on every rank (a reduction over the shards), else ``value``."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _export_keys(policies: Policies, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The export's tensors from the policy's full state dict: ``lora.<adapter key>`` (keys of the adapted
    ``LTXModel``, as in the single-process checkpoint) or ``policy.<key>``."""
    if policies.adapters is not None:
        return {f"lora.{key}": full[f"model.{key}"] for key in policies.adapters.named}
    return {f"policy.{key}": value for key, value in full.items()}


def load_dcp(
    folder: Path, policies: Policies, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> dict[str, Any]:
    """Load an FSDP2 ``checkpoint.dcp`` folder into ``policies`` and ``optimizer`` (sharded or, in one process
    without an engine, plain: DCP reshards to the current world); returns its metadata."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    modules = policies.checkpointed()
    state = {
        "modules": {prefix: dict(m.state_dict()) for prefix, m in modules.items()},
        "optim": get_optimizer_state_dict(policies.policy, optimizer),
        "rng": _rng_state(generator),
    }
    _dcp_load(folder, state, modules)
    set_optimizer_state_dict(policies.policy, optimizer, state["optim"])
    _set_rng(state["rng"], generator)
    return folder_metadata(folder)


def load_dcp_modules(folder: Path, modules: dict[str, Any]) -> None:
    """Only the ``modules`` (by prefix, as ``Policies.checkpointed`` names them) of an FSDP2 ``checkpoint.dcp``
    folder, in one process: what ``generate``, ``analyze`` and ``merge-lora`` read of a sharded run."""
    _dcp_load(folder, {"modules": {prefix: dict(m.state_dict()) for prefix, m in modules.items()}}, modules)


def _dcp_load(folder: Path, state: dict[str, Any], modules: dict[str, Any]) -> None:
    """``dcp.load`` of ``state`` (its ``modules`` entry and whatever else it names), then the modules' weights."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # loading in one process is what a run without an engine means
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    for prefix, module in modules.items():
        module.load_state_dict(state["modules"][prefix])


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 2/3: the policy inside a ``DeepSpeedEngine`` (its optimiser, clipping and accumulation), the
    full-fine-tuning old policy and reference as ZeRO-3 engines without an optimiser (partitioned parameters)."""

    folder_name = DEEPSPEED_CHECKPOINT

    def __init__(
        self,
        world: Dist,
        policies: Policies,
        optimizer: torch.optim.Optimizer,
        engine: Any,
        frozen: list[Any],
    ) -> None:
        super().__init__(world, policies, optimizer)
        self.engine = engine
        self.frozen = frozen
        self.policies = dataclasses.replace(policies, policy=engine)

    @contextlib.contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(boundary)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> dict[str, torch.Tensor]:
        """DeepSpeed's gradient norm of the step where DeepSpeed holds it (NaN where it has none), unread: the
        update checks every step's norm in its one host read at the end."""
        norm = self.engine.get_global_grad_norm()
        return {"grad_norm/total": torch.as_tensor(float("nan") if norm is None else norm).detach()}

    def _old_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        p = self.policies
        if p.adapters is not None:
            return super()._old_pairs()
        return list(p.old.parameters()), list(self.engine.module.parameters())

    def state_bytes(self) -> int:
        params = [_local(p) for p in self.engine.module.parameters()]
        zero = self.engine.optimizer
        flats = [
            t
            for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")
            for t in getattr(zero, name, [])
        ]
        inner = getattr(zero, "optimizer", zero)
        states = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return _storage_bytes(params + flats + states)

    def _frozen_state(self) -> list[torch.Tensor]:
        """This rank's shards of what the engine's checkpoint leaves out: the old policy (and reference)."""
        p = self.policies
        if p.adapters is not None:
            return [_local(old) for _, old in p.adapters.pairs]
        models = [m for m in (p.old, p.ref) if m is not None]
        return [_local(q) for m in models for q in m.parameters()]

    def _save(self, folder: Path, generator: torch.Generator) -> None:
        self.engine.save_checkpoint(str(folder), tag="engine", save_latest=False)
        torch.save(
            {"frozen": [t.clone() for t in self._frozen_state()], "rng": _rng_state(generator)},
            folder / f"frozen_rank{self.world.rank}_of_{self.world.world}.pt",
        )

    def load(self, folder: Path, generator: torch.Generator) -> dict[str, Any]:
        shards = folder / f"frozen_rank{self.world.rank}_of_{self.world.world}.pt"
        if not shards.is_file():
            raise ValueError(
                f"checkpoint {str(folder)!r} was written by another number of ranks; DeepSpeed checkpoints resume "
                f"with the world size that wrote them ({self.world.world} now)"
            )
        self.engine.load_checkpoint(str(folder), tag="engine")
        state = torch.load(shards, weights_only=True)
        with torch.no_grad():
            for target, value in zip(self._frozen_state(), state["frozen"], strict=True):
                target.copy_(value)
        _set_rng(state["rng"], generator)
        return folder_metadata(folder)

    def export(self, path: Path, iteration: int) -> None:
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.world.main:
                _write_export(path, _export_keys(self.policies, module.state_dict()), iteration)
        self.world.barrier()


def latest_checkpoint(out: Path, single: str) -> tuple[str, Path] | None:
    """The newest checkpoint of the run in ``out`` as ``(format, path)``: ``safetensors`` (the one-process file
    named ``single``), ``fsdp2`` (a DCP folder) or ``deepspeed``; ``None`` when there is none."""
    from omninft_fast.train.checkpoint import checkpoint_metadata

    found = []
    if (out / single).is_file():
        found.append((checkpoint_metadata(out / single)["iteration"], "safetensors", out / single))
    for kind, name in (("fsdp2", DCP_CHECKPOINT), ("deepspeed", DEEPSPEED_CHECKPOINT)):
        folder = checkpoint_folder(out, name)
        if folder is not None:
            found.append((folder_metadata(folder)["iteration"], kind, folder))
    if not found:
        return None
    _, kind, path = max(found, key=lambda item: item[0])
    return kind, path


def export_iteration(path: Path) -> int | None:
    """The iteration a run's ``export.safetensors`` holds the weights after (``None``: no export, or one without
    the iteration in its header)."""
    if not path.is_file():
        return None
    iteration = header_metadata(path, "export").get("iteration")
    return None if iteration is None else int(iteration)


def readable(kind: str, backend: str, path: Path) -> None:
    """``ValueError`` unless a run with ``distributed.backend=backend`` reads a ``kind`` checkpoint: the same
    backend, one process (``none``) reading an FSDP2 folder (DCP reshards) or FSDP2 the one-process file."""
    if kind == backend or {kind, backend} in ({"safetensors", "none"}, {"safetensors", "fsdp2"}, {"fsdp2", "none"}):
        return
    written = "none" if kind == "safetensors" else kind
    raise ValueError(
        f"checkpoint {str(path)!r} was written with distributed.backend={written}; resume it with that backend"
        + {"fsdp2": " or with none (one process)", "safetensors": " or with fsdp2"}.get(kind, "")
    )


def check_deepspeed_resume(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """``ValueError`` naming the setting when a DeepSpeed checkpoint cannot resume under ``config``: its ZeRO stage
    and precision fix how its shards are laid out."""
    for key in ("zero_stage", "mixed_precision"):
        then, now = saved["distributed"][key], getattr(config.distributed, key)
        if then != now:
            raise ValueError(
                f"checkpoint {str(path)!r} was written with distributed.{key}={then}; resume it with that ({now} now)"
            )


def gather_rollout(
    world: Dist, samples: Rollout, scores: Scores, texts: list[str], video: list[str], audio: list[str]
) -> tuple[Rollout, Scores]:
    """The whole batch's ``Rollout`` and ``Scores`` from every rank's share (``texts`` and the judged prompts are
    the whole batch's, known to every rank): latents, Eq 10 scores and rewards gathered in rank order."""
    if world.world == 1:
        return samples, scores
    region = None if samples.region_scores is None else world.gather(samples.region_scores)
    rollout = Rollout(texts, world.gather(samples.video), world.gather(samples.audio), region, video, audio)
    values = {name: world.gather(value) for name, value in scores.values.items()}
    outputs = {name: world.gather(value) for name, value in scores.outputs.items()}
    return rollout, Scores(values, scores.modality, scores.weight, outputs)
