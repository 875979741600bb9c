"""The ``prism`` command (also ``python -m core``).

Every command has --help; bad input ends with a one-line ``prism: error: ...`` and exit 1.
Options that a library argument class declares (:class:`~core.train.trainer.TrainOptions`,
:class:`~core.index.build.IndexArguments`, :class:`~core.control.arguments.CalibrationArguments`)
are built from it with :func:`core.options.add_options`, so their defaults and help live there.
"""

from __future__ import annotations

import argparse
import logging
import sys

from core.commands import (  # noqa: F401 (REPO, DEMO_BUNDLE, APP: public)
    APP,
    DEMO_BUNDLE,
    MODEL_ENV,
    REPO,
    cmd_attribute,
    cmd_calibrate,
    cmd_corpus,
    cmd_explore,
    cmd_generate,
    cmd_index,
    cmd_label,
    cmd_outliers,
    cmd_report,
    cmd_target,
    cmd_train,
    default_model,
)
from core.device import DEVICES, add_device_options, default_device, default_dtype  # noqa: F401 (DEVICES: public)
from core.errors import CliError, PrismError
from core.options import add_options, number_parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 1 instead of usage + exit 2
        raise CliError(f"{message} (see `{self.prog} --help`)")


_positive_int = number_parser(int, minimum=1)


# ----------------------------------------------------------------------------- the parser


def _add_model(parser: argparse.ArgumentParser, what: str = "bundle folder", required: bool = False) -> None:
    if required:
        parser.add_argument("--model", required=True, help=what)
    else:
        parser.add_argument(
            "--model", help=f"{what} (default: ${MODEL_ENV}, else the demo bundle of a source checkout)"
        )


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


def _add_generation(parser: argparse.ArgumentParser, when: str = "") -> None:
    """How new tokens are chosen; unset options take core.generation.DEFAULT_GENERATION's values
    (resolved by :func:`core.commands.generation_from_args`)."""
    from core.generation import DEFAULT_GENERATION, GenerationSettings
    from core.options import help_of

    default = DEFAULT_GENERATION
    sampling = default if default.do_sample else GenerationSettings(do_sample=True)  # what --sample starts from
    group = parser.add_argument_group(
        "generation" + when,
        "how each new token is chosen. The defaults were chosen by measurement (bench/generation.py, "
        f"docs/benchmarks.md): {default.describe()}",
    )
    group.add_argument(
        "--greedy",
        action="store_true",
        help="plain greedy decoding: the likeliest token every time, no repetition penalty or n-gram ban",
    )
    group.add_argument(
        "--sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"sample each token, or take the likeliest (--no-sample: greedy, keeping the repetition options) "
        f"(default: {'--sample' if default.do_sample else '--no-sample'})",
    )
    for name, kind, metavar, bounds in (
        ("temperature", float, "T", {"exclusive_minimum": 0.0}),
        ("top_p", float, "P", {"exclusive_minimum": 0.0}),
        ("repetition_penalty", float, "R", {"exclusive_minimum": 0.0}),
        ("no_repeat_ngram_size", int, "N", {"minimum": 0}),
    ):
        sampling_only = name in ("temperature", "top_p")
        value = getattr(sampling if sampling_only else default, name)
        note = "; sampling only" if sampling_only else ""
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=number_parser(kind, **bounds),
            default=None,
            metavar=metavar,
            help=f"{help_of(GenerationSettings, name)}{note} (default: {value:g})",
        )
    group.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed: the same seed and options give the same text (default: 0)",
    )


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
    train.add_argument(
        "--top-k-start",
        type=_positive_int,
        help="anneal k linearly from this many active prototypes down to --top-k while training "
        "(default: no annealing)",
    )
    train.add_argument(
        "--anneal-fraction",
        type=number_parser(float, exclusive_minimum=0.0),
        help="with --top-k-start: the share of the steps over which k is annealed, in (0, 1] (default: 0.5)",
    )
    train.add_argument(
        "--concentration-weight",
        type=number_parser(float, minimum=0.0),
        help="weight of the loss on the entropy of each token's active weights (default: 0, off)",
    )
    train.add_argument(
        "--weight-power",
        type=number_parser(float, exclusive_minimum=0.0),
        help="weights softplus(score)^p; p > 1 sharpens them (default: 1)",
    )
    train.add_argument(
        "--learn-weight-power",
        action="store_true",
        default=None,
        help="train the weight power, starting from --weight-power",
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
    _add_generation(gen)
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
    attr.add_argument(
        "--completion", help="text to attribute (default: generate --max-new-tokens with the generation options)"
    )
    _add_trace(attr)
    _add_controls(attr)
    _add_generation(attr, " (without --completion)")
    attr.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    attr.add_argument(
        "--candidates",
        type=number_parser(int, minimum=0),
        default=None,
        help="influence only: score only the N documents whose gradient sketches promise most (faster on large "
        "stores; it can miss documents of the exact top, see docs/benchmarks.md); default: every document, exactly. "
        "A sketch-only store (--influence-store sketch) always estimates every document and ignores it",
    )
    attr.add_argument(
        "--rank-by",
        choices=("relative", "loss"),
        default="relative",
        help="influence only: rank documents by their score over the norm of their gradient (relative, the "
        "default: how closely a document's gradient points along the completion's, whatever its length) or by "
        "the score itself (loss: the predicted change of the completion's loss)",
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
    _add_generation(rep, " (for prompts without a completion)")
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
