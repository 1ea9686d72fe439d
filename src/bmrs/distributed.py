"""Running bmrs in several processes (``torch.distributed``, DistributedDataParallel).

The rules every distributed part of bmrs follows (see docs/distributed.md):

* a model may be handed over wrapped in ``DistributedDataParallel`` (or ``DataParallel``):
  :func:`unwrap` finds the network inside, and every public function of bmrs calls it;
* the noise of the gates differs between processes: :func:`seed_noise` seeds each rank's
  generators from the run's seed and the rank;
* pruning decisions are rank 0's, broadcast to every rank (:func:`broadcast`), so masks
  change at the same step everywhere;
* only rank 0 writes files (:func:`is_main`).

Outside ``torch.distributed`` (no process group) every helper is the single-process case:
rank 0 of a world of size 1, broadcasts and gathers do nothing.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "unwrap", "is_initialized", "rank", "world_size", "is_main", "barrier", "broadcast", "gather_rows",
    "average", "seed_noise", "init_from_environment",
]

_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``.module``);
    any other module as it is."""
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank arrives here."""
    if world_size() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    """``tensor`` as rank ``src`` holds it, on every rank (a new tensor on ``tensor``'s device)."""
    if world_size() == 1:
        return tensor
    out = tensor.detach().to(_comm_device(), copy=True)
    torch.distributed.broadcast(out, src=src)
    return out.to(tensor.device)


def gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (same shape on all ranks), stacked in rank order, on the CPU."""
    if world_size() == 1:
        return tensor.detach().cpu().unsqueeze(0)
    local = tensor.detach().to(_comm_device())
    rows = [torch.empty_like(local) for _ in range(world_size())]
    torch.distributed.all_gather(rows, local)
    return torch.stack([r.cpu() for r in rows])


def average(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each number in ``values`` (the same keys on every rank)."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    summed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(summed)
    return {k: float(v) / world_size() for k, v in zip(keys, summed.tolist())}


def seed_noise(seed: int) -> None:
    """Give each rank its own stream of random numbers for the gates' noise (and dropout).

    In a world of N > 1 processes, PyTorch's default generators (CPU and every CUDA device)
    are seeded from ``(seed, rank)``, so the ranks draw different noise and a run is
    reproducible for a given seed and world size. Call it after the model is built (the
    initial weights are the same on every rank) and before training. In a single process
    it does nothing: the stream :func:`bmrs.seed_everything` started goes on, so results do
    not change with this call.
    """
    if world_size() == 1:
        return
    state = np.random.SeedSequence([int(seed), rank()]).generate_state(2, dtype=np.uint32)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def init_from_environment() -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL and this process's GPU (``LOCAL_RANK``) where CUDA is available, gloo on the
    CPU otherwise; returns the device the process should train on. Without torchrun's
    variables (or with a world of one process) no group is created and the device is the
    CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and "RANK" in os.environ:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        return device
    return torch.device("cpu")
