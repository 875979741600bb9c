"""How sparse a PRISM bundle's explanations are, beside its quality against the dense twin.

On the first --sequences packed validation sequences (fixed: the same positions every run):
the share of each target logit's absolute slice mass held by its largest 1 / 4 / 8 slices, the
median number of slices that hold 80% of it ("effective k"), the distinct prototypes a 64-token
window of text activates; then the validation loss of the bundle and of its dense twin on the
preset's validation sequences, their ratio, and (unless --no-throughput) the ratio of their
training tokens/s on the same batches (bench/quality.py's measurement). The measures are
:mod:`core.model.sparsity`. Last line: one JSON object, also written to
bench/results/sparsity[.TAG].json.

    python bench/sparsity.py                                    # the demo bundle and its twin
    python bench/sparsity.py --model DIR --twin DIR --corpus PATH --results-tag probe-k16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _results  # noqa: E402


def training_batches(corpus, tokenizer, seq_len: int, batch_size: int, count: int) -> list[torch.Tensor]:
    """``count`` (batch_size, seq_len) batches of training sequences in a fixed (seeded) order."""
    from core.data.corpus import pack

    train_seq = pack(corpus.train.select(range(min(len(corpus.train), 2000))), tokenizer, seq_len)
    order = torch.randperm(len(train_seq), generator=torch.Generator().manual_seed(0))
    return [
        torch.tensor(train_seq[order[i * batch_size : (i + 1) * batch_size].tolist()]["input_ids"])
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets/models/demo"))
    parser.add_argument("--twin", default=str(REPO / "assets/models/demo-dense"), help="'' skips the twin")
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--sequences", type=int, default=16, help="validation sequences probed for the slices")
    parser.add_argument("--eval-sequences", type=int, default=None, help="for the losses (default: the preset's)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the training tokens/s ratio")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per model (throughput)")
    _results.add_arguments(parser)
    args = parser.parse_args()

    from core import PRESETS, load_bundle, load_corpus
    from core.data.corpus import pack
    from core.model.sparsity import sparsity_figures
    from core.train.trainer import evaluate_loss

    torch.manual_seed(0)
    bundle = load_bundle(args.model)
    if not bundle.is_prism:
        sys.exit(f"{args.model} is a dense bundle: it has no slices")
    model = bundle.model
    preset = PRESETS[bundle.training.get("preset", "demo")]
    corpus = load_corpus(args.corpus)
    seq_len = model.config.sequence_length
    val = pack(corpus.validation, bundle.tokenizer, seq_len)
    n = min(args.sequences, len(val))
    ids = torch.tensor(val[:n]["input_ids"])  # (n, T)
    figures: dict[str, float | int | str | None] = sparsity_figures(model, ids)

    n_eval = args.eval_sequences or preset.eval_sequences
    val_eval = pack(corpus.validation, bundle.tokenizer, preset.seq_len)
    figures["prism_val_loss"] = evaluate_loss(model, val_eval, max_sequences=n_eval)
    figures["eval_sequences"] = min(n_eval, len(val_eval))
    if args.twin:
        twin = load_bundle(args.twin)
        figures["dense_val_loss"] = evaluate_loss(twin.model, val_eval, max_sequences=n_eval)
        figures["val_loss_ratio"] = figures["prism_val_loss"] / figures["dense_val_loss"]
        if not args.no_throughput:
            from quality import train_throughput

            batches = training_batches(corpus, bundle.tokenizer, seq_len, preset.batch_size, args.steps + 1)
            figures["prism_train_tokens_per_s"] = train_throughput(model, batches, preset.learning_rate)
            figures["dense_train_tokens_per_s"] = train_throughput(twin.model, batches, preset.learning_rate)
            figures["throughput_ratio"] = figures["prism_train_tokens_per_s"] / figures["dense_train_tokens_per_s"]

    f = figures
    print(f"{args.model}: P = {f['num_prototypes']}, k = {f['slices_top_k']}; {f['slices_positions']:,} positions")
    shares = " / ".join(f"{f[f'slices_top{n}_share']:.1%}" for n in (1, 4, 8))
    print(f"  largest 1 / 4 / 8 slices hold {shares} of the target's absolute slice mass")
    median, mean = f["slices_effective_k_median"], f["slices_effective_k_mean"]
    print(f"  effective k (80% of the mass): median {median:.0f}, mean {mean:.1f}")
    distinct_median = f["distinct_prototypes_per_window_median"]
    print(f"  distinct prototypes per {f['window_tokens']}-token window: median {distinct_median:.0f}")
    loss = f"  validation loss {figures['prism_val_loss']:.4f}"
    if "val_loss_ratio" in figures:
        loss += f" (dense twin {figures['dense_val_loss']:.4f}, ratio {figures['val_loss_ratio']:.3f})"
    print(loss)
    if "throughput_ratio" in figures:
        print(f"  training tokens/s PRISM / dense: {figures['throughput_ratio']:.3f}")
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
