"""Training of PRISM models and their dense twins through the transformers Trainer.

The Trainer brings checkpoints, resume, mixed precision, gradient accumulation and multi-GPU;
this module adds the prototype loss terms, their logging, dead-prototype re-seeding,
checkpoints marked complete only once fully written, and the bundle written at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments, set_seed

from core.model import losses
from core.model.head import active_prototypes, prototype_scores, prototype_weights
from core.bundle import BundleError, write_bundle
from core.model.config import PrismConfig
from core.data.corpus import Corpus, load_corpus, pack, token_counts_by_source, train_tokenizer
from core.model.modeling import PrismForCausalLM
from core.errors import TrainingError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"


@dataclass(frozen=True)
class Preset:
    """Model size and training schedule of a named preset."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    vocab_size: int
    num_prototypes: int
    top_k: int
    batch_size: int
    learning_rate: float
    max_steps: int
    warmup_steps: int
    save_steps: int
    eval_sequences: int
    router_gradient: str = "active"


PRESETS: dict[str, Preset] = {
    # Trains in well under a minute on 2 CPU cores; used by the tests.
    "tiny": Preset(64, 2, 4, 128, 64, 512, 64, 8, 8, 3e-3, 200, 20, 50, 64),
    # The shipped demo model: ~5.6M parameters, 1,024 prototypes, k = 64, trained with the
    # straight-through router gradient (README, "The demo model, measured": k = 64 and this
    # gradient bring validation loss within 4% of the dense twin; k = 32 stayed 8% behind).
    "demo": Preset(256, 4, 4, 640, 256, 8192, 1024, 64, 16, 2e-3, 1400, 100, 200, 256, router_gradient="all"),
    # For GPU users.
    "small": Preset(512, 8, 8, 1376, 512, 16384, 4096, 8, 32, 1e-3, 20000, 1000, 1000, 1024),
}


@dataclass
class TrainOptions:
    """Arguments of :func:`train`.

    Attributes:
        corpus: corpus file or folder.
        out: output bundle folder.
        preset: tiny, demo or small.
        dense: train the dense twin instead of PRISM.
        max_steps: override the preset's number of steps.
        device: auto (CUDA when present), cpu or cuda.
        seed: seeds model init and data order.
        tokenizer: reuse the tokenizer of this bundle instead of training one.
        resume: continue from the newest complete checkpoint in out/checkpoints.
        progress: show progress bars.
        overrides: PrismConfig fields to override (tests, experiments).
        save_steps: checkpoint every this many steps (default: the preset's).
        stop_after: stop (as if interrupted) after this many steps; for resume tests.
    """

    corpus: str
    out: str
    preset: str = "tiny"
    dense: bool = False
    max_steps: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    tokenizer: str | None = None
    resume: bool = False
    progress: bool = True
    overrides: dict = field(default_factory=dict)
    save_steps: int | None = None
    stop_after: int | None = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise TrainingError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainingError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError(f"max_steps must be >= 1, got {self.max_steps}")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_config(preset: Preset, vocab_size: int, eos_id: int, dense: bool, **overrides) -> PrismConfig:
    """PrismConfig with a Llama-style backbone sized by ``preset``."""
    text_config = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=preset.seq_len,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
    )
    fields = dict(num_prototypes=preset.num_prototypes, prototype_top_k=preset.top_k, dense=dense,
                  router_gradient=preset.router_gradient)
    return PrismConfig(text_config=text_config, **{**fields, **overrides})


class _Collator:
    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "labels": ids}


class PrismTrainer(Trainer):
    """The transformers Trainer with PRISM's loss terms and dead-prototype re-seeding."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        self.reseed_candidates: tuple[torch.Tensor, torch.Tensor] | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        out = model(input_ids=inputs["input_ids"], labels=labels)
        loss = out.loss
        terms = {"ce": out.loss.detach()}
        if out.aux_losses:
            loss = losses.total_loss(out.loss, out.aux_losses, model.config)
            terms.update({k: v.detach() for k, v in out.aux_losses.items()})
            # Kept for the re-seeding callback: this batch's hidden states and next tokens.
            self.reseed_candidates = (out.head_hidden[:, :-1].detach(), labels[:, 1:])
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value)
        self._term_count += 1
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._term_count and "loss" in logs:
            for name, total in self._term_sums.items():
                logs[f"loss_{name}"] = round(total / self._term_count, 4)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        (folder / COMPLETE_MARKER).write_text("ok\n")


class _ReseedCallback(TrainerCallback):
    """Every ``reseed_interval`` steps, move prototypes unused since the last check onto the
    last batch's tokens that are farthest from every prototype.

    A re-seeded key points at its token's hidden state, scaled so that its score on that token
    equals the token's current k-th best score: it joins that token's active set (and its
    close neighbours') without taking over others. Its value is the token's current mean
    active value, so the model's output barely moves until training specialises it.
    """

    def __init__(self, trainer: PrismTrainer):
        self.trainer = trainer
        self.reseeded = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = self.trainer.model
        head = model.prototypes
        interval = model.config.reseed_interval
        if head is None or not interval or state.global_step % interval:
            return
        with torch.no_grad():
            dead = (head.usage_window == 0).nonzero().flatten()
            if len(dead) and self.trainer.reseed_candidates is not None:
                hidden, _ = self.trainer.reseed_candidates
                hidden = hidden.reshape(-1, hidden.shape[-1]).to(head.keys.dtype)  # (N, d)
                scores = prototype_scores(hidden, head.keys)  # (N, P)
                coverage = head.cosine(hidden, scores).max(dim=-1).values  # (N,)
                far = coverage.topk(min(len(dead), len(coverage)), largest=False).indices
                dead = dead[: len(far)]
                h = hidden[far]  # (n, d)
                top_ids, top_scores = active_prototypes(scores[far], head.top_k)  # (n, k)
                kth = top_scores[:, -1:].clamp_min(1e-3)  # (n, 1)
                head.keys[dead] = h * (kth / h.pow(2).sum(-1, keepdim=True).clamp_min(1e-8))
                weights = prototype_weights(top_scores)  # (n, k)
                mean_value = (weights.unsqueeze(-1) * head.values[top_ids]).sum(1) / weights.sum(1, keepdim=True)
                head.values[dead] = mean_value
                self.reseeded += len(dead)
            head.usage_window.zero_()


class _StopAfter(TrainerCallback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            raise KeyboardInterrupt(f"stopped after {self.steps} steps")


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint folder that was completely written, or None."""
    complete = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


@torch.no_grad()
def evaluate_loss(model: PrismForCausalLM, packed, batch_size: int = 16, max_sequences: int | None = None) -> float:
    """Mean next-token cross-entropy over the packed sequences (token-weighted)."""
    model.eval()
    device = next(model.parameters()).device
    n = len(packed) if max_sequences is None else min(len(packed), max_sequences)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        ids = torch.tensor(packed[start : min(n, start + batch_size)]["input_ids"], dtype=torch.long, device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(ce)
        count += ids[:, 1:].numel()
    if count == 0:
        raise TrainingError("the validation split is empty after packing; use a larger corpus")
    return total / count


def load_or_train_tokenizer(opts: TrainOptions, corpus: Corpus, preset: Preset):
    """The tokenizer of ``opts.tokenizer`` if given, else one trained on the training split."""
    if opts.tokenizer:
        path = Path(opts.tokenizer)
        if not (path / "tokenizer.json").exists():
            raise TrainingError(f"--tokenizer {path}: no tokenizer.json there (give a bundle folder)")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        tokenizer.model_max_length = preset.seq_len
        return tokenizer

    def texts():
        for start in range(0, len(corpus.train), 1000):
            yield from corpus.train[start : start + 1000]["text"]

    return train_tokenizer(texts(), preset.vocab_size, preset.seq_len)


def train(opts: TrainOptions) -> dict:
    """Train a PRISM model (or its dense twin) and write a bundle to ``opts.out``.

    Returns:
        the training record also written to ``out/training.json``.

    Raises:
        TrainingError, CorpusError: bad arguments or corpus.
    """
    t0 = time.time()
    preset = PRESETS[opts.preset]
    out = Path(opts.out)
    checkpoint_dir = out / "checkpoints"
    resume_from = None
    if opts.resume:
        resume_from = latest_checkpoint(checkpoint_dir)
        if resume_from is None:
            raise TrainingError(f"--resume: no complete checkpoint under {checkpoint_dir}")
    device = resolve_device(opts.device)
    corpus = load_corpus(opts.corpus)
    tokenizer = load_or_train_tokenizer(opts, corpus, preset)
    packed_train = pack(corpus.train, tokenizer, preset.seq_len)
    packed_val = pack(corpus.validation, tokenizer, preset.seq_len)
    if len(packed_train) == 0:
        raise TrainingError(f"corpus {opts.corpus} is shorter than one training sequence ({preset.seq_len} tokens)")
    max_steps = opts.max_steps or preset.max_steps

    set_seed(opts.seed)
    config = build_config(preset, len(tokenizer), tokenizer.eos_token_id, opts.dense, **opts.overrides)
    model = PrismForCausalLM(config)
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=max_steps,
        per_device_train_batch_size=preset.batch_size,
        learning_rate=preset.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(preset.warmup_steps, max_steps // 10),
        weight_decay=0.01,
        adam_beta2=0.99,
        max_grad_norm=1.0,
        logging_steps=max(1, min(50, max_steps // 20)),
        save_strategy="steps",
        save_steps=min(opts.save_steps or preset.save_steps, max_steps),
        save_total_limit=2,
        seed=opts.seed,
        data_seed=opts.seed,
        use_cpu=device == "cpu",
        bf16=use_bf16,
        report_to="none",
        disable_tqdm=not opts.progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = PrismTrainer(
        model=model,
        args=args,
        train_dataset=packed_train.with_format(columns=["input_ids"]),
        data_collator=_Collator(),
    )
    reseed = _ReseedCallback(trainer)
    trainer.add_callback(reseed)
    if opts.stop_after:
        trainer.add_callback(_StopAfter(opts.stop_after))
    train_start = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.time() - train_start

    model = trainer.model
    if model.prototypes is not None:
        model.prototypes.usage_window.zero_()
    val_loss = evaluate_loss(model, packed_val, max_sequences=preset.eval_sequences)
    steps_this_run = trainer.state.global_step - (int(resume_from.name.split("-")[-1]) if resume_from else 0)
    tokens_this_run = steps_this_run * preset.batch_size * preset.seq_len
    record = {
        "kind": "dense" if opts.dense else "prism",
        "preset": opts.preset,
        "preset_config": asdict(preset),
        "seed": opts.seed,
        "device": device,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "val_tokens": min(len(packed_val), preset.eval_sequences) * (preset.seq_len - 1),
        "steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step * preset.batch_size * preset.seq_len,
        "train_loss": result.training_loss,
        "tokens_per_second": tokens_this_run / train_seconds if train_seconds > 0 else None,
        "wall_seconds": time.time() - t0,
        "train_seconds": train_seconds,
        "resumed_from": str(resume_from) if resume_from else None,
        "reseeded_prototypes": reseed.reseeded,
        "corpus": str(opts.corpus),
        "corpus_fingerprint": corpus.fingerprint,
        "corpus_documents": {"train": len(corpus.train), "validation": len(corpus.validation)},
        "skipped_rows": corpus.skipped_rows,
        "parameters": sum(p.numel() for p in model.parameters()),
        "log_history": trainer.state.log_history,
    }
    if not opts.dense:
        record["corpus_tokens_by_source"] = token_counts_by_source(corpus.train, tokenizer)
    model.to("cpu")
    write_bundle(out, model, tokenizer, record)
    return record


def record_twin(bundle: str | Path, twin_record: dict) -> dict:
    """Write a dense twin's validation loss into a PRISM bundle's training.json.

    Raises:
        BundleError: the twin was not trained on the same corpus.
    """
    path = Path(bundle) / "training.json"
    record = json.loads(path.read_text())
    if record.get("corpus_fingerprint") != twin_record.get("corpus_fingerprint"):
        raise BundleError("the dense twin was trained on a different corpus than the bundle")
    record["dense_val_loss"] = twin_record["val_loss"]
    record["dense_steps"] = twin_record["steps"]
    record["dense_tokens_per_second"] = twin_record.get("tokens_per_second")
    record["val_loss_ratio"] = record["val_loss"] / twin_record["val_loss"]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return record


def remove_checkpoints(out: str | Path) -> None:
    """Delete out/checkpoints once a bundle is final."""
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)
