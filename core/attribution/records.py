"""What attribution returns: per-token decompositions, credited training examples and the
attribution of a completion, with its JSON and text forms (``prism attribute``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PrototypeSlice:
    """One active prototype of a token: its id, mixture weight, slice of the logit and
    cos(K_j, h) with the hidden state it was chosen for."""

    id: int
    weight: float
    slice: float
    cosine: float


@dataclass
class Alternative:
    """A token the model could have chosen instead, with its slices (same prototype order)."""

    token: str
    token_id: int
    logit: float
    probability: float
    slices: list[float]


@dataclass
class TokenDecomposition:
    """A completion token split into prototype slices.

    Attributes:
        position: index of the token in the completion (0 = first completion token).
        context_tokens: number of tokens it was predicted from.
        token, token_id: the token.
        logit, probability: its logit and softmax probability under the call's controls.
        prototypes: the k active prototypes, by decreasing slice; slices sum to ``logit``.
        alternatives: the most likely other tokens, by decreasing logit.
    """

    position: int
    context_tokens: int
    token: str
    token_id: int
    logit: float
    probability: float
    prototypes: list[PrototypeSlice]
    alternatives: list[Alternative] = field(default_factory=list)


@dataclass
class Decomposition:
    """A decomposed completion.

    Attributes:
        prompt, completion: the texts as the model saw them (the prompt after truncation).
        prompt_ids, completion_ids: their token ids.
        tokens: one record per completion token.
        generated: True when the completion was generated greedily by the model.
        truncated_tokens: tokens dropped from the start of a prompt too long for the context.
    """

    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    tokens: list[TokenDecomposition]
    generated: bool = False
    truncated_tokens: int = 0


@dataclass
class Example:
    """A training document credited for a token (or a span), with its best snippet.

    Attributes:
        doc_id, source: the corpus row's id (unchanged) and source.
        score: summed credit of the document's neighbour positions (neighbourhood), or its
            influence on the attributed tokens' loss, + = helpful (influence).
        snippet: text around the position that carried most credit; the trigger token is
            ``snippet[highlight_start:highlight_end]``.
        prototype: the prototype that carried most credit to this document.
        doc_index: row of the document in the training split.
        char_offset: start of the trigger token in the document.
        positions: number of the document's neighbour positions (neighbourhood) or
            (prototype, document) entries (influence) that received credit.
        relative: influence only: ``score`` / ||g_D||_A, the score of the document's gradient
            scaled to unit length (how closely it points along the query's, whatever its
            size); the default ranking key of influence. None for the other methods.
    """

    doc_id: str
    source: str
    score: float
    snippet: str
    highlight_start: int
    highlight_end: int
    prototype: int
    doc_index: int
    char_offset: int
    positions: int
    relative: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Attribution:
    """Attribution of a completion: per-token decomposition and examples, and examples over
    the whole completion (or ``span``).

    Attributes:
        model, model_fingerprint: the bundle.
        method: the attribution method (one of :data:`core.attribution.engine.METHODS`).
        measurement: what was attributed: ``logit slice`` (neighbourhood: each example's
            share of the tokens' logit slices) or ``loss`` (influence: the change of the
            attributed tokens' summed loss -log p it explains, + = helpful).
        decomposition: the per-token decomposition.
        token_examples: examples of each completion token; examples: over the ``span``.
        harmful: influence only: the documents over the ``span`` whose upweighting would raise
            its loss most (most negative scores first); empty for the other methods.
        labels: prototype id -> label.
        span: (start, end) completion tokens of the overall ranking, None for all of them.
    """

    model: str
    model_fingerprint: str
    method: str
    measurement: str
    decomposition: Decomposition
    token_examples: list[list[Example]]
    examples: list[Example]
    harmful: list[Example] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    span: tuple[int, int] | None = None

    def to_json(self) -> dict:
        """The ``prism attribute --json`` object (the contract in docs/design.md, plus extra keys)."""
        dec = self.decomposition
        tokens = []
        for token, examples in zip(dec.tokens, self.token_examples, strict=True):
            record = asdict(token)
            for p in record["prototypes"]:
                p["label"] = self.labels.get(p["id"])
            tokens.append({**record, "examples": [e.to_json() for e in examples]})
        return {
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "method": self.method,
            "measurement": self.measurement,
            "prompt": dec.prompt,
            "completion": dec.completion,
            "generated": dec.generated,
            "truncated_tokens": dec.truncated_tokens,
            "span": list(self.span) if self.span else None,
            "tokens": tokens,
            "examples": [e.to_json() for e in self.examples],
            "harmful": [e.to_json() for e in self.harmful],
        }

    def to_text(self, prototypes: int = 4, examples: int = 3) -> str:
        """A readable table: each token with its strongest slices and examples, then the
        examples over the whole completion."""
        dec = self.decomposition
        lines = [
            f"prompt: {dec.prompt!r}",
            f"completion: {dec.completion!r}" + (" (generated)" if dec.generated else ""),
            f"method: {self.method} (scores: {self.measurement}"
            + (", relative score in ( )" if self.method == "influence" else "")
            + ")",
            "each token: its strongest slices, then examples with the trigger token in [[ ]]",
        ]
        for token, token_examples in zip(dec.tokens, self.token_examples, strict=True):
            lines.append(
                f"[{token.position:>3}] {token.token!r:<16} logit {token.logit:8.3f}  p {token.probability:.3f}"
            )
            for p in token.prototypes[:prototypes]:
                label = f"  {self.labels[p.id]}" if p.id in self.labels else ""
                lines.append(f"        prototype {p.id:>5}  weight {p.weight:7.3f}  slice {p.slice:8.3f}{label}")
            for e in token_examples[:examples]:
                lines.append(f"        {_score(e)}  {e.doc_id} ({e.source}): {_marked(e)}")
        span = f" tokens {self.span[0]}..{self.span[1] - 1}" if self.span else " the whole completion"
        lines.append(f"examples over{span} ({self.method}):")
        for rank, e in enumerate(self.examples, start=1):
            lines.append(f"  {rank:>2}. {_score(e)}  {e.doc_id} ({e.source}, prototype {e.prototype}): {_marked(e)}")
        if self.harmful:
            lines.append(f"most harmful over{span} (upweighting them raises the loss):")
            for rank, e in enumerate(self.harmful, start=1):
                lines.append(
                    f"  {rank:>2}. {_score(e)}  {e.doc_id} ({e.source}, prototype {e.prototype}): {_marked(e)}"
                )
        return "\n".join(lines)


def _score(example: Example) -> str:
    """The score column: the score, and the relative score after it where there is one."""
    if example.relative is None:
        return f"{example.score:8.3f}"
    return f"{example.score:8.3f} ({example.relative:+.3f})"


def _marked(example: Example, width: int = 70) -> str:
    """One line of snippet around the trigger token, which is wrapped in [[ ]]."""
    s, a, b = example.snippet, example.highlight_start, example.highlight_end
    text = s[max(0, a - width // 2) : a] + "[[" + s[a:b] + "]]" + s[b : b + width // 2]
    return " ".join(text.split())
