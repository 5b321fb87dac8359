"""Data-parallel training on an existing launcher: `accelerate launch` or `torchrun` start N processes
and set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the recipes read them here.

Each process takes its contiguous share of every global batch (global batch = per-device batch x
WORLD_SIZE, TRL's convention), losses are normalised by the *global* count of tokens / sequences, and
gradients are summed across processes before clipping and the optimizer step, so N processes follow
the same loss curve as one process with the global batch (up to float rounding). Sampling is seeded per
row (sampling.generate), so a rank's share of the samples equals the single-process samples. Only rank
0 writes files; the others wait at barriers. Backend: gloo on CPU, nccl on CUDA.

Sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`) is on when `accelerate launch` runs with an
FSDP config (ACCELERATE_USE_FSDP) or with `runtime.fsdp=true`: each decoder layer and the root become FSDP
units, so each process holds 1/N of the trained model's parameters, gradients and optimizer state. The
gradient reduce-scatter sums (the losses are already normalised globally), so the loss curve is the
data-parallel one. Generation and evaluation run inside `full_weights` (all units gathered on every
process); saved weights and checkpoints go through full state dicts (`full_state`, `load_full_state`).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from contextlib import contextmanager

import torch


def _destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1
        self.fsdp = self.active and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        if not self.active or torch.distributed.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=self.rank, world_size=self.world)
        # Without this, gloo's worker threads can still hold tensors when the interpreter finalises and the
        # process dies with SIGABRT ("terminate called without an active exception", pytorch#179291); the
        # launcher then kills the other ranks, rank 0 possibly mid-write. Runs before finalisation.
        atexit.register(_destroy_group)

    def share(self, n_per_rank: int) -> slice:
        """This rank's rows of a global batch of n_per_rank * world rows."""
        return slice(self.rank * n_per_rank, (self.rank + 1) * n_per_rank)

    def sum(self, x: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float64).clone()
        if self.active:
            torch.distributed.all_reduce(t)
        return t

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks of equally shaped tensors (rank order)."""
        if not self.active:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_objects(self, items: list) -> list:
        """Concatenation over ranks of picklable lists (rank order), on every rank."""
        if not self.active:
            return items
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def sync_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks (losses are already normalised by the global count); under FSDP the
        reduce-scatter in backward has done it."""
        if not self.active or self.fsdp:
            return
        for p in params:
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


    # ------------------------------------------------------------------------- FSDP

    def wrap(self, model):
        """Shard `model` (the trained one) with FSDP2 when sharding is on; otherwise return it unchanged.
        Units: every decoder layer (the model's `_no_split_modules`, or FSDP_TRANSFORMER_CLS_TO_WRAP), then
        the root (embeddings, final norm, head). Honours FSDP_RESHARD_AFTER_FORWARD and FSDP_OFFLOAD_PARAMS."""
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        if hasattr(model, "peft_config"):
            from .errors import ConfigError

            raise ConfigError("use_peft=true with FSDP is not supported: LoRA adapters are small, launch without "
                              "an FSDP config (data parallel) and put the frozen models on runtime.frozen_device")
        env = os.environ
        names = [n.strip() for n in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
        names = set(names or getattr(model, "_no_split_modules", None) or [])
        kw = {"reshard_after_forward": self._reshard_after_forward(),
              "offload_policy": CPUOffloadPolicy() if env.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true"
              else OffloadPolicy()}
        for module in list(model.modules()):
            if module is not model and type(module).__name__ in names:
                fully_shard(module, **kw)
        fully_shard(model, **kw)
        for unit in self._units(model):
            unit.set_gradient_divide_factor(1.0)  # sum, not mean: the losses are globally normalised
            if hasattr(unit, "set_force_sum_reduction_for_comms"):
                unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        return model

    @staticmethod
    def _reshard_after_forward() -> bool:
        return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0")

    def _units(self, model) -> list:
        if not self.fsdp:
            return []
        from torch.distributed.fsdp import FSDPModule

        return [m for m in model.modules() if isinstance(m, FSDPModule)]

    @contextmanager
    def full_weights(self, model):
        """Every process holds the full weights of a sharded `model` inside (plain tensors: generation,
        evaluation, the lean decoder); a no-op for an unsharded model. Collective: all ranks enter."""
        units = self._units(model)
        if not units:
            yield model
            return
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self._reshard_after_forward(), recurse=False)

    def full_state(self, model) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict, on CPU, on rank 0 ({} elsewhere) for a sharded model; the model's
        own state dict otherwise. Collective under FSDP."""
        if not self._units(model):
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        shared: dict[int, list[str]] = {}  # tied weights (embeddings = head) once, as the model's own state dict has them
        for name, p in model.named_parameters(remove_duplicate=False):
            shared.setdefault(id(p), []).append(name)
        for names in shared.values():
            for name in names[1:]:
                state.pop(name, None)
        return state

    def load_full_state(self, model, state: dict) -> None:
        """Load a full state dict (every rank passes the same one) into a sharded model. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def full_optimizer_state(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_optimizer_state(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def sharded(self, model) -> bool:
        return bool(self._units(model))


_DIST: Dist | None = None


def get_dist() -> Dist:
    global _DIST
    if _DIST is None:
        _DIST = Dist()
    return _DIST


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor | float, dist: Dist | None = None) -> torch.Tensor:
    """This rank's share of the global mean: local_sum / (sum of counts over ranks). Summing it over ranks
    (or the gradients of it) gives the mean over the global batch; with one process it is the plain mean."""
    dist = dist or get_dist()
    count = torch.as_tensor(local_count, dtype=torch.float64)
    total = dist.sum(count) if dist.active else count
    return local_sum / total.clamp(min=1).to(local_sum.dtype)
