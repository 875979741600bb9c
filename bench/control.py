"""Controllers and suppression, measured on a bundle (default: the demo bundle).

For each task in assets/tasks/: held-out accuracy before and after calibration and the number
of gains changed. For each behaviour in assets/behaviours/: prototypes chosen by contrast (in
rounds: each round looks for the prototypes that take over once the previous ones are
suppressed), the behaviour rate in sampled continuations (fixed seeds) before and after
suppression, validation perplexity on the other corpus sources (and on the behaviour's own
source) before and after, and the mean KL(suppressed || original) of next-token distributions
over neutral text.

    python bench/control.py                     # every task and behaviour (a few minutes on 2 cores)
    python bench/control.py --behaviours "" --results-tag tasks
    python bench/control.py --tasks "" --max-new-tokens 24 --ppl-tokens 8192 --results-tag behaviours
    python bench/control.py --tasks "" --max-new-tokens 24 --ppl-tokens 8192 --method cluster --results-tag cluster
    python bench/control.py --tasks "" --max-new-tokens 24 --ppl-tokens 8192 --contrast-texts 200 --results-tag more
    python bench/control.py --quick --no-results  # fewer items, samples and tokens (a smoke run)

The last line is one JSON object with every figure (flat keys), also written to
bench/results/control[.TAG].json (bench/_results.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import _results  # noqa: E402

from core import Bundle, Controls, calibrate, load_behaviour, load_bundle, load_task, target_by_contrast  # noqa: E402
from core.control.controls import control_kwargs  # noqa: E402
from core.data.demo.tasks import read_validation  # noqa: E402

if TYPE_CHECKING:
    from core.control.formats import Behaviour


def sample_rate(
    bundle: Bundle,
    behaviour: Behaviour,
    controls: Controls | None,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> tuple[float, list[str]]:
    """Fraction of sampled continuations of the behaviour's prompts that show it."""
    model, tok = bundle.model, bundle.tokenizer
    kwargs = control_kwargs(controls, model, bundle.fingerprint, "cpu")
    hits, texts = 0, []
    for n, prompt in enumerate(behaviour.prompts):
        # Rows repeated rather than num_return_sequences, which would also repeat the (P,) controls.
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]]).repeat(samples, 1)
        torch.manual_seed(seed + n)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_k=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.eos_token_id,
                **kwargs,
            )
        for row in out[:, ids.shape[1] :].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            text = tok.decode(row)
            texts.append(text)
            hits += int(behaviour.detect(text))
    return hits / max(1, len(texts)), texts


def validation_tokens(bundle: Bundle, corpus: Path, sources: list[str], max_tokens: int) -> torch.Tensor:
    """(S, T) sequences of validation documents of ``sources``, EOS-separated, about
    ``max_tokens`` in all, taken in turn from each source."""
    validation = read_validation(corpus)
    tok = bundle.tokenizer
    seq_len = min(256, bundle.model.config.get_text_config().max_position_embeddings)
    per_source = max_tokens // max(1, len(sources))
    stream: list[int] = []
    for source in sources:
        taken = 0
        for doc in validation.get(source, []):
            ids = tok(doc["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            stream.extend(ids)
            taken += len(ids)
            if taken >= per_source:
                break
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def perplexity(bundle: Bundle, sequences: torch.Tensor, controls: Controls | None, batch: int = 8) -> float:
    kwargs = control_kwargs(controls, bundle.model, bundle.fingerprint, "cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch):
            ids = sequences[start : start + batch]
            logits = bundle.model(ids, **kwargs).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def mean_kl(bundle: Bundle, texts: list[str], controls: Controls) -> float:
    """Mean over positions of KL(suppressed || original) next-token distributions."""
    kwargs = control_kwargs(controls, bundle.model, bundle.fingerprint, "cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([bundle.tokenizer(text, add_special_tokens=False)["input_ids"][:256]])
            original = bundle.model(ids).logits[0].float().log_softmax(-1)
            steered = bundle.model(ids, **kwargs).logits[0].float().log_softmax(-1)
            total += float((steered.exp() * (steered - original)).sum())
            count += ids.shape[1]
    return total / count


def key_neighbours(bundle: Bundle, seeds: list[int], budget: int) -> list[int]:
    """``seeds`` and then, round-robin over the seeds, each one's nearest prototypes by the
    cosine of their keys (the space the atlas maps), until ``budget`` prototypes in all."""
    keys = F.normalize(bundle.model.prototypes.keys.detach().float(), dim=-1)
    similarity = keys[seeds] @ keys.T  # (seeds, P)
    order = similarity.argsort(dim=1, descending=True).tolist()
    chosen, seen = list(seeds), set(seeds)
    depth = 1
    while len(chosen) < budget and depth < keys.shape[0]:
        for row in order:
            if len(chosen) < budget and row[depth] not in seen:
                chosen.append(row[depth])
                seen.add(row[depth])
        depth += 1
    return chosen


def corpus_contrast(corpus: Path, behaviour: Behaviour, count: int, chars: int = 200) -> tuple[list[str], list[str]]:
    """``count`` more contrast texts from the training split: contexts of the behaviour's source
    that end just before a match of its pattern, and as many texts of the other sources (cut to
    ``chars``), each from its own document, in corpus order."""
    import re

    from core.data.corpus import load_corpus

    pattern = re.compile(behaviour.pattern, re.IGNORECASE)
    train = load_corpus(corpus).train
    behaving, neutral = [], []
    for text, source in zip(train["text"], train["source"], strict=True):
        if source == behaviour.source and len(behaving) < count:
            match = pattern.search(text, 40)
            if match:
                behaving.append(text[max(0, match.start() - chars) : match.start()])
        elif source != behaviour.source and len(neutral) < count:
            neutral.append(text[:chars])
        if len(behaving) >= count and len(neutral) >= count:
            break
    return behaving, neutral


def suppression_rounds(
    bundle: Bundle,
    behaviour: Behaviour,
    rounds: int,
    per_round: int,
    method: str,
    extra: tuple[list[str], list[str]] = ([], []),
) -> Controls:
    """Suppress by contrast, ``per_round`` prototypes a round, each round under the last's suppression.

    method "weight": mixture weights at the last position of texts cut before the behaviour
    vs texts cut before another word, with the neutral prompts as background. method "slice":
    slices towards the behaviour's own tokens over every position of the behaviour texts vs
    the neutral prompts (other sources). method "cluster": one round of ``per_round`` by slice,
    then each chosen prototype's nearest prototypes by key (a cluster around each), up to
    ``rounds x per_round`` in all. ``extra``: more (behaviour, neutral) contrast texts.
    """
    controls = Controls(model_fingerprint=bundle.fingerprint, note=f"suppression of {behaviour.name}")
    behaving = [*behaviour.contrast_behaviour, *extra[0]]
    neutral = [*behaviour.neutral_prompts, *extra[1]]
    if method == "cluster":
        seeds = target_by_contrast(
            bundle, behaving, neutral, per_round, positions="all", token_ids=behaviour.token_ids(bundle.tokenizer)
        )
        controls.suppressed = sorted(key_neighbours(bundle, [t.id for t in seeds], rounds * per_round))
        return controls
    for _ in range(rounds):
        current = controls if controls.suppressed else None
        if method == "slice":
            targets = target_by_contrast(
                bundle,
                behaving,
                neutral,
                per_round,
                positions="all",
                controls=current,
                token_ids=behaviour.token_ids(bundle.tokenizer),
            )
        else:
            targets = target_by_contrast(
                bundle,
                behaving,
                [*behaviour.contrast_neutral, *extra[1]],
                per_round,
                controls=current,
                background=behaviour.neutral_prompts,
            )
        if not targets:
            break
        controls.suppressed = sorted(set(controls.suppressed) | {t.id for t in targets})
    return controls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "models" / "demo"))
    parser.add_argument("--corpus", default=str(REPO / "assets" / "corpus"))
    parser.add_argument("--tasks", default="wordnet_pos,shakespeare_pronoun,debian_section")
    parser.add_argument("--behaviours", default="archaic,package_boilerplate")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--penalty", type=float, default=0.01)
    parser.add_argument("--dev", type=float, default=0.0, help="calibration items kept for early stopping")
    parser.add_argument("--rounds", type=int, default=4, help="contrast rounds per behaviour")
    parser.add_argument("--per-round", type=int, default=8, help="prototypes suppressed per round")
    parser.add_argument(
        "--method",
        default="slice",
        choices=["slice", "weight", "cluster"],
        help="contrast of slices or weights, or a cluster by key around each prototype of one slice round",
    )
    parser.add_argument(
        "--contrast-texts",
        type=int,
        default=0,
        help="more contrast texts from the training split: contexts before a match, and other sources",
    )
    parser.add_argument("--samples", type=int, default=2, help="sampled continuations per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="validation tokens per perplexity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, samples and tokens")
    _results.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.samples, args.ppl_tokens, args.max_new_tokens = 10, 1, 2048, 12
    torch.set_grad_enabled(True)
    bundle = load_bundle(args.model)
    figures: dict[str, float] = {}

    print(f"{'task':<22}{'items':>7}{'before':>9}{'after':>9}{'points':>8}{'changed':>9}{'seconds':>9}")
    for name in filter(None, args.tasks.split(",")):
        items = load_task(REPO / "assets" / "tasks" / f"{name}.jsonl")
        if args.quick:
            items = items[:60]
        t0 = time.time()
        result = calibrate(bundle, items, steps=args.steps, penalty=args.penalty, dev=args.dev, seed=args.seed)
        seconds = time.time() - t0
        points = 100 * (result.after - result.before)
        print(
            f"{name:<22}{len(items):>7}{100 * result.before:>8.1f}%{100 * result.after:>8.1f}%{points:>+8.1f}"
            f"{result.changed:>9}{seconds:>9.0f}",
            flush=True,
        )
        figures.update(
            {
                f"{name}_items": len(items),
                f"{name}_before": round(result.before, 4),
                f"{name}_after": round(result.after, 4),
                f"{name}_points": round(points, 2),
                f"{name}_changed": result.changed,
                f"{name}_holdout_items": result.holdout_items,
                f"{name}_s": round(seconds, 1),
            }
        )

    print()
    print(
        f"{'behaviour':<20}{'suppr.':>7}{'rate before':>12}{'after':>8}{'drop':>7}{'ppl other':>18}{'change':>8}"
        f"{'ppl own':>18}{'KL neutral':>11}"
    )
    validation_sources = sorted(read_validation(args.corpus))
    for name in filter(None, args.behaviours.split(",")):
        behaviour = load_behaviour(REPO / "assets" / "behaviours" / f"{name}.json")
        t0 = time.time()
        extra = corpus_contrast(Path(args.corpus), behaviour, args.contrast_texts) if args.contrast_texts else ([], [])
        controls = suppression_rounds(bundle, behaviour, args.rounds, args.per_round, args.method, extra)
        rate_before, _ = sample_rate(
            bundle, behaviour, None, args.samples, args.max_new_tokens, args.temperature, args.seed
        )
        rate_after, _ = sample_rate(
            bundle, behaviour, controls, args.samples, args.max_new_tokens, args.temperature, args.seed
        )
        others = validation_tokens(
            bundle, Path(args.corpus), [s for s in validation_sources if s != behaviour.source], args.ppl_tokens
        )
        own = validation_tokens(bundle, Path(args.corpus), [behaviour.source], args.ppl_tokens // 4)
        ppl_other = (perplexity(bundle, others, None), perplexity(bundle, others, controls))
        ppl_own = (perplexity(bundle, own, None), perplexity(bundle, own, controls))
        kl = mean_kl(bundle, list(behaviour.neutral_prompts), controls)
        drop = 1 - rate_after / rate_before if rate_before > 0 else float("nan")
        change = ppl_other[1] / ppl_other[0] - 1
        print(
            f"{name:<20}{len(controls.suppressed):>7}{100 * rate_before:>11.1f}%{100 * rate_after:>7.1f}%"
            f"{100 * drop:>6.0f}%{ppl_other[0]:>9.2f}->{ppl_other[1]:<7.2f}{100 * change:>+7.2f}%"
            f"{ppl_own[0]:>9.2f}->{ppl_own[1]:<7.2f}{kl:>11.4f}",
            flush=True,
        )
        figures.update(
            {
                f"{name}_suppressed": len(controls.suppressed),
                f"{name}_rate_before": round(rate_before, 4),
                f"{name}_rate_after": round(rate_after, 4),
                f"{name}_rate_drop": round(drop, 4),
                f"{name}_continuations": len(behaviour.prompts) * args.samples,
                f"{name}_ppl_other_before": round(ppl_other[0], 3),
                f"{name}_ppl_other_after": round(ppl_other[1], 3),
                f"{name}_ppl_other_change": round(change, 5),
                f"{name}_ppl_other_tokens": int(others.numel()),
                f"{name}_ppl_own_before": round(ppl_own[0], 3),
                f"{name}_ppl_own_after": round(ppl_own[1], 3),
                f"{name}_kl_neutral": round(kl, 5),
                f"{name}_s": round(time.time() - t0, 1),
            }
        )
    figures.update(
        steps=args.steps,
        penalty=args.penalty,
        rounds=args.rounds,
        per_round=args.per_round,
        method=args.method,
        contrast_texts=args.contrast_texts,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        ppl_tokens=args.ppl_tokens,
    )
    _results.emit(figures, args, __file__)


if __name__ == "__main__":
    main()
