"""The PRISM causal LM: a decoder backbone, the prototype head (core/model/head.py) and a
tied unembedding, as a transformers model (save_pretrained / from_pretrained / generate).

The logits are E z with z the head's prototype mixture, E the tied token embedding and no
bias, so the logit of any token y splits exactly into per-prototype slices
(see :func:`core.model.head.prototype_slices`).

Controls (gains and suppression) are per-call arguments and never written into the model.

This file is copied into every bundle (with config.py, head.py and losses.py) so that
``AutoModelForCausalLM.from_pretrained(bundle, trust_remote_code=True)`` works without core:
it imports only torch, transformers and its neighbours, by relative imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .config import PrismConfig
from .head import PrototypeHead, prototype_slices
from .losses import TOKEN_SAMPLE, prototype_losses


@dataclass
class PrismCausalLMOutput(ModelOutput):
    """Output of :class:`PrismForCausalLM`.

    Attributes:
        loss: next-token cross-entropy when ``labels`` is given.
        logits: (B, T, V) next-token logits.
        cache: the key/value cache when ``use_cache``.
        hidden_states, attentions: the backbone's, on request.
        prototype_ids: (B, T, k) active prototypes, with ``return_prototypes``.
        prototype_weights: (B, T, k) their mixture weights (gains applied).
        prototype_slices: (B, T, m, k) slices of ``slice_token_ids`` (default: the argmax
            token, m = 1); they sum over k to the corresponding logits.
        head_hidden: (B, T, d) the hidden states the head read.
        aux_losses: the prototype training losses (training mode with ``labels`` only).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    prototype_ids: torch.Tensor | None = None
    prototype_weights: torch.Tensor | None = None
    prototype_slices: torch.Tensor | None = None
    head_hidden: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None


class PrismPreTrainedModel(PreTrainedModel):
    config_class = PrismConfig
    config: PrismConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # Loaded in bfloat16 or float16, the backbone takes that dtype and the prototype head stays
    # float32: the active set, the weights and every slice are computed without 8-bit rounding,
    # at a cost of 2 P d float32 multiply-adds per token (small next to the backbone's).
    _keep_in_fp32_modules_strict = ["prototypes"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PrototypeHead):
            d = module.keys.shape[1]
            # Keys: h . K_j ~ N(0, 1) for RMS-normalised h. Values: z starts at the scale of h.
            init.normal_(module.keys, mean=0.0, std=d**-0.5)
            k = self.config.prototype_top_k_start or module.top_k  # the k that training starts with
            init.normal_(module.values, mean=0.0, std=k**-0.5)
            init.zeros_(module.usage_window)
            if module.log_weight_power is not None:
                init.constant_(module.log_weight_power, math.log(module.initial_weight_power))
        else:
            super()._init_weights(module)


class PrismForCausalLM(PrismPreTrainedModel, GenerationMixin):
    """A causal LM whose every prediction is a sparse, non-negative mixture of prototypes.

    With ``config.dense`` it is the dense twin: the same backbone with logits = E h.
    """

    def __init__(self, config: PrismConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(config.text_config)
        hidden = config.text_config.hidden_size
        self.prototypes = (
            None
            if config.dense
            else PrototypeHead(
                config.num_prototypes,
                hidden,
                config.prototype_top_k,
                config.router_gradient,
                config.weight_power,
                config.learn_weight_power,
            )
        )
        # An untied pretrained decoder keeps its own output matrix; it is E, still without bias.
        vocab = config.text_config.vocab_size
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(hidden, vocab, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    @property
    def unembedding(self) -> torch.Tensor:
        """(V, d) the output matrix E: the token embedding when tied, else ``lm_head``'s weight."""
        if self.lm_head is not None:
            return self.lm_head.weight
        return self.model.get_input_embeddings().weight

    def _controls(
        self, gains: torch.Tensor | None, suppressed: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        P = self.config.num_prototypes
        if self.prototypes is None and (gains is not None or suppressed is not None):
            raise ValueError("the dense twin has no prototypes: gains and suppression do not apply")
        if gains is not None:
            gains = torch.as_tensor(gains, dtype=torch.float32, device=device)
            if gains.shape != (P,):
                raise ValueError(f"prototype_gains must have shape ({P},), got {tuple(gains.shape)}")
            if bool((gains < 0).any()):
                raise ValueError("prototype_gains must be non-negative")
        if suppressed is not None:
            suppressed = torch.as_tensor(suppressed, device=device)
            if suppressed.dtype != torch.bool or suppressed.shape != (P,):
                raise ValueError(f"suppressed_prototypes must be a bool mask of shape ({P},)")
            if int((~suppressed).sum()) < self.config.prototype_top_k:
                raise ValueError(
                    f"at most {P - self.config.prototype_top_k} of {P} prototypes can be suppressed "
                    f"(k={self.config.prototype_top_k} must stay available)"
                )
        return gains, suppressed

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prototype_gains: torch.Tensor | None = None,
        suppressed_prototypes: torch.Tensor | None = None,
        return_prototypes: bool = False,
        slice_token_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> PrismCausalLMOutput:
        """Run the model.

        Args:
            input_ids: (B, T) token ids.
            labels: (B, T) targets; the loss is the next-token cross-entropy (shifted inside,
                -100 ignored), as in transformers' causal LMs.
            prototype_gains: (P,) per-prototype controller gains for this call only.
            suppressed_prototypes: (P,) bool mask of prototypes kept out of every active set.
            return_prototypes: also return active ids, weights and slices.
            slice_token_ids: (B, T, m) tokens whose logits to split into slices.
        """
        gains, suppressed = self._controls(
            prototype_gains, suppressed_prototypes, (input_ids if input_ids is not None else inputs_embeds).device
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state  # (B, T, d)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        B, T, d = hidden.shape
        E = self.unembedding

        result = PrismCausalLMOutput(cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions)
        if self.prototypes is None:
            result.logits = hidden @ E.T  # (B, T, V)
        else:
            act = self.prototypes(hidden.reshape(B * T, d), gains, suppressed)
            result.logits = (act.mixed.to(E.dtype) @ E.T).view(B, T, -1)  # (B, T, V)
            if return_prototypes:
                ids = act.ids.view(B, T, -1)
                weights = act.weights.view(B, T, -1)
                if slice_token_ids is None:
                    slice_token_ids = result.logits.argmax(-1, keepdim=True)  # (B, T, 1)
                result.prototype_ids = ids
                result.prototype_weights = weights
                result.prototype_slices = prototype_slices(ids, weights, self.prototypes.values, E, slice_token_ids)
                result.head_hidden = hidden
            if self.training and labels is not None:
                result.head_hidden = hidden
                flat = hidden.reshape(B * T, d)
                every = max(1, flat.shape[0] // TOKEN_SAMPLE)
                cosine = self.prototypes.cosine(flat[::every], act.scores[::every])  # (N / every, P)
                result.aux_losses = prototype_losses(
                    flat[::every],
                    act.scores[::every],
                    cosine,
                    act.ids[::every],
                    act.weights[::every],
                    self.prototypes,
                    self.config,
                )
        if labels is not None:
            result.loss = F.cross_entropy(
                result.logits[:, :-1].reshape(-1, result.logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return result
