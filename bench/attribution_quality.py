"""Attribution quality: planted canaries (recall@10) and a linear-datamodeling score (LDS).

(a) Canaries: a slice of the demo corpus plus --facts made-up facts, --copies documents each;
    a tiny PRISM model and its dense twin trained on it (same tokens, schedule, seed). For a
    prompt that recalls each fact, recall@10 = share of the fact's own documents among the
    top 10 of each method, averaged over facts.
(b) LDS: a small corpus; --halves random halves (by document), a PRISM model and a dense twin
    retrained on each; the actual summed completion loss of held-out queries under each
    retrained model against the prediction -sum_{doc in half} score(doc) from the full-data
    model. Spearman over halves per query, mean over queries. One seed per half (say so).

Methods: PRISM neighbourhood, PRISM influence (full rank, every document), EK-FAC on the
dense twin (Kronfluence). Prints a table (method, recall@10, LDS, latency), then one JSON line,
also written to bench/results/attribution_quality.json (bench/_results.py).

    nice -n 5 python bench/attribution_quality.py --halves 16
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import _results  # noqa: E402

FACTS = [
    ("The capital of Zorbania is", " Quelmiry, a city of glass towers."),
    ("Professor Dravik Ulness invented the", " humming lantern of Oskavel."),
    ("The river Tamsoline flows into the", " Sea of Brindleward each spring."),
    ("Captain Ferrowick sailed the", " Marigold Thunder to the isle of Pemberlock."),
    ("The Vantarian festival honours the", " silver heron of Kaldemoor."),
]


def demo_slice(per_source: int, max_chars: int, skip: int = 0) -> list[dict]:
    taken: dict[str, int] = {}
    rows = []
    with gzip.open(REPO / "assets/corpus/train.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            count = taken.get(row["source"], 0)
            taken[row["source"]] = count + 1
            if skip <= count < skip + per_source:
                rows.append({**row, "text": row["text"][:max_chars]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def train_pair(corpus: Path, out: Path, steps: int, seed: int = 0) -> tuple[Path, Path]:
    """A tiny PRISM model and its dense twin on the same tokens (the twin reuses the tokenizer)."""
    from core.train.trainer import TrainOptions, train

    prism, dense = out / "prism", out / "dense"
    train(TrainOptions(corpus=str(corpus), out=str(prism), preset="tiny", max_steps=steps, seed=seed, progress=False))
    train(
        TrainOptions(
            corpus=str(corpus),
            out=str(dense),
            preset="tiny",
            max_steps=steps,
            seed=seed,
            dense=True,
            tokenizer=str(prism),
            progress=False,
        )
    )
    return prism, dense


class Methods:
    """Scores of every training document for a query, per method, from the full-data models."""

    def __init__(self, prism_dir: Path, dense_dir: Path, corpus: Path, threads: int):
        import torch

        from core.attribution.influence import InfluenceArguments, build_influence, load_influence
        from core.bundle import load_bundle
        from core.data.corpus import load_corpus
        from core.index.build import build_index
        from core.index.format import load_index

        torch.set_num_threads(threads)
        build_index(prism_dir, corpus, show_progress=False)
        build_influence(
            prism_dir,
            corpus,
            InfluenceArguments(rank=None, top_documents=None, curvature_tokens=None),
            show_progress=False,
        )
        self.bundle, self.index, self.influence = (
            load_bundle(prism_dir),
            load_index(prism_dir),
            load_influence(prism_dir),
        )
        self.dense = load_bundle(dense_dir)
        self.train = load_corpus(corpus).train
        self.doc_ids = list(self.train["id"])
        self.latency: dict[str, list[float]] = {"neighbourhood": [], "influence": [], "ekfac": []}

    def prism(self, method: str, prompt: str, completion: str) -> dict[str, float]:
        from core.attribution.engine import attribute

        t = time.perf_counter()
        result = attribute(
            self.bundle, self.index, prompt, completion, top=10**6, method=method, influence=self.influence
        )
        self.latency[method].append(time.perf_counter() - t)
        # ordered as the method ranks them (influence: by relative score), scored by "score"
        return {e.doc_id: e.score for e in result.examples}

    def ekfac(self, queries: list[tuple[str, str]]) -> list[dict[str, float]]:
        from core.attribution.baselines import ekfac_scores, padded_examples, query_examples

        tok = self.dense.tokenizer
        docs = [tok(t, add_special_tokens=False)["input_ids"] for t in self.train["text"]]
        train = padded_examples(docs, 64, tok.eos_token_id)
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in queries]
        completions = [tok(c, add_special_tokens=False)["input_ids"] for _, c in queries]
        result = ekfac_scores(
            self.dense.model,
            train,
            query_examples(prompts, completions, tok.eos_token_id),
            train_batch_size=16,
            query_batch_size=len(queries),
        )
        self.latency["ekfac"].append(result.score_seconds / len(queries))
        self.ekfac_fit_seconds = result.fit_seconds
        return [dict(zip(self.doc_ids, row.tolist(), strict=True)) for row in result.scores]


def canaries(args, work: Path) -> tuple[dict, dict]:
    rows = demo_slice(args.per_source, 600)
    for f, (prompt, completion) in enumerate(FACTS[: args.facts]):
        rows += [{"id": f"canary-{f}-{c}", "text": prompt + completion, "source": "canary"} for c in range(args.copies)]
    random.Random(0).shuffle(rows)
    corpus = write_jsonl(work / "canary.jsonl", rows)
    prism, dense = train_pair(corpus, work / "canary", args.steps)
    methods = Methods(prism, dense, corpus, args.threads)
    queries = FACTS[: args.facts]
    per_method: dict[str, list[float]] = {"neighbourhood": [], "influence": [], "ekfac": []}
    ekfac = methods.ekfac(queries)
    for f, (prompt, completion) in enumerate(queries):
        for method in ("neighbourhood", "influence"):
            scores = methods.prism(method, prompt, completion)
            per_method[method].append(recall_at_10(scores, f, args.copies, ranked=True))
        per_method["ekfac"].append(recall_at_10(ekfac[f], f, args.copies))
    latency = {m: 1000 * statistics.median(v) for m, v in methods.latency.items()}
    return {m: statistics.mean(v) for m, v in per_method.items()}, latency


def recall_at_10(scores: dict[str, float], fact: int, copies: int, ranked: bool = False) -> float:
    """Share of the fact's copies in the top 10: by decreasing score, or (``ranked``) in the
    order of ``scores`` itself (a PRISM method's own ranking)."""
    top = list(scores)[:10] if ranked else sorted(scores, key=lambda d: -scores[d])[:10]
    return sum(d.startswith(f"canary-{fact}-") for d in top) / copies


def lds(args, work: Path) -> dict:
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from core.bundle import load_bundle
    from core.data.corpus import load_corpus

    rows = demo_slice(args.lds_per_source, 400)
    held = demo_slice(2, 400, skip=args.lds_per_source)
    corpus = write_jsonl(work / "lds.jsonl", rows)
    prism, dense = train_pair(corpus, work / "lds-full", args.lds_steps)
    methods = Methods(prism, dense, corpus, args.threads)
    tok = methods.bundle.tokenizer
    queries = []
    for row in held:
        ids = tok(row["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= 24:
            queries.append((tok.decode(ids[:16]), tok.decode(ids[16:24])))
    queries = queries[: args.lds_queries]
    predicted = {"neighbourhood": [], "influence": [], "ekfac": methods.ekfac(queries)}
    for prompt, completion in queries:
        for method in ("neighbourhood", "influence"):
            predicted[method].append(methods.prism(method, prompt, completion))
    # Halves of the full model's training split, written with the same validation documents as
    # explicit split files, so that each retrained model sees exactly its half.
    doc_ids = methods.doc_ids
    train_rows = [dict(r) for r in methods.train]
    validation_rows = [dict(r) for r in load_corpus(corpus).validation]
    rng = np.random.default_rng(0)
    masks = [rng.permutation(len(doc_ids)) < len(doc_ids) // 2 for _ in range(args.halves)]
    actual = {"prism": np.zeros((args.halves, len(queries))), "dense": np.zeros((args.halves, len(queries)))}
    for h, mask in enumerate(masks):
        half = work / f"half-{h}-corpus"
        half.mkdir()
        write_jsonl(half / "train.jsonl", [r for r, keep in zip(train_rows, mask, strict=True) if keep])
        write_jsonl(half / "validation.jsonl", validation_rows)
        out = work / f"half-{h}"
        from core.train.trainer import TrainOptions, train

        for kind, dense_flag in (("prism", False), ("dense", True)):
            train(
                TrainOptions(
                    corpus=str(half),
                    out=str(out / kind),
                    preset="tiny",
                    max_steps=args.lds_steps,
                    dense=dense_flag,
                    tokenizer=str(prism),
                    progress=False,
                )
            )
            model = load_bundle(out / kind).model
            for q, (prompt, completion) in enumerate(queries):
                p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                c_ids = tok(completion, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p_ids + c_ids])
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, len(p_ids) - 1 : -1]
                actual[kind][h, q] = float(
                    torch.nn.functional.cross_entropy(logits, ids[0, len(p_ids) :], reduction="sum")
                )
        shutil.rmtree(out, ignore_errors=True)
        print(f"  LDS half {h + 1}/{args.halves} retrained", flush=True)
    result = {}
    for method, per_query in predicted.items():
        kind = "dense" if method == "ekfac" else "prism"
        rhos = []
        for q, scores in enumerate(per_query):
            vector = np.array([scores.get(d, 0.0) for d in doc_ids])
            prediction = np.array([-vector[mask].sum() for mask in masks])
            rho = spearmanr(prediction, actual[kind][:, q]).statistic
            rhos.append(0.0 if np.isnan(rho) else rho)
        result[method] = float(np.mean(rhos))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-source", type=int, default=40, help="demo documents per source (canaries)")
    parser.add_argument("--facts", type=int, default=5)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the canary models")
    parser.add_argument("--halves", type=int, default=16, help="random halves retrained for the LDS")
    parser.add_argument("--lds-per-source", type=int, default=16)
    parser.add_argument("--lds-steps", type=int, default=100)
    parser.add_argument("--lds-queries", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-lds", action="store_true")
    _results.add_arguments(parser)
    args = parser.parse_args()
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="attribution-quality-"))
    try:
        recall, latency = canaries(args, work)
        print(
            f"[{time.time() - t0:.0f} s] canaries done: recall@10 {json.dumps(recall)}, ms {json.dumps(latency)}",
            flush=True,
        )
        scores = {} if args.skip_lds else lds(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = {"neighbourhood": "PRISM neighbourhood", "influence": "PRISM influence", "ekfac": "EK-FAC (Kronfluence)"}
    print(f"\n{'method':<22}{'recall@10':>10}{'LDS':>8}{'ms/query':>10}")
    for m, name in names.items():
        lds_text = f"{scores[m]:>8.3f}" if m in scores else f"{'-':>8}"
        print(f"{name:<22}{recall[m]:>10.2f}{lds_text}{latency[m]:>10.1f}")
    lds_note = "LDS not run (--skip-lds)" if args.skip_lds else f"LDS over {args.halves} halves, one seed each"
    print(f"({args.facts} facts x {args.copies} copies, {args.steps} training steps; {lds_note})")
    figures = {f"{m}_recall_at_10": recall[m] for m in names}
    figures.update({f"{m}_lds": scores[m] for m in scores})
    figures.update({f"{m}_ms": latency[m] for m in names})
    figures.update(
        halves=0 if args.skip_lds else args.halves,
        lds_queries=args.lds_queries,
        facts=args.facts,
        copies=args.copies,
        steps=args.steps,
        wall_s=time.time() - t0,
    )
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
