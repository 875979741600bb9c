"""Text generation from a bundle, with per-request controls, settings and prompt truncation.

How each new token is chosen is a :class:`GenerationSettings`: greedy or sampled (temperature,
top-p), with an optional repetition penalty and no-repeat n-gram size, which apply to greedy
decoding too. :data:`DEFAULT_GENERATION` is the setting chosen by bench/generation.py (the one
whose text is nearest the corpus's own in distinct bigrams and perplexity under the dense
twin); :data:`GREEDY` is plain greedy decoding. Attribution explains whatever tokens came out.

Safe for concurrent callers (the explorer serves several sessions from one loaded model):
controls and settings are per-call arguments, and a sampled call draws from its own seeded
generator state inside ``torch.random.fork_rng`` under a process-wide lock, so one session's
seed neither changes nor is changed by another's, and the caller's global RNG state is untouched.
"""

from __future__ import annotations

import difflib
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch

from core.bundle import Bundle
from core.control.controls import Controls, control_kwargs
from core.errors import ArgumentError
from core.options import check_fields, option

logger = logging.getLogger(__name__)

# torch's default generator is process-global: a sampled generation forks it under this lock.
_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class GenerationSettings:
    """How each new token is chosen: greedy or sampled, and what repetition is discouraged.

    The sampling fields (temperature, top-p) must stay at 1.0 for greedy decoding, so that a
    setting says exactly what it does; the repetition penalty and the no-repeat n-gram size
    apply to greedy decoding and sampling alike (transformers' logits processors). Top-k is
    always off: transformers would otherwise keep only the 50 likeliest tokens.

    Raises:
        ArgumentError (a ValueError): a value out of range, or a sampling field set for greedy decoding.
    """

    do_sample: bool = option(False, "sample each token from the (tempered, top-p) distribution instead of the argmax")
    temperature: float = option(1.0, "divide the logits by this before sampling; < 1 sharpens", exclusive_minimum=0.0)
    top_p: float = option(
        1.0, "sample only from the likeliest tokens holding this probability mass", exclusive_minimum=0.0
    )
    repetition_penalty: float = option(
        1.0,
        "divide (multiply, if negative) the logits of tokens already in the text by this; 1 is off",
        exclusive_minimum=0.0,
    )
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this many tokens of the text; 0 is off", minimum=0)

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ArgumentError(f"do_sample must be True or False, got {self.do_sample!r}")
        check_fields(self)
        for name in ("temperature", "repetition_penalty"):
            if getattr(self, name) == math.inf:
                raise ArgumentError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.top_p > 1:
            raise ArgumentError(f"top_p must be in (0, 1], got {self.top_p!r}; 1 keeps every token")
        if not self.do_sample:
            for name in ("temperature", "top_p"):
                if getattr(self, name) != 1.0:
                    raise ArgumentError(
                        f"{name} {getattr(self, name)!r} applies only when sampling: set do_sample=True, "
                        f"or leave {name} at 1.0 for greedy decoding"
                    )

    def generate_kwargs(self) -> dict:
        """The keyword arguments of ``model.generate`` that apply these settings (and nothing else)."""
        kwargs: dict = {"do_sample": self.do_sample}
        if self.do_sample:
            # top_k=0 disables transformers' default top-k of 50 (None would be filled with it).
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs

    def describe(self, seed: int | None = None) -> str:
        """How a text was generated, in words: "generated greedily", "sampled with seed 0,
        temperature 0.8, top-p 0.95, repetition penalty 1.2"."""
        extras = []
        if self.do_sample:
            extras += [f"temperature {self.temperature:g}", f"top-p {self.top_p:g}"]
        if self.repetition_penalty != 1.0:
            extras.append(f"repetition penalty {self.repetition_penalty:g}")
        if self.no_repeat_ngram_size:
            extras.append(f"no repeated {self.no_repeat_ngram_size}-grams")
        how = "generated greedily"
        if self.do_sample:
            how = "sampled" + (f" with seed {seed}" if seed is not None else "")
        return ", ".join([how, *extras])

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GenerationSettings:
        """Settings from :meth:`to_json`'s object; keys that are not fields (a seed) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


GREEDY = GenerationSettings()
"""Plain greedy decoding: the argmax token at every step."""

# Measured, not guessed: bench/generation.py on the demo bundle (assets/models/demo, scored by
# its twin assets/models/demo-dense; docs/benchmarks.md, "Generation settings") chose the setting
# whose text is nearest the corpus's own continuations in distinct-2 and log twin perplexity.
# On a new bundle, rerun `python bench/generation.py --model DIR --twin DIR` and paste the line
# it prints here.
DEFAULT_GENERATION = GenerationSettings(do_sample=True, temperature=0.8, top_p=0.95, no_repeat_ngram_size=3)
"""The default of generate_text, ``prism generate``/``attribute`` and the explorer."""


def describe_generation(record: dict | None) -> str:
    """The words for a recorded generation (:meth:`GenerationSettings.to_json` plus ``seed``);
    "generated" when the record is missing (a trace written before settings were recorded)."""
    if not record:
        return "generated"
    return GenerationSettings.from_json(record).describe(record.get("seed"))


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
    settings: GenerationSettings | None = None,
) -> GenerationResult:
    """Generate a continuation of ``prompt``.

    Args:
        bundle: a PRISM bundle or a dense twin.
        prompt: the text to continue (its start is dropped if it and the new tokens overflow the context).
        max_new_tokens: tokens to generate at most (fewer when the model ends the text).
        controls: gains and suppression for this call only; the bundle's model is not modified.
        seed: the sampling seed (the same seed, prompt and settings give the same text).
        settings: how tokens are chosen; None for :data:`DEFAULT_GENERATION`, :data:`GREEDY`
            for plain greedy decoding.

    Raises:
        ValueError: an empty prompt, a bad ``max_new_tokens``, or ``settings`` that are not
            a :class:`GenerationSettings`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    settings = DEFAULT_GENERATION if settings is None else settings
    if not isinstance(settings, GenerationSettings):
        raise ArgumentError(f"settings must be a GenerationSettings, got {type(settings).__name__}")
    model = bundle.model
    ids, dropped = encode_prompt(bundle, prompt, max_new_tokens)
    device = next(model.parameters()).device
    kwargs = control_kwargs(controls, model, bundle.fingerprint, device)
    input_ids = torch.tensor([ids], device=device)
    arguments = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=bundle.tokenizer.eos_token_id,
        **settings.generate_kwargs(),
        **kwargs,
    )
    if settings.do_sample:
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
