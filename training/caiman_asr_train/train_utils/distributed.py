"""torch.distributed set-up: one process per device.

The processes come from ``--num_gpus N`` (train_utils/launcher.py) or from
torchrun (multi-node: start it yourself with torchrun's ``--nnodes``,
``--node_rank``, ``--rdzv_endpoint`` ...); either way they are recognised by the
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` environment variables. NCCL joins GPU
processes, gloo CPU ones.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True when torchrun (or a compatible launcher) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun prepared (no-op for a single process).

    NCCL for CUDA devices, gloo for CPU; each GPU process uses cuda:LOCAL_RANK.
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    # Validation and exports run on rank 0 while the others wait at a barrier:
    # allow them well over the default 10 minutes on large dev sets.
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return info


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not info.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_sum(values: Sequence[float], info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    if not info.distributed:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
