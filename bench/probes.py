"""Probes of the sparsity-quality frontier (issue 16): short demo-size trainings, one protocol.

Every probe trains the demo preset's model (size, batch, learning rate, cosine schedule with
warm-up, seed 0) on the same corpus with the demo bundle's tokenizer for the same --steps,
changing only the PrismConfig fields of its row; the dense twin probe trains the same
backbone on the same tokens. Per probe: the training cross-entropy averaged over the last
--tail-steps steps (step-matched across probes), the validation loss (the preset's validation
sequences) and its ratio to the dense probe's, the sparsity measures of bench/sparsity.py
(:func:`core.model.sparsity.sparsity_figures` on the first 16 validation sequences), the
training tokens/s of the run (wall clock: noisy on shared cores) and the throughput ratio to
a dense model of the same size, timed on the same batches right after, alternating
PRISM / dense twice (bench/quality.py's measurement), so that both see the same load.

Probes run one after another; each one's figures are merged into bench/results/probes.json as
soon as it finishes, so a long queue can be split over several invocations (--only). Bundles
are written under --work and left there (--reuse measures a probe's bundle found there
instead of training it again). Run it niced when the cores are shared:

    nice -n 19 python bench/probes.py                         # every probe (~6 min each on 2 idle cores)
    nice -n 19 python bench/probes.py --only dense,baseline   # some of them
    python bench/probes.py --list
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _results  # noqa: E402


@dataclass(frozen=True)
class Probe:
    """One row of the probe table: PrismConfig fields that differ from the demo preset."""

    label: str
    overrides: dict = field(default_factory=dict)
    dense: bool = False


PROBES: dict[str, Probe] = {
    "dense": Probe("dense twin", dense=True),
    "baseline": Probe("P=1,024, k=64 (the demo preset until issue 16)"),
    "k16": Probe("P=1,024, k=16", {"prototype_top_k": 16}),
    "p4096-k16": Probe("P=4,096, k=16", {"num_prototypes": 4096, "prototype_top_k": 16}),
    "p4096-k8": Probe("P=4,096, k=8", {"num_prototypes": 4096, "prototype_top_k": 8}),
    "anneal-k16": Probe(
        "P=1,024, k annealed 64 -> 16 over the first half",
        {"prototype_top_k": 16, "prototype_top_k_start": 64, "top_k_anneal_fraction": 0.5},
    ),
    "concentration-k16": Probe(
        "P=1,024, k=16, weight-entropy loss 0.1",
        {"prototype_top_k": 16, "concentration_weight": 0.1},
    ),
    "power2-k16": Probe("P=1,024, k=16, weights softplus(s)^2", {"prototype_top_k": 16, "weight_power": 2.0}),
    "power3-k16": Probe("P=1,024, k=16, weights softplus(s)^3", {"prototype_top_k": 16, "weight_power": 3.0}),
    "power2-k12": Probe("P=1,024, k=12, weights softplus(s)^2", {"prototype_top_k": 12, "weight_power": 2.0}),
    "power2-k8": Probe("P=1,024, k=8, weights softplus(s)^2", {"prototype_top_k": 8, "weight_power": 2.0}),
    "anneal-power2-k16": Probe(
        "P=1,024, k annealed 64 -> 16, weights softplus(s)^2",
        {"prototype_top_k": 16, "prototype_top_k_start": 64, "weight_power": 2.0},
    ),
    "anneal-power2-k12": Probe(
        "P=1,024, k annealed 64 -> 12, weights softplus(s)^2 (the shipped point, annealed)",
        {"prototype_top_k": 12, "prototype_top_k_start": 64, "weight_power": 2.0},
    ),
    "anneal-concentration-k16": Probe(
        "P=1,024, k annealed 64 -> 16, weight-entropy loss 0.1",
        {"prototype_top_k": 16, "prototype_top_k_start": 64, "concentration_weight": 0.1},
    ),
    "p4096-anneal-k8": Probe(
        "P=4,096, k annealed 64 -> 8 over the first half",
        {"num_prototypes": 4096, "prototype_top_k": 8, "prototype_top_k_start": 64},
    ),
}
# The probes' common starting point: the demo preset as it was when the protocol was set (P = 1,024,
# k = 64, weights softplus(s)). The shipped preset has since moved to one of the probes (k = 12,
# p = 2); every probe pins these fields so that its row means what its label says.
PROTOCOL_BASE = {"num_prototypes": 1024, "prototype_top_k": 64, "weight_power": 1.0}
RESULTS_NAME = "probes"
PROBE_SEQUENCES = 16  # validation sequences probed for the slices, as bench/sparsity.py


def tail_mean(log_history: list[dict], key: str, steps: int, tail: int) -> float | None:
    """Mean of the logged ``key`` over log entries after step ``steps - tail``."""
    values = [e[key] for e in log_history if key in e and e.get("step", 0) > steps - tail]
    return statistics.fmean(values) if values else None


def run_probe(name: str, probe: Probe, args: argparse.Namespace) -> dict[str, float | int | str | None]:
    """Train one probe and measure it; figures keyed ``<name>_<figure>``."""
    from core import load_bundle, load_corpus
    from core.data.corpus import pack
    from core.model.sparsity import sparsity_figures
    from core.store import read_json
    from core.train.trainer import TrainOptions, train

    opts = TrainOptions(
        corpus=args.corpus,
        out=str(Path(args.work) / name),
        preset="demo",
        dense=probe.dense,
        max_steps=args.steps,
        tokenizer=args.tokenizer,
        seed=0,
        overwrite=True,
        progress=False,
        overrides={} if probe.dense else {**PROTOCOL_BASE, **probe.overrides},
    )
    done = Path(opts.out) / "training.json"
    record = read_json(done, "the probe's training record") if args.reuse and done.is_file() else train(opts)
    figures: dict[str, float | int | str | None] = {
        "label": probe.label,
        "overrides": json.dumps(probe.overrides, sort_keys=True),
        "train_ce": tail_mean(record["log_history"], "loss_ce", args.steps, args.tail_steps),
        "val_loss": record["val_loss"],
        "tokens_per_s": record["tokens_per_second"],
        "train_seconds": record["train_seconds"],
        "reseeded_prototypes": record["reseeded_prototypes"],
    }
    if not probe.dense:
        bundle = load_bundle(opts.out)
        corpus = load_corpus(args.corpus)
        val = pack(corpus.validation, bundle.tokenizer, bundle.model.config.sequence_length)
        ids = torch.tensor(val[: min(PROBE_SEQUENCES, len(val))]["input_ids"])  # (n, T)
        figures.update(sparsity_figures(bundle.model, ids))
        figures["throughput_ratio"] = throughput_ratio(bundle.model, corpus, bundle.tokenizer, args.throughput_steps)
    return {f"{name}_{key}": value for key, value in figures.items()}


def throughput_ratio(model, corpus, tokenizer, steps: int) -> float:
    """Training tokens/s of ``model`` over that of a dense model of its size, on the same batches.

    Timed PRISM, dense, PRISM, dense (``steps`` steps each after a warm-up step), so that
    a change of load on shared cores falls on both.
    """
    from quality import train_throughput
    from sparsity import training_batches

    from core.model.config import PrismConfig
    from core.model.modeling import PrismForCausalLM
    from core.train.presets import PRESETS

    preset = PRESETS["demo"]
    dense = PrismForCausalLM(PrismConfig(text_config=model.config.text_config.to_dict(), dense=True))
    batches = training_batches(corpus, tokenizer, preset.seq_len, preset.batch_size, steps + 1)
    speeds = {"prism": [], "dense": []}
    for _ in range(2):
        speeds["prism"].append(train_throughput(model, batches, preset.learning_rate))
        speeds["dense"].append(train_throughput(dense, batches, preset.learning_rate))
    return statistics.fmean(speeds["prism"]) / statistics.fmean(speeds["dense"])


def with_ratios(figures: dict) -> dict:
    """``figures`` with every probe's validation-loss ratio to the dense probe's, where both exist."""
    dense_loss = figures.get("dense_val_loss")
    for name in figures.get("probes", []):
        if dense_loss and name != "dense" and f"{name}_val_loss" in figures:
            figures[f"{name}_val_loss_ratio"] = figures[f"{name}_val_loss"] / dense_loss
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated probe names (default: all, in table order)")
    parser.add_argument("--list", action="store_true", help="print the probes and exit")
    parser.add_argument("--steps", type=int, default=200, help="training steps of every probe")
    parser.add_argument("--tail-steps", type=int, default=60, help="steps the training cross-entropy is averaged over")
    parser.add_argument("--corpus", default=str(REPO / "assets/corpus"))
    parser.add_argument("--tokenizer", default=str(REPO / "assets/models/demo"), help="bundle whose tokenizer to use")
    parser.add_argument("--work", default="/tmp/prism-probes", help="folder for the probes' bundles")
    parser.add_argument("--reuse", action="store_true", help="measure a probe's bundle already under --work")
    parser.add_argument("--throughput-steps", type=int, default=3, help="timed steps per throughput measurement")
    _results.add_arguments(parser)
    args = parser.parse_args()
    if args.list:
        for name, probe in PROBES.items():
            print(f"{name:26s} {probe.label}")
        return
    names = args.only.split(",") if args.only else list(PROBES)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        sys.exit(f"unknown probe(s) {', '.join(unknown)}; see --list")

    path = _results.results_path(__file__, args.results_tag)
    figures: dict = json.loads(path.read_text())["figures"] if path.is_file() else {}
    if figures.get("steps", args.steps) != args.steps:
        sys.exit(f"{path} holds {figures['steps']}-step probes; use --steps {figures['steps']} or --results-tag")
    figures.update(steps=args.steps, tail_steps=args.tail_steps)
    for name in names:
        print(f"probe {name}: {PROBES[name].label}", flush=True)
        figures.update(run_probe(name, PROBES[name], args))
        figures["probes"] = [n for n in PROBES if f"{n}_val_loss" in figures]
        figures = with_ratios(figures)
        if not args.no_results:
            _results.write(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, __file__, args.results_tag
            )
        print(json.dumps({k: v for k, v in figures.items() if k.startswith(f"{name}_")}), flush=True)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
