"""Where the model runs and in what precision: the one declaration of ``--device`` and ``--dtype``.

Every command that runs the model (train, index, label, attribute, generate, report, calibrate,
target) and the explorer take the same two settings. Their defaults come from the environment
(:data:`DEVICE_ENV`, :data:`DTYPE_ENV`), else ``auto``:

- device ``auto`` is the first CUDA device when one is present, else the CPU;
- dtype ``auto`` is bfloat16 on a CUDA device that supports it, else float32.

A model loaded in bfloat16 or float16 still reports its prototype slices in float32: the
slices are computed from the head's weights cast to float32 (:func:`core.model.head.prototype_slices`),
so they sum to the reported float32 logit to float32 rounding whatever the model's dtype
(docs/model.md states the tolerances).
"""

from __future__ import annotations

import os
import typing
from typing import Literal

from core.errors import ArgumentError

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DEVICES: tuple[str, ...] = typing.get_args(Device)
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
DEVICE_ENV = "PRISM_DEVICE"  # the default of every --device (and of the explorer)
DTYPE_ENV = "PRISM_DTYPE"  # the default of every --dtype (and of the explorer)

DEVICE_HELP = "where the model runs: auto (CUDA when present), cpu or cuda"
DTYPE_HELP = (
    "the model's precision: auto (bfloat16 on a CUDA device that supports it, else float32), "
    "float32, bfloat16 or float16; slices are reported in float32 either way"
)


def default_device() -> str:
    """$PRISM_DEVICE when set, else ``auto``.

    Raises:
        ArgumentError: $PRISM_DEVICE holds something else than auto, cpu or cuda.
    """
    return _from_env(DEVICE_ENV, DEVICES)


def default_dtype() -> str:
    """$PRISM_DTYPE when set, else ``auto``.

    Raises:
        ArgumentError: $PRISM_DTYPE holds something else than auto, float32, bfloat16 or float16.
    """
    return _from_env(DTYPE_ENV, DTYPES)


def _from_env(name: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or "auto"
    if value not in allowed:
        raise ArgumentError(f"${name} is {os.environ[name]!r}; set it to one of {', '.join(allowed)} or unset it")
    return value


def resolve_device(device: str) -> str:
    """The torch device of a device setting: ``auto`` is CUDA when present, else the CPU.

    Raises:
        ArgumentError: an unknown device, or ``cuda`` on a machine without a CUDA device.
    """
    import torch

    if device not in DEVICES:
        raise ArgumentError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    """The torch dtype of a dtype setting on the resolved ``device`` ("cpu" or "cuda").

    Raises:
        ArgumentError: an unknown dtype.
    """
    import torch

    if dtype not in DTYPES:
        raise ArgumentError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        cuda = str(device).startswith("cuda")
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def add_device_options(parser, *, device_default: str | None = None) -> None:
    """Add ``--device`` and ``--dtype`` to an argparse (sub)parser, defaults from the environment.

    Args:
        parser: the subparser of a command that runs the model.
        device_default: a command-specific default device (said in its help); None: $PRISM_DEVICE or auto.
    """
    device = device_default or default_device()
    dtype = default_dtype()
    parser.add_argument("--device", default=device, choices=DEVICES, help=f"{DEVICE_HELP} (default: {device})")
    parser.add_argument("--dtype", default=dtype, choices=DTYPES, help=f"{DTYPE_HELP} (default: {dtype})")
