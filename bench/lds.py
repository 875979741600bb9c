"""Attribution fidelity on equal terms: recall@10, LDS with paired standard errors, the top-k
counterfactual and the costs of every method, on one corpus and one tiny PRISM model.

Corpus: --per-source short documents of each demo source (cut to --max-chars) plus --facts
made-up facts in --copies documents each (bench/canary_corpus.py's facts). A tiny PRISM model
(the project's trainer, preset tiny, --lds-steps: one epoch by default) and with --twin its
dense twin (same tokens, schedule and seed). Every method scores the same D training documents,
whole (the post-hoc baselines sum the windows of a document; PRISM influence stores every
position):

- PRISM influence (``attribute(method="influence")``: its score is the predicted loss change;
  recall by its default relative ranking, and by loss) and PRISM neighbourhood;
- EK-FAC (Kronfluence) on the PRISM model itself, its head as nn.Linear modules
  (core.attribution.baselines.linear_head_copy); with --twin also on the dense twin, scored
  against dense retrains;
- LoGra (dattri) on the PRISM model's linear copy; BM25 (bm25s, query = prompt + completion);
  random scores (the harness check).

One damping rule: 0.1 x the mean eigenvalue of each curvature block (a prototype block, a
Kronfluence module, a LoGra layer's projected Fisher).

recall@10: share of a fact's copies among a method's top 10, for the verbatim and the
paraphrased prompt. LDS: --halves random halves of the documents x --seeds training seeds,
each retrained with the same recipe (one epoch of its data: steps in proportion to its tokens);
per held-out query (prompt and completion cut from a held-out document), the Spearman
correlation over halves between -sum_{doc in half} score(doc) and the actual summed completion
loss (averaged over the seeds); mean and standard error over queries, and the paired difference
of each method from PRISM influence. Counterfactual: for --cf-queries of those queries, the
--cf-k documents a method scores highest removed and the model retrained (each seed), against
k random documents removed: the mean loss increase over queries, with its standard error.

Retrains are cached in --workdir (one JSON file each), so a rerun resumes. Torch runs one
thread by default: on 2 shared, loaded cores, 2 threads made a tiny training step 14x slower.

    nice -n 5 python bench/lds.py --halves 4 --seeds 1 --cf-queries 2 --no-results   # smoke run
    nice -n 5 python bench/lds.py --twin                                            # 32 halves x 2 seeds
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import _lds_methods as methods  # noqa: E402
import _results  # noqa: E402
from _lds_methods import Query, Scored  # noqa: E402

T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {message}", flush=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name, then rename (an interrupted run leaves no half file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_rows(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


# ----------------------------------------------------------------------------- corpus, models, queries


def build_corpus(args, work: Path) -> tuple[list[dict], list[dict], list[dict], list]:
    """(training rows, validation rows, held-out rows for the queries, facts); writes work/corpus/."""
    from attribution_quality import demo_slice
    from canary_corpus import make_facts

    rows = demo_slice(args.per_source, args.max_chars)
    held = demo_slice(args.held_out_per_source, args.max_chars, skip=args.per_source)
    words = {w.lower() for r in rows + held for w in re.findall(r"[A-Za-z]+", r["text"])}
    facts, planted = make_facts(args.facts, args.copies, seed=0, forbidden=words)
    train_rows = rows + planted
    random.Random(0).shuffle(train_rows)
    validation = held[::3]  # the trainer's end-of-training evaluation only
    query_rows = [r for i, r in enumerate(held) if i % 3]
    random.Random(1).shuffle(query_rows)  # sources mixed
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    write_rows(work / "corpus" / "train.jsonl", train_rows)
    write_rows(work / "corpus" / "validation.jsonl", validation)
    return train_rows, validation, query_rows, facts


def train_model(corpus: Path, out: Path, steps: int, seed: int, dense: bool, tokenizer: Path | None) -> None:
    """The project's trainer, preset tiny, no checkpoints."""
    from core.train.trainer import TrainOptions, train

    options = dict(preset="tiny", max_steps=steps, seed=seed, dense=dense, progress=False, overwrite=True)
    tok = str(tokenizer) if tokenizer else None
    train(TrainOptions(corpus=str(corpus), out=str(out), tokenizer=tok, save_steps=10**6, **options))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def summed_losses(bundle_dir: Path, queries: list[Query]) -> list[float]:
    """Each query's summed completion loss (nats) under the bundle's model; prompt and
    completion tokenised apart, as ``attribute`` does."""
    import torch

    from core.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    tok, model, out = bundle.tokenizer, bundle.model.eval(), []
    for q in queries:
        p, c = (tok(t, add_special_tokens=False)["input_ids"] for t in (q.prompt, q.completion))
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()  # (len(c), V)
        out.append(float(torch.nn.functional.cross_entropy(logits, ids[0, len(p) :], reduction="sum")))
    return out


def cut_queries(tokenizer, rows: list[dict], n: int, prompt_tokens: int, completion_tokens: int) -> list[Query]:
    """Prompt and completion cut from the start of held-out documents long enough for both."""
    queries = []
    for row in rows:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens + completion_tokens and len(queries) < n:
            prompt = tokenizer.decode(ids[:prompt_tokens])
            completion = tokenizer.decode(ids[prompt_tokens : prompt_tokens + completion_tokens])
            queries.append(Query(prompt, completion, "lds"))
    if len(queries) < n:
        raise SystemExit(f"only {len(queries)} held-out documents are long enough; raise --held-out-per-source")
    return queries


# ----------------------------------------------------------------------------- retraining


class Retrainer:
    """Retrains the model on a subset of the documents (same recipe: one epoch of its tokens at
    the full model's steps per token) and returns every query's summed completion loss; each
    result cached as work/retrains/<config>/<kind>-<subset, seed>.json."""

    def __init__(self, work: Path, tokenizer: Path, rows: list[dict], validation: list[dict], tokens, steps: int):
        self.work, self.rows, self.validation, self.tokens, self.steps = work, rows, validation, tokens, steps
        self.tokenizer = tokenizer
        self.queries: list[Query] = []
        self.trained = self.cached = 0
        self.seconds = 0.0

    def configure(self, queries: list[Query]) -> None:
        self.queries = queries
        text = (self.work / "corpus" / "train.jsonl").read_text(encoding="utf-8")
        spec = json.dumps([text, self.steps, [(q.prompt, q.completion) for q in queries]])
        self.cache = self.work / "retrains" / hashlib.sha256(spec.encode()).hexdigest()[:12]
        self.cache.mkdir(parents=True, exist_ok=True)

    def losses(self, kind: str, keep: np.ndarray, seed: int, label: str) -> np.ndarray:
        key = hashlib.sha256(np.packbits(keep).tobytes() + f"{seed}".encode()).hexdigest()[:16]
        path = self.cache / f"{kind}-{key}.json"
        if path.is_file():
            self.cached += 1
            return np.array(json.loads(path.read_text())["losses"])
        t0 = time.perf_counter()
        corpus, out = self.work / "retrain-corpus", self.work / "retrain-model"
        corpus.mkdir(exist_ok=True)
        write_rows(corpus / "train.jsonl", [r for r, k in zip(self.rows, keep, strict=True) if k])
        write_rows(corpus / "validation.jsonl", self.validation)
        steps = max(1, round(self.steps * self.tokens[keep].sum() / self.tokens.sum()))
        train_model(corpus, out, steps, seed, kind == "dense", self.tokenizer)
        losses = summed_losses(out, self.queries)
        write_text(path, json.dumps({"kind": kind, "seed": seed, "steps": steps, "label": label, "losses": losses}))
        shutil.rmtree(os.environ["HF_DATASETS_CACHE"], ignore_errors=True)  # one corpus per retrain
        gc.collect()
        seconds = time.perf_counter() - t0
        self.trained, self.seconds = self.trained + 1, self.seconds + seconds
        log(f"{label}: {kind} retrained ({steps} steps) in {seconds:.1f} s")
        return np.array(losses)


# ----------------------------------------------------------------------------- the three measures


def recall_at_10(scored: Scored, ranking: str, queries: list[Query], copies: dict[int, set[int]]) -> dict:
    """Mean share of each fact's copies among the top 10, per prompt kind."""
    out = {}
    for kind in ("verbatim", "paraphrased"):
        shares = [
            len(copies[q.fact] & set(scored.orders[ranking][i][:10].tolist())) / len(copies[q.fact])
            for i, q in enumerate(queries)
            if q.kind == kind
        ]
        out[kind] = float(np.mean(shares)) if shares else None
    return out


def spearman_rows(prediction: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation per column of two (H, Q) arrays (0 where one is constant)."""
    from scipy.stats import spearmanr

    rhos = [spearmanr(prediction[:, q], actual[:, q]).statistic for q in range(actual.shape[1])]
    return np.nan_to_num(np.array(rhos, dtype=np.float64))


def lds(scored: Scored, masks: np.ndarray, actual: np.ndarray, lds_queries: np.ndarray) -> np.ndarray:
    """(Q,) LDS per query: masks (H, D), actual (H, S, Q_all) losses, averaged over the seeds."""
    prediction = -(masks.astype(np.float64) @ scored.scores[lds_queries].T)  # (H, Q)
    return spearman_rows(prediction, actual[:, :, lds_queries].mean(1))


def counterfactual(
    scored: list[Scored], retrain: Retrainer, cf_queries: list[int], seeds: int, k: int, documents: int
) -> dict[str, np.ndarray]:
    """Per method, (Q_cf,) loss after removing its top k minus after removing k random
    documents, each averaged over the seeds."""
    deltas: dict[str, list[float]] = {s.name: [] for s in scored if s.name != "random"}
    for q in cf_queries:
        base: dict[str, float] = {}
        for kind in sorted({s.kind for s in scored}):
            rng = np.random.default_rng(1000 + q)
            keep = np.ones(documents, dtype=bool)
            keep[rng.choice(documents, k, replace=False)] = False
            base[kind] = np.mean([retrain.losses(kind, keep, s, f"CF q{q} random seed {s}")[q] for s in range(seeds)])
        for s in scored:
            if s.name == "random":
                continue
            keep = np.ones(documents, dtype=bool)
            keep[np.argsort(-s.scores[q], kind="stable")[:k]] = False
            losses = [retrain.losses(s.kind, keep, seed, f"CF q{q} {s.name} seed {seed}")[q] for seed in range(seeds)]
            deltas[s.name].append(float(np.mean(losses)) - base[s.kind])
    return {name: np.array(v) for name, v in deltas.items()}


# ----------------------------------------------------------------------------- the run


def score_all(args, work: Path, full: Path, steps: int, rows: list[dict], queries: list[Query]) -> list[Scored]:
    """Every method's scores of every document for every query, with its costs."""
    import torch

    from core.bundle import load_bundle

    prism_dir, corpus = full / f"prism-{steps}", work / "corpus"
    bundle = load_bundle(prism_dir)
    tok = bundle.tokenizer
    token_ids = [tok(r["text"], add_special_tokens=False)["input_ids"] for r in rows]
    D, out = len(rows), []
    torch.manual_seed(0)
    log("PRISM index and influence store: building, then scoring")
    out += methods.prism_methods(prism_dir, corpus, queries, D, args.influence_rank)
    log("EK-FAC on the PRISM model (Kronfluence)")
    torch.manual_seed(0)
    out.append(methods.ekfac(bundle.model, tok, token_ids, queries, "ekfac", "EK-FAC on PRISM (Kronfluence)", "prism"))
    if args.twin:
        log("EK-FAC on the dense twin (Kronfluence)")
        torch.manual_seed(0)
        twin = load_bundle(full / f"dense-{steps}").model
        out.append(methods.ekfac(twin, tok, token_ids, queries, "ekfac_dense", "EK-FAC on the dense twin", "dense"))
    if args.logra_proj_dim:
        log("LoGra on the PRISM model (dattri)")
        torch.manual_seed(0)
        out.append(methods.logra(bundle.model, tok, token_ids, queries, args.logra_proj_dim))
    out.append(methods.bm25([r["text"] for r in rows], queries))
    out.append(methods.random_scores(queries, D))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The bench's options (bench/lds_ranks.py adds its own to them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--workdir", type=Path, default=Path("/tmp/prism-lds"), help="models, corpora and cached retrains")
    add("--per-source", type=int, default=200, help="demo documents per source (5 sources)")
    add("--max-chars", type=int, default=400, help="documents cut to this many characters")
    add("--held-out-per-source", type=int, default=16, help="held-out documents per source (queries, validation)")
    add("--facts", type=int, default=8, help="planted facts (recall@10)")
    add("--copies", type=int, default=4, help="documents per planted fact")
    add("--lds-steps", type=int, default=None, help="training steps of the full model (default: one epoch)")
    add("--halves", type=int, default=32, help="random halves retrained for the LDS")
    add("--seeds", type=int, default=2, help="training seeds per half (and per counterfactual)")
    add("--queries", type=int, default=32, help="held-out LDS queries")
    add("--prompt-tokens", type=int, default=16)
    add("--completion-tokens", type=int, default=16)
    add("--cf-queries", type=int, default=6, help="LDS queries with the top-k counterfactual (0: none)")
    add("--cf-k", type=int, default=10, help="documents removed per counterfactual")
    add("--twin", action="store_true", help="also the dense twin: EK-FAC on it, scored against dense retrains")
    add("--logra-proj-dim", type=int, default=64, help="LoGra's projection per layer (a square; 0: no LoGra)")
    add("--influence-rank", type=int, default=None, help="PRISM influence's --influence-rank (default: as shipped)")
    add("--threads", type=int, default=1, help="torch threads")
    _results.add_arguments(parser)
    return parser


@dataclass
class Setup:
    """The bench's corpus, models and queries (what every run over the same --workdir shares)."""

    work: Path
    full: Path  # the models of this corpus
    tokenizer: Path
    rows: list[dict]
    validation: list[dict]
    facts: list
    tokens: np.ndarray  # (D,) tokens per document, EOS included
    steps: int
    queries: list[Query]  # the LDS queries, then the facts' verbatim and paraphrased prompts
    lds_queries: int


def model_copy(setup: Setup, name: str) -> Path:
    """A fresh copy of the bench's PRISM model and index, without its influence store, as
    ``WORKDIR/ranks/prism-STEPS-NAME`` (for benches that rebuild the store their own way)."""
    out = setup.work / "ranks" / f"prism-{setup.steps}-{name}"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(setup.full / f"prism-{setup.steps}", out)
    (out / "index" / "influence.safetensors").unlink(missing_ok=True)
    return out


def prepare(args, twin: bool) -> Setup:
    """Environment, corpus, the full models (trained once per corpus) and the queries."""
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")  # before datasets is imported
    os.environ["TQDM_DISABLE"] = "1"  # the libraries' bars; this bench logs one line per step
    warnings.filterwarnings("ignore", message=".*(GradScaler|pin_memory|autocast).*")
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    from core.bundle import load_bundle
    from core.train.presets import PRESETS

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "sequence longer than the context" when documents are tokenised whole
    rows, validation, held, facts = build_corpus(args, work)
    log(f"corpus: {len(rows)} training documents ({args.facts} facts x {args.copies} copies planted)")
    # Models of this corpus live under full/<its hash>: a rerun reuses them, another corpus does not.
    corpus_hash = hashlib.sha256((work / "corpus" / "train.jsonl").read_bytes()).hexdigest()[:12]
    full = work / "full" / corpus_hash
    tokenizer = full / "tokenizer"  # a one-step bundle: the tokenizer every model here shares
    if not (tokenizer / "training.json").is_file():
        train_model(work / "corpus", tokenizer, 1, 0, False, None)
    tok = load_bundle(tokenizer).tokenizer
    tokens = np.array([len(tok(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows])  # + EOS
    preset = PRESETS["tiny"]
    steps = args.lds_steps or math.ceil(tokens.sum() / preset.seq_len / preset.batch_size)  # one epoch
    for kind in ("prism", "dense") if twin else ("prism",):
        out = full / f"{kind}-{steps}"
        if not (out / "training.json").is_file():
            log(f"training the full {kind} model: {steps} steps ({tokens.sum():,} tokens, one epoch)")
            train_model(work / "corpus", out, steps, 0, kind == "dense", tokenizer)
    lds_queries = cut_queries(tok, held, args.queries, args.prompt_tokens, args.completion_tokens)
    fact_queries = [Query(f.prompt, f.completion, "verbatim", f.fact) for f in facts]
    fact_queries += [Query(f.paraphrase, f.completion, "paraphrased", f.fact) for f in facts]
    return Setup(
        work, full, tokenizer, rows, validation, facts, tokens, steps, lds_queries + fact_queries, len(lds_queries)
    )


def ground_truth(setup: Setup, kinds: list[str], halves: int, seeds: int) -> tuple[Retrainer, np.ndarray, dict]:
    """The retrainer, the (H, D) halves and per model kind the (H, S, Q) actual losses of every
    query after retraining on each half with each seed (cached in the workdir)."""
    retrain = Retrainer(setup.work, setup.tokenizer, setup.rows, setup.validation, setup.tokens, setup.steps)
    retrain.configure(setup.queries)
    D = len(setup.rows)
    masks = np.stack([np.random.default_rng(h).permutation(D) < D // 2 for h in range(halves)])
    actual = {kind: np.zeros((halves, seeds, len(setup.queries))) for kind in kinds}
    for h in range(halves):
        for s in range(seeds):
            for kind in kinds:
                actual[kind][h, s] = retrain.losses(kind, masks[h], s, f"LDS half {h + 1}/{halves} seed {s}")
    return retrain, masks, actual


def main() -> None:
    args = build_parser().parse_args()
    setup = prepare(args, args.twin)
    import psutil

    from core.attribution.influence import InfluenceArguments

    rows, facts, tokens, steps, queries = setup.rows, setup.facts, setup.tokens, setup.steps, setup.queries
    baseline_rss_mb = psutil.Process().memory_info().rss / methods.MB
    scored = score_all(args, setup.work, setup.full, steps, rows, queries)
    influence = next(s for s in scored if s.name == "influence")  # its recall by loss: a row of its own
    log("scored; retraining for the LDS")
    D, kinds = len(rows), sorted({s.kind for s in scored})
    retrain, masks, actual = ground_truth(setup, kinds, args.halves, args.seeds)
    lds_index = np.arange(setup.lds_queries)
    rhos = {s.name: lds(s, masks, actual[s.kind], lds_index) for s in scored}
    cf = counterfactual(scored, retrain, list(range(args.cf_queries)), args.seeds, args.cf_k, D)

    id_row = {r["id"]: i for i, r in enumerate(rows)}
    copies = {f.fact: {id_row[d] for d in f.doc_ids} for f in facts}
    figures = report(args, scored, influence, queries, copies, rhos, cf, actual, lds_index)
    figures.update(
        documents=D,
        training_tokens=int(tokens.sum()),
        steps=steps,
        halves=args.halves,
        seeds=args.seeds,
        lds_queries=setup.lds_queries,
        facts=args.facts,
        copies=args.copies,
        cf_queries=args.cf_queries,
        cf_k=args.cf_k,
        prompt_tokens=args.prompt_tokens,
        completion_tokens=args.completion_tokens,
        influence_rank=args.influence_rank or InfluenceArguments().rank,
        influence_curvature_tokens=InfluenceArguments().curvature_tokens,
        logra_proj_dim=args.logra_proj_dim,
        threads=args.threads,
        retrains=retrain.trained,
        retrains_cached=retrain.cached,
        retrain_s_mean=retrain.seconds / max(1, retrain.trained),
        baseline_rss_mb=baseline_rss_mb,
        damping="0.1 x mean eigenvalue per block (PRISM: prototype block; Kronfluence: module, its "
        "damping_factor=None heuristic; dattri LoGra: layer, damping=0.1 x trace/dim)",
        wall_s=time.time() - T0,
    )
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


def report(args, scored, influence, queries, copies, rhos, cf, actual, lds_index) -> dict:
    """Print the table; return the flat figures."""
    figures: dict = {"methods": [s.name for s in scored], "labels": {s.name: s.label for s in scored}}
    rows = [(s, "") for s in scored] + [(influence, "loss")]
    header = f"{'method':<36}{'recall@10 v/p':>14}{'LDS +- SE':>15}{'CF dloss +- SE':>16}"
    header += f"{'1-query ms':>12}{'ms/query':>10}{'bytes/doc':>11}{'build s':>9}{'peak RSS MB':>12}"
    print("\n" + header)
    for s, ranking in rows:
        key = s.name + (f"_by_{ranking}" if ranking else "")
        recall = recall_at_10(s, ranking, queries, copies)
        figures[f"{key}_recall_verbatim"] = recall["verbatim"]
        figures[f"{key}_recall_paraphrased"] = recall["paraphrased"]
        label = s.label + (" (ranked by loss)" if ranking else "")
        rec = f"{recall['verbatim']:.2f}/{recall['paraphrased']:.2f}"
        if ranking:
            print(f"{label:<36}{rec:>14}")
            continue
        m, se = mean_se(rhos[s.name])
        figures.update({f"{key}_lds": m, f"{key}_lds_se": se, f"{key}_lds_per_query": rhos[s.name].tolist()})
        cf_text = ""
        if len(cf.get(s.name, [])):
            d, dse = mean_se(cf[s.name])
            figures.update({f"{key}_cf_delta": d, f"{key}_cf_se": dse, f"{key}_cf_per_query": cf[s.name].tolist()})
            cf_text = f"{d:+.3f} +- {dse:.3f}"
        figures.update(
            {
                f"{key}_kind": s.kind,
                f"{key}_single_query_ms": s.single_query_ms,
                f"{key}_query_ms": s.query_ms,
                f"{key}_bytes_per_document": s.bytes_per_document,
                f"{key}_build_s": s.build_s,
                f"{key}_peak_rss_mb": s.peak_rss_mb,
            }
        )
        ms = f"{s.single_query_ms:.1f}" if s.single_query_ms is not None else "-"
        batched = f"{s.query_ms:.1f}" if s.query_ms is not None else "-"
        print(
            f"{label:<36}{rec:>14}{f'{m:.3f} +- {se:.3f}':>15}{cf_text:>16}{ms:>12}{batched:>10}"
            f"{s.bytes_per_document:>11,.0f}{s.build_s:>9.1f}{s.peak_rss_mb:>12,.0f}"
        )
    print("\nPaired LDS differences, PRISM influence - method (mean +- SE over queries):")
    for s in scored:
        if s.name != "influence" and s.kind == "prism":
            d, se = mean_se(rhos["influence"] - rhos[s.name])
            figures.update({f"influence_minus_{s.name}_lds": d, f"influence_minus_{s.name}_lds_se": se})
            print(f"  - {s.label:<34}{d:+.3f} +- {se:.3f}")
    for kind, losses in actual.items():
        if losses.shape[1] > 1:  # seed agreement: how reproducible the ground truth is
            agree = spearman_rows(losses[:, 0, lds_index], losses[:, 1, lds_index])
            figures[f"{kind}_seed_agreement"], figures[f"{kind}_seed_agreement_se"] = mean_se(agree)
            print(f"Ground truth ({kind}): Spearman of seed 0 vs seed 1 losses over halves {mean_se(agree)[0]:.3f}")
    print(
        f"({len(lds_index)} LDS queries, {args.halves} halves x {args.seeds} seeds; counterfactual: "
        f"{args.cf_queries} queries, top {args.cf_k} vs {args.cf_k} random removed; damping 0.1 x mean eigenvalue; "
        "peak RSS: the bench process, models loaded)"
    )
    return figures


if __name__ == "__main__":
    main()
