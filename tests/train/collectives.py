"""The worker of test_distributed's gloo test: light imports (torch and core.distributed only),
because every spawned process imports this module again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core import distributed


def collectives_worker(rank: int, world: int, init_file: str) -> None:
    """Run each collective of core.distributed as ``rank`` of ``world``; write what it saw to JSON."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = torch.full((rank + 1, 2), float(rank))  # rank 0 holds 1 row, rank 1 holds 2
        gathered = distributed.all_gather_rows(rows)
        total = distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
        value = distributed.broadcast(torch.tensor([10.0 * (rank + 1)]))
        obj = distributed.broadcast_object({"from": rank})
        marker = Path(init_file).with_suffix(".first")
        with distributed.main_process_first():
            if rank == 0:
                time.sleep(0.5)  # a slow rank 0: the others must still wait for it
                marker.write_text("rank 0 was here")
            found_first = marker.exists()
        results = {
            "gathered": gathered.tolist(),
            "total": total.item(),
            "value": value.item(),
            "obj": obj,
            "rank": distributed.rank(),
            "world": distributed.world_size(),
            "main": distributed.is_main(),
            "shard": list(distributed.shard_range(5)),
            "found_first": found_first,
        }
        Path(f"{init_file}.rank-{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
