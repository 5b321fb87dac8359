"""Data-parallel training on an existing launcher: `accelerate launch` or `torchrun` start N processes
and set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the recipes read them here.

Each process takes its contiguous share of every global batch (global batch = per-device batch x
WORLD_SIZE, TRL's convention), losses are normalised by the *global* count of tokens / sequences, and
gradients are summed across processes before clipping and the optimizer step, so N processes follow
the same loss curve as one process with the global batch (up to float rounding). Sampling is seeded per
row (sampling.generate), so a rank's share of the samples equals the single-process samples. Only rank
0 writes files; the others wait at barriers. Backend: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        if not self.active or torch.distributed.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=self.rank, world_size=self.world)

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
        """Sum gradients over ranks (losses are already normalised by the global count)."""
        if not self.active:
            return
        for p in params:
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


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
