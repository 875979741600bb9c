"""Per-token decomposition: each completion token's logit split into prototype slices.

:func:`decompose` runs one forward pass over prompt + completion and, for each completion
token (predicted from everything before it), returns its logit and probability, its k active
prototypes with their weights and slices (which sum to the logit), and the top alternative
tokens with their own slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.attribution.records import Alternative, Decomposition, PrototypeSlice, TokenDecomposition
from core.bundle import Bundle
from core.control.controls import Controls, control_kwargs
from core.errors import ArgumentError
from core.model.head import at_least_float32, prototype_scores, prototype_slices, token_logits

if TYPE_CHECKING:
    from core.generation import GenerationSettings


def _check_text(name: str, text: str | None) -> None:
    """Refuse text that is not valid Unicode (undecodable bytes arrive as lone surrogates)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ascii(text[err.start : err.end])
        raise ValueError(
            f"the {name} has characters that are not valid text ({bad}: bytes that are not UTF-8?); give UTF-8 text"
        ) from None


def _encode(bundle: Bundle, text: str) -> list[int]:
    return bundle.tokenizer(text, add_special_tokens=False)["input_ids"]


def _split_input(
    bundle: Bundle,
    text: str | None,
    prompt: str | None,
    completion: str | None,
    controls: Controls | None,
    max_new_tokens: int,
    generation: GenerationSettings | None = None,
    seed: int = 0,
) -> tuple[list[int], list[int], dict | None, int]:
    """(prompt ids, completion ids, how it was generated (None: given), truncated prompt tokens), validated."""
    from core.generation import DEFAULT_GENERATION, encode_prompt, generate_text

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
        return ids[:1], ids[1:], None, 0
    if prompt is None or not prompt:
        raise ValueError("the prompt is empty: give the text that the completion follows")
    if completion is None:
        settings = DEFAULT_GENERATION if generation is None else generation
        result = generate_text(
            bundle, prompt, max_new_tokens=max_new_tokens, controls=controls, seed=seed, settings=settings
        )
        if not result.new_ids:
            raise ValueError("the model generated no tokens for this prompt (it ended the text); give a completion")
        # the ids themselves are decomposed (not their text re-encoded): exactly the tokens produced
        return result.prompt_ids, result.new_ids, {**settings.to_json(), "seed": seed}, result.truncated_tokens
    completion_ids = _encode(bundle, completion)
    if not completion_ids:
        raise ValueError("the completion has no tokens: give the text to attribute after the prompt")
    unknown = bundle.tokenizer.unk_token_id
    if unknown is not None and all(i == unknown for i in completion_ids):
        raise ValueError(
            "the completion has only characters the tokenizer does not know: give text in the model's alphabet"
        )
    if len(completion_ids) >= context:
        raise ValueError(
            f"the completion has {len(completion_ids)} tokens; at most {context - 1} fit the model's "
            f"context of {context} after the prompt"
        )
    prompt_ids, dropped = encode_prompt(bundle, prompt, reserve=len(completion_ids))
    return prompt_ids, completion_ids, None, dropped


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
    generation: GenerationSettings | None = None,
    seed: int = 0,
) -> Decomposition:
    """Split each completion token's logit into prototype slices, in one forward pass.

    Args:
        bundle: a PRISM bundle.
        text: decompose every token of this text after the first; or else
        prompt: the context, and
        completion: the tokens to decompose (tokenised on their own, so they are exactly the
            completion's tokens). Without one, ``max_new_tokens`` are generated with
            ``generation`` and ``seed``, and exactly the tokens generated are decomposed.
        top_alternatives: other tokens, by logit, to split as well.
        controls: per-call gains and suppression, applied to generation and decomposition.
        max_new_tokens: tokens generated when no completion is given.
        generation: how they are generated (None: :data:`core.generation.DEFAULT_GENERATION`;
            :data:`core.generation.GREEDY` for plain greedy decoding).
        seed: the sampling seed of that generation.

    Raises:
        ValueError: an empty prompt, a completion without tokens, input too long for the
            context, or a dense bundle.
        ArgumentError: a negative ``top_alternatives``.
    """
    return decompose_with_tensors(
        bundle, text, prompt, completion, top_alternatives, controls, max_new_tokens, generation, seed
    )[0]


@torch.no_grad()
def decompose_with_tensors(
    bundle: Bundle,
    text: str | None,
    prompt: str | None,
    completion: str | None,
    top_alternatives: int,
    controls: Controls | None,
    max_new_tokens: int,
    generation: GenerationSettings | None = None,
    seed: int = 0,
) -> tuple[Decomposition, QueryTensors]:
    """:func:`decompose`, also returning the tensors of its forward pass (for the attribution
    methods)."""
    if not bundle.is_prism:
        raise ValueError(f"{bundle.path} is a dense twin: it has no prototypes to decompose into")
    if top_alternatives < 0:
        raise ArgumentError(f"top_alternatives must be >= 0, got {top_alternatives}")
    model, tok = bundle.model, bundle.tokenizer
    device = next(model.parameters()).device
    kwargs = control_kwargs(controls, bundle.model, bundle.fingerprint, device)
    prompt_ids, completion_ids, how, dropped = _split_input(
        bundle, text, prompt, completion, controls, max_new_tokens, generation, seed
    )
    ids = torch.tensor([prompt_ids + completion_ids], device=device)  # (1, T)
    # The last token predicts nothing here; the head and the unembedding run only on the n
    # positions that predict a completion token (the prompt's logits are never needed).
    n = len(completion_ids)
    out = model(input_ids=ids[:, :-1], return_prototypes=True, logits_to_keep=n, **kwargs)
    logits = out.logits[0].float()  # (n, V)
    active = out.prototype_ids[0]  # (n, k)
    # float32 from here on (float64 for a float64 model), whatever the model's dtype
    weights = at_least_float32(out.prototype_weights[0])  # (n, k)
    hidden = at_least_float32(out.head_hidden[0])  # (n, d)
    keys = at_least_float32(model.prototypes.keys)  # (P, d)
    scores = prototype_scores(hidden, keys)  # (n, P)
    norms = hidden.norm(dim=-1, keepdim=True) * keys.norm(dim=-1)  # (n, P)
    cosines = (scores / norms.clamp_min(1e-8)).gather(1, active)  # (n, k), as PrototypeHead.cosine
    targets = torch.tensor(completion_ids, device=device)  # (n,)
    n_alt = min(top_alternatives, logits.shape[-1] - 1)
    ranked = logits.topk(n_alt + 1, dim=-1).indices  # (n, n_alt + 1)
    alternatives = torch.stack([row[row != t][:n_alt] for row, t in zip(ranked, targets, strict=True)])  # (n, n_alt)
    token_ids = torch.cat([targets[:, None], alternatives], dim=1)  # (n, 1 + n_alt)
    # (n, 1 + n_alt, k): slices of the chosen token, then of each alternative; float32 whatever
    # the model's dtype, like the logits they are reported with (a bfloat16 forward pass rounds
    # its logits to 8 bits of mantissa; these are the same logits without that rounding).
    slices = prototype_slices(active, weights, model.prototypes.values, model.unembedding, token_ids)
    reported = token_logits(active, weights, model.prototypes.values, model.unembedding, token_ids)  # (n, 1 + n_alt)
    probs = logits.softmax(-1)  # (n, V)
    # Python lists once: element-wise float() on tensors costs more than the forward pass.
    order = slices[:, 0].argsort(dim=-1, descending=True)  # (n, k) strongest slice first
    active_l, weights_l, cosines_l = (t.gather(1, order).tolist() for t in (active, weights, cosines))
    slices_l = slices.gather(2, order[:, None, :].expand_as(slices)).tolist()  # (n, 1 + n_alt, k)
    logit_l = reported.tolist()  # (n, 1 + n_alt)
    token_probs = probs.gather(1, token_ids).tolist()
    records = []
    for i in range(n):
        chosen = [
            PrototypeSlice(*fields)
            for fields in zip(active_l[i], weights_l[i], slices_l[i][0], cosines_l[i], strict=True)
        ]
        alts = [
            Alternative(
                token=tok.decode([a]),
                token_id=a,
                logit=logit_l[i][1 + m],
                probability=token_probs[i][1 + m],
                slices=slices_l[i][1 + m],
            )
            for m, a in enumerate(token_ids[i, 1:].tolist())
        ]
        records.append(
            TokenDecomposition(
                position=i,
                context_tokens=len(prompt_ids) + i,
                token=tok.decode([completion_ids[i]]),
                token_id=completion_ids[i],
                logit=logit_l[i][0],
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
        generated=how is not None,
        truncated_tokens=dropped,
        generation=how,
    )
    return decomposition, QueryTensors(hidden, active, weights, targets, kwargs.get("prototype_gains"), probs)


@dataclass
class QueryTensors:
    """What the attribution methods need from the decomposition's forward pass.

    All on the model's device; floating tensors in float32 (float64 for a float64 model)
    whatever the model's dtype.

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
