"""PRISM Explorer's library: the PRISM model, training, attribution and controllers.

The names in ``__all__`` are the public API; the explorer and the benches import only these.
Importing ``core`` registers the ``prism`` model type with transformers' Auto classes; every
other name is imported on first use, so ``import core`` stays cheap and free of side effects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from core.errors import (
    ArgumentError,
    ArtifactError,
    AtlasError,
    BaselineError,
    BehaviourError,
    BundleError,
    ControlsError,
    CorpusError,
    InfluenceError,
    LabelsError,
    PrismError,
    PrototypeIndexError,
    ReportError,
    TargetingError,
    TaskError,
    TrainingError,
)
from core.model.config import PrismConfig
from core.model.head import PrototypeHead, prototype_slices
from core.model.modeling import PrismCausalLMOutput, PrismForCausalLM

# name -> module that defines it; resolved by __getattr__ on first use.
_LAZY = {
    # bundles and generation
    "Bundle": "core.bundle",
    "load_bundle": "core.bundle",
    "write_bundle": "core.bundle",
    "model_fingerprint": "core.bundle",
    "DEVICES": "core.device",
    "DTYPES": "core.device",
    "DEVICE_ENV": "core.device",
    "DTYPE_ENV": "core.device",
    "default_device": "core.device",
    "default_dtype": "core.device",
    "GenerationResult": "core.generation",
    "generate_text": "core.generation",
    "GenerationSettings": "core.generation",
    "GREEDY": "core.generation",
    "DEFAULT_GENERATION": "core.generation",
    "describe_generation": "core.generation",
    "continuation_perplexity": "core.generation",
    "truncation_notice": "core.generation",
    "TokenComparison": "core.generation",
    "compare_tokens": "core.generation",
    # data and training
    "load_corpus": "core.data.corpus",
    "build_demo_corpus": "core.data.demo",
    "TrainOptions": "core.train.trainer",
    "PRESETS": "core.train.trainer",
    "train": "core.train.trainer",
    # index
    "PrototypeIndex": "core.index.format",
    "load_index": "core.index.format",
    "index_exists": "core.index.format",
    "build_index": "core.index.build",
    "IndexArguments": "core.index.build",
    # attribution
    "METHODS": "core.attribution.engine",
    "AUTO_METHOD": ("core.attribution.engine", "AUTO"),
    "Attribution": "core.attribution.records",
    "Decomposition": "core.attribution.records",
    "attribute": "core.attribution.engine",
    "decompose": "core.attribution.decompose",
    "InfluenceArguments": "core.attribution.influence",
    "build_influence": "core.attribution.influence",
    "load_influence": "core.attribution.influence",
    "self_influence": "core.attribution.influence",
    "SpanIndex": "core.attribution.spans_index",
    "build_spans": "core.attribution.spans_index",
    "load_spans": "core.attribution.spans_index",
    # controllers
    "Controls": "core.control.controls",
    "load_controls": "core.control.controls",
    "save_controls": "core.control.controls",
    "parse_ids": "core.control.controls",
    "CalibrationArguments": "core.control.arguments",
    "calibrate": "core.control.calibration",
    "evaluate_task": "core.control.calibration",
    "split_items": "core.control.calibration",
    "moved_prototypes": "core.control.calibration",
    "CalibrationResult": "core.control.calibration",
    "TaskItem": "core.control.formats",
    "load_task": "core.control.formats",
    "read_task_lines": "core.control.formats",
    "Behaviour": "core.control.formats",
    "load_behaviour": "core.control.formats",
    "parse_behaviour": "core.control.formats",
    "target_by_ids": "core.control.targeting",
    "target_by_label": "core.control.targeting",
    "target_by_query": "core.control.targeting",
    "target_by_contrast": "core.control.targeting",
    # labels and atlas
    "build_labels": "core.atlas.labels",
    "load_labels": "core.atlas.labels",
    "quality_summary": "core.atlas.labels",
    "build_atlas": "core.atlas.layout",
    "load_atlas": "core.atlas.layout",
    "AtlasTables": "core.atlas.tables",
    "build_atlas_tables": "core.atlas.tables",
    # reports
    "build_report": "core.report",
    "write_report": "core.report",
    "read_prompts": "core.report",
    "report_from_attributions": "core.report",
    "render_report": ("core.report", "render"),
    "WATERFALL_SLICES": "core.report",
    "report_formats": ("core.report", "FORMATS"),
}

__all__ = [
    "ArgumentError",
    "ArtifactError",
    "AtlasError",
    "BaselineError",
    "BehaviourError",
    "BundleError",
    "ControlsError",
    "CorpusError",
    "InfluenceError",
    "LabelsError",
    "PrismCausalLMOutput",
    "PrismConfig",
    "PrismError",
    "PrismForCausalLM",
    "PrototypeHead",
    "PrototypeIndexError",
    "ReportError",
    "TargetingError",
    "TaskError",
    "TrainingError",
    "prototype_slices",
    *_LAZY,
]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from core.bundle import Bundle, load_bundle  # noqa: F401
