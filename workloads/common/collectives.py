"""The only torch.distributed collectives the workloads call: sums, in-place sums, a gather of small Python values and
a barrier, on the device the process group's backend reduces on.

Ray Train starts the group with `nccl` on GPUs and `gloo` on CPUs (`cluster.train.fit`). NCCL reduces only CUDA
tensors ("No backend type associated with device type cpu"), so a sum of Python floats made on the CPU goes to the
current CUDA device (the one Ray Train sets for the worker) and back; under gloo it stays on the CPU. Outside a
process group (one process, or one worker without torch.distributed) every call is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# The device type each backend reduces on; a backend not named here (gloo, or a mixed "cpu:gloo,cuda:nccl") takes CPU.
_BACKEND_DEVICE = {"nccl": "cuda"}


def world() -> tuple[int, int]:
    """(rank, world size) in the process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if _grouped() else (0, 1)


def reduce_device() -> torch.device:
    """Where this process's collectives run: the current CUDA device under NCCL, else the CPU."""
    if device_type(dist.get_backend() if _grouped() else "gloo") == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_type(backend: str) -> str:
    """The device type a process group of `backend` (as `dist.get_backend()` names it) reduces tensors on."""
    return _BACKEND_DEVICE.get(backend, "cpu")


def sum_across(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over all processes of the group (float64, so counts stay exact)."""
    totals = torch.tensor(values, dtype=torch.float64)
    sum_(totals)
    return totals.tolist()


def sum_(tensor: torch.Tensor) -> None:
    """`tensor` replaced in place by its element-wise sum over all processes, reduced on `reduce_device()` (a copy
    there and back when it lives elsewhere)."""
    if world()[1] == 1:
        return
    device = reduce_device()
    if tensor.device == device:
        dist.all_reduce(tensor)
        return
    moved = tensor.to(device)
    dist.all_reduce(moved)
    tensor.copy_(moved)


def gather(value: object) -> list:
    """Every process's `value` (small and picklable), in rank order; `[value]` without a process group."""
    if world()[1] == 1:
        return [value]
    values: list = [None] * world()[1]
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for without one)."""
    if world()[1] == 1:
        return
    device = reduce_device()
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()
