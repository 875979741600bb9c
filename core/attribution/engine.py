"""Per-token decomposition and training-data attribution.

:func:`decompose` runs one forward pass over prompt + completion and, for each completion
token (predicted from everything before it), returns its logit and probability, its k active
prototypes with their weights and slices (which sum to the logit), and the top alternative
tokens with their own slices.

:func:`attribute` links the slices to training documents through the index
(:mod:`core.index`). Method ``neighbourhood`` (level 0 of the design): the slice of prototype
j is shared among j's neighbourhood in proportion to similarity (its non-negative part,
normalised over the neighbourhood); a document's score is the sum of the shares of its
neighbour positions over all active prototypes (and, for a span, over its tokens).

Method ``influence`` (level 1): influence functions restricted to the prototype parameters
(:mod:`core.influence`); a document's score is the change of the attributed tokens' summed
loss it explains, + = helpful, and its ``prototype`` is the block that carried most of it.

Similarity (``similarity="code"``, the default) is the cosine between the query's prototype
code and the neighbour's: each position's cosines with its k active prototypes, as a sparse
P-vector. Neighbours whose context activates the same prototypes as the query's take most of
the credit. ``similarity="key"`` uses cos(K_j, h_n), which gives every query the same shares:
on the planted-canary setup of tests/test_attribution.py (64 or 128 prototypes, 3 seeds
each) it put no canary in the top 3, while the code put one first or second every time.

Credit is the *signed* slice. A negative slice (a prototype that pushed against the token)
gives its neighbours negative scores, so examples that opposed the prediction rank last, and
the scores of all documents add up to the logit (to the part of it whose prototypes have a
neighbour of positive similarity, which is the usual case for all of them). Using |slice|
would rank opposing examples as support and break that sum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from core.bundle import Bundle
from core.control.controls import Controls, control_kwargs
from core.index.format import PrototypeIndexError, PrototypeIndex, best_per_group
from core.attribution.influence import InfluenceCredit, InfluenceFactors
from core.model.head import prototype_scores, prototype_slices

METHODS = ("neighbourhood", "influence")


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

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Attribution:
    """Attribution of a completion: per-token decomposition and examples, and examples over
    the whole completion (or ``span``)."""

    model: str
    model_fingerprint: str
    method: str
    decomposition: Decomposition
    token_examples: list[list[Example]]
    examples: list[Example]
    labels: dict[int, str] = field(default_factory=dict)
    span: tuple[int, int] | None = None

    def to_json(self) -> dict:
        """The ``prism attribute --json`` object (DESIGN section 8, plus extra keys)."""
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
            "prompt": dec.prompt,
            "completion": dec.completion,
            "generated": dec.generated,
            "truncated_tokens": dec.truncated_tokens,
            "span": list(self.span) if self.span else None,
            "tokens": tokens,
            "examples": [e.to_json() for e in self.examples],
        }

    def to_text(self, prototypes: int = 4, examples: int = 3) -> str:
        """A readable table: each token with its strongest slices and examples, then the
        examples over the whole completion."""
        dec = self.decomposition
        lines = [
            f"prompt: {dec.prompt!r}",
            f"completion: {dec.completion!r}" + (" (generated)" if dec.generated else ""),
            "each token: its strongest slices, then examples with the trigger token in [[ ]]",
        ]
        for token, token_examples in zip(dec.tokens, self.token_examples, strict=True):
            lines.append(f"[{token.position:>3}] {token.token!r:<16} logit {token.logit:8.3f}  "
                         f"p {token.probability:.3f}")
            for p in token.prototypes[:prototypes]:
                label = f"  {self.labels[p.id]}" if p.id in self.labels else ""
                lines.append(f"        prototype {p.id:>5}  weight {p.weight:7.3f}  slice {p.slice:8.3f}{label}")
            for e in token_examples[:examples]:
                lines.append(f"        {e.score:8.3f}  {e.doc_id} ({e.source}): {_marked(e)}")
        span = f" tokens {self.span[0]}..{self.span[1] - 1}" if self.span else " the whole completion"
        lines.append(f"examples over{span} ({self.method}):")
        for rank, e in enumerate(self.examples, start=1):
            lines.append(f"  {rank:>2}. {e.score:8.3f}  {e.doc_id} ({e.source}, prototype {e.prototype}): "
                         f"{_marked(e)}")
        return "\n".join(lines)


def _marked(example: Example, width: int = 70) -> str:
    """One line of snippet around the trigger token, which is wrapped in [[ ]]."""
    s, a, b = example.snippet, example.highlight_start, example.highlight_end
    text = s[max(0, a - width // 2) : a] + "[[" + s[a:b] + "]]" + s[b : b + width // 2]
    return " ".join(text.split())


def _check_text(name: str, text: str | None) -> None:
    """Refuse text that is not valid Unicode (undecodable bytes arrive as lone surrogates)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ascii(text[err.start : err.end])
        raise ValueError(f"the {name} has characters that are not valid text ({bad}: bytes that are not UTF-8?); "
                         "give UTF-8 text") from None


def _encode(bundle: Bundle, text: str) -> list[int]:
    return bundle.tokenizer(text, add_special_tokens=False)["input_ids"]


def _split_input(
    bundle: Bundle,
    text: str | None,
    prompt: str | None,
    completion: str | None,
    controls: Controls | None,
    max_new_tokens: int,
) -> tuple[list[int], list[int], bool, int]:
    """(prompt ids, completion ids, generated?, truncated prompt tokens), validated."""
    from core.generation import encode_prompt, generate_text

    context = bundle.model.config.get_text_config().max_position_embeddings
    for name, value in (("text", text), ("prompt", prompt), ("completion", completion)):
        _check_text(name, value)
    if text is not None:
        if prompt is not None or completion is not None:
            raise ValueError("give either text, or a prompt (and optionally a completion), not both")
        ids = _encode(bundle, text)
        if len(ids) < 2:
            raise ValueError("the text needs at least two tokens: each token is predicted from the ones before it")
        if len(ids) > context:
            raise ValueError(f"the text has {len(ids)} tokens; the model's context holds {context}")
        return ids[:1], ids[1:], False, 0
    if prompt is None or not prompt:
        raise ValueError("the prompt is empty: give the text that the completion follows")
    if completion is None:
        result = generate_text(bundle, prompt, max_new_tokens=max_new_tokens, controls=controls)
        if not result.new_ids:
            raise ValueError("the model generated no tokens for this prompt (it ended the text); give a completion")
        return result.prompt_ids, result.new_ids, True, result.truncated_tokens
    completion_ids = _encode(bundle, completion)
    if not completion_ids:
        raise ValueError("the completion has no tokens: give the text to attribute after the prompt")
    unknown = bundle.tokenizer.unk_token_id
    if unknown is not None and all(i == unknown for i in completion_ids):
        raise ValueError("the completion has only characters the tokenizer does not know: give text in the "
                         "model's alphabet")
    if len(completion_ids) >= context:
        raise ValueError(
            f"the completion has {len(completion_ids)} tokens; at most {context - 1} fit the model's "
            f"context of {context} after the prompt"
        )
    prompt_ids, dropped = encode_prompt(bundle, prompt, reserve=len(completion_ids))
    return prompt_ids, completion_ids, False, dropped


@torch.no_grad()
def decompose(
    bundle: Bundle,
    text: str | None = None,
    prompt: str | None = None,
    completion: str | None = None,
    top_alternatives: int = 5,
    *,
    controls: Controls | None = None,
    max_new_tokens: int = 16,
) -> Decomposition:
    """Split each completion token's logit into prototype slices, in one forward pass.

    Args:
        bundle: a PRISM bundle.
        text: decompose every token of this text after the first; or else
        prompt: the context, and
        completion: the tokens to decompose (tokenised on their own, so they are exactly the
            completion's tokens). Without one, ``max_new_tokens`` are generated greedily.
        top_alternatives: other tokens, by logit, to split as well.
        controls: per-call gains and suppression, applied to generation and decomposition.
        max_new_tokens: tokens generated when no completion is given.

    Raises:
        ValueError: an empty prompt, a completion without tokens, input too long for the
            context, or a dense bundle.
    """
    return _decompose(bundle, text, prompt, completion, top_alternatives, controls, max_new_tokens)[0]


@torch.no_grad()
def _decompose(
    bundle: Bundle,
    text: str | None,
    prompt: str | None,
    completion: str | None,
    top_alternatives: int,
    controls: Controls | None,
    max_new_tokens: int,
) -> tuple[Decomposition, _QueryTensors]:
    """:func:`decompose`, also returning the tensors of its forward pass."""
    if not bundle.is_prism:
        raise ValueError(f"{bundle.path} is a dense twin: it has no prototypes to decompose into")
    if top_alternatives < 0:
        raise ValueError(f"top_alternatives must be >= 0, got {top_alternatives}")
    model, tok = bundle.model, bundle.tokenizer
    device = next(model.parameters()).device
    kwargs = control_kwargs(controls, bundle.model, bundle.fingerprint, device)
    prompt_ids, completion_ids, generated, dropped = _split_input(
        bundle, text, prompt, completion, controls, max_new_tokens
    )
    ids = torch.tensor([prompt_ids + completion_ids], device=device)  # (1, T)
    # The last token predicts nothing here; the head and the unembedding run only on the n
    # positions that predict a completion token (the prompt's logits are never needed).
    n = len(completion_ids)
    out = model(input_ids=ids[:, :-1], return_prototypes=True, logits_to_keep=n, **kwargs)
    logits = out.logits[0].float()  # (n, V)
    active = out.prototype_ids[0]  # (n, k)
    weights = out.prototype_weights[0]  # (n, k)
    hidden = out.head_hidden[0]  # (n, d)
    cosines = model.prototypes.cosine(hidden, prototype_scores(hidden, model.prototypes.keys)).gather(1, active)  # (n, k)
    targets = torch.tensor(completion_ids, device=device)  # (n,)
    n_alt = min(top_alternatives, logits.shape[-1] - 1)
    ranked = logits.topk(n_alt + 1, dim=-1).indices  # (n, n_alt + 1)
    alternatives = torch.stack([row[row != t][:n_alt] for row, t in zip(ranked, targets, strict=True)])  # (n, n_alt)
    token_ids = torch.cat([targets[:, None], alternatives], dim=1)  # (n, 1 + n_alt)
    # (n, 1 + n_alt, k): slices of the chosen token, then of each alternative
    slices = prototype_slices(active, weights, model.prototypes.values, model.unembedding, token_ids)
    probs = logits.softmax(-1)  # (n, V)
    # Python lists once: element-wise float() on tensors costs more than the forward pass.
    order = slices[:, 0].argsort(dim=-1, descending=True)  # (n, k) strongest slice first
    active_l, weights_l, cosines_l = (t.gather(1, order).tolist() for t in (active, weights, cosines))
    slices_l = slices.gather(2, order[:, None, :].expand_as(slices)).tolist()  # (n, 1 + n_alt, k)
    token_logits = logits.gather(1, token_ids).tolist()  # (n, 1 + n_alt)
    token_probs = probs.gather(1, token_ids).tolist()
    records = []
    for i in range(n):
        chosen = [PrototypeSlice(*fields) for fields in zip(active_l[i], weights_l[i], slices_l[i][0], cosines_l[i],
                                                            strict=True)]
        alts = [
            Alternative(token=tok.decode([a]), token_id=a, logit=token_logits[i][1 + m],
                        probability=token_probs[i][1 + m], slices=slices_l[i][1 + m])
            for m, a in enumerate(token_ids[i, 1:].tolist())
        ]
        records.append(
            TokenDecomposition(
                position=i,
                context_tokens=len(prompt_ids) + i,
                token=tok.decode([completion_ids[i]]),
                token_id=completion_ids[i],
                logit=token_logits[i][0],
                probability=token_probs[i][0],
                prototypes=chosen,
                alternatives=alts,
            )
        )
    decomposition = Decomposition(
        prompt=tok.decode(prompt_ids),
        completion=tok.decode(completion_ids),
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        tokens=records,
        generated=generated,
        truncated_tokens=dropped,
    )
    return decomposition, _QueryTensors(hidden, active, weights, targets, kwargs.get("prototype_gains"), probs)


@dataclass
class _QueryTensors:
    """What the influence method needs from the decomposition's forward pass.

    Attributes:
        hidden: (n, d) the head's input at each completion position.
        ids, weights: (n, k) active prototypes and their weights (controls applied).
        targets: (n,) the completion tokens.
        gains: (P,) the call's gains, or None.
        probs: (n, V) the forward pass's next-token distributions.
    """

    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    targets: torch.Tensor
    gains: torch.Tensor | None
    probs: torch.Tensor


@dataclass
class _Credit:
    """Credit given to neighbour positions: (C,) position rows, prototypes and values."""

    rows: np.ndarray
    prototypes: np.ndarray
    values: np.ndarray

    @staticmethod
    def concat(parts: list[_Credit]) -> _Credit:
        return _Credit(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("rows", "prototypes", "values")))


def neighbourhood_credit(
    index: PrototypeIndex,
    prototype_ids: np.ndarray,
    slices: np.ndarray,
    query_cosine: np.ndarray,
    similarity: Literal["code", "key"] = "code",
) -> _Credit:
    """Share each slice among its prototype's neighbourhood in proportion to similarity.

    Args:
        prototype_ids: (k,) active prototypes of one token.
        slices: (k,) their slices of the token's logit.
        query_cosine: (k,) cos(K_j, h_q) of the query's hidden state with each of them.
        similarity: ``code``: cosine between the query's prototype code and the neighbour's
            (the cosines to each position's k active prototypes, as sparse P-vectors), so
            that the neighbours whose context activates the same prototypes as the query's
            take most of the credit; ``key``: cos(K_j, h_n), the same shares for every query.

    Returns:
        the credit of every neighbour position: slice_j * share_j(n), where share_j is the
        non-negative part of the similarity, normalised over j's neighbourhood.
    """
    rows = index.neighbour_row[prototype_ids]  # (k, M)
    filled = rows >= 0
    if similarity == "key":
        sim = np.clip(index.cosine[prototype_ids].astype(np.float64), 0, None)  # (k, M)
    elif similarity == "code":
        # cos(code of the query, code of each neighbour): one sparse product with the index's
        # unit-length codes; a dense gather of (k, M, k) entries per token cost 4x more at k=64.
        query = np.zeros(index.num_prototypes)
        norm = np.linalg.norm(query_cosine)
        if norm > 0:
            query[prototype_ids] = query_cosine / norm  # (P,) unit code of the query
        sim = np.clip(index.codes()[np.clip(rows, 0, None).ravel()] @ query, 0, None).reshape(rows.shape)  # (k, M)
    else:
        raise ValueError(f"unknown similarity {similarity!r}; choose code or key")
    sim = np.where(filled, sim, 0.0)
    totals = sim.sum(axis=1, keepdims=True)  # (k, 1)
    shares = np.divide(sim, totals, out=np.zeros_like(sim), where=totals > 0)  # (k, M), rows sum to 1 or 0
    values = slices.astype(np.float64)[:, None] * shares  # (k, M)
    keep = filled & (shares > 0)
    protos = np.broadcast_to(prototype_ids[:, None], rows.shape)
    return _Credit(rows[keep].astype(np.int64), protos[keep].astype(np.int64), values[keep])


def rank_examples(index: PrototypeIndex, credit: _Credit, top: int) -> list[Example]:
    """Sum credit per document and return the ``top`` documents, highest score first.

    Ties are broken by the document's row in the training split, so the order is stable.
    """
    if len(credit.values) == 0:
        return []
    documents = index.positions["document"][credit.rows]  # (C,)
    # Credited documents by counting, not sorting: rows of documents.jsonl are few (thousands).
    counts = np.bincount(documents, minlength=len(index.documents))
    docs = np.flatnonzero(counts)  # (D,) credited documents, ascending
    inverse = np.cumsum(counts > 0)[documents] - 1  # (C,) each entry's document among docs
    totals = np.bincount(inverse, weights=credit.values, minlength=len(docs))  # (D,)
    some_row = np.empty(len(docs), dtype=np.int64)
    some_row[inverse] = credit.rows  # (D,) a credited position of each document
    doc_rows = index.positions["doc_index"][some_row]  # (D,) its row in the training split
    candidates = np.arange(len(docs))
    if len(docs) > top:  # sort only the top scores and every tie with the last of them
        cut = np.partition(-totals, top - 1)[top - 1]
        candidates = np.flatnonzero(-totals <= cut)
    order = candidates[np.lexsort((doc_rows[candidates], -totals[candidates]))[:top]]  # (top,) ranked documents
    rank_of = np.full(len(docs), -1)
    rank_of[order] = np.arange(len(order))
    mine = rank_of[inverse] >= 0  # credit entries of the ranked documents
    rank, rows, protos, values = rank_of[inverse[mine]], credit.rows[mine], credit.prototypes[mine], credit.values[mine]
    best_row, n_rows = best_per_group(rank, rows, values, len(order))
    best_proto, _ = best_per_group(rank, protos, values, len(order))
    examples = []
    for r, d in enumerate(order.tolist()):
        record = index.example(int(best_row[r]))
        del record["token_id"], record["next_token_id"]
        examples.append(Example(**record, score=float(totals[d]), prototype=int(best_proto[r]),
                                positions=int(n_rows[r])))
    return examples


def attribute(
    bundle: Bundle,
    index: PrototypeIndex,
    prompt: str,
    completion: str | None = None,
    top: int = 10,
    method: Literal["neighbourhood", "influence"] = "neighbourhood",
    span: tuple[int, int] | None = None,
    *,
    controls: Controls | None = None,
    max_new_tokens: int = 16,
    top_alternatives: int = 5,
    similarity: Literal["code", "key"] = "code",
    influence: InfluenceFactors | None = None,
) -> Attribution:
    """Attribute each completion token, and the completion as a whole, to training documents.

    Args:
        bundle: a PRISM bundle.
        index: its index (:func:`core.index.load_index`).
        prompt, completion: as in :func:`decompose`; without a completion, ``max_new_tokens``
            are generated greedily first.
        top: examples kept per token and overall.
        method: ``neighbourhood`` (slices shared among neighbourhoods) or ``influence``
            (prototype-block influence functions, :mod:`core.influence`).
        span: (start, end) completion token indices, end exclusive, for the overall ranking;
            None for the whole completion.
        controls: per-call gains and suppression.
        top_alternatives: alternative tokens decomposed per position.
        similarity: neighbourhood method only, see :func:`neighbourhood_credit`.
        influence: loaded influence factors (default: the index's, loaded once when first needed).

    Raises:
        ValueError: bad input (see :func:`decompose`), an unknown method or a bad span.
        PrototypeIndexError: the index (or the influence factors) belong to another model, or the
            factors are missing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    hint = f"rebuild it with `prism index --model {bundle.path} --corpus PATH`"
    if index.model_fingerprint != bundle.fingerprint:
        raise PrototypeIndexError(
            f"the index was built for model {index.model_fingerprint}, not this model ({bundle.fingerprint}); {hint}"
        )
    if index.num_prototypes != bundle.model.config.num_prototypes:
        raise PrototypeIndexError(
            f"the index has {index.num_prototypes} prototypes, the model {bundle.model.config.num_prototypes}; {hint}"
        )
    if method == "influence":
        influence = influence if influence is not None else index.influence_factors()
        if influence.model_fingerprint != bundle.fingerprint:
            raise PrototypeIndexError(f"the influence factors were built for model {influence.model_fingerprint}, not this "
                              f"model ({bundle.fingerprint}); {hint}")
    dec, tensors = _decompose(bundle, None, prompt, completion, top_alternatives, controls, max_new_tokens)
    n = len(dec.tokens)
    if span is not None:
        start, end = span
        if not 0 <= start < end <= n:
            raise ValueError(f"span {start}:{end} is not inside the completion's {n} tokens (0 <= start < end <= {n})")
    start, end = span if span is not None else (0, n)
    if method == "influence":
        credits = influence.credit(bundle.model, tensors.hidden, tensors.ids, tensors.weights, tensors.targets,
                                   tensors.gains, tensors.probs)
        *token_examples, overall = _influence_examples(
            influence, [*credits, InfluenceCredit.concat(credits[start:end])], top)
    else:
        credits = []
        for token in dec.tokens:
            ids = np.array([p.id for p in token.prototypes], dtype=np.int64)
            slices = np.array([p.slice for p in token.prototypes], dtype=np.float64)
            cosines = np.array([p.cosine for p in token.prototypes], dtype=np.float64)
            credits.append(neighbourhood_credit(index, ids, slices, cosines, similarity))
        token_examples = [rank_examples(index, credit, top) for credit in credits]
        overall = rank_examples(index, _Credit.concat(credits[start:end]), top)
    return Attribution(
        model=str(bundle.path),
        model_fingerprint=bundle.fingerprint,
        method=method,
        decomposition=dec,
        token_examples=token_examples,
        examples=overall,
        labels=dict(index.labels),
        span=tuple(span) if span is not None else None,
    )


def _influence_examples(influence: InfluenceFactors, credits: list[InfluenceCredit], top: int) -> list[list[Example]]:
    """Ranked documents of each influence credit as examples, with the best token marked (the
    documents' texts are read from the corpus in one pass for all the credits)."""
    ranked = [influence.rank(credit, top) for credit in credits]
    records = iter(influence.describe([r for ranking in ranked for r in ranking]))
    return [[Example(**next(records), score=r.score, prototype=r.prototype, positions=r.entries) for r in ranking]
            for ranking in ranked]
