"""Options declared once: argument dataclasses with a help string per field.

A library argument class declares each option as a dataclass field whose metadata carries its
help text (and, optionally, its command-line name or a flag that keeps it off the command line):

    @dataclass
    class IndexArguments:
        top_m: int = option(32, "neighbours kept per prototype", minimum=1)

The class validates itself in ``__post_init__`` (:func:`check_fields` does the common checks);
the CLI builds its options from the class with :func:`add_options` and builds the instance back
with :func:`from_namespace`, and the explorer reads the same defaults with :func:`default_of`.
So a default lives in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

from core.errors import ArgumentError

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    cli: bool = True,
    flag: str | None = None,
    metavar: str | None = None,
    default_factory: Any = _MISSING,
) -> Any:
    """A dataclass field with its help text and bounds.

    Args:
        default: the default value (omit for a required option).
        help: one line for --help and the docs.
        minimum: the smallest allowed value (inclusive), checked by :func:`check_fields`.
        exclusive_minimum: values must be greater than this.
        cli: False keeps the field off the command line (tests, internal knobs).
        flag: the option's name on the command line (default: --field-name).
        metavar: how --help shows the value.
        default_factory: as in ``dataclasses.field``.
    """
    metadata = {
        "help": help,
        "minimum": minimum,
        "exclusive_minimum": exclusive_minimum,
        "cli": cli,
        "flag": flag,
        "metavar": metavar,
    }
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(typing.get_args(annotation))
    return annotation, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(instance: Any, error: type[Exception] = ArgumentError) -> None:
    """Check every field of a dataclass instance against its type and bounds.

    Literal fields must hold one of their values; int and float fields must be numbers (bool is
    not an int here) at or above their ``minimum``; ``None`` is accepted where the type allows it.
    """
    hints = _hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        kind, optional = _unwrap(hints[f.name])
        if value is None:
            if optional:
                continue
            if f.default is None:
                continue
        if typing.get_origin(kind) is Literal:
            allowed = typing.get_args(kind)
            if value not in allowed:
                raise error(f"{f.name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
            continue
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise error(f"{f.name} must be an integer, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise error(f"{f.name} must be a number, got {value!r}")
        if kind in (int, float):
            lo, above = f.metadata.get("minimum"), f.metadata.get("exclusive_minimum")
            if value != value:  # NaN
                raise error(f"{f.name} must be a number, got {value!r}")
            if lo is not None and value < lo:
                raise error(f"{f.name} must be >= {lo}, got {value!r}")
            if above is not None and not value > above:
                raise error(f"{f.name} must be > {above}, got {value!r}")


def default_of(cls: type, name: str) -> Any:
    """The declared default of field ``name`` of argument class ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not _MISSING:
                return f.default
            if f.default_factory is not _MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of argument class ``cls``."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def number_parser(kind: type, minimum: float | None = None, exclusive_minimum: float | None = None):
    """An argparse ``type`` that parses an int or float and checks its bounds, with a one-line error."""
    count = kind is int and minimum == 1
    expected = "a positive integer" if count else ("an integer" if kind is int else "a number")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected {expected}, got {value}" if count else f"must be >= {minimum}, got {text}"
            )
        if exclusive_minimum is not None and not value > exclusive_minimum:
            raise argparse.ArgumentTypeError(f"must be > {exclusive_minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    prefix: str = "",
) -> None:
    """Add one command-line option per field of the argument dataclass ``cls``.

    bool fields become ``--flag`` switches (or ``--no-flag`` when the default is True); Literal
    fields get ``choices``; numbers are checked against their bounds while parsing. The
    argparse destination is the field name (with ``prefix``), so :func:`from_namespace` can
    rebuild the instance.

    Args:
        parser: the (sub)parser or argument group.
        cls: the argument dataclass.
        exclude: fields left off this command.
        defaults: command-specific defaults that override the class's (say so in the help).
        prefix: prepended to the destination names when two classes share a parser.
    """
    hints = _hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        kind, optional = _unwrap(hints[f.name])
        required = f.default is _MISSING and f.default_factory is _MISSING and f.name not in defaults
        default = defaults.get(f.name, None if required else default_of(cls, f.name))
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        dest = prefix + f.name
        if kind is bool:
            if default:
                parser.add_argument("--no-" + flag[2:], dest=dest, action="store_false", help=text)
            else:
                parser.add_argument(flag, dest=dest, action="store_true", help=text)
            parser.set_defaults(**{dest: bool(default)})
            continue
        metavar = f.metadata.get("metavar") or flag[2:].upper().replace("-", "_")  # named after the flag, not dest
        kwargs: dict[str, Any] = {"dest": dest, "help": text, "metavar": metavar}
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if default is not None and text:
                kwargs["help"] = f"{text} (default: {default})"
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
            kwargs.pop("metavar")
        elif kind in (int, float):
            kwargs["type"] = number_parser(kind, f.metadata.get("minimum"), f.metadata.get("exclusive_minimum"))
        elif kind is str:
            kwargs["type"] = str
        else:
            continue  # dicts, lists and tensors are library-only
        parser.add_argument(flag, **kwargs)


def from_namespace(cls: type, args: argparse.Namespace, prefix: str = "", **extra: Any) -> Any:
    """Build ``cls`` from the parsed options that :func:`add_options` added (plus ``extra``)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, prefix + f.name):
            values[f.name] = getattr(args, prefix + f.name)
    values.update(extra)
    return cls(**values)
