"""Text generation from a bundle, with per-request controls and prompt truncation.

Safe for concurrent callers (the explorer serves several sessions from one loaded model):
controls are per-call arguments, and a sampled call draws from its own seeded generator
state inside ``torch.random.fork_rng`` under a process-wide lock, so one session's seed
neither changes nor is changed by another's, and the caller's global RNG state is untouched.
"""

from __future__ import annotations

import difflib
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.bundle import Bundle
from core.control.controls import Controls, control_kwargs

logger = logging.getLogger(__name__)

# torch's default generator is process-global: a sampled generation forks it under this lock.
_RNG_LOCK = threading.Lock()


@dataclass
class GenerationResult:
    """A generated continuation.

    Attributes:
        prompt: the prompt as the model saw it (after truncation).
        text: the generated continuation only.
        prompt_ids, new_ids: token ids of each part.
        truncated_tokens: tokens dropped from the start of a too-long prompt (0 if none).
    """

    prompt: str
    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    truncated_tokens: int = 0

    @property
    def notice(self) -> str | None:
        return truncation_notice(self.truncated_tokens)


def truncation_notice(dropped: int) -> str | None:
    """The user-facing notice for a prompt whose first ``dropped`` tokens were cut (None if 0)."""
    if not dropped:
        return None
    return f"prompt truncated: its first {dropped} tokens were dropped to fit the context"


def encode_prompt(bundle: Bundle, prompt: str, reserve: int) -> tuple[list[int], int]:
    """Token ids of ``prompt``, keeping its end if it plus ``reserve`` new tokens overflow the context.

    Returns:
        (ids, number of tokens dropped from the start).
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    context = bundle.model.config.get_text_config().max_position_embeddings
    if reserve >= context:
        raise ValueError(f"max_new_tokens must be below the model's context of {context} tokens")
    ids = bundle.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt has no tokens")
    room = context - reserve
    dropped = max(0, len(ids) - room)
    if dropped:
        logger.warning("prompt of %d tokens truncated to its last %d", len(ids), room)
    return ids[dropped:], dropped


@torch.no_grad()
def generate_text(
    bundle: Bundle,
    prompt: str,
    max_new_tokens: int = 48,
    controls: Controls | None = None,
    seed: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
) -> GenerationResult:
    """Generate a continuation of ``prompt``; greedy unless ``do_sample``.

    Controls apply to this call only; the bundle's model is not modified.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model = bundle.model
    ids, dropped = encode_prompt(bundle, prompt, max_new_tokens)
    device = next(model.parameters()).device
    kwargs = control_kwargs(controls, model, bundle.fingerprint, device)
    sampling: dict = {"do_sample": do_sample}
    if do_sample:
        sampling.update(temperature=temperature, top_p=top_p, top_k=None)
    input_ids = torch.tensor([ids], device=device)
    arguments = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=bundle.tokenizer.eos_token_id,
        **sampling,
        **kwargs,
    )
    if do_sample:
        cuda = device.type == "cuda"
        with _RNG_LOCK, torch.random.fork_rng(devices=[device] if cuda else []):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            out = model.generate(input_ids, **arguments)
    else:  # greedy decoding draws no random numbers: no lock, concurrent calls run in parallel
        out = model.generate(input_ids, **arguments)
    new_ids = out[0, len(ids) :].tolist()
    eos = bundle.tokenizer.eos_token_id
    if eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    return GenerationResult(
        prompt=bundle.tokenizer.decode(ids),
        text=bundle.tokenizer.decode(new_ids),
        prompt_ids=ids,
        new_ids=new_ids,
        truncated_tokens=dropped,
    )


@torch.no_grad()
def continuation_perplexity(
    bundle: Bundle, prompt_ids: list[int], new_ids: list[int], controls: Controls | None = None
) -> float:
    """exp(mean negative log-likelihood) of ``new_ids`` after ``prompt_ids``, under ``controls``.

    One forward pass. Returns nan for an empty continuation.

    Raises:
        ValueError: empty prompt or a sequence longer than the model's context.
    """
    if not new_ids:
        return math.nan
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    context = bundle.model.config.get_text_config().max_position_embeddings
    if len(prompt_ids) + len(new_ids) > context:
        total = len(prompt_ids) + len(new_ids)
        raise ValueError(f"prompt and continuation have {total} tokens; the context holds {context}")
    device = next(bundle.model.parameters()).device
    kwargs = control_kwargs(controls, bundle.model, bundle.fingerprint, device)
    ids = torch.tensor([prompt_ids + new_ids], device=device)  # (1, T)
    logits = bundle.model(input_ids=ids[:, :-1], **kwargs).logits[0, len(prompt_ids) - 1 :].float()  # (n, V)
    targets = ids[0, len(prompt_ids) :]  # (n,)
    nll = torch.nn.functional.cross_entropy(logits, targets)
    return float(torch.exp(nll))


@dataclass(frozen=True)
class TokenComparison:
    """How a steered continuation differs from the original, token by token.

    Attributes:
        first_difference: position of the first differing token (the shorter length when one is
            a prefix of the other), None when both are the same.
        original_unaligned: positions of original tokens outside the aligned blocks.
        steered_unaligned: positions of steered tokens outside the aligned blocks.
    """

    first_difference: int | None
    original_unaligned: frozenset[int]
    steered_unaligned: frozenset[int]


def unaligned_positions(ids: Sequence[int], other: Sequence[int]) -> frozenset[int]:
    """Positions of ``ids`` outside the longest matching blocks with ``other`` (difflib alignment)."""
    matcher = difflib.SequenceMatcher(None, ids, other, autojunk=False)
    kept = {i for block in matcher.get_matching_blocks() for i in range(block.a, block.a + block.size)}
    return frozenset(range(len(ids))) - kept


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where ``a`` and ``b`` differ; None when they are equal."""
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_tokens(original: Sequence[int], steered: Sequence[int]) -> TokenComparison:
    """Align two continuations' token ids: where they first differ and which tokens each side adds.

    Each side is aligned against the other separately (difflib's matching is not symmetric),
    so the marks on each side are exactly the tokens that side does not share.
    """
    return TokenComparison(
        first_difference=first_difference(original, steered),
        original_unaligned=unaligned_positions(original, steered),
        steered_unaligned=unaligned_positions(steered, original),
    )
