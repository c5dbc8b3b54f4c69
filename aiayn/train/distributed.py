"""Data parallelism with torch.distributed: the same training code runs as one process or under
`torchrun --nproc_per_node N` (gloo on the CPU, NCCL on CUDA). Every rank builds the same batch
plan and trains on its own shard of each batch; DDP averages the gradients."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world_size > 1


def init_distributed(device_type="cpu"):
    """Joins the process group torchrun described in the environment (WORLD_SIZE > 1), or returns a
    single-process context. NCCL for CUDA, gloo for the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # NCCL binds each rank to its own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def current_context():
    """The context of an already initialized process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def all_reduce_sum(values, ctx, device):
    """Sums a list of floats over the ranks (returns them unchanged for one process)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, ctx):
    """Every rank's `obj`, in rank order."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx):
    if ctx.active:
        dist.barrier()
