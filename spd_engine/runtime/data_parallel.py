"""Data parallelism on torch.distributed: every rank does a deterministic share of the same work.

    torchrun --standalone --nproc-per-node 8 -m spd_engine train-pdm --distributed --cache DIR ...
    torchrun --standalone --nproc-per-node 8 -m spd_engine build-data --distributed --out DIR ...

The process group, its timeout (``--dist-timeout``), the watchdog and the one-line exit when a peer is lost are
the inference runtime's (:func:`~spd_engine.runtime.distributed.run_in_process_group`); this module adds what
data-parallel work needs on top:

* ``train-pdm --cache``: every rank runs the same seeded sampler, so all draw the same global batch, and each
  trains on its contiguous share of it (:meth:`Replicas.share`). Losses are divided by the whole batch's
  token count, so summing the gradients over ranks (:meth:`Replicas.sum_gradients`, one all-reduce per step:
  the PDM is small, and the frozen target is not in the step at all) gives the single-process gradient of
  that batch up to float summation order. Every rank then takes the same optimiser step on the same weights.
  Rank 0 alone writes checkpoints, reports and the final PDM.
* ``build-data``: shards are dealt to ranks (:meth:`Replicas.deal`); each rank writes its own shard files and
  rank 0 the manifest.

:data:`SINGLE` is one process: the same code then runs with no communication at all.

Setup (model, cache, checkpoint) is each rank's own; a mistake that only one rank sees (a path missing on one
machine) is agreed on before the first collective, so every rank refuses with one line instead of waiting.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import UserError

if TYPE_CHECKING:  # the runtime (engine, SPD) is imported only by a distributed launch
    from .distributed import Peer

WRITER = 0  # the rank that writes checkpoints, reports and manifests


class Replicas:
    """This rank among ``world_size`` ranks doing one job together (``peer`` None: a single process)."""

    def __init__(self, peer: Peer | None = None):
        self.peer = peer
        self.rank = peer.rank if peer else 0
        self.world_size = peer.world_size if peer else 1
        self.agreed = peer is None  # whether every rank's setup succeeded (checked by the first collective)

    def agree(self, error: str | None = None) -> None:
        """Every rank's setup outcome; any rank's mistake raises UserError on all (``error``: this rank's)."""
        from .distributed import agree

        self.agreed = True
        agree(self.peer, self.rank, {"error": error})

    @property
    def writer(self) -> bool:
        return self.rank == WRITER

    def _meet(self) -> None:
        if not self.agreed:
            self.agree()

    def share(self, items: list) -> list:
        """This rank's contiguous slice of ``items``; the slices of all ranks, in rank order, are ``items``."""
        n, w = len(items), self.world_size
        return items[self.rank * n // w: (self.rank + 1) * n // w]

    def deal(self, items: list) -> list:
        """Every ``world_size``-th item from this rank's own: one per rank per round."""
        return items[self.rank::self.world_size]

    def sum_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.peer is not None:
            self._meet()
            with self.peer.waiting(what):
                dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, parameters: list[torch.Tensor], extra: torch.Tensor) -> None:
        """Sum the gradients of ``parameters`` and the (float32) ``extra`` over the ranks in one all-reduce."""
        if self.peer is None:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads] + [extra.reshape(-1)]), "summing gradients")
        offset = 0
        for parameter, grad in zip(parameters, grads):
            parameter.grad = flat[offset: offset + grad.numel()].view_as(grad)
            offset += grad.numel()
        extra.copy_(flat[offset:].view_as(extra))

    def broadcast_(self, tensors: list[torch.Tensor], what: str) -> None:
        """Every rank's ``tensors`` become the writer's (replicas start from the same weights, as in DDP)."""
        if self.peer is None:
            return
        self._meet()
        with self.peer.waiting(what), torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=WRITER)

    def gather(self, value, what: str) -> list:
        """Every rank's ``value`` (picklable), in rank order."""
        if self.peer is None:
            return [value]
        self._meet()
        gathered: list = [None] * self.world_size
        with self.peer.waiting(what):
            dist.all_gather_object(gathered, value)
        return gathered


SINGLE = Replicas()


def run_data_parallel(args, example: str, body) -> int:
    """Join torchrun's process group and run ``body(replicas)`` on this rank (:func:`run_in_process_group`)."""
    from .distributed import run_in_process_group

    def on_rank(peer) -> int:
        replicas = Replicas(peer)
        try:
            return body(replicas)
        except UserError as exc:
            if replicas.agreed:  # a mistake found mid-run: the others learn of it as a lost peer
                raise
            replicas.agree(str(exc))  # raises on every rank, this one included
            raise

    return run_in_process_group(args, example, on_rank)
