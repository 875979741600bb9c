"""Distributed training through torchrun (2 CPU ranks, gloo) and the collectives behind it.

The torchrun test is the issue's acceptance command with a schedule short enough for CI
(about 30 s on 2 cores): 1,024 prototypes with one active per token and a re-seeding every 20
steps, so that dead prototypes are re-seeded twice while both ranks train. Each rank writes the
sha256 of its parameters (and buffers) and the tokens it trained on to $PRISM_RANK_REPORT_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from core import distributed
from core.bundle import load_bundle
from core.generation import generate_text
from core.model.modeling import PrismForCausalLM
from core.train.trainer import PRESETS, RANK_REPORT_ENV, PrismTrainer, build_config
from tests.helpers import REPO
from tests.train.collectives import collectives_worker

STEPS = 40


def test_torchrun_two_ranks_hold_identical_parameters_and_count_every_token(tmp_path, small_corpus):
    out, reports = tmp_path / "bundle", tmp_path / "ranks"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "core",
        "train",
        "--corpus",
        str(small_corpus),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--max-steps",
        str(STEPS),
        "--num-prototypes",
        "1024",
        "--top-k",
        "1",
        "--reseed-interval",
        "20",
        "--quiet",
    ]
    env = {**os.environ, RANK_REPORT_ENV: str(reports), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((reports / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["parameters_sha256"] == ranks[1]["parameters_sha256"]
    record = json.loads((out / "training.json").read_text())
    assert record["reseeded_prototypes"] > 0  # the re-seeding that used to split the ranks ran
    assert record["world_size"] == 2 and record["steps"] == STEPS
    assert record["train_tokens"] == ranks[0]["tokens"] + ranks[1]["tokens"]
    assert record["train_tokens"] == STEPS * 2 * record["batch_size"] * record["sequence_length"]
    # rank 0 alone printed the summary
    assert done.stdout.count('"train_tokens"') == 1

    bundle = load_bundle(out)
    assert bundle.model.config.num_prototypes == 1024
    assert len(generate_text(bundle, "The", max_new_tokens=5).text) > 0
    assert not (out / "checkpoints").exists()  # removed once, by rank 0, after the barrier


def test_collectives_over_two_gloo_processes(tmp_path):
    mp.spawn(collectives_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
    results = {rank: json.loads((tmp_path / f"init.rank-{rank}.json").read_text()) for rank in (0, 1)}
    for rank in (0, 1):
        r = results[rank]
        assert r["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # uneven rows, rank order
        assert r["total"] == 3.0
        assert r["value"] == 10.0  # rank 0's
        assert r["obj"] == {"from": 0}
        assert (r["rank"], r["world"], r["main"]) == (rank, 2, rank == 0)
        assert r["found_first"]  # rank 1 entered the block after rank 0 had left it
    assert results[0]["shard"] == [0, 1, 2] and results[1]["shard"] == [3, 4]


def test_single_process_fallbacks():
    t = torch.arange(3.0)
    assert distributed.all_gather_rows(t) is t
    assert torch.equal(distributed.all_reduce_sum(t.clone()), t)
    assert distributed.broadcast_object("x") == "x"
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    with distributed.main_process_first():
        pass


@pytest.mark.parametrize("n_items", [0, 1, 7, 64, 65])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_item_once_in_order(n_items, world):
    shards = [distributed.shard_range(n_items, r, world) for r in range(world)]
    assert [i for shard in shards for i in shard] == list(range(n_items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_range_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 of 2"):
        distributed.shard_range(10, 2, 2)


def test_compute_loss_reads_the_config_through_a_data_parallel_wrapper(tmp_path):
    """nn.DataParallel (2 visible GPUs without torchrun) has no .config: the loss must unwrap it."""
    from transformers import TrainingArguments

    model = PrismForCausalLM(build_config(PRESETS["tiny"], vocab_size=100, eos_id=0, dense=False))
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = PrismTrainer(model=model, args=args)
    wrapped = nn.DataParallel(model)  # on a CPU machine it runs the module itself
    assert not hasattr(wrapped, "config")
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 16))
    loss = trainer.compute_loss(wrapped, {"input_ids": ids, "labels": ids})
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(trainer._term_sums) == {"ce", "cluster", "anchor", "diversity", "balance"}
    assert trainer.rank_tokens == ids.numel()
