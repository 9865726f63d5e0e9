"""Thin helpers over ``torch.distributed`` so the trainer reads the same with one or many processes.

Launch with ``torchrun --nproc_per_node N -m plmetric.cli train ...``; a single process needs nothing.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 writes logs, checkpoints and plots."""
    return rank() == 0


def init_from_env(device: str) -> bool:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Uses NCCL on CUDA and gloo on the CPU. Returns True when a group was initialised here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate per-rank tensors along dim 0 (sizes may differ), keeping the autograd graph.

    Rows are padded to the largest rank's count for the collective and the padding is removed
    again. The backward pass sums the incoming gradients over ranks (reduce-scatter), so every
    rank computing the same global loss and DDP averaging parameter gradients gives exactly the
    one-process gradient.
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    counts = all_gather_no_grad(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    pad = max(counts) - tensor.shape[0]
    if pad:
        tensor = torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))], dim=0)
    with warnings.catch_warnings():  # deprecated in favour of a private API; still the autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(tensor.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)], dim=0)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized per-rank tensors along dim 0 (no gradient)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate per-rank tensors whose first dimension differs (padding removed)."""
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = all_gather_no_grad(count).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = all_gather_no_grad(padded).split(max(counts))
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)], dim=0)


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (a MIN all-reduce; the flag itself without a group)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def average_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce (mean) the gradients of parameters that DDP does not manage."""
    if not is_distributed():
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world_size())


def barrier() -> None:
    """Synchronise all processes (no-op for one)."""
    if is_distributed():
        dist.barrier()
