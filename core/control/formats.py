"""The two input formats of the controller: task files and behaviour files.

One reader for each, used by the CLI, the app (for uploads) and the benches, so a file the
CLI accepts is a file the app accepts, with the same error messages.

A task is JSONL rows ``{"prompt": str, "choices": [str, ...], "answer": int}`` (other keys,
such as "id", are ignored); see :mod:`core.control.calibration` for how it is scored.

A behaviour is one JSON object::

    {"name", "description", "pattern", "source", "prompts": [...], "neutral_prompts": [...],
     "contrast_behaviour": [...], "contrast_neutral": [...], "words": [...] (optional)}

that says how to detect a behaviour of the model in a continuation and which texts show it
(for :func:`core.control.targeting.target_by_contrast`); the demo behaviours are built by
:mod:`core.data.demo.tasks`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core import store
from core.errors import BehaviourError, TaskError

MIN_TASK_ITEMS = 2
BEHAVIOUR_FIELDS = (
    "name",
    "description",
    "pattern",
    "prompts",
    "neutral_prompts",
    "contrast_behaviour",
    "contrast_neutral",
    "source",
)
_TEXT_LISTS = BEHAVIOUR_FIELDS[3:7]


# ------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskItem:
    """One multiple-choice question: the prompt, its choices and the index of the right one."""

    prompt: str
    choices: list[str]
    answer: int


def parse_item(data: object, where: str = "item") -> TaskItem:
    """Validate one task row; ``where`` names it in errors (e.g. "tasks.jsonl line 4")."""
    if not isinstance(data, dict):
        raise TaskError(f"{where} is not a JSON object")
    for key in ("prompt", "choices", "answer"):
        if key not in data:
            raise TaskError(f'{where} has no "{key}" (rows are {{"prompt", "choices", "answer"}})')
    prompt, choices, answer = data["prompt"], data["choices"], data["answer"]
    if not isinstance(prompt, str) or not prompt:
        raise TaskError(f'{where}: "prompt" must be a non-empty string')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise TaskError(f'{where}: "answer" must be an index 0..{len(choices) - 1} into "choices", got {answer!r}')
    return TaskItem(prompt=prompt, choices=list(choices), answer=answer)


def read_task_lines(lines: Iterable[str], where: str) -> list[TaskItem]:
    """Parse the lines of a task JSONL file (blank lines skipped).

    Args:
        lines: the file's lines (an open file, or an upload's text split into lines).
        where: the file's name, for errors ("tasks.jsonl line 4 is not valid JSON").

    Raises:
        TaskError: a bad row (named by its line number) or fewer than two items.
    """
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        data = store.parse_json(line, f"{where} line {number}", error=TaskError)
        items.append(parse_item(data, f"{where} line {number}"))
    if len(items) < MIN_TASK_ITEMS:
        raise TaskError(f"{where} has {len(items)} items; a task needs at least {MIN_TASK_ITEMS}")
    return items


def load_task(path: str | Path) -> list[TaskItem]:
    """Read a task JSONL file, raising :class:`TaskError` that names the bad line."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"task file not found: {p}")
    with open(p, encoding="utf-8") as f:
        return read_task_lines(f, str(p))


# -------------------------------------------------------------------------------- behaviours


@dataclass(frozen=True)
class Behaviour:
    """A behaviour of the model to measure and remove.

    Attributes:
        name, description: what it is.
        pattern: regular expression (case-insensitive) that detects it in a continuation.
        prompts: prompts whose sampled continuations are scored for the behaviour.
        neutral_prompts: prompts without it (side effects are measured on them).
        contrast_behaviour, contrast_neutral: texts for :func:`core.control.targeting.target_by_contrast`:
            contexts whose next word shows the behaviour, and matched contexts whose next word
            does not. Disjoint from ``prompts``.
        source: the corpus source the behaviour belongs to; perplexity is measured on the others.
        words: the words that make up the behaviour (for targeting by the tokens prototypes write).
    """

    name: str
    description: str
    pattern: str
    prompts: tuple[str, ...]
    neutral_prompts: tuple[str, ...]
    contrast_behaviour: tuple[str, ...]
    contrast_neutral: tuple[str, ...]
    source: str
    words: tuple[str, ...] = ()

    def token_ids(self, tokenizer) -> list[int]:
        """The tokens that spell one of the words whole (a trailing ":" aside), after a space
        or at a line start, capitalised or not; words split into pieces are left out."""
        ids = set()
        for word in self.words:
            bare = word.rstrip(":")
            for variant in (f" {word}", f" {word.capitalize()}", word, word.capitalize()):
                encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
                if encoded and tokenizer.decode(encoded[:1]).strip().lower() == bare.lower():
                    ids.add(encoded[0])
        return sorted(ids)

    def detect(self, text: str) -> bool:
        """True when ``text`` shows the behaviour."""
        return re.search(self.pattern, text, flags=re.IGNORECASE) is not None


def parse_behaviour(data: object, where: str = "behaviour") -> Behaviour:
    """Validate a parsed behaviour document; ``where`` names it in errors ("behaviour file x.json").

    Raises:
        BehaviourError: not an object, a missing field or a pattern that is not a regular expression.
    """
    if not isinstance(data, dict):
        raise BehaviourError(f"{where} is not a JSON object")
    missing = [f for f in BEHAVIOUR_FIELDS if f not in data]
    if missing:
        raise BehaviourError(f"{where} lacks {', '.join(missing)}")
    try:
        re.compile(data["pattern"])
    except (re.error, TypeError) as err:
        raise BehaviourError(f"{where}: pattern {data['pattern']!r} is not a regular expression ({err})") from None
    lists = {f: tuple(str(x) for x in data[f]) for f in _TEXT_LISTS}
    return Behaviour(
        name=str(data["name"]),
        description=str(data["description"]),
        pattern=data["pattern"],
        source=str(data["source"]),
        words=tuple(str(w) for w in data.get("words", [])),
        **lists,
    )


def load_behaviour(path: str | Path) -> Behaviour:
    """Read a behaviour JSON file, raising :class:`BehaviourError` on a malformed one."""
    p = Path(path)
    if not p.is_file():
        raise BehaviourError(f"behaviour file not found: {p}")
    data = store.read_json(p, "behaviour file", error=BehaviourError)
    return parse_behaviour(data, f"behaviour file {p}")
