"""Planted facts on a corpus the project has never seen: does `prism attribute` find their documents?

A fresh corpus (bench/canary_corpus.py): --documents background documents cut from Debian's
offline documentation (changelogs, copyright files, READMEs, man pages), plus --facts made-up
facts, each planted in --copies documents. Then the real command line, as a new user runs it,
with its defaults:

    prism train --corpus C --out B --preset tiny --seed S
    prism index --model B --corpus C
    prism attribute --model B --prompt P --completion C --method M --top 10 --json

once per fact, per prompt (verbatim: the start of the planted sentence; paraphrased: another
wording with the same completion) and per method (default: every one `prism attribute --help`
lists). A hit is any of the fact's planted documents among the top 10 of the ranking over the
whole completion ("examples"). Prints a table (method x prompt: recall@10 with hits, recall@1,
median rank of the first planted document), the wall times, then one JSON line, also written
to bench/results/canaries.json (bench/_results.py). A method that fails is reported, not fatal.

    nice -n 5 python bench/canaries.py --quick --results-tag quick     # 2,000 documents, 6 facts
    nice -n 5 python bench/canaries.py --workdir /tmp/canaries-full     # 10,000 documents, 12 facts
    python bench/canaries.py --workdir /tmp/canaries-full --skip-train  # index and attribute again
    python bench/canaries.py --workdir DIR --prepare-only               # corpus and bundle only

--code DIR runs `python -m core` from DIR (a copy of core/) instead of `prism`, for a stable
snapshot while core/ is being edited.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import _results  # noqa: E402
import canary_corpus  # noqa: E402

KINDS = {"verbatim": "prompt", "paraphrased": "paraphrase"}  # prompt kind -> its field in facts.json


CODE = REPO  # where `python -m core` runs from; --code changes it


def prism_command() -> list[str]:
    """The `prism` entry point (`python -m core` with --code, or where `prism` is not on PATH)."""
    found = shutil.which("prism")
    return [found] if found and CODE == REPO else [sys.executable, "-m", "core"]


def run_step(name: str, args: list[str], logs: Path) -> float:
    """Run one `prism` command to completion, its output in logs/<name>.log; its wall seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    print(f"$ prism {' '.join(args)}", flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run([*prism_command(), *args], cwd=CODE, stdout=f, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"prism {name} failed (exit {done.returncode}, log {log}):\n" + "\n".join(tail))
    print(f"  {seconds:.0f} s", flush=True)
    return seconds


def attribute_methods() -> list[str]:
    """The choices of `prism attribute --method`, read from its --help."""
    done = subprocess.run([*prism_command(), "attribute", "--help"], cwd=CODE, capture_output=True, text=True)
    found = re.search(r"--method \{([^}]*)\}", done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"could not read the methods from `prism attribute --help`:\n{done.stdout}{done.stderr}")
    return found[1].split(",")


def attribute_once(bundle: Path, prompt: str, completion: str, method: str, top: int) -> dict:
    """One `prism attribute --json` call: its parsed output, or {"error": last stderr line}; with its seconds."""
    args = ["attribute", "--model", str(bundle), "--prompt", prompt, "--completion", completion]
    args += ["--method", method, "--top", str(top), "--json"]
    start = time.perf_counter()
    done = subprocess.run([*prism_command(), *args], cwd=CODE, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {done.returncode}", "seconds": seconds}
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError as err:
        return {"error": f"output is not JSON: {err}", "seconds": seconds}
    return {"result": result, "seconds": seconds}


def score_query(result: dict, planted: list[str], top: int) -> dict:
    """Rank (1-based) of the first planted document in the overall ranking, or None beyond ``top``."""
    ranked = [e["doc_id"] for e in result.get("examples", [])][:top]
    rank = next((i + 1 for i, doc in enumerate(ranked) if doc in set(planted)), None)
    logprob = sum(math.log(max(t["probability"], 1e-30)) for t in result.get("tokens", []))
    return {"rank": rank, "top": ranked, "completion_logprob": logprob}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(queries: list[dict], methods: list[str], top: int) -> dict:
    """Flat figures per method and prompt kind: recall@top, hits, recall@1, median rank, errors; latency."""
    figures: dict = {}
    for method in methods:
        mine = [q for q in queries if q["method"] == method]
        for kind in KINDS:
            rows = [q for q in mine if q["kind"] == kind]
            ok = [q for q in rows if "error" not in q]
            ranks = [q["rank"] for q in rows]
            # a failed query counts as a miss; the median treats a miss as rank infinity
            hits = sum(r is not None for r in ranks)
            ordered = sorted(r if r is not None else math.inf for r in ranks)
            median = statistics.median(ordered) if ordered else math.inf
            prefix = f"{method}_{kind}"
            figures[f"{prefix}_recall_at_{top}"] = hits / len(rows) if rows else None
            figures[f"{prefix}_hits_at_{top}"] = hits
            figures[f"{prefix}_recall_at_1"] = sum(r == 1 for r in ranks) / len(rows) if rows else None
            figures[f"{prefix}_median_rank"] = median if median != math.inf else None
            figures[f"{prefix}_ranks"] = ranks
            figures[f"{prefix}_errors"] = len(rows) - len(ok)
        seconds = [q["seconds"] for q in mine if "error" not in q]
        figures[f"{method}_attribute_s_median"] = statistics.median(seconds) if seconds else None
        figures[f"{method}_attribute_s_p95"] = percentile(seconds, 0.95) if seconds else None
        errors = sorted({q["error"] for q in mine if "error" in q})
        if errors:
            figures[f"{method}_error"] = errors[0][:300]
    for kind in KINDS:
        logprobs = [q["completion_logprob"] for q in queries if q["kind"] == kind and "completion_logprob" in q]
        figures[f"{kind}_completion_logprob_mean"] = statistics.mean(logprobs) if logprobs else None
    return figures


def print_table(figures: dict, methods: list[str], facts: int, top: int) -> None:
    header = f"{'method':<16}{'prompt':<13}{f'recall@{top}':>16}{'recall@1':>10}{'median rank':>13}{'s/query':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for method in methods:
        for kind in KINDS:
            p = f"{method}_{kind}"
            hits, recall = figures[f"{p}_hits_at_{top}"], figures[f"{p}_recall_at_{top}"]
            median = figures[f"{p}_median_rank"]
            cell = f"{recall:.2f} ({hits}/{facts})" if recall is not None else "-"
            rank = f"{median:g}" if median is not None else f">{top}"
            r1 = figures[f"{p}_recall_at_1"]
            errors = figures[f"{p}_errors"]
            note = f"  {errors} failed" if errors else ""
            seconds = figures[f"{method}_attribute_s_median"]
            s = f"{seconds:.1f}" if seconds is not None else "-"
            print(
                f"{method:<16}{kind:<13}{cell:>16}{(f'{r1:.2f}' if r1 is not None else '-'):>10}{rank:>13}{s:>9}{note}"
            )
        if figures.get(f"{method}_error"):
            print(f"  {method} error: {figures[f'{method}_error']}")


def index_summary(bundle: Path) -> dict:
    """A few figures of the index the run built (read defensively: the format may change)."""
    try:
        meta = json.loads((bundle / "index" / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    influence = meta.get("influence") or {}
    out = {
        "index_documents": meta.get("documents"),
        "index_positions": meta.get("positions"),
        "influence_documents": influence.get("documents"),
        "influence_document_tokens": (influence.get("arguments") or {}).get("document_tokens"),
    }
    return {k: v for k, v in out.items() if v is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="draws the corpus and the facts; seeds `prism train`")
    parser.add_argument(
        "--documents", type=int, default=None, help="background documents (default 10,000; quick 2,000)"
    )
    parser.add_argument("--facts", type=int, default=None, help="planted facts (default 12; quick 6)")
    parser.add_argument("--copies", type=int, default=4, help="documents that hold each fact")
    parser.add_argument("--methods", default=None, help="comma-separated; default: every `prism attribute` method")
    parser.add_argument("--top", type=int, default=10, help="the k of recall@k (`prism attribute --top`)")
    parser.add_argument(
        "--workdir", default=None, help="keep the corpus, bundle and outputs here (default: a temp dir)"
    )
    parser.add_argument("--skip-train", action="store_true", help="reuse the corpus and bundle already in --workdir")
    parser.add_argument("--skip-index", action="store_true", help="with --skip-train: reuse the index as well")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 documents, 6 facts")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="generate the corpus and train the bundle, then stop (see --skip-train)",
    )
    parser.add_argument(
        "--code",
        default=None,
        help="run `python -m core` from this folder (a snapshot of core/, e.g. while core/ is being edited)",
    )
    _results.add_arguments(parser)
    args = parser.parse_args()
    if (args.skip_train or args.skip_index) and not args.workdir:
        parser.error("--skip-train and --skip-index need the --workdir of an earlier run")
    if args.prepare_only and (args.skip_train or not args.workdir):
        parser.error("--prepare-only needs a --workdir to keep, and no --skip-train")
    if args.skip_index and not args.skip_train:
        parser.error("--skip-index needs --skip-train (a new bundle needs its index)")
    global CODE
    if args.code:
        CODE = Path(args.code).resolve()
        if not (CODE / "core" / "__main__.py").is_file():
            parser.error(f"--code {args.code}: no core/__main__.py there")
    documents = args.documents or (2000 if args.quick else 10000)
    n_facts = args.facts or (6 if args.quick else 12)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="canaries-"))
    corpus, bundle, facts_path, logs = work / "corpus", work / "bundle", work / "facts.json", work / "logs"
    times: dict[str, float] = {}
    try:
        if args.skip_train:
            for path in (facts_path, corpus, bundle / "training.json"):
                if not path.exists():
                    raise SystemExit(f"--skip-train: {path} is missing; run once without --skip-train first")
            content = json.loads(facts_path.read_text(encoding="utf-8"))
            if (work / "times.json").is_file():  # the earlier run's generate, train (and index) times
                times.update(json.loads((work / "times.json").read_text(encoding="utf-8")))
        else:
            if bundle.exists():
                raise SystemExit(f"{bundle} exists: pass --skip-train to reuse it, or give another --workdir")
            start = time.perf_counter()
            content = canary_corpus.generate(work, documents, n_facts, args.copies, args.seed)
            times["generate_s"] = time.perf_counter() - start
            meta = content["meta"]
            print(
                f"corpus {corpus}: {meta['train_documents']:,} training documents "
                f"({meta['background_by_source']} + {n_facts} x {args.copies} planted), "
                f"{meta['corpus_chars'] / 1e6:.1f} M characters, in {times['generate_s']:.0f} s",
                flush=True,
            )
            times["train_s"] = run_step(
                "train",
                ["train", "--corpus", str(corpus), "--out", str(bundle), "--preset", "tiny"]
                + ["--seed", str(content["meta"]["seed"]), "--quiet"],
                logs,
            )
            (work / "times.json").write_text(json.dumps(times) + "\n", encoding="utf-8")
        if args.prepare_only:
            print(f"prepared {work}: rerun with --workdir {work} --skip-train to index and attribute")
            return
        if not args.skip_index:
            times["index_s"] = run_step(
                "index", ["index", "--model", str(bundle), "--corpus", str(corpus), "--quiet"], logs
            )
            (work / "times.json").write_text(json.dumps(times) + "\n", encoding="utf-8")

        meta, facts = content["meta"], content["facts"]
        methods = args.methods.split(",") if args.methods else attribute_methods()
        queries: list[dict] = []
        outputs = work / "attribute"
        outputs.mkdir(exist_ok=True)
        for method in methods:
            for fact in facts:
                for kind, field in KINDS.items():
                    done = attribute_once(bundle, fact[field], fact["completion"], method, args.top)
                    query = {"method": method, "kind": kind, "fact": fact["fact"], "relation": fact["relation"]}
                    query["seconds"] = done["seconds"]
                    if "error" in done:
                        query.update(error=done["error"], rank=None)
                    else:
                        query.update(score_query(done["result"], fact["doc_ids"], args.top))
                        name = f"{method}-{kind}-{fact['fact']:02d}.json"
                        (outputs / name).write_text(json.dumps(done["result"], indent=1), encoding="utf-8")
                    queries.append(query)
                    rank = query["rank"] if query["rank"] is not None else f">{args.top}"
                    status = f"error: {query['error'][:120]}" if "error" in query else f"rank {rank}"
                    print(
                        f"  {method:<14}{kind:<12}fact {fact['fact']:>2} ({fact['relation']}): {status}"
                        f"  [{query['seconds']:.1f} s]",
                        flush=True,
                    )
        canary_corpus.write_jsonl(work / "queries.jsonl", queries)
        training = json.loads((bundle / "training.json").read_text(encoding="utf-8"))
        index_figures = index_summary(bundle)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    figures = summarise(queries, methods, args.top)
    print_table(figures, methods, len(facts), args.top)
    corpus_tokens = sum((training.get("corpus_tokens_by_source") or {}).values()) or None
    figures.update(
        times,
        attribute_queries=len(queries),
        methods=",".join(methods),
        seed=meta["seed"],
        documents=meta["documents"],
        facts=len(facts),
        copies=meta["copies"],
        top=args.top,
        train_documents=meta["train_documents"],
        corpus_chars=meta["corpus_chars"],
        corpus_sha256=meta["corpus_sha256"][:16],
        **{f"background_{source}": n for source, n in meta["background_by_source"].items()},
        dropped_demo_overlap=meta["dropped_demo_overlap"],
        val_loss=training.get("val_loss"),
        train_steps=training.get("steps"),
        train_tokens=training.get("train_tokens"),
        corpus_tokens=corpus_tokens,
        **index_figures,
    )
    timing = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in times.items())
    print(
        f"\n{len(facts)} facts x {meta['copies']} copies in {meta['train_documents']:,} training documents "
        f"(seed {meta['seed']}); recall@{args.top} over the overall ranking; a failed query counts as a miss."
    )
    earlier = ""
    if args.skip_train:
        earlier = " (generate, train" + (", index" if args.skip_index else "") + ": an earlier run's)"
    print(f"wall: {timing or 'nothing rebuilt'}{earlier}; attribute s/query: one CLI process (median; p95 in the JSON)")
    if corpus_tokens and training.get("train_tokens"):
        print(
            f"the tiny preset trained on {training['train_tokens']:,} tokens; the corpus holds {corpus_tokens:,} "
            f"({training['train_tokens'] / corpus_tokens:.0%})"
        )
    _results.emit({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, args, __file__)


if __name__ == "__main__":
    main()
