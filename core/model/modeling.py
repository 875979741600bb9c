"""The PRISM model: a decoder backbone, a prototype head and a tied unembedding.

For a token with final normalised hidden state h (dimension d), the head scores every
prototype by s_j = h . K_j, keeps the top k (suppressed prototypes are masked out first),
gives each active prototype the weight a_j = softplus(s_j) times its controller gain g_j,
and returns z = sum_j a_j W_j. The logits are E z with E the tied token
embedding and no bias, so the logit of any token y splits exactly into per-prototype slices

    logit(y) = sum_j a_j (E_y . W_j) = sum_j slice_j(y).

Controls (gains and suppression) are per-call arguments and never written into the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from . import losses
from core.model.config import PrismConfig


@dataclass
class PrototypeActivations:
    """What the prototype head computed for a batch of positions.

    Attributes:
        ids: (N, k) active prototype ids, by decreasing score.
        weights: (N, k) mixture weights a_j after gains (non-negative).
        scores: (N, P) s_j = h . K_j for every prototype (before masking).
        mixed: (N, d) z = sum_j a_j W_j.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    mixed: torch.Tensor


class PrototypeHead(nn.Module):
    """P prototypes with keys K (P, d) and values W (P, d).

    A token's active set is the top k of s_j = h . K_j; each active prototype gets the weight
    a_j = softplus(s_j) * g_j, so exactly k weights are positive (for positive gains) and the
    rest are zero. softplus rather than a softmax over the active set: a convex combination
    of k values cannot reach the output scale and directions a dense head reaches, and cost
    the tiny preset 0.5-1.4 nats of validation loss against its dense twin in our probes.
    """

    def __init__(self, num_prototypes: int, hidden_size: int, top_k: int, router_gradient: str = "active"):
        super().__init__()
        self.num_prototypes = num_prototypes
        self.top_k = top_k
        self.router_gradient = router_gradient
        self.keys = nn.Parameter(torch.empty(num_prototypes, hidden_size))
        self.values = nn.Parameter(torch.empty(num_prototypes, hidden_size))
        # How often each prototype was active since the last dead-prototype check. Updated in
        # training mode only; persistent so that a resumed run continues the same window.
        self.register_buffer("usage_window", torch.zeros(num_prototypes), persistent=True)

    def forward(
        self,
        hidden: torch.Tensor,
        gains: torch.Tensor | None = None,
        suppressed: torch.Tensor | None = None,
    ) -> PrototypeActivations:
        """Mix prototypes for each position.

        Args:
            hidden: (N, d) final normalised hidden states.
            gains: (P,) non-negative controller gains, or None for all ones.
            suppressed: (P,) bool mask of prototypes that may not be active, or None.
        """
        scores = hidden @ self.keys.T  # (N, P)
        masked = scores if suppressed is None else scores.masked_fill(suppressed, float("-inf"))
        top_scores, ids = masked.topk(self.top_k, dim=-1)  # (N, k)
        weights = F.softplus(top_scores)  # (N, k), > 0
        if gains is not None:
            weights = weights * gains[ids]
        if self.training and self.router_gradient == "all" and torch.is_grad_enabled():
            # Straight-through: the value of `mixed` is the sparse mixture, its gradient is
            # that of the softplus mixture of every (unsuppressed) prototype as well.
            every = F.softplus(scores)  # (N, P)
            if suppressed is not None:
                every = every.masked_fill(suppressed, 0.0)
            if gains is not None:
                every = every * gains
            mixed = _StraightThroughMix.apply(ids, weights, every, self.values)  # (N, d)
        else:
            mixed = mix_values(ids, weights, self.values)  # (N, d)
        if self.training:
            with torch.no_grad():
                self.usage_window += torch.bincount(ids.flatten(), minlength=self.num_prototypes)
        return PrototypeActivations(ids=ids, weights=weights, scores=scores, mixed=mixed)

    def cosine(self, hidden: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(N, P) cos(h, K_j) from the (N, d) hidden states and their (N, P) scores."""
        norms = hidden.norm(dim=-1, keepdim=True) * self.keys.norm(dim=-1)  # (N, P)
        return scores / norms.clamp_min(1e-8)


class _StraightThroughMix(torch.autograd.Function):
    """z = sum_j a_j W_j over the k active prototypes, with the gradient of z + Z - stop(Z)
    where Z = sum_j e_j W_j over all P prototypes (e = softplus(s) with gains, suppressed 0).

    Same value and gradient as that expression written out, at lower cost: Z's forward
    product is never formed (its value cancels), and the backward pass serves both mixtures
    with the two dense products Z needs anyway: G = g W^T gives the gradient of e and, read
    at the active ids, that of a; the values' gradient is (e + a scattered)^T g.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weights: torch.Tensor, every: torch.Tensor, values: torch.Tensor):
        ctx.save_for_backward(ids, weights, every, values)
        return mix_values(ids, weights, values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ids, weights, every, values = ctx.saved_tensors
        grad = grad.to(values.dtype)
        grad_every = grad @ values.T  # (N, P)
        grad_weights = grad_every.gather(1, ids).to(weights.dtype)  # (N, k)
        both = every.to(values.dtype).scatter_add(1, ids, weights.to(values.dtype))  # (N, P)
        grad_values = both.T @ grad  # (P, d)
        return None, grad_weights, grad_every.to(every.dtype), grad_values


def mix_values(ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """z = sum_j a_j W_j for each position: (N, k) ids and weights, (P, d) values -> (N, d)."""
    # embedding_bag is a fused gather-and-sum whose backward is a fast scatter on CPU and GPU;
    # bench/quality.py measures the head's overhead against the dense twin.
    return F.embedding_bag(ids, values, per_sample_weights=weights.to(values.dtype), mode="sum")


def prototype_slices(
    ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, embedding: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """slice_j(y) = a_j (E_y . W_j) for the k active prototypes of each position.

    Args:
        ids: (..., k) active prototype ids.
        weights: (..., k) their mixture weights.
        values: (P, d) prototype values W.
        embedding: (V, d) tied token embedding E.
        token_ids: (..., m) the tokens y whose logits are split.

    Returns:
        (..., m, k) slices; summing over the last axis gives the logits of ``token_ids``.
    """
    proto_values = values[ids]  # (..., k, d)
    token_vectors = embedding[token_ids]  # (..., m, d)
    dots = token_vectors @ proto_values.transpose(-1, -2)  # (..., m, k)
    return dots * weights.unsqueeze(-2)


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
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PrototypeHead):
            d = module.keys.shape[1]
            # Keys: h . K_j ~ N(0, 1) for RMS-normalised h. Values: z starts at the scale of h.
            init.normal_(module.keys, mean=0.0, std=d**-0.5)
            init.normal_(module.values, mean=0.0, std=module.top_k**-0.5)
            init.zeros_(module.usage_window)
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
            else PrototypeHead(config.num_prototypes, hidden, config.prototype_top_k, config.router_gradient)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    @property
    def unembedding(self) -> torch.Tensor:
        """(V, d) the tied token embedding E used as the output matrix."""
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
            result.logits = (act.mixed @ E.T).view(B, T, -1)  # (B, T, V)
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
                every = max(1, flat.shape[0] // losses.TOKEN_SAMPLE)
                cosine = self.prototypes.cosine(flat[::every], act.scores[::every])  # (N / every, P)
                result.aux_losses = losses.prototype_losses(
                    flat[::every], act.scores[::every], cosine, act.ids[::every], self.prototypes, self.config
                )
        if labels is not None:
            result.loss = F.cross_entropy(
                result.logits[:, :-1].reshape(-1, result.logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return result


AutoConfig.register("prism", PrismConfig, exist_ok=True)
AutoModelForCausalLM.register(PrismConfig, PrismForCausalLM, exist_ok=True)
