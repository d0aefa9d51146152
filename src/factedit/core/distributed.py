"""Several processes started by ``torchrun``: which one this is, and the few collective steps factedit
needs (sum a tensor, check that every rank agrees, wait for all).

    world = World.from_env()        # size 1 without torchrun; joins the process group with it
    world.all_reduce_sum(acc.sum)   # float64 sums of every rank, in place
    world.agree("model fingerprint", fp)   # every rank raises if one differs

The backend is NCCL when this rank computes on a CUDA device, gloo otherwise (CPU).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from .errors import FactEditError

__all__ = ["World", "DistributedError"]


class DistributedError(FactEditError):
    """The ranks of a torchrun world disagree (corpus, model, configuration) or cannot talk."""


@dataclass
class World:
    """This process's place among ``size`` processes (``rank`` 0 writes the shared files)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @classmethod
    def from_env(cls, device: Optional[torch.device] = None, timeout_s: float = 1800.0) -> "World":
        """The world torchrun describes in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (size 1 without them),
        with the process group initialised (NCCL when ``device`` is CUDA, else gloo)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            except (RuntimeError, ValueError) as e:
                raise DistributedError(f"could not join the torchrun world ({backend}): {e}") from None
        return cls(rank, size, local, backend)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes what all ranks computed."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Round-robin sharding: item ``index`` is this rank's."""
        return index % self.size == self.rank

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (on CPU for gloo; on the rank's GPU for NCCL)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (JSON-like), in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, what: str, value: Any) -> None:
        """Raise :class:`DistributedError` on every rank unless all ranks hold the same ``value``."""
        values = self.gather(value)
        bad = [r for r, v in enumerate(values) if v != values[0]]
        if bad:
            raise DistributedError(f"the torchrun ranks disagree on the {what}: rank 0 has {values[0]!r}, rank "
                                   f"{bad[0]} has {values[bad[0]]!r}; start every rank with the same model, data "
                                   "and options (nothing was written)")

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Leave the process group. Every exit path must (an error included): a gloo group left to the
        interpreter's teardown can abort the process (SIGABRT) instead of letting it exit with its status."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
