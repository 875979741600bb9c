"""Training of PRISM models and their dense twins through the transformers Trainer.

The Trainer brings checkpoints, resume, mixed precision, gradient accumulation and multi-GPU;
this module adds the prototype loss terms, their logging, dead-prototype re-seeding,
checkpoints marked complete only once fully written, and the bundle written at the end.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments, set_seed

from core import store
from core.bundle import write_bundle
from core.data.corpus import Corpus, datasets_progress, load_corpus, pack, token_counts_by_source, train_tokenizer
from core.errors import BundleError, TrainingError
from core.model import losses
from core.model.config import PrismConfig
from core.model.head import active_prototypes, prototype_scores, prototype_weights
from core.model.modeling import PrismForCausalLM
from core.options import check_fields, option
from core.train.checkpoints import (  # noqa: F401 (latest_checkpoint, remove_checkpoints: public here too)
    COMPLETE_MARKER,
    check_output_folder,
    check_resume,
    latest_checkpoint,
    remove_checkpoints,
    run_record,
    start_run,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """Model size and training schedule of a named preset.

    Attributes:
        hidden_size, num_layers, num_heads, intermediate_size: the Llama-style backbone.
        seq_len: tokens per training sequence (also the model's context).
        vocab_size: size of the BPE vocabulary trained on the corpus.
        num_prototypes, top_k: P prototypes, k of them active per token.
        batch_size, learning_rate, max_steps, warmup_steps: the optimisation schedule.
        save_steps: steps between checkpoints.
        eval_sequences: validation sequences scored at the end.
        router_gradient: PrismConfig.router_gradient ("active" or "all").
    """

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
    "tiny": Preset(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        seq_len=64,
        vocab_size=512,
        num_prototypes=64,
        top_k=8,
        batch_size=8,
        learning_rate=3e-3,
        max_steps=200,
        warmup_steps=20,
        save_steps=50,
        eval_sequences=64,
    ),
    # The shipped demo model: ~5.6M parameters, 1,024 prototypes, k = 64, trained with the
    # straight-through router gradient (docs/benchmarks.md and docs/history.md: k = 64 and this
    # gradient bring validation loss within 4% of the dense twin; k = 32 stayed 8% behind).
    "demo": Preset(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=640,
        seq_len=256,
        vocab_size=8192,
        num_prototypes=1024,
        top_k=64,
        batch_size=16,
        learning_rate=2e-3,
        max_steps=1400,
        warmup_steps=100,
        save_steps=200,
        eval_sequences=256,
        router_gradient="all",
    ),
    # For GPU users.
    "small": Preset(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        intermediate_size=1376,
        seq_len=512,
        vocab_size=16384,
        num_prototypes=4096,
        top_k=8,
        batch_size=32,
        learning_rate=1e-3,
        max_steps=20000,
        warmup_steps=1000,
        save_steps=1000,
        eval_sequences=1024,
    ),
}
PresetName = Literal["tiny", "demo", "small"]  # the keys of PRESETS
Device = Literal["auto", "cpu", "cuda"]


@dataclass
class TrainOptions:
    """Arguments of :func:`train`, and the options of `prism train`."""

    corpus: str = option(help="JSONL file, or folder of .jsonl/.txt files")
    out: str = option(help="bundle folder to write")
    preset: PresetName = option("tiny", "model size and schedule")
    dense: bool = option(False, "train the dense twin instead of PRISM")
    max_steps: int | None = option(None, "override the preset's number of steps", minimum=1)
    device: Device = option("auto", "auto (CUDA when present), cpu or cuda")
    seed: int = option(0, "seeds model init and data order")
    tokenizer: str | None = option(None, "reuse the tokenizer of this bundle")
    resume: bool = option(False, "continue from the newest complete checkpoint in OUT/checkpoints")
    overwrite: bool = option(False, "replace the bundle already in OUT (its index and checkpoints are removed with it)")
    progress: bool = option(True, "show progress bars", cli=False)
    overrides: dict = option(
        help="PrismConfig fields to override (tests, experiments)", default_factory=dict, cli=False
    )
    save_steps: int | None = option(
        None, "checkpoint every this many steps (default: the preset's)", minimum=1, cli=False
    )
    stop_after: int | None = option(
        None, "stop (as if interrupted) after this many steps; for resume tests", minimum=1, cli=False
    )

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise TrainingError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainingError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError(f"max_steps must be >= 1, got {self.max_steps}")
        check_fields(self, TrainingError)


def resolve_device(device: Device) -> str:
    """The torch device of a device option: "auto" is CUDA when present, else the CPU."""
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
    fields = dict(
        num_prototypes=preset.num_prototypes,
        prototype_top_k=preset.top_k,
        dense=dense,
        router_gradient=preset.router_gradient,
    )
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
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        # The Trainer writes into an existing folder without clearing it: drop an old marker
        # first, so that it never vouches for half-written files.
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)
        store.atomic_write(folder / COMPLETE_MARKER, "ok\n")


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
    check_output_folder(opts)
    resume_from = None
    if opts.resume:
        resume_from = latest_checkpoint(checkpoint_dir)
        if resume_from is None:
            raise TrainingError(f"--resume: no complete checkpoint under {checkpoint_dir}")
    device = resolve_device(opts.device)
    with datasets_progress(opts.progress):
        corpus = load_corpus(opts.corpus)
        tokenizer = load_or_train_tokenizer(opts, corpus, preset)
        run = run_record(opts, corpus, tokenizer)
        if opts.resume:
            check_resume(checkpoint_dir, run)
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
    if not opts.resume:
        start_run(checkpoint_dir, run)
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
    write_bundle(out, model, tokenizer, record, keep_index=False)  # an index of the old weights goes with them
    return record


def record_twin(bundle: str | Path, twin_record: dict) -> dict:
    """Write a dense twin's validation loss into a PRISM bundle's training.json.

    Raises:
        BundleError: the twin was not trained on the same corpus.
    """
    path = Path(bundle) / "training.json"
    record = store.read_json(
        path, "the training record", fix=f"retrain the bundle with `prism train --out {bundle}`", error=BundleError
    )
    if record.get("corpus_fingerprint") != twin_record.get("corpus_fingerprint"):
        raise BundleError("the dense twin was trained on a different corpus than the bundle")
    record["dense_val_loss"] = twin_record["val_loss"]
    record["dense_steps"] = twin_record["steps"]
    record["dense_tokens_per_second"] = twin_record.get("tokens_per_second")
    record["val_loss_ratio"] = record["val_loss"] / twin_record["val_loss"]
    store.write_json(path, record, indent=2)
    return record
