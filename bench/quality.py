"""Quality and cost of PRISM against its dense twin, measured in one run on the same tokens.

Prints validation loss of each (same packed validation sequences), their ratio, and training
throughput of each (forward + backward + AdamW step on the same training batches, the
prototype terms included for PRISM), with their ratio. Last line: one JSON object, also
written to bench/results/quality.json (bench/_results.py).

    python bench/quality.py                       # the demo bundle and its twin
    python bench/quality.py --steps 16 --results-tag steps16
    python bench/quality.py --model DIR --twin DIR --corpus PATH
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import _results  # noqa: E402

from core import PRESETS, load_bundle, load_corpus  # noqa: E402
from core.data.corpus import pack  # noqa: E402
from core.model import losses  # noqa: E402
from core.train.trainer import evaluate_loss  # noqa: E402


def train_throughput(model, batches: list[torch.Tensor], lr: float) -> float:
    """Tokens per second of full training steps on ``batches`` (the first one is a warm-up)."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    elapsed, tokens = 0.0, 0
    for i, ids in enumerate(batches):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        loss = losses.total_loss(out.loss, out.aux_losses, model.config) if out.aux_losses else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # skip the warm-up step
            elapsed += time.perf_counter() - start
            tokens += ids.numel()
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets/models/demo"))
    parser.add_argument("--twin", default=str(REPO / "assets/models/demo-dense"))
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per model")
    parser.add_argument("--eval-sequences", type=int, default=None, help="default: the preset's")
    _results.add_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    prism = load_bundle(args.model)
    twin = load_bundle(args.twin)
    if not prism.is_prism or twin.is_prism:
        sys.exit("--model must be a PRISM bundle and --twin a dense one")
    if prism.tokenizer.get_vocab() != twin.tokenizer.get_vocab():
        sys.exit("the two bundles do not share a tokenizer, so they did not see the same tokens")
    info = prism.training
    preset = PRESETS[info.get("preset", "demo")]
    corpus = load_corpus(args.corpus)
    if info.get("corpus_fingerprint") and info["corpus_fingerprint"] != corpus.fingerprint:
        print("warning: this corpus differs from the one the model was trained on", file=sys.stderr)
    val = pack(corpus.validation, prism.tokenizer, preset.seq_len)
    n_eval = args.eval_sequences or preset.eval_sequences
    t = time.perf_counter()
    prism_loss = evaluate_loss(prism.model, val, max_sequences=n_eval)
    twin_loss = evaluate_loss(twin.model, val, max_sequences=n_eval)
    eval_seconds = time.perf_counter() - t

    train_seq = pack(corpus.train.select(range(min(len(corpus.train), 4000))), prism.tokenizer, preset.seq_len)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_seq), generator=g)
    batches = [
        torch.tensor(train_seq[order[i * preset.batch_size : (i + 1) * preset.batch_size].tolist()]["input_ids"])
        for i in range(args.steps + 1)
    ]
    prism_tps = train_throughput(prism.model, batches, preset.learning_rate)
    twin_tps = train_throughput(twin.model, batches, preset.learning_rate)
    n_val_tokens = min(len(val), n_eval) * (preset.seq_len - 1)

    rows = [
        ("validation loss (nats/token)", f"{prism_loss:.4f}", f"{twin_loss:.4f}", f"{prism_loss / twin_loss:.4f}"),
        ("validation perplexity", f"{torch.tensor(prism_loss).exp():.2f}", f"{torch.tensor(twin_loss).exp():.2f}", ""),
        ("training tokens/s", f"{prism_tps:.0f}", f"{twin_tps:.0f}", f"{prism_tps / twin_tps:.3f}"),
        (
            "parameters",
            f"{sum(p.numel() for p in prism.model.parameters()):,}",
            f"{sum(p.numel() for p in twin.model.parameters()):,}",
            "",
        ),
    ]
    print(f"PRISM {args.model}  vs  dense twin {args.twin}")
    print(
        f"validation: {n_val_tokens:,} tokens; throughput: {args.steps} steps of {preset.batch_size}x{preset.seq_len}"
        f" tokens, same batches; torch threads: {torch.get_num_threads()}"
    )
    print(f"{'':32s}{'PRISM':>14s}{'dense':>14s}{'PRISM/dense':>14s}")
    for name, a, b, r in rows:
        print(f"{name:32s}{a:>14s}{b:>14s}{r:>14s}")
    _results.emit(
        {
            "prism_val_loss": prism_loss,
            "dense_val_loss": twin_loss,
            "val_loss_ratio": prism_loss / twin_loss,
            "prism_val_perplexity": float(torch.tensor(prism_loss).exp()),
            "dense_val_perplexity": float(torch.tensor(twin_loss).exp()),
            "steps": args.steps,
            "batch_tokens": preset.batch_size * preset.seq_len,
            "prism_train_tokens_per_s": prism_tps,
            "dense_train_tokens_per_s": twin_tps,
            "throughput_ratio": prism_tps / twin_tps,
            "val_tokens": n_val_tokens,
            "eval_s": eval_seconds,
            "prism_training_wall_s": info.get("wall_seconds"),
            "dense_training_wall_s": (twin.training or {}).get("wall_seconds"),
        },
        args,
        __file__,
    )


if __name__ == "__main__":
    main()
