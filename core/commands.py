"""The ``prism`` commands' bodies: each takes the parsed arguments and returns an exit code.

The parser, the error handling and the entry point are in :mod:`core.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import CliError
from core.options import from_namespace

if TYPE_CHECKING:
    from core.generation import GenerationSettings

REPO = Path(__file__).resolve().parent.parent  # the source checkout, when core runs from one
DEMO_BUNDLE = REPO / "assets" / "models" / "demo"
APP = REPO / "explorer" / "app.py"
MODEL_ENV = "PRISM_MODEL"  # the default --model of every command that has one


def cmd_corpus(args: argparse.Namespace) -> int:
    from core.data.demo import build_demo_corpus
    from core.errors import CorpusError

    try:
        stats = build_demo_corpus(args.out, seed=args.seed, show_progress=not args.quiet)
    except RuntimeError as err:  # a download or an apt step failed: its message says what to do
        raise CorpusError(f"the demo corpus could not be built: {err}") from None
    print(json.dumps(stats, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from core.train.trainer import TrainOptions, record_twin, remove_checkpoints, train

    overrides = {
        name: value
        for name, value in (
            ("router_gradient", args.router_gradient),
            ("prototype_top_k", args.top_k),
            ("num_prototypes", args.num_prototypes),
            ("reseed_interval", args.reseed_interval),
            ("prototype_top_k_start", args.top_k_start),
            ("top_k_anneal_fraction", args.anneal_fraction),
            ("concentration_weight", args.concentration_weight),
            ("weight_power", args.weight_power),
            ("learn_weight_power", args.learn_weight_power),
        )
        if value is not None
    }
    from core import distributed

    opts = from_namespace(TrainOptions, args, progress=not args.quiet, overrides=overrides)
    # Under torchrun every rank runs this command; rank 0 alone writes files and prints.
    main = distributed.is_main
    record = train(opts)
    summary = {k: record[k] for k in ("kind", "val_loss", "steps", "train_tokens", "tokens_per_second", "wall_seconds")}
    if record["skipped_rows"] and main():
        skipped = record["skipped_rows"]
        print(f"prism: note: skipped {sum(skipped.values())} invalid corpus rows {skipped}", file=sys.stderr)
    if args.twin_out:
        # The twin trains on the same tokens and schedule, all of it (a frozen start is PRISM's head only).
        twin_opts = dataclasses.replace(
            opts, dense=True, out=args.twin_out, tokenizer=args.out, resume=False, freeze_backbone=0
        )
        twin = train(twin_opts)
        if main():
            record = record_twin(args.out, twin)
            summary.update(dense_val_loss=twin["val_loss"], val_loss_ratio=record["val_loss_ratio"])
    distributed.barrier()  # no rank still reads a checkpoint folder
    if main():
        if not args.keep_checkpoints:
            remove_checkpoints(args.out)
            if args.twin_out:
                remove_checkpoints(args.twin_out)
        print(json.dumps(summary, indent=2))
    return 0


def _controls_from_args(args: argparse.Namespace, bundle):
    """The controller of --controls FILE and --suppress IDS together."""
    from core.control.controls import Controls, load_controls, parse_ids

    controls = load_controls(args.controls) if args.controls else Controls()
    if args.suppress:
        if not bundle.is_prism:
            raise CliError("--suppress needs a PRISM model; this bundle is a dense twin")
        ids = parse_ids(args.suppress, bundle.model.config.num_prototypes)
        controls.suppressed = sorted(set(controls.suppressed) | set(ids))
    return controls


_GENERATION_OPTIONS = ("sample", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def generation_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The GenerationSettings of --greedy, --sample/--no-sample, --temperature, --top-p,
    --repetition-penalty and --no-repeat-ngram-size; options not given take DEFAULT_GENERATION's
    values (--sample without the others: its temperature and top-p)."""
    from core.generation import DEFAULT_GENERATION, GREEDY, GenerationSettings

    given = [name for name in _GENERATION_OPTIONS if getattr(args, name) is not None]
    if args.greedy:
        if given:
            raise CliError(
                f"--greedy is plain greedy decoding; drop {', '.join(_flag(n) for n in given)} "
                "(or use --no-sample with the repetition options for greedy decoding with them)"
            )
        return GREEDY
    default = DEFAULT_GENERATION
    sample = default.do_sample if args.sample is None else args.sample
    sampling = default if default.do_sample else GenerationSettings(do_sample=True)
    if not sample:
        wrong = [_flag(n) for n in ("temperature", "top_p") if getattr(args, n) is not None]
        if wrong:
            raise CliError(f"{' and '.join(wrong)} apply only when sampling: add --sample, or drop them")

    def value(name: str, source: GenerationSettings) -> float:
        given_value = getattr(args, name)
        return getattr(source, name) if given_value is None else given_value

    return GenerationSettings(
        do_sample=sample,
        temperature=value("temperature", sampling) if sample else 1.0,
        top_p=value("top_p", sampling) if sample else 1.0,
        repetition_penalty=value("repetition_penalty", default),
        no_repeat_ngram_size=value("no_repeat_ngram_size", default),
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from core.bundle import load_bundle
    from core.generation import generate_text

    settings = generation_from_args(args)  # bad options fail before the model loads
    bundle = load_bundle(args.model, device=args.device, dtype=args.dtype)
    controls = _controls_from_args(args, bundle)
    result = generate_text(
        bundle,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        controls=controls,
        seed=0 if args.seed is None else args.seed,
        settings=settings,
    )
    if result.notice:
        print(f"prism: note: {result.notice}", file=sys.stderr)
    print(result.prompt + result.text)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from core import distributed
    from core.device import resolve_device
    from core.index.staging import shared_staged_index

    # Under torchrun every rank runs this command: each takes a shard of the neighbourhood and
    # influence passes; rank 0 alone merges, writes the other files, swaps the index in and prints.
    distributed.start(cpu=resolve_device(args.device) == "cpu")
    # Every file is built in a staging copy of the bundle; the old index stays whole until one swap.
    with shared_staged_index(args.model, keep_index=False) as staging:
        summary = _build_index_files(argparse.Namespace(**{**vars(args), "model": str(staging)}))
    if distributed.is_main():
        print(json.dumps(_unstaged(summary, staging, args.model), indent=2))
    return 0


def _unstaged(value, staging, bundle):
    """``value`` with the staging folder's path replaced by the bundle's (in summaries)."""
    if isinstance(value, dict):
        return {k: _unstaged(v, staging, bundle) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(str(staging)):
        return str(bundle) + value[len(str(staging)) :]
    return value


def _build_index_files(args: argparse.Namespace) -> dict | None:
    """Neighbourhoods, influence factors, spans, labels and the atlas of ``args.model``; their
    summary (None on ranks other than 0, which share the first two passes only)."""
    from core import distributed
    from core.device import resolve_device
    from core.index.build import IndexArguments, build_index

    device = resolve_device(args.device)
    # IndexArguments.dtype is the precision of the stored index; --dtype is the model's.
    index_args = from_namespace(IndexArguments, args, device=device, dtype="float32")
    summary = build_index(
        args.model,
        args.corpus,
        **dataclasses.asdict(index_args),
        model_dtype=args.dtype,
        show_progress=not args.quiet,
    )
    if not args.no_influence:
        from core.attribution.influence import InfluenceArguments, build_influence

        influence_args = from_namespace(
            InfluenceArguments,
            args,
            prefix="influence_",
            batch_size=max(1, index_args.batch_size // 2),
            max_tokens=index_args.max_tokens,
        )
        influence = build_influence(
            args.model, args.corpus, influence_args, device=device, show_progress=not args.quiet
        )
    if not distributed.is_main():
        return None  # the rest reads no more than the index: rank 0 builds it alone
    if not args.no_spans:
        from core.attribution.spans_index import build_spans

        summary["spans"] = build_spans(args.model, args.corpus, show_progress=not args.quiet)
    summary["labels"] = _label_and_map(args.model, not args.quiet, device, args.dtype)
    if not args.no_influence:
        summary["influence"] = influence
    return summary


def _label_and_map(model: str, progress: bool, device: str = "cpu", dtype: str = "float32") -> dict:
    """Labels and the atlas of an indexed bundle; their quality summary."""
    from core.atlas.labels import build_atlas, build_labels, quality_summary

    labels = build_labels(model, progress=progress, device=device, dtype=dtype)
    coords = build_atlas(model)
    return {**quality_summary(labels), "atlas_points": len(coords)}


def cmd_label(args: argparse.Namespace) -> int:
    from core.bundle import load_bundle
    from core.index.format import load_index
    from core.index.staging import staged_index

    load_bundle(args.model)  # damaged weights are named as such, not as an index for other weights
    load_index(args.model)  # no index, or a stale one: refused before the work
    with staged_index(args.model, keep_index=True) as staging:  # labels and atlas swapped in together
        summary = _label_and_map(str(staging), not args.quiet, args.device, args.dtype)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from core.attribution.engine import attribute
    from core.bundle import load_bundle
    from core.generation import truncation_notice
    from core.index.format import load_index

    if not args.prompt:
        raise CliError("the prompt is empty: give the text that the completion follows")
    if args.completion is not None:
        given = ["greedy"] * args.greedy + [n for n in (*_GENERATION_OPTIONS, "seed") if getattr(args, n) is not None]
        if given:
            raise CliError(
                f"{', '.join(_flag(n) for n in given)} choose how a completion is generated; "
                "with --completion nothing is generated: drop them"
            )
    settings = generation_from_args(args)
    bundle = load_bundle(args.model, device=args.device, dtype=args.dtype)
    if not bundle.is_prism:
        raise CliError("attribution needs a PRISM model; this bundle is a dense twin")
    index = load_index(args.model)
    controls = _controls_from_args(args, bundle)
    result = attribute(
        bundle,
        index,
        args.prompt,
        args.completion,
        top=args.top,
        method=args.method,
        controls=controls,
        max_new_tokens=args.max_new_tokens,
        candidates=args.candidates,
        ranking=args.rank_by,
        generation=settings,
        seed=0 if args.seed is None else args.seed,
    )
    notice = truncation_notice(result.decomposition.truncated_tokens)
    if notice:
        print(f"prism: note: {notice}", file=sys.stderr)
    print(json.dumps(result.to_json(), indent=2, ensure_ascii=False) if args.json else result.to_text())
    return 0


def cmd_outliers(args: argparse.Namespace) -> int:
    from core.attribution.influence import outliers

    found = outliers(args.model, top=args.top)
    records = [{**r, "text": r["text"][:200]} for r in found["records"]]
    if args.json:
        print(json.dumps({"measure": found["measure"], "documents": records}, ensure_ascii=False))
        return 0
    print(f"{len(records)} of {found['documents']} training documents by self-influence per token")
    print("(sum over prototype blocks of g^T A g for the document's summed gradient, over its stored positions)")
    for rec in records:
        snippet = " ".join(rec["text"].split())[:90]
        score, positions = rec["self_influence_per_token"], rec["positions"]
        print(f"{rec['rank']:>4}  {score:>12.4g}  {positions:>6} tok  {rec['doc_id']}  {snippet}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from core.bundle import load_bundle
    from core.errors import ReportError
    from core.index.format import load_index
    from core.report import build_report, format_of, read_prompts, write_report
    from core.store import check_output

    format_of(args.out)  # a bad extension or folder fails before the model loads
    check_output(args.out, "--out", ReportError)
    settings = generation_from_args(args)  # so do bad generation options
    items = read_prompts(args.prompts)
    bundle = load_bundle(args.model, device=args.device, dtype=args.dtype)
    if not bundle.is_prism:
        raise CliError("a report needs a PRISM model; this bundle is a dense twin")
    index = load_index(args.model)
    controls = _controls_from_args(args, bundle)
    with tqdm(total=len(items), desc="tracing prompts", unit="prompt", disable=args.quiet) as bar:
        report = build_report(
            bundle,
            index,
            items,
            controls=controls,
            method=args.method,
            top=args.top,
            max_new_tokens=args.max_new_tokens,
            generation=settings,
            seed=0 if args.seed is None else args.seed,
            progress=lambda done, total: bar.update(1),
        )
    path = write_report(report, args.out)
    print(json.dumps({"out": str(path), "traces": len(report["traces"]), "format": format_of(path)}))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from core.bundle import load_bundle
    from core.control.arguments import CalibrationArguments
    from core.control.calibration import calibrate, format_report
    from core.control.controls import save_controls
    from core.control.formats import load_task
    from core.errors import ControlsError
    from core.store import check_output

    arguments = from_namespace(CalibrationArguments, args)
    check_output(args.out, "--out", ControlsError)  # a bad --out or task file fails before the model loads
    items = load_task(args.task)
    bundle = load_bundle(args.model, device=args.device, dtype=args.dtype)
    if not bundle.is_prism:
        raise CliError("calibration needs a PRISM model; this bundle is a dense twin")
    with tqdm(total=1, desc="calibrating", unit="step", disable=args.quiet) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = calibrate(bundle, items, arguments, progress=progress)
    save_controls(result.controls, args.out)
    if args.json:
        print(json.dumps({**result.to_json(), "out": str(args.out)}, indent=2, ensure_ascii=False))
    else:
        print(format_report(result))
        print(f"controls written to {args.out}")
    return 0


def cmd_target(args: argparse.Namespace) -> int:
    from core.bundle import load_bundle
    from core.control.controls import Controls, parse_ids, save_controls
    from core.control.targeting import target_by_contrast, target_by_ids, target_by_label, target_by_query
    from core.errors import ControlsError
    from core.index.format import index_exists, load_index
    from core.store import check_output

    if sum(x is not None for x in (args.ids, args.label, args.query, args.behaviour)) != 1:
        raise CliError("give exactly one of --ids, --label, --query, --behaviour")
    if args.out:
        check_output(args.out, "--out", ControlsError)  # before the model loads
    bundle = load_bundle(args.model, device=args.device, dtype=args.dtype)
    if not bundle.is_prism:
        raise CliError("targeting needs a PRISM model; this bundle is a dense twin")
    index = load_index(args.model) if index_exists(args.model) or args.label or args.query else None
    if args.ids is not None:
        P = bundle.model.config.num_prototypes
        targets = target_by_ids(parse_ids(args.ids, P), index, P)
    elif args.label is not None:
        targets = target_by_label(index, args.label, args.top)
    elif args.query is not None:
        targets = target_by_query(index, args.query, args.top, bundle.tokenizer)
    else:
        from core.control.formats import load_behaviour

        behaviour = load_behaviour(args.behaviour)
        targets = target_by_contrast(
            bundle, behaviour.contrast_behaviour, behaviour.contrast_neutral, args.top, index=index
        )
    if not targets:
        raise CliError("no prototype matches; try another text or a larger --top")
    for t in targets:
        print(f"{t.id:>6}  {t.score:8.4f}  {t.evidence}")
    if args.out:
        controls = Controls(
            suppressed=[t.id for t in targets],
            model_fingerprint=bundle.fingerprint,
            note=f"suppression chosen by `prism target` ({len(targets)} prototypes)",
        )
        save_controls(controls, args.out)
        print(f"controls suppressing {len(targets)} prototypes written to {args.out}")
    return 0


def default_model() -> str:
    """$PRISM_MODEL, else the demo bundle when core runs from a source checkout.

    Raises:
        CliError: neither (an installed package carries no bundle): the message names --model.
    """
    if os.environ.get(MODEL_ENV, "").strip():
        return os.environ[MODEL_ENV].strip()
    if (REPO / "pyproject.toml").is_file() and DEMO_BUNDLE.is_dir():  # never a path inside site-packages
        return str(DEMO_BUNDLE)
    raise CliError(
        f"no model given: pass --model BUNDLE_DIR (or set {MODEL_ENV}); the demo bundle ships with the "
        "source checkout, not with the installed package"
    )


def cmd_explore(args: argparse.Namespace) -> int:
    import importlib.util
    import subprocess

    if not APP.is_file():
        raise CliError(
            "the explorer app is not part of the installed package: run `prism explore` from a source checkout "
            "(pip install -e '.[app]'), or `streamlit run explorer/app.py` there"
        )
    if importlib.util.find_spec("streamlit") is None:
        raise CliError("the explorer needs streamlit: pip install -e '.[app]' (or pip install -r requirements.txt)")
    command = [sys.executable, "-m", "streamlit", "run", str(APP)]
    if args.port is not None:
        command += ["--server.port", str(args.port)]
    if args.headless:
        command += ["--server.headless", "true"]
    command += ["--", "--device", args.device, "--dtype", args.dtype]
    model = args.model or os.environ.get(MODEL_ENV, "").strip()
    if model:  # else the app's own default: $PRISM_EXPLORER_MODEL, else the demo bundle
        command += ["--model", model]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:  # streamlit got the same Ctrl-C and stopped
        return 130
