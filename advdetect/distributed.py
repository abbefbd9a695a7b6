"""Running under ``torchrun``: ranks, shard assignment, barriers.

``torchrun --nproc-per-node N -m advdetect <command> ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`init_from_env` reads them and joins the process group (gloo on CPU,
NCCL on CUDA, through torchrun's own rendezvous, so several nodes work the same way).
Work is split by shard: rank ``r`` of ``W`` computes shards ``r, r + W, r + 2W, ...`` and
writes them itself; rank 0 merges the manifest. Shard contents depend only on the shard
size, never on the number of ranks, so every image gets the result a single process gives.

Without torchrun (or with ``WORLD_SIZE=1``) everything here is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import AdvDetectError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_shards(self, n_shards: int) -> Iterator[int]:
        """The shard indices this rank computes (round robin)."""
        return iter(range(self.rank, n_shards, self.world_size))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


_alone = threading.local()


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Within the block this process works alone (``context()`` is a one-process job): for work
    only rank 0 does after the shared stages, which must not wait for the other ranks."""
    before = getattr(_alone, "active", False)
    _alone.active = True
    try:
        yield
    finally:
        _alone.active = before


def context() -> Context:
    """The current job: the process group's view when one is initialized, else a single process."""
    if getattr(_alone, "active", False):
        return Context()
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Context()


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise AdvDetectError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from exc


def init_from_env(device: str = "auto") -> Context:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; returns the context.

    ``device`` is the user's --device: CUDA ranks use NCCL and the GPU ``LOCAL_RANK``; CPU
    ranks use gloo. Calling it again is harmless.
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return context()
    if not dist.is_available():
        raise AdvDetectError("this torch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as exc:
        raise AdvDetectError(f"could not join the torchrun process group ({backend}): {exc}") from exc
    atexit.register(shutdown)
    ctx = context()
    log.info("rank %d of %d (%s)", ctx.rank, ctx.world_size, backend)
    return ctx


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """CUDA without an index means this rank's GPU under torchrun."""
    if device.type == "cuda" and device.index is None and context().enabled:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device
