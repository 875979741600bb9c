"""The few collective operations that training, the index and influence passes need across ranks.

A command launched with ``torchrun --nproc_per_node N`` (or ``accelerate launch``) runs in N
processes, one per rank. :func:`start` joins them into a process group through accelerate's
``PartialState`` (gloo on the CPU, NCCL on CUDA); every other function here works on that group
and falls back to the single-process answer when there is none, so the same code runs both ways.

Tensors given to a collective must live where the backend expects them (CPU for gloo, the
rank's GPU for NCCL): the model's device in practice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def start(cpu: bool = False):
    """Join the process group that ``torchrun`` / ``accelerate launch`` set up (no-op alone).

    Args:
        cpu: use the CPU backend (gloo) even where CUDA is present.

    Returns:
        accelerate's ``PartialState`` for this process.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def rank_device(device: str) -> str:
    """Where this rank runs a model asked for on ``device``: under several ranks ``cuda`` is the
    rank's own GPU (``cuda:LOCAL_RANK``, torchrun's numbering); anything else is unchanged."""
    if device == "cuda" and is_distributed():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def is_distributed() -> bool:
    """Whether this process is one of several ranks in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when alone)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 when alone)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this is rank 0, the rank that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place on every rank; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place; returns it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s (picklable) ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (n_r, ...) along the first axis, in rank order.

    The ranks may hold different numbers of rows; the other axes must agree.

    Returns:
        (sum_r n_r, ...) on every rank.
    """
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = tensor.new_zeros((most, *tensor.shape[1:]))  # all_gather needs equal shapes
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])


def shard_range(n_items: int, index: int | None = None, count: int | None = None) -> range:
    """The contiguous share of ``n_items`` that rank ``index`` of ``count`` ranks handles.

    Shares differ by at most one item, earlier ranks take the larger ones, and in rank order
    they cover ``range(n_items)`` exactly once (a rank may get an empty range).

    Args:
        n_items: how many items (training sequences, documents) there are.
        index, count: the rank and the number of ranks (default: this process's).
    """
    index = rank() if index is None else index
    count = world_size() if count is None else count
    if count < 1 or not 0 <= index < count or n_items < 0:
        raise ValueError(f"cannot share {n_items} items as rank {index} of {count}")
    base, extra = divmod(n_items, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (which then find its caches)."""
    if not is_distributed():
        yield
        return
    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()
