"""Scale-out under `torchrun`: one process per rank, gloo on CPU and nccl on GPU. Each rank samples its
share of the prompts; gradients are averaged by DDP and the loss is divided by the global token or
sequence count, so the update equals the single-process one on the union of the shards."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_sum(self, value) -> torch.Tensor:
        """Sum of a tensor (or a number) over ranks, as a float64 tensor on the communication device."""
        t = torch.as_tensor(value, dtype=torch.float64).clone()
        if self.enabled:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
            t = t.to(device)
            dist.all_reduce(t)
            t = t.cpu()
        return t

    def shard(self, items: list) -> list:
        """Contiguous block of this rank (contiguity keeps a prompt's group on one rank)."""
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"{n} items cannot be split evenly over {self.world_size} ranks")
        per = n // self.world_size
        return items[self.rank * per: (self.rank + 1) * per]


def init_distributed(device_request: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), device


def wrap_for_training(module: torch.nn.Module, d: Dist, device: torch.device):
    """DDP over the ranks; the module as is in a single process. (FSDP2 is not wired in: the fused loss
    reads `lm_head.weight` outside the wrapped forward and generation calls the LM's own forward, which
    FSDP2's hooks would need to see unsharded; see the report in docs.)"""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def shutdown(d: Dist):
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
