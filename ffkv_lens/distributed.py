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

**Rank 0's solo work** (:func:`main_section`): when it fails with any exception, rank 0 writes the
error to the rendezvous store before raising it. Every other rank runs a watcher thread
(started by :func:`init_from_env`) blocked on that key: it logs ``rank 0 failed: ...`` and ends its
process (exit code 1) at once, even while its main thread waits in a collective, which NCCL would
otherwise hold until :data:`TIMEOUT`. Ranks that finish their share early wait for rank 0's outcome
(:func:`wait_for_main`) and exit with its error, as :class:`~ffkv_lens.errors.RankFailedError`.
The watcher only waits on a socket; the normal path has no extra collective.

Example:
    $ torchrun --nproc-per-node 2 -m ffkv_lens.cli run --model smollm2-135m --out runs/x
"""

import contextlib
import datetime
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ffkv_lens.errors import ConfigError, RankFailedError

__all__ = [
    "World",
    "all_gather_varlen",
    "all_sum_",
    "init_from_env",
    "main_section",
    "shard",
    "wait_for_main",
    "world",
]

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
    if not here.is_main:
        threading.Thread(target=_watch_main, args=(here.rank,), name="ffkv-lens-watch-rank0", daemon=True).start()
    return here, device


# Keys in the rendezvous store (MASTER_ADDR:MASTER_PORT), per torchrun restart.
_FAILED = "ffkv_lens/{restart}/rank0_failed"
_DONE = "ffkv_lens/{restart}/rank0_done"
_awaiting_main = threading.Event()  # set once this rank's main thread waits in wait_for_main (its run's end)


def _key(template: str) -> str:
    return template.format(restart=os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _store_client() -> Any:
    """A new client of the rendezvous store: its own socket, so a blocking wait stalls no other thread."""
    import torch.distributed as dist

    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=TIMEOUT,
        wait_for_workers=False,
    )  # fmt: skip


def _watch_main(rank: int) -> None:
    """Watcher thread of a rank other than 0: end this process when rank 0 reports a failure."""
    try:
        store = _store_client()
        store.wait([_key(_FAILED)])
        message = store.get(_key(_FAILED)).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 (the store is gone: rank 0 ended; the collectives report it)
        return
    if _awaiting_main.is_set():  # wait_for_main raises it in the main thread
        return
    log.error("rank 0 failed: %s; stopping rank %d", message, rank)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(1)


@contextlib.contextmanager
def main_section(here: World, *, last: bool = False) -> Iterator[None]:
    """Wrap work that rank 0 does alone: any exception in it is announced to the other ranks, then raised.

    Args:
        here: The world (a single process: nothing is announced).
        last: Rank 0's last solo work: its success is announced too (the others wait for it in
            :func:`wait_for_main`).
    """
    if not here.distributed:
        yield
        return
    try:
        yield
    except BaseException as err:
        message = f"{type(err).__name__}: {err}".replace("\n", " ")
        with contextlib.suppress(Exception):  # announcing must not hide the error itself
            store = _store_client()
            store.set(_key(_DONE), message)
            store.set(_key(_FAILED), message)
        raise
    if last:
        _store_client().set(_key(_DONE), "")


def wait_for_main(here: World) -> None:
    """On a rank other than 0: wait until rank 0's last :func:`main_section` ends; raise its failure.

    Raises:
        RankFailedError: Rank 0 failed (the message carries its error).
    """
    if not here.distributed or here.is_main:
        return
    _awaiting_main.set()
    try:
        store = _store_client()
        store.wait([_key(_DONE)])
        message = store.get(_key(_DONE)).decode("utf-8", "replace")
    except RuntimeError as err:  # the store went away with rank 0
        message = f"it ended without reporting its outcome: {err}".replace("\n", " ")
    if message:
        raise RankFailedError(f"rank 0 failed ({message}); rank {here.rank} stops too. Fix rank 0's error and rerun.")


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
