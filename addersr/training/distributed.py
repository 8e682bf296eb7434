"""Several processes: the process group, DDP and the decisions all ranks take together.

``torchrun --nproc_per_node=N -m addersr.train ...`` (DistributedDataParallel; ``--batch``
is per process). Batch normalisation uses each process's own batch (plain BN, as with one
GPU and the same per-GPU batch); DDP broadcasts rank 0's running statistics. Gradients are
all-reduced before the adaptive-rate rescaling, so all ranks apply the same update. Rank 0
alone logs, validates and writes checkpoints; what every rank must decide alike (the loss
check, the stop at the time limit) goes through the collective calls here.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def setup_distributed(device):
    """(rank, world_size, device) from torchrun's environment; starts the process group.

    A CUDA device without an index (``cuda``, the default) becomes ``cuda:LOCAL_RANK``; with
    several processes each takes its own GPU, ``cuda:LOCAL_RANK``, whatever index was given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and (world > 1 or device.index is None):
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed patch size
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def teardown(world):
    """End the process group that :func:`setup_distributed` started, if any."""
    if world > 1:
        dist.destroy_process_group()


def wrap(model, world, device):
    """``model`` in DistributedDataParallel under several processes, else itself."""
    if world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def reduce_mean(value, world):
    """The mean of the tensor ``value`` over all ranks."""
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value


def any_rank(flag, world, device):
    """Whether ``flag`` is true on any rank (a collective call under several processes)."""
    if world > 1:
        tensor = torch.tensor(float(flag), device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        flag = bool(tensor.item())
    return flag
