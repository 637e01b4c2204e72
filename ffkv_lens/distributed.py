"""Scale-out with ``torch.distributed`` (launched by ``torchrun``): sharding and exact reductions.

A run under ``torchrun --nproc-per-node N`` has ``N`` ranks. Work is split **by batch**: the
stream of units (or of sampled prefixes) is cut into batches exactly as a single process would
cut it, and batch ``i`` goes to rank ``i % N``. Every unit is therefore seen by one rank, in the
same batch (same companions, same padding) as in a single-process run, so its coefficients are
bitwise the same when the ranks compute like the single process (same device kind and thread
count) and the merged results equal a single-process run exactly:

- top-k states: gathered from every rank and merged with :func:`ffkv_lens.kernels.merge_states`
  (associative; ties keep the global unit order because unit ids are global);
- counts and per-position records: each rank fills only its own entries of zero tensors and an
  ``all_reduce`` sum combines them (adding zeros is exact, also for floats).

Backends: ``gloo`` on the CPU, ``nccl`` on CUDA (each rank on ``cuda:LOCAL_RANK``). A single
process (no ``torchrun``) is the world of size 1 and nothing here communicates.

Example:
    $ torchrun --nproc-per-node 2 -m ffkv_lens.cli run --model smollm2-135m --out runs/x
"""

import datetime
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from ffkv_lens.errors import ConfigError

__all__ = ["World", "all_gather_varlen", "all_sum_", "init_from_env", "shard", "world"]

log = logging.getLogger(__name__)
T = TypeVar("T")
# Collectives wait this long for the slowest rank (a rank may run a long step alone).
TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class World:
    """Where this process stands in the run.

    Attributes:
        rank: This process's rank (0 writes the run folder).
        size: Number of processes.
        backend: ``"gloo"``, ``"nccl"`` or ``None`` for a single process.
    """

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this rank writes results (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.size > 1

    def describe(self) -> dict[str, object]:
        """JSON-serialisable summary (recorded in manifests)."""
        return {"world_size": self.size, "backend": self.backend}


def world() -> World:
    """The current world: the initialised process group, or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return World()


def init_from_env(device: str | None = None) -> tuple[World, str | None]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE`` (or with 1) nothing happens. Otherwise the group is initialised with
    ``gloo`` for CPU runs and ``nccl`` for CUDA runs, and a CUDA rank is pinned to
    ``cuda:LOCAL_RANK``.

    Args:
        device: The requested device (``None``: CUDA if available, else CPU).

    Returns:
        The world and the device this rank should use (``None``: the caller's default).

    Raises:
        ConfigError: The environment is inconsistent (e.g. CUDA requested but absent).
    """
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    if dist.is_initialized():
        return world(), device
    wants_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if wants_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} under torchrun, but CUDA is not available; pass --device cpu.")
    if wants_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    backend = "nccl" if wants_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    here = world()
    log.info("rank %d of %d (%s) on %s", here.rank, here.size, backend, device)
    return here, device


def shard(items: Iterable[T], here: World | None = None) -> Iterator[tuple[int, T]]:
    """``(global index, item)`` of the items this rank handles: index ``i`` goes to rank ``i % size``."""
    here = here or world()
    for index, item in enumerate(items):
        if index % here.size == here.rank:
            yield index, item


def all_sum_(tensor: Tensor, here: World | None = None) -> Tensor:
    """Sum ``tensor`` over the ranks, in place (bool tensors are summed as int64 and OR-ed back)."""
    import torch.distributed as dist

    here = here or world()
    if not here.distributed:
        return tensor
    if tensor.dtype == torch.bool:
        total = tensor.to(torch.int64)
        dist.all_reduce(_on_backend(total, here))
        return tensor.copy_(total > 0)
    moved = _on_backend(tensor, here)
    dist.all_reduce(moved)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_gather_varlen(tensor: Tensor, here: World | None = None) -> list[Tensor]:
    """Every rank's 1-d ``tensor`` (lengths may differ), in rank order, on ``tensor``'s device."""
    import torch.distributed as dist

    here = here or world()
    if not here.distributed:
        return [tensor]
    if tensor.ndim != 1:
        raise ConfigError(f"all_gather_varlen takes a 1-d tensor, got shape {tuple(tensor.shape)}.")
    flat = _on_backend(tensor, here)
    length = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
    lengths = [torch.zeros_like(length) for _ in range(here.size)]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in range(here.size)]
    dist.all_gather(parts, padded)
    return [part[: int(n)].to(tensor.device) for part, n in zip(parts, lengths, strict=True)]


def barrier(here: World | None = None) -> None:
    """Wait for every rank (no-op for a single process)."""
    import torch.distributed as dist

    here = here or world()
    if here.distributed:
        dist.barrier()


def _on_backend(tensor: Tensor, here: World) -> Tensor:
    """``nccl`` needs CUDA tensors, ``gloo`` CPU ones."""
    if here.backend == "nccl":
        return tensor if tensor.is_cuda else tensor.cuda()
    return tensor if tensor.device.type == "cpu" else tensor.cpu()
