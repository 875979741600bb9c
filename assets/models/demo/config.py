"""PrismConfig: the transformers configuration of a PRISM language model.

A PRISM model is a decoder backbone (any transformers decoder, built from ``text_config``)
followed by a prototype head. The head's settings live here; the backbone's settings live in
the nested ``text_config`` so that ``get_text_config()`` and generation's cache find them.

This file is also copied into every bundle (with modeling.py, head.py and losses.py) for
``trust_remote_code`` loading, so it imports only transformers and, when it is installed, core.

Field names avoid generation parameter names (``top_k``, ``temperature``): transformers
refuses to save a config that carries those as model fields. Bad values raise
:class:`~core.errors.ArgumentError`, a ``ValueError`` as transformers configs raise.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

try:  # a bundle's copy of this file also runs where core is not installed
    from core.errors import ArgumentError
except ImportError:
    ArgumentError = ValueError

ROUTER_GRADIENTS = ("active", "all")  # the values of PrismConfig.router_gradient


class PrismConfig(PreTrainedConfig):
    """Configuration of :class:`core.model.PrismForCausalLM`.

    Attributes:
        text_config: the backbone decoder's config (default: a small Llama-style decoder).
        num_prototypes: P, the number of prototypes.
        prototype_top_k: k, the number of active prototypes per token.
        dense: True for the dense twin: same backbone, logits = E h (no prototype head).
        cluster_weight: weight of the cluster loss (every token near a prototype).
        anchor_weight: weight of the anchor loss (every prototype near real training tokens).
        diversity_weight: weight of the diversity loss (prototype keys kept apart).
        diversity_margin: cosine above which two prototype keys are penalised.
        balance_weight: weight of the load-balance loss (no dead prototypes).
        reseed_interval: training steps between checks for dead prototypes (0 disables).
        prototype_top_k_start: k at the start of training, annealed linearly down to
            ``prototype_top_k`` over the first ``top_k_anneal_fraction`` of the steps (a wide
            active set while the prototypes are still unspecialised); None: k throughout.
            Training only: the saved model always routes to ``prototype_top_k``.
        top_k_anneal_fraction: the share of the training steps over which k is annealed.
        concentration_weight: weight of the concentration loss (the normalised entropy of
            each token's k active weights: a few prototypes carry each prediction); 0: off.
        weight_power: the power p of the weights a_j = softplus(s_j)^p; p > 1 sharpens them
            (the ratio of two weights is raised to p). Slices stay exact for any p > 0.
        learn_weight_power: p is a trained parameter (``log_weight_power``, started at
            ``weight_power``) instead of a constant.
        router_gradient: ``active``: training follows the exact gradient of the top-k head, so
            a token's loss reaches only its k active prototypes; ``all``: a straight-through
            estimator also passes the gradient through the softplus mixture of all P
            prototypes, so that the hidden state learns to move towards prototypes outside its
            active set that would help. The forward pass (and every slice) is the same.
        sequence_length: tokens per packed sequence: training, the index and the influence
            pass cut the corpus into sequences of this length. Its own field because a
            pretrained backbone's context (``max_position_embeddings``) is usually longer than
            the sequences PRISM was trained on; bundles written before it existed read the
            backbone's ``max_position_embeddings``, which was the same number.
        tie_word_embeddings: True: the unembedding E is the backbone's input embedding;
            False: a separate output matrix E (``lm_head``), e.g. from an untied pretrained
            decoder. Either way the logits are E z with no bias.
    """

    model_type = "prism"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    text_config: dict | PreTrainedConfig | None = None
    num_prototypes: int = 1024
    prototype_top_k: int = 8
    dense: bool = False
    cluster_weight: float = 0.05
    anchor_weight: float = 0.05
    diversity_weight: float = 0.05
    diversity_margin: float = 0.5
    balance_weight: float = 0.1
    reseed_interval: int = 100
    prototype_top_k_start: int | None = None
    top_k_anneal_fraction: float = 0.5
    concentration_weight: float = 0.0
    weight_power: float = 1.0
    learn_weight_power: bool = False
    router_gradient: str = "active"
    sequence_length: int | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> PrismConfig:
        """Load a PRISM config; a folder holding another model's config is refused.

        Raises:
            ArgumentError: the config's ``model_type`` is not ``prism`` (a plain Llama folder, say).
        """
        data, _ = cls.get_config_dict(pretrained_model_name_or_path, **dict(kwargs))
        found = data.get("model_type")
        if found != cls.model_type:
            raise ArgumentError(
                f"{pretrained_model_name_or_path} holds a {found!r} config, not a PRISM one (model_type 'prism'); "
                "give a PRISM bundle, or start PRISM from that decoder with `prism train --backbone`"
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_prototypes < 1:
            raise ArgumentError(f"num_prototypes must be >= 1, got {self.num_prototypes}")
        if not 1 <= self.prototype_top_k <= self.num_prototypes:
            raise ArgumentError(
                f"prototype_top_k must be in [1, num_prototypes={self.num_prototypes}], got {self.prototype_top_k}"
            )
        start = self.prototype_top_k_start
        if start is not None and not self.prototype_top_k <= start <= self.num_prototypes:
            raise ArgumentError(
                f"prototype_top_k_start must be in [prototype_top_k={self.prototype_top_k}, "
                f"num_prototypes={self.num_prototypes}], got {start}"
            )
        if not 0.0 < self.top_k_anneal_fraction <= 1.0:
            raise ArgumentError(f"top_k_anneal_fraction must be in (0, 1], got {self.top_k_anneal_fraction}")
        if not self.weight_power > 0:
            raise ArgumentError(f"weight_power must be > 0, got {self.weight_power}")
        for name in ("cluster_weight", "anchor_weight", "diversity_weight", "balance_weight", "concentration_weight"):
            if getattr(self, name) < 0:
                raise ArgumentError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not -1.0 <= self.diversity_margin <= 1.0:
            raise ArgumentError(f"diversity_margin is a cosine in [-1, 1], got {self.diversity_margin}")
        if self.router_gradient not in ROUTER_GRADIENTS:
            raise ArgumentError(f"router_gradient must be 'active' or 'all', got {self.router_gradient!r}")
        if self.reseed_interval < 0:
            raise ArgumentError(f"reseed_interval must be >= 0, got {self.reseed_interval}")
        if self.sequence_length is None:
            self.sequence_length = getattr(self.text_config, "max_position_embeddings", None)
        if self.sequence_length is None or self.sequence_length < 2:
            raise ArgumentError(f"sequence_length must be >= 2 tokens, got {self.sequence_length}")
        # The unembedding is the backbone's input embedding when tied; make the backbone agree.
        self.text_config.tie_word_embeddings = self.tie_word_embeddings
