"""The training callbacks PRISM adds to the transformers Trainer: dead-prototype re-seeding
(consistent across ranks), k annealing, a frozen-backbone start, and a stop for resume tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from core import distributed
from core.model.head import active_prototypes, prototype_scores, prototype_weights
from core.train.backbone import backbone_parameters

if TYPE_CHECKING:
    from core.train.trainer import PrismTrainer


class ReseedCallback(TrainerCallback):
    """Every ``reseed_interval`` steps, move prototypes unused since the last check onto the
    last batch's tokens that are farthest from every prototype.

    A re-seeded key points at its token's hidden state, scaled so that its score on that token
    equals the token's current k-th best score: it joins that token's active set (and its
    close neighbours') without taking over others. Its value is the token's current mean
    active value, so the model's output barely moves until training specialises it.

    Across ranks (torchrun), every rank must hold the same parameters: the usage window is
    summed over ranks after every step, so that all ranks agree on which prototypes are dead
    (and checkpoints hold the global window), the candidate tokens are gathered from every
    rank's last batch, and rank 0 alone decides the new keys and values and broadcasts them.
    """

    def __init__(self, trainer: PrismTrainer):
        self.trainer = trainer
        self.reseeded = 0
        self._synced: torch.Tensor | None = None  # the window as last summed over ranks

    def _head(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model).prototypes

    def on_train_begin(self, args, state, control, **kwargs):
        head = self._head()
        if head is not None:  # identical on every rank: zero, or read from the same checkpoint
            self._synced = head.usage_window.detach().clone()

    def on_step_end(self, args, state, control, **kwargs):
        head = self._head()
        if head is None:
            return
        with torch.no_grad():
            if distributed.is_distributed():
                # The buffer holds the global window plus this rank's counts since: sum the new counts.
                fresh = distributed.all_reduce_sum(head.usage_window - self._synced)
                head.usage_window.copy_(self._synced + fresh)
                self._synced.copy_(head.usage_window)
            interval = self.trainer.accelerator.unwrap_model(self.trainer.model).config.reseed_interval
            if not interval or state.global_step % interval:
                return
            dead = (head.usage_window == 0).nonzero().flatten()
            if len(dead) and self.trainer.reseed_candidates is not None:
                hidden, _ = self.trainer.reseed_candidates
                hidden = hidden.reshape(-1, hidden.shape[-1]).to(head.keys.dtype)  # (N_r, d)
                hidden = distributed.all_gather_rows(hidden.contiguous())  # (N, d), every rank's tokens
                n = min(len(dead), len(hidden))
                if distributed.is_main():
                    self._reseed(head, dead[:n], hidden)
                distributed.broadcast(head.keys.data)
                distributed.broadcast(head.values.data)
                self.reseeded += n
            head.usage_window.zero_()
            self._synced = head.usage_window.detach().clone()

    @staticmethod
    def _reseed(head, dead: torch.Tensor, hidden: torch.Tensor) -> None:
        """Point the ``dead`` (n,) prototypes at the n tokens of ``hidden`` (N, d) farthest from all."""
        scores = prototype_scores(hidden, head.keys)  # (N, P)
        coverage = head.cosine(hidden, scores).max(dim=-1).values  # (N,)
        far = coverage.topk(len(dead), largest=False).indices
        h = hidden[far]  # (n, d)
        top_ids, top_scores = active_prototypes(scores[far], head.top_k)  # (n, k)
        kth = top_scores[:, -1:].clamp_min(1e-3)  # (n, 1)
        head.keys[dead] = h * (kth / h.pow(2).sum(-1, keepdim=True).clamp_min(1e-8))
        weights = prototype_weights(top_scores, head.weight_power)  # (n, k)
        mean_value = (weights.unsqueeze(-1) * head.values[top_ids]).sum(1) / weights.sum(1, keepdim=True)
        head.values[dead] = mean_value


def annealed_top_k(start: int, end: int, fraction: float, step: int, max_steps: int) -> int:
    """k at optimiser step ``step``: linear from ``start`` to ``end`` over the first
    ``fraction`` of ``max_steps`` steps (rounded to the nearest integer), then ``end``."""
    span = max(1, round(fraction * max_steps))
    progress = min(1.0, step / span)
    return round(start + (end - start) * progress)


class AnnealTopK(TrainerCallback):
    """Train with k annealed from ``prototype_top_k_start`` down to ``prototype_top_k``.

    The head's ``top_k`` is set before every optimiser step from the step number alone, so a
    resumed run and every rank follow the same schedule; at the end of training it is the
    config's k again, which is what the saved model routes with.
    """

    def __init__(self, trainer: PrismTrainer):
        self.trainer = trainer

    def _model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def on_step_begin(self, args, state, control, **kwargs):
        config = self._model().config
        self._model().prototypes.top_k = annealed_top_k(
            config.prototype_top_k_start,
            config.prototype_top_k,
            config.top_k_anneal_fraction,
            state.global_step,
            state.max_steps,
        )

    def on_train_end(self, args, state, control, **kwargs):
        self._model().prototypes.top_k = self._model().config.prototype_top_k


class FreezeBackbone(TrainerCallback):
    """Train the prototype head alone for the first ``steps`` optimiser steps, then everything.

    Frozen parameters get no gradient, so AdamW skips them entirely (no update, no weight
    decay); they stay in the optimiser (built before the first step) and in DDP's buckets.
    """

    def __init__(self, trainer: PrismTrainer, steps: int):
        self.trainer = trainer
        self.steps = steps
        self.frozen = False

    def _set(self, frozen: bool) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        for parameter in backbone_parameters(model):
            parameter.requires_grad_(not frozen)
        self.frozen = frozen

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step < self.steps:
            self._set(True)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.frozen and state.global_step >= self.steps:
            self._set(False)


class StopAfter(TrainerCallback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            raise KeyboardInterrupt(f"stopped after {self.steps} steps")
