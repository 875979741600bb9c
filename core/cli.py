"""The ``prism`` command (also ``python -m core``).

Every command has --help; bad input ends with a one-line ``prism: error: ...`` and exit 1.
Options that a library argument class declares (:class:`~core.train.trainer.TrainOptions`,
:class:`~core.index.build.IndexArguments`, :class:`~core.control.arguments.CalibrationArguments`)
are built from it with :func:`core.options.add_options`, so their defaults and help live there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from core.device import DEVICES, add_device_options, default_device, default_dtype  # noqa: F401 (DEVICES: public)
from core.errors import CliError, PrismError
from core.options import add_options, from_namespace, number_parser

REPO = Path(__file__).resolve().parent.parent  # the source checkout, when core runs from one
DEMO_BUNDLE = REPO / "assets" / "models" / "demo"
APP = REPO / "explorer" / "app.py"
MODEL_ENV = "PRISM_MODEL"  # the default --model of every command that has one


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 1 instead of usage + exit 2
        raise CliError(f"{message} (see `{self.prog} --help`)")


_positive_int = number_parser(int, minimum=1)


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


def cmd_generate(args: argparse.Namespace) -> int:
    from core.bundle import load_bundle
    from core.generation import generate_text

    bundle = load_bundle(args.model, device=args.device, dtype=args.dtype)
    controls = _controls_from_args(args, bundle)
    result = generate_text(
        bundle,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        controls=controls,
        seed=args.seed,
        do_sample=args.sample,
        temperature=args.temperature,
    )
    if result.notice:
        print(f"prism: note: {result.notice}", file=sys.stderr)
    print(result.prompt + result.text)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from core.index.staging import staged_index

    # Every file is built in a staging copy of the bundle; the old index stays whole until one swap.
    with staged_index(args.model, keep_index=False) as staging:
        summary = _build_index_files(argparse.Namespace(**{**vars(args), "model": str(staging)}))
    print(json.dumps(_unstaged(summary, staging, args.model), indent=2))
    return 0


def _unstaged(value, staging, bundle):
    """``value`` with the staging folder's path replaced by the bundle's (in summaries)."""
    if isinstance(value, dict):
        return {k: _unstaged(v, staging, bundle) for k, v in value.items()}
    if isinstance(value, str) and value.startswith(str(staging)):
        return str(bundle) + value[len(str(staging)) :]
    return value


def _build_index_files(args: argparse.Namespace) -> dict:
    """Neighbourhoods, spans, labels, the atlas and influence factors of ``args.model``; their summary."""
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
    if not args.no_spans:
        from core.attribution.spans_index import build_spans

        summary["spans"] = build_spans(args.model, args.corpus, show_progress=not args.quiet)
    summary["labels"] = _label_and_map(args.model, not args.quiet, device, args.dtype)
    if not args.no_influence:
        from core.attribution.influence import InfluenceArguments, build_influence

        influence_args = from_namespace(
            InfluenceArguments,
            args,
            prefix="influence_",
            batch_size=max(1, index_args.batch_size // 2),
            max_tokens=index_args.max_tokens,
        )
        summary["influence"] = build_influence(
            args.model, args.corpus, influence_args, device=device, show_progress=not args.quiet
        )
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
    )
    notice = truncation_notice(result.decomposition.truncated_tokens)
    if notice:
        print(f"prism: note: {notice}", file=sys.stderr)
    print(json.dumps(result.to_json(), indent=2, ensure_ascii=False) if args.json else result.to_text())
    return 0


def cmd_outliers(args: argparse.Namespace) -> int:
    from core.attribution.influence import load_influence, self_influence

    ranked = self_influence(args.model, top=args.top)
    factors = load_influence(args.model)
    train = factors.corpus().train
    rows = train[[r.doc_index for r in ranked]] if ranked else {"id": [], "source": [], "text": []}
    records = [
        {
            "rank": i + 1,
            "doc_id": doc_id,
            "source": source,
            "doc_index": r.doc_index,
            "self_influence_per_token": r.score,
            "positions": r.positions,
            "text": text[:200],
        }
        for i, (r, doc_id, source, text) in enumerate(
            zip(ranked, rows["id"], rows["source"], rows["text"], strict=True)
        )
    ]
    if args.json:
        print(json.dumps({"measure": "self-influence per stored position", "documents": records}, ensure_ascii=False))
        return 0
    print(f"{len(records)} of {len(factors.documents)} training documents by self-influence per token")
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


# ----------------------------------------------------------------------------- the parser


def _add_model(parser: argparse.ArgumentParser, what: str = "bundle folder", required: bool = False) -> None:
    if required:
        parser.add_argument("--model", required=True, help=what)
    else:
        parser.add_argument(
            "--model", help=f"{what} (default: ${MODEL_ENV}, else the demo bundle of a source checkout)"
        )


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


def _add_quiet(parser: argparse.ArgumentParser, what: str = "no progress bars") -> None:
    parser.add_argument("--quiet", action="store_true", help=what)


def _add_controls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controls", help="controls JSON (the controller's gains and suppressions)")
    parser.add_argument("--suppress", help="prototype ids to suppress, e.g. 3,17,40-42")


def _add_trace(parser: argparse.ArgumentParser, max_new_help: str | None = None) -> None:
    """The options `attribute` and `report` share (defaults as in :func:`core.attribution.engine.attribute`)."""
    from core.attribution.engine import AUTO, METHODS

    parser.add_argument("--top", type=_positive_int, default=10, help="examples per token and overall")
    parser.add_argument(
        "--method",
        default=AUTO,
        choices=[AUTO, *METHODS],
        help="influence: which training documents taught the model this; spans: documents holding the "
        "text verbatim; neighbourhood: exemplars of the active prototypes (what they stand for); "
        "auto (default): the first of influence, spans, neighbourhood that the bundle's index has",
    )
    parser.add_argument("--max-new-tokens", type=_positive_int, default=16, help=max_new_help)


def _add_train(sub) -> None:
    from core.model.config import ROUTER_GRADIENTS
    from core.train.trainer import TrainOptions

    train = sub.add_parser("train", help="train a PRISM model (or its dense twin) into a bundle")
    add_options(train, TrainOptions, defaults={"device": default_device(), "dtype": default_dtype()})
    train.add_argument("--twin-out", help="also train the dense twin on the same tokens into this folder")
    train.add_argument("--keep-checkpoints", action="store_true", help="keep OUT/checkpoints afterwards")
    _add_quiet(train)
    train.add_argument(
        "--top-k",
        type=_positive_int,
        help="active prototypes per token (default: the preset's; at most its prototypes)",
    )
    train.add_argument("--num-prototypes", type=_positive_int, help="prototypes P (default: the preset's)")
    train.add_argument(
        "--reseed-interval",
        type=number_parser(int, minimum=0),
        help="steps between re-seedings of unused prototypes; 0 never (default: 100)",
    )
    train.add_argument(
        "--router-gradient",
        choices=list(ROUTER_GRADIENTS),
        help="all: straight-through gradient through every prototype's score while training "
        "(forward unchanged); active: the exact top-k gradient; default: the preset's",
    )
    train.set_defaults(func=cmd_train)


def _add_index(sub) -> None:
    from core.attribution.influence import InfluenceArguments
    from core.index.build import IndexArguments

    index = sub.add_parser("index", help="build a bundle's index: neighbourhoods, usage, snippets, labels, atlas")
    _add_model(index, required=True)
    index.add_argument("--corpus", required=True, help="the corpus the model was trained on")
    add_options(index, IndexArguments, exclude=("device",))
    add_device_options(index)
    index.add_argument("--no-spans", action="store_true", help="skip the span index (exact-span attribution)")
    # The influence factors' options (batch size and token cap follow the index's).
    index.add_argument("--no-influence", action="store_true", help="skip the influence factors")
    add_options(index, InfluenceArguments, prefix="influence_")
    _add_quiet(index)
    index.set_defaults(func=cmd_index)


def build_parser() -> argparse.ArgumentParser:
    from core.control.calibration import CalibrationArguments

    parser = _Parser(prog="prism", description="PRISM Explorer: prototype language models you can trace and steer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    corpus = sub.add_parser("corpus", help="build corpora")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True, parser_class=_Parser)
    demo = corpus_sub.add_parser("demo", help="build the mixed-domain demo corpus (needs apt and pip access)")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    _add_quiet(demo)
    demo.set_defaults(func=cmd_corpus)

    _add_train(sub)

    gen = sub.add_parser("generate", help="generate text from a bundle")
    _add_model(gen)
    gen.add_argument("--prompt", required=True)
    _add_controls(gen)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=48)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (with --sample)")
    add_device_options(gen)
    gen.set_defaults(func=cmd_generate)

    _add_index(sub)

    label = sub.add_parser("label", help="recompute an indexed bundle's prototype labels and UMAP atlas")
    _add_model(label, "indexed bundle folder", required=True)
    _add_quiet(label)
    add_device_options(label)
    label.set_defaults(func=cmd_label)

    attr = sub.add_parser("attribute", help="split a completion into prototype slices and link them to training data")
    _add_model(attr, "indexed bundle folder")
    attr.add_argument("--prompt", required=True)
    attr.add_argument("--completion", help="text to attribute (default: generate --max-new-tokens greedily)")
    _add_trace(attr)
    _add_controls(attr)
    attr.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    attr.add_argument(
        "--candidates",
        type=number_parser(int, minimum=0),
        default=None,
        help="influence only: score only the N documents whose gradient sketches promise most (faster on large "
        "stores; it can miss documents of the exact top, see docs/benchmarks.md); default: every document, exactly",
    )
    add_device_options(attr)
    attr.set_defaults(func=cmd_attribute)

    out = sub.add_parser(
        "outliers",
        help="training documents by self-influence per token: what the model finds unusual or memorised",
    )
    _add_model(out, "bundle folder with influence factors (built by prism index)")
    out.add_argument("--top", type=number_parser(int, minimum=1), default=20, help="documents listed (default: 20)")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    out.set_defaults(func=cmd_outliers)

    rep = sub.add_parser("report", help="trace prompts and write an attribution report (HTML, JSON or CSV)")
    _add_model(rep, "indexed bundle folder")
    rep.add_argument("--prompts", required=True, help='one prompt per line, or .jsonl rows {"prompt", "completion"}')
    rep.add_argument("--out", required=True, help="report file: .html (self-contained), .json or .csv")
    _add_trace(rep, "tokens generated without a completion")
    _add_controls(rep)
    _add_quiet(rep, "no progress bar")
    add_device_options(rep)
    rep.set_defaults(func=cmd_report)

    cal = sub.add_parser("calibrate", help="fit a controller's per-prototype gains on a multiple-choice task (JSONL)")
    _add_model(cal)
    cal.add_argument("--task", required=True, help='task JSONL, rows {"prompt", "choices", "answer"}')
    cal.add_argument("--out", required=True, help="controls JSON to write")
    add_options(cal, CalibrationArguments)
    cal.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    _add_quiet(cal, "no progress bar")
    add_device_options(cal)
    cal.set_defaults(func=cmd_calibrate)

    tgt = sub.add_parser("target", help="choose prototypes for a controller to suppress, with the evidence for each")
    _add_model(tgt)
    tgt.add_argument("--ids", help="prototype ids, e.g. 3,17,40-42")
    tgt.add_argument("--label", help="text contained in the prototypes' labels")
    tgt.add_argument("--query", help="words at the trigger of the prototypes' training neighbours")
    tgt.add_argument("--behaviour", help="behaviour JSON (assets/behaviours/): contrast its texts")
    tgt.add_argument("--top", type=_positive_int, default=10, help="prototypes to return")
    tgt.add_argument("--out", help="write a controls JSON suppressing them")
    add_device_options(tgt)
    tgt.set_defaults(func=cmd_target)

    app = sub.add_parser("explore", help="start the explorer app (Streamlit) on a bundle")
    app.add_argument("--model", default="", help=f"bundle folder (default: ${MODEL_ENV}, else the app's: the demo)")
    add_device_options(app)
    app.add_argument("--port", type=_positive_int, help="the server's port (default: Streamlit's, 8501)")
    app.add_argument("--headless", action="store_true", help="do not open a browser")
    app.set_defaults(func=cmd_explore)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    from transformers.utils import logging as hf_logging

    args = None
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "model", "") is None:  # a command whose --model has a default
            args.model = default_model()
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        if args.command != "train" or args.quiet:
            # weight-loading bars are noise around a generated text; --quiet means no bar at all
            hf_logging.disable_progress_bar()
        return args.func(args)
    except (PrismError, ValueError, OSError) as err:  # PrismError first: every error the library means for users
        if args is not None and args.verbose:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"prism: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prism: interrupted; {_interrupted(args)}", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line, and the way to the traceback
        if args is not None and args.verbose:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"prism: error: unexpected {type(err).__name__}: {message} (rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1


def _interrupted(args: argparse.Namespace | None) -> str:
    """What an interruption left behind, for the command that was running."""
    if args is not None and args.command == "train":
        return f"checkpoints written so far are kept in {args.out}/checkpoints; rerun with --resume to continue"
    if args is not None and args.command in ("index", "label"):
        return f"the index of {args.model} is as it was before; rerun the command to build it"
    return "each file is written under a temporary name and renamed once complete; rerun the command to finish"


if __name__ == "__main__":
    sys.exit(main())


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
