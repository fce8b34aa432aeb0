"""Scale-out under `torchrun`: one process per rank, gloo on CPU and nccl on GPU. Each rank samples its
share of the prompts; gradients are averaged by DDP and the loss is divided by the global token or
sequence count, so the update equals the single-process one on the union of the shards."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tensor_parallel: int = 1  # ranks that share one batch and split lm_head by vocabulary (a 1-D mesh)
    mesh: object = None  # the tensor-parallel DeviceMesh when tensor_parallel > 1

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: those that see different batches."""
        return self.world_size // self.tensor_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def data_parallel(self) -> bool:
        return self.dp_size > 1

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
        if n % self.dp_size:
            raise ValueError(f"{n} items cannot be split evenly over {self.dp_size} ranks")
        per = n // self.dp_size
        return items[self.dp_rank * per: (self.dp_rank + 1) * per]


def init_distributed(device_request: str, tensor_parallel: int = 1) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; pick the device; with `tensor_parallel` K > 1,
    the 1-D device mesh of the K ranks (UserError unless K equals the world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if tensor_parallel > 1:
        from sppo_fast.trainer.config import UserError

        if world % tensor_parallel:
            raise UserError(f"tensor_parallel ({tensor_parallel}) must divide the world size ({world}; launch with "
                            f"torchrun --nproc_per_node {tensor_parallel})")
        if world != tensor_parallel:
            raise UserError(f"tensor_parallel ({tensor_parallel}) must equal the world size ({world}): data "
                            "parallel next to tensor parallel is not supported")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    mesh = None
    if tensor_parallel > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (tensor_parallel,), mesh_dim_names=("tp",))
    return Dist(rank, world, local, tensor_parallel, mesh), device


def shard_vocabulary(lm, d: Dist):
    """Tensor parallel: lm_head split by vocabulary rows (ColwiseParallel; its logits, when the model's own
    forward runs them for generation, gathered whole so that sampling sees the whole vocabulary) and the
    input embedding by vocabulary rows (RowwiseParallel: each rank looks up its ids, the rows are summed),
    as DTensors over the tensor-parallel mesh. A tied embedding is left alone (the two layers would need
    one placement)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
    names = {id(m): n for n, m in lm.named_modules()}
    plan = {names[id(head)]: ColwiseParallel(output_layouts=Replicate())}
    if embed.weight is not head.weight:
        plan[names[id(embed)]] = RowwiseParallel(input_layouts=Replicate())
    parallelize_module(lm, d.mesh, plan)


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def use_fsdp2(strategy: str, d: Dist, device: torch.device) -> bool:
    """`auto`: FSDP2 on GPUs where `fully_shard` exists, DDP otherwise; `ddp`/`fsdp2` force one."""
    if strategy not in ("auto", "ddp", "fsdp2"):
        raise ValueError(f"parallel: unknown {strategy!r}; choose auto, ddp or fsdp2")
    if not d.enabled or strategy == "ddp":
        return False
    if strategy == "fsdp2":
        if not fsdp2_available():
            raise ValueError("parallel: fsdp2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6)")
        return True
    return device.type == "cuda" and fsdp2_available()


def shard_decoder_layers(lm) -> list[torch.nn.Parameter]:
    """FSDP2 on each decoder layer and on the decoder as the root (embeddings, final norm); returns the
    parameters left replicated (`lm_head`, and anything else outside the decoder). lm_head stays whole on
    purpose: the fused loss multiplies the hidden states by its weight outside any module's forward. The
    decoder's forward runs both in generation and in the loss, so the FSDP hooks see every use of the
    sharded weights. The replicated gradients are averaged by `average_replicated_grads`."""
    from torch.distributed.fsdp import fully_shard

    decoder = lm.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(decoder)
    sharded = {id(p) for p in decoder.parameters()}
    return [p for p in lm.parameters() if id(p) not in sharded]


def average_replicated_grads(params, d: Dist):
    """What DDP would do for the parameters FSDP2 does not own: average their gradients over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def wrap_for_training(module: torch.nn.Module, d: Dist, device: torch.device):
    """DDP over the ranks; the module as is in a single process (or when every rank sees the same batch:
    tensor parallel)."""
    if not d.data_parallel:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


# Seconds the last step of a distributed run leaves the GIL free (see shutdown).
_DRAIN_SECONDS = 0.2


def shutdown(d: Dist, *, failed: bool = False):
    """Leave the process group. Once DDP has run, torch 2.13 keeps the gloo group and its worker threads
    alive past destroy_process_group (a minimal DDP script shows it), so they live until the
    interpreter exits. A worker that frees a finished collective holding Python tensors must take the
    GIL; if the interpreter is already finalizing, that thread is made to exit through a noexcept
    destructor and the process aborts ("terminate called without an active exception": 2 in 260
    looped 2-process runs, core dump read with gdb). Hence a last barrier, then a moment with the GIL
    free for the workers to drop what they hold, before the interpreter may finalize. After a failure
    (`failed`) no barrier: the other ranks may never reach it; the launcher ends them."""
    if d.enabled and dist.is_initialized():
        if not failed:
            dist.barrier()
            time.sleep(_DRAIN_SECONDS)
        dist.destroy_process_group()
