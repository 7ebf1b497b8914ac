"""torchrun support: process group setup, DDP or FSDP2 wrapping, cross-rank sums, and full weights on rank 0.

`mmfm train` run under `torchrun --nproc_per_node=N` reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment, joins a process group (gloo on CPU, NCCL on GPU) and wraps the training module in DDP or in
FSDP2 (`fully_shard` on every backbone block, then on the whole). A single process needs none of this.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmfm.errors import MMFMError

# A rank waits this long for the others before the job fails (a dead peer usually fails it sooner).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Joins the torchrun process group when WORLD_SIZE > 1; otherwise a single-process environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world == 1:
        return DistEnv(device=torch.device("cuda") if cuda else device)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def wrap(module: nn.Module, blocks: nn.ModuleList, kind: str, env: DistEnv) -> nn.Module:
    """DDP around `module`, or FSDP2: shard every block of `blocks`, then `module` itself."""
    if not env.enabled:
        return module
    if kind == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        # Each step trains one task, which leaves the other heads (and maybe an encoder) unused.
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(module)
    return module


def sum_across_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of a tensor over every rank (the tensor itself in a single process)."""
    if env.enabled:
        value = value.clone()
        dist.all_reduce(value)
    return value


def full_state_dict(module: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights of a (possibly DDP- or FSDP-wrapped) module; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not env.enabled or isinstance(module, nn.parallel.DistributedDataParallel):
        inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order (a one-item list in a single process)."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


class RankFailure(MMFMError):
    """Another rank stopped answering (it died or was killed); this rank ends instead of waiting forever."""
