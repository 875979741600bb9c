"""The GPU check: the whole pipeline on a CUDA device in bfloat16, with its slices checked and its
speed against the CPU.

On a CUDA machine it trains the tiny preset in bfloat16 (autocast) on a slice of the demo
corpus, builds the index and the influence factors on the GPU, loads the bundle there in
bfloat16, attributes a completion with the neighbourhood and influence methods, generates with
a controller (a gain and a suppression), checks that every reported slice set sums to its logit
(within 1e-4 of the slices' magnitudes) and that the bfloat16 logits stay within 5% of
(1 + |logit|) of the float32 CPU model's, and measures tokens per second of training and of
greedy generation on the GPU (bfloat16) and on the CPU (float32). Each step is a named check;
one that raises is recorded as failed with its one-line error, and the others still run.

Prints one line per check, then the figures as its last line, one JSON object (also written to
bench/results/gpu_check.json unless --no-results). Exit status: 0 when every check passed, 1
when one failed, 2 when there is no CUDA device: then it prints one line saying so and checks
nothing (`--device cpu` runs the same steps on the CPU: a dry run of this script, not a GPU
check).

    python bench/gpu_check.py                 # about a minute on an H100
    python bench/gpu_check.py --device cpu --no-results --steps 20   # dry run, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _results  # noqa: E402

PROMPT, COMPLETION = "ROMEO. But soft, what light", " through yonder window breaks"
SLICE_TOL = 1e-4  # |sum of slices - logit| <= SLICE_TOL * sum |slices| (docs/model.md)
BF16_TOL = 0.05  # |logit(bf16) - logit(float32)| <= BF16_TOL * (1 + |logit(float32)|)


def demo_slice(path: Path, per_source: int) -> Path:
    """The first ``per_source`` training documents of each demo source, as one JSONL file."""
    taken: dict[str, int] = {}
    with (
        gzip.open(REPO / "assets" / "corpus" / "train.jsonl.gz", "rt", encoding="utf-8") as src,
        open(path, "w", encoding="utf-8") as out,
    ):
        for line in src:
            row = json.loads(line)
            if taken.get(row["source"], 0) < per_source:
                taken[row["source"]] = taken.get(row["source"], 0) + 1
                out.write(json.dumps({**row, "text": row["text"][:1500]}) + "\n")
    return path


def slice_error(tokens) -> float:
    """The largest |sum of slices - logit| / sum |slices| over tokens and their alternatives."""
    worst = 0.0
    for token in tokens:
        pairs = [([p.slice for p in token.prototypes], token.logit)]
        pairs += [(a.slices, a.logit) for a in token.alternatives]
        for slices, logit in pairs:
            worst = max(worst, abs(sum(slices) - logit) / max(sum(abs(s) for s in slices), 1e-12))
    return worst


def generation_speed(bundle, tokens: int, controls=None) -> float:
    """Greedy tokens per second (after one warm-up call), generation stopped only by ``tokens``."""
    import torch

    from core.generation import GREEDY, generate_text

    generate_text(bundle, PROMPT, max_new_tokens=4, controls=controls, settings=GREEDY)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = generate_text(bundle, PROMPT, max_new_tokens=tokens, controls=controls, settings=GREEDY)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    return len(result.new_ids) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the tiny preset")
    parser.add_argument("--per-source", type=int, default=80, help="demo documents per source in the corpus")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated for the speed figures")
    _results.add_arguments(parser)
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False): nothing was checked")
        return 2

    from core import Controls, attribute, load_bundle, load_index
    from core.attribution.influence import InfluenceArguments, build_influence
    from core.index.build import build_index
    from core.train.trainer import TrainOptions, train

    device = args.device
    dtype = "bfloat16"  # on the CPU too (a dry run): CPU autocast and bfloat16 loading exist there as well
    checks: dict[str, bool] = {}
    errors: dict[str, str] = {}
    figures: dict[str, object] = {"device": device, "dtype": dtype, "steps": args.steps}

    def check(name: str, step) -> object:
        try:
            value = step()
        except Exception as err:  # a failed step is a result, not the end of the check
            checks[name] = False
            errors[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            print(f"FAIL {name}: {errors[name]}")
            traceback.print_exc(file=sys.stderr)
            return None
        checks[name] = value is not False
        print(f"{'ok  ' if checks[name] else 'FAIL'} {name}")
        return value

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        tmp = Path(tmp)
        corpus = demo_slice(tmp / "corpus.jsonl", args.per_source)
        out = tmp / "bundle"
        opts = TrainOptions(
            corpus=str(corpus), out=str(out), preset="tiny", max_steps=args.steps, device=device, dtype=dtype
        )
        record = check("train", lambda: train(opts))
        if record is None:
            print(json.dumps({**figures, "checks": checks, "errors": errors, "ok": False}))
            return 1
        figures["train_tokens_per_second"] = {f"{device}_{dtype}": round(record["tokens_per_second"], 1)}
        figures["val_loss"] = round(record["val_loss"], 4)
        cpu_opts = TrainOptions(
            corpus=str(corpus), out=str(tmp / "cpu"), preset="tiny", max_steps=20, device="cpu", dtype="float32"
        )
        cpu_record = check("train_cpu_reference", lambda: train(cpu_opts))
        if cpu_record is not None:
            figures["train_tokens_per_second"]["cpu_float32"] = round(cpu_record["tokens_per_second"], 1)

        check("index", lambda: build_index(out, corpus, device=device, model_dtype=dtype, show_progress=False))
        check(
            "influence",
            lambda: build_influence(out, corpus, InfluenceArguments(), device=device, show_progress=False),
        )

        bundle = load_bundle(out, device=device, dtype=dtype)
        reference = load_bundle(out, device="cpu", dtype="float32")
        index = load_index(out)
        controls = Controls(gains={1: 1.5}, suppressed=[2], model_fingerprint=bundle.fingerprint)

        def attributed(method: str) -> bool:
            result = attribute(bundle, index, PROMPT, COMPLETION, method=method, controls=controls)
            figures[f"slice_error_{method}"] = slice_error(result.decomposition.tokens)
            return figures[f"slice_error_{method}"] <= SLICE_TOL and bool(result.examples)

        check("attribute_neighbourhood", lambda: attributed("neighbourhood"))
        check("attribute_influence", lambda: attributed("influence"))

        def logits_near_float32() -> bool:
            from core.attribution.decompose import decompose

            low = decompose(bundle, prompt=PROMPT, completion=COMPLETION)
            full = decompose(reference, prompt=PROMPT, completion=COMPLETION)
            drift = max(
                abs(a.logit - b.logit) / (1 + abs(b.logit)) for a, b in zip(low.tokens, full.tokens, strict=True)
            )
            figures["logit_drift_vs_float32"] = drift
            return drift <= BF16_TOL

        check("logits_near_float32", logits_near_float32)

        def controlled_generation() -> bool:
            from core.generation import generate_text

            plain = generate_text(bundle, PROMPT, max_new_tokens=16)
            steered = generate_text(bundle, PROMPT, max_new_tokens=16, controls=controls)
            return bool(plain.new_ids) and bool(steered.new_ids)

        check("generate_with_controls", controlled_generation)
        speed = {
            f"{device}_{dtype}": check("speed_device", lambda: generation_speed(bundle, args.new_tokens, controls)),
            "cpu_float32": check("speed_cpu", lambda: generation_speed(reference, args.new_tokens, controls)),
        }
        figures["generate_tokens_per_second"] = {k: round(v, 1) for k, v in speed.items() if v is not None}

    figures.update(checks=checks, errors=errors, ok=all(checks.values()))
    if device == "cuda":
        figures["gpu"] = torch.cuda.get_device_name()
    if not args.no_results and device == "cuda":
        _results.write(figures, __file__, args.results_tag, device=device)
    print(json.dumps(figures))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
