"""The arguments of the influence build, declared once (help text and bounds per field): the
library, the command line (``prism index``) and the explorer read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.errors import ArgumentError
from core.options import check_fields, option

STORAGES = ("int8", "float16", "float32", "float64")
STORES = ("positions", "sketch")


@dataclass
class InfluenceArguments:
    """How the influence factors and the position store are built (stored with them).

    The fields' ``flag`` metadata names their ``prism index`` options.
    """

    rank: int | None = option(
        64,
        "eigenvectors kept per prototype block, r <= 2d; every other direction is weighted by the damped mean "
        "of the eigenvalues left out, so r trades build time and factor memory (2d x r per prototype) against "
        "agreement with the exact inverse (the query's scan of the store does not depend on it); None keeps "
        "all 2d (exact)",
        minimum=1,
        flag="--influence-rank",
    )
    damping: float = option(0.1, "lambda_j = damping * mean eigenvalue of block j", exclusive_minimum=0, cli=False)
    top_documents: int | None = option(
        None,
        "removed in format 3 (every document is stored); only None is accepted",
        minimum=1,
        cli=False,
    )
    curvature_tokens: int | None = option(
        32_768,
        "training tokens (whole sequences, evenly spread) sampled for the Fisher blocks; None uses every position",
        minimum=1,
    )
    document_tokens: int | None = option(
        None,
        "training tokens (whole, evenly spread sequences) stored for scoring; None stores every position. "
        "A cap stores only part of each document and leaves out documents never sampled",
        minimum=1,
        flag="--influence-tokens",
    )
    batch_size: int = option(8, "sequences per forward pass; the factors do not depend on it", minimum=1, cli=False)
    max_tokens: int | None = option(
        None, "use only the first sequences holding this many tokens; None: all", minimum=1, cli=False
    )
    dtype: Literal["float32", "float64"] = option(
        "float32", "precision of the passes; float64 is for tests that compare exactly", cli=False
    )
    storage: Literal["int8", "float16", "float32", "float64"] = option(
        "int8",
        "precision of the stored positions (h, r, c, a; one scale per row): int8 keeps the float32 "
        "ranking (Spearman > 0.999) in about half the bytes of float16",
        flag="--influence-storage",
    )
    store: Literal["positions", "sketch"] = option(
        "positions",
        "what is kept per training document: positions (every position's block gradient parts, about "
        "0.6 kB each at the demo's size: exact scores) or sketch (only the document's gradient sketch, "
        "4 bytes x --influence-sketch per document: every document scored by an unbiased estimate)",
        flag="--influence-store",
    )
    seed: int = option(0, "seeds the sampled Fisher labels and the gradient sketch", cli=False)
    sketch_width: int = option(
        2048,
        "coordinates of each document's gradient sketch, searched for a query's candidates before "
        "they are scored exactly (4 bytes each per document); wider sketches miss fewer of the exact top",
        minimum=8,
        flag="--influence-sketch",
    )
    curvature_memory_mb: int = option(
        2048,
        "memory for the curvature blocks held at once; more blocks than fit are "
        "accumulated and inverted in several passes over the curvature sample",
        minimum=1,
    )

    def __post_init__(self) -> None:
        if self.top_documents is not None:
            raise ArgumentError(
                f"top_documents={self.top_documents!r}: per-prototype document lists were removed (influence "
                "format 3 stores every document's positions); drop the option (--influence-documents)"
            )
        for name in ("rank", "curvature_tokens", "document_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ArgumentError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("batch_size", "curvature_memory_mb", "sketch_width"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.damping > 0:
            raise ArgumentError(f"damping must be > 0, got {self.damping}")
        if self.dtype not in ("float32", "float64"):
            raise ArgumentError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.store not in STORES:
            raise ArgumentError(f"store must be one of {', '.join(STORES)}, got {self.store!r}")
        if self.storage not in STORAGES:
            raise ArgumentError(f"storage must be one of {', '.join(STORAGES)}, got {self.storage!r}")
        check_fields(self, ArgumentError)
