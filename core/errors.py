"""One error hierarchy for the library.

Every error a user can cause derives from :class:`PrismError`. Its message names the bad value
(a path, an option, a row) and the fix, so the CLI prints it as one line and the explorer shows
it in a box; a traceback means a bug. ``PrismError`` is a ``ValueError`` so that code which
already catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class PrismError(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it."""


class ArgumentError(PrismError):
    """An option or argument value out of range, with the allowed values."""


class ArtifactError(PrismError):
    """A stored file (index, influence factors, labels, atlas, ...) that is missing, unreadable,
    stale or made for other weights, with the command that rebuilds it."""


class CorpusError(PrismError):
    """A corpus path that cannot be used, with the reason and the fix."""


class BundleError(PrismError):
    """A folder that is not a usable PRISM bundle, with the reason and the fix."""


class TrainingError(PrismError):
    """Bad training arguments, with the reason and the fix."""


class PrototypeIndexError(ArtifactError):
    """An index that is missing, stale or built for another model or corpus, with the fix."""


class InfluenceError(ArtifactError):
    """Influence factors that are missing, stale or unusable, with the command that fixes it."""


class LabelsError(ArtifactError):
    """Labels that are missing their inputs, unreadable or made for other weights, with the fix."""


class AtlasError(ArtifactError):
    """An atlas that cannot be built or read, with the reason and the fix."""


class ControlsError(PrismError):
    """A controls document that cannot be applied, with the reason."""


class TaskError(PrismError):
    """A task file or item that cannot be used, with the bad row and the fix."""


class BehaviourError(PrismError):
    """A behaviour file that cannot be used, with the reason."""


class TargetingError(PrismError):
    """A targeting request that cannot be answered, with the reason and the fix."""


class ReportError(PrismError):
    """A prompts file or output path that cannot make a report, with the fix."""


class BaselineError(PrismError):
    """A post-hoc baseline that cannot run (library missing, bad input), with the fix."""


class CliError(PrismError):
    """A command-line usage error: printed as one line, exit 1."""
