"""Training of PRISM models and their dense twins through the transformers Trainer.

The Trainer brings checkpoints, resume, mixed precision, gradient accumulation and multi-GPU
(torchrun / accelerate launch: DDP); this module adds the prototype loss terms, their logging,
dead-prototype re-seeding and a frozen-backbone start (core/train/callbacks.py), checkpoints
marked complete only once fully written, the start from a pretrained decoder
(core/train/backbone.py), and the bundle written at the end by rank 0. docs/training.md says
what keeps several ranks identical.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import (
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils.hub import convert_file_size_to_int

from core import distributed, store
from core.bundle import MAX_SHARD_SIZE, write_bundle
from core.data.corpus import Corpus, datasets_progress, load_corpus, pack, token_counts_by_source, train_tokenizer
from core.device import Dtype, dtype_name, resolve_dtype
from core.errors import BundleError, TrainingError
from core.model import losses
from core.model.config import PrismConfig
from core.model.modeling import PrismForCausalLM
from core.options import check_fields, option
from core.train.backbone import load_backbone_weights, read_backbone_config
from core.train.callbacks import AnnealTopK, FreezeBackbone, ReseedCallback, StopAfter
from core.train.checkpoints import (  # noqa: F401 (latest_checkpoint, remove_checkpoints: public here too)
    COMPLETE_MARKER,
    check_output_folder,
    check_resume,
    latest_checkpoint,
    remove_checkpoints,
    run_record,
    start_run,
)
from core.train.presets import PRESETS, Preset, PresetName  # noqa: F401 (public here too)

logger = logging.getLogger(__name__)

# Tests of distributed training: when set, every rank writes rank-<r>.json there at the end of
# train() (its parameters' sha256 and the tokens it trained on), to compare ranks honestly.
RANK_REPORT_ENV = "PRISM_RANK_REPORT_DIR"


Device = Literal["auto", "cpu", "cuda"]


@dataclass
class TrainOptions:
    """Arguments of :func:`train`, and the options of `prism train`."""

    corpus: str = option(help="JSONL file, or folder of .jsonl/.txt files")
    out: str = option(help="bundle folder to write")
    preset: PresetName = option("tiny", "model size and schedule")
    dense: bool = option(False, "train the dense twin instead of PRISM")
    max_steps: int | None = option(None, "override the preset's number of steps", minimum=1)
    batch_size: int | None = option(None, "sequences per device per micro-batch (default: the preset's)", minimum=1)
    grad_accum: int = option(1, "micro-batches accumulated into each optimiser step", minimum=1)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, slower)")
    backbone: str | None = option(
        None, "start from this local pretrained transformers decoder (a save_pretrained folder with its tokenizer)"
    )
    freeze_backbone: int = option(
        0, "with --backbone: train the prototype head alone for this many steps, then everything", minimum=0
    )
    device: Device = option("auto", "auto (CUDA when present), cpu or cuda")
    dtype: Dtype = option(
        "auto",
        "mixed precision of the forward and backward passes (the weights stay float32): auto (bfloat16 on "
        "a CUDA device that supports it, else float32), float32, bfloat16 or float16 (CUDA only)",
    )
    seed: int = option(0, "seeds model init and data order")
    max_shard_size: str = option(
        MAX_SHARD_SIZE, "largest weight file the bundle is written in, e.g. 10MB (a repository's file-size limit)"
    )
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
        if self.dtype == "float16" and resolve_device(self.device) == "cpu":
            raise TrainingError("--dtype float16 trains on CUDA only; on the CPU use bfloat16 or float32")
        try:
            convert_file_size_to_int(self.max_shard_size)
        except ValueError:
            raise TrainingError(
                f"--max-shard-size {self.max_shard_size!r} is not a size; write it like 10MB or 5GB"
            ) from None
        if self.freeze_backbone and not self.backbone:
            raise TrainingError("--freeze-backbone needs --backbone (a pretrained decoder to keep frozen)")
        if self.freeze_backbone and self.dense:
            raise TrainingError("--freeze-backbone trains the prototype head alone; the dense twin has none")


def resolve_device(device: Device) -> str:
    """The torch device of a device option: "auto" is CUDA when present, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def sequence_length(preset: Preset, backbone: PreTrainedConfig | None = None) -> int:
    """Tokens per training sequence: the preset's, within a pretrained backbone's context."""
    context = getattr(backbone, "max_position_embeddings", None) if backbone is not None else None
    return min(preset.seq_len, context) if context else preset.seq_len


def build_backbone_config(backbone: PreTrainedConfig, preset: Preset, dense: bool, **overrides) -> PrismConfig:
    """PrismConfig around a pretrained decoder's config; the preset sizes the head and the sequences."""
    fields = _head_fields(
        preset,
        dense,
        overrides,
        sequence_length=sequence_length(preset, backbone),
        tie_word_embeddings=bool(getattr(backbone, "tie_word_embeddings", True)),
    )
    return PrismConfig(text_config=backbone.to_dict(), **fields)


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
    fields = _head_fields(preset, dense, overrides, sequence_length=preset.seq_len)
    return PrismConfig(text_config=text_config, **fields)


def _head_fields(preset: Preset, dense: bool, overrides: dict, **fields) -> dict:
    """PrismConfig fields of the preset's head, then ``fields``, then the command line's
    ``overrides``, with the preset's k annealing.

    The preset's starting k applies to PRISM models whose final k is at or below it: ``--top-k 128``
    on a preset that anneals from 64 trains at 128 throughout rather than failing.
    """
    head = dict(
        num_prototypes=preset.num_prototypes,
        prototype_top_k=preset.top_k,
        dense=dense,
        router_gradient=preset.router_gradient,
        weight_power=preset.weight_power,
    )
    merged = {**head, **fields, **overrides}
    if "prototype_top_k_start" not in overrides and preset.top_k_start is not None and not merged["dense"]:
        if preset.top_k_start >= merged["prototype_top_k"]:
            merged["prototype_top_k_start"] = min(preset.top_k_start, merged["num_prototypes"])
    return merged


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
        self.rank_tokens = 0  # tokens this rank trained on in this run

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        # Under DDP or nn.DataParallel `model` is a wrapper: the config lives on the model inside.
        config = self.accelerator.unwrap_model(model).config
        out = model(input_ids=inputs["input_ids"], labels=labels)
        loss = out.loss
        terms = {"ce": out.loss.detach()}
        if out.aux_losses:
            loss = losses.total_loss(out.loss, out.aux_losses, config)
            terms.update({k: v.detach() for k, v in out.aux_losses.items()})
            # Kept for the re-seeding callback: this batch's hidden states and next tokens.
            self.reseed_candidates = (out.head_hidden[:, :-1].detach(), labels[:, 1:])
        for name, value in terms.items():
            # nn.DataParallel gathers one value per GPU: their mean is the batch's.
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value.float().mean())
        self._term_count += 1
        self.rank_tokens += inputs["input_ids"].numel()
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._term_count and "loss" in logs:
            # Every rank logs at the same steps: report the mean over ranks, as the Trainer does for "loss".
            names = sorted(self._term_sums)
            device = self.args.device
            means = torch.tensor([self._term_sums[n] / self._term_count for n in names], device=device)
            means = distributed.all_reduce_sum(means.double()) / distributed.world_size()
            for name, mean in zip(names, means.tolist(), strict=True):
                logs[f"loss_{name}"] = round(mean, 4)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        # The Trainer writes into an existing folder without clearing it: drop an old marker
        # first, so that it never vouches for half-written files.
        if distributed.is_main():
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)
        distributed.barrier()  # every rank has written its share (its RNG state)
        if distributed.is_main():
            store.atomic_write(folder / COMPLETE_MARKER, "ok\n")


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


def load_or_train_tokenizer(opts: TrainOptions, corpus: Corpus, preset: Preset, seq_len: int | None = None):
    """The tokenizer of ``opts.tokenizer`` if given, else the backbone's, else one trained on the training split."""
    seq_len = seq_len or preset.seq_len
    folder, flag = (opts.tokenizer, "--tokenizer") if opts.tokenizer else (opts.backbone, "--backbone")
    if folder:
        path = Path(folder)
        if not (path / "tokenizer.json").exists():
            fix = "give a bundle folder" if opts.tokenizer else "save the decoder's tokenizer there or give --tokenizer"
            raise TrainingError(f"{flag} {path}: no tokenizer.json there ({fix})")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        if tokenizer.eos_token_id is None:
            raise TrainingError(f"{flag} {path}: the tokenizer has no end-of-text token to separate documents")
        tokenizer.model_max_length = seq_len
        return tokenizer

    def texts():
        for start in range(0, len(corpus.train), 1000):
            yield from corpus.train[start : start + 1000]["text"]

    return train_tokenizer(texts(), preset.vocab_size, seq_len)


def _prepare_data(opts: TrainOptions, preset: Preset, seq_len: int):
    """Corpus, tokenizer and packed splits, the same on every rank.

    Rank 0 goes first (it fills the datasets cache that the other ranks then read) and alone
    trains a new tokenizer, which it sends to the others.
    """
    with datasets_progress(opts.progress and distributed.is_main()):
        with distributed.main_process_first():
            corpus = load_corpus(opts.corpus)
        if opts.tokenizer or opts.backbone:
            tokenizer = load_or_train_tokenizer(opts, corpus, preset, seq_len)
        else:
            tokenizer = load_or_train_tokenizer(opts, corpus, preset, seq_len) if distributed.is_main() else None
            tokenizer = distributed.broadcast_object(tokenizer)
        with distributed.main_process_first():
            packed_train = pack(corpus.train, tokenizer, seq_len)
            packed_val = pack(corpus.validation, tokenizer, seq_len)
    return corpus, tokenizer, packed_train, packed_val


def _build_model(opts: TrainOptions, preset: Preset, tokenizer, backbone: PreTrainedConfig | None) -> PrismForCausalLM:
    """A new PRISM model (or dense twin): from the preset, or around the pretrained ``backbone``."""
    if backbone is None:
        config = build_config(preset, len(tokenizer), tokenizer.eos_token_id, opts.dense, **opts.overrides)
        return PrismForCausalLM(config)
    largest = max(tokenizer.get_vocab().values())
    if largest >= backbone.vocab_size:
        raise TrainingError(
            f"--backbone {opts.backbone}: the tokenizer has ids up to {largest} but the decoder's vocabulary has "
            f"{backbone.vocab_size} entries; give the tokenizer the decoder was trained with"
        )
    model = PrismForCausalLM(build_backbone_config(backbone, preset, opts.dense, **opts.overrides))
    load_backbone_weights(model, opts.backbone)
    return model


def parameters_sha256(model: torch.nn.Module) -> str:
    """sha256 of every parameter and saved buffer of ``model``, by name: equal iff bitwise equal."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train(opts: TrainOptions) -> dict:
    """Train a PRISM model (or its dense twin) and write a bundle to ``opts.out``.

    Launched with ``torchrun --nproc_per_node N`` (or ``accelerate launch``), every rank runs
    this function: the Trainer gives each rank its own share of every batch and averages the
    gradients (DDP), the prototype re-seeding is decided on rank 0 for all, and rank 0 alone
    writes the bundle once every rank has finished. Every rank returns the same record.

    Returns:
        the training record also written to ``out/training.json``.

    Raises:
        TrainingError, CorpusError: bad arguments or corpus.
    """
    t0 = time.time()
    preset = PRESETS[opts.preset]
    out = Path(opts.out)
    checkpoint_dir = out / "checkpoints"
    device = resolve_device(opts.device)
    distributed.start(cpu=device == "cpu")
    check_output_folder(opts)
    resume_from = None
    if opts.resume:
        resume_from = latest_checkpoint(checkpoint_dir)
        if resume_from is None:
            raise TrainingError(f"--resume: no complete checkpoint under {checkpoint_dir}")
    distributed.barrier()  # every rank has looked at OUT before rank 0 writes into it
    backbone = read_backbone_config(opts.backbone) if opts.backbone else None
    seq_len = sequence_length(preset, backbone)
    corpus, tokenizer, packed_train, packed_val = _prepare_data(opts, preset, seq_len)
    run = run_record(opts, corpus, tokenizer)
    if opts.resume:
        check_resume(checkpoint_dir, run)
    if len(packed_train) == 0:
        raise TrainingError(f"corpus {opts.corpus} is shorter than one training sequence ({seq_len} tokens)")
    if len(packed_val) == 0:  # found now, on every rank, rather than after training on rank 0 alone
        raise TrainingError("the validation split is empty after packing; use a larger corpus")
    max_steps = opts.max_steps or preset.max_steps
    batch_size = opts.batch_size or preset.batch_size

    set_seed(opts.seed)
    model = _build_model(opts, preset, tokenizer, backbone)
    precision = resolve_dtype(opts.dtype, device)  # autocast only: the weights and optimiser stay float32
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        activation_checkpointing=opts.gradient_checkpointing,  # transformers 5's name for it
        activation_checkpointing_kwargs={"use_reentrant": False} if opts.gradient_checkpointing else None,
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
        bf16=precision == torch.bfloat16,
        fp16=precision == torch.float16,
        report_to="none",
        disable_tqdm=not opts.progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # The usage window is summed over ranks by the re-seeding callback; DDP's default
        # broadcast of buffers would overwrite every rank's counts with rank 0's at each forward.
        ddp_broadcast_buffers=False,
        # A frozen backbone takes no gradient for a while: DDP must expect unused parameters.
        ddp_find_unused_parameters=bool(opts.freeze_backbone),
        include_num_input_tokens_seen="all",  # summed over ranks by the Trainer
    )
    trainer = PrismTrainer(
        model=model,
        args=args,
        train_dataset=packed_train.with_format(columns=["input_ids"]),
        data_collator=_Collator(),
    )
    if not opts.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # with the bars off it prints every log step instead
    reseed = ReseedCallback(trainer)
    trainer.add_callback(reseed)
    if model.prototypes is not None and model.config.prototype_top_k_start is not None:
        trainer.add_callback(AnnealTopK(trainer))
    if opts.freeze_backbone:
        trainer.add_callback(FreezeBackbone(trainer, opts.freeze_backbone))
    if opts.stop_after:
        trainer.add_callback(StopAfter(opts.stop_after))
    if not opts.resume and distributed.is_main():
        start_run(checkpoint_dir, run)
    distributed.barrier()
    train_start = time.time()
    tokens_before = 0
    if resume_from is not None:
        tokens_before = _tokens_at(resume_from)
    with warnings.catch_warnings():
        # torch deprecates DDP's broadcast_buffers=False for forward_sync_buffers, which the
        # Trainer cannot pass yet; the behaviour asked for (no buffer sync in forward) is the same.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.time() - train_start

    model = trainer.model
    if model.prototypes is not None:
        model.prototypes.usage_window.zero_()
    _report_rank(model, trainer.rank_tokens)
    distributed.barrier()  # every rank has finished training before rank 0 writes the bundle
    record = None
    if distributed.is_main():
        val_loss = evaluate_loss(model, packed_val, max_sequences=preset.eval_sequences)
        train_tokens = int(trainer.state.num_input_tokens_seen)  # every rank's, every micro-batch
        record = {
            "kind": "dense" if opts.dense else "prism",
            "preset": opts.preset,
            "preset_config": asdict(preset),
            "backbone": str(opts.backbone) if opts.backbone else None,
            "freeze_backbone_steps": opts.freeze_backbone,
            "seed": opts.seed,
            "device": device,
            "dtype": dtype_name(precision),
            "world_size": distributed.world_size(),
            "batch_size": batch_size,
            "grad_accum": opts.grad_accum,
            "sequence_length": seq_len,
            "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss),
            "val_tokens": min(len(packed_val), preset.eval_sequences) * (seq_len - 1),
            "steps": trainer.state.global_step,
            "train_tokens": train_tokens,
            "train_loss": result.training_loss,
            "tokens_per_second": (train_tokens - tokens_before) / train_seconds if train_seconds > 0 else None,
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
        # keep_index=False: an index of the old weights goes with them
        write_bundle(out, model, tokenizer, record, keep_index=False, max_shard_size=opts.max_shard_size)
    return distributed.broadcast_object(record)  # after rank 0 wrote the bundle


def _tokens_at(checkpoint: Path) -> int:
    """Training tokens (all ranks) that a checkpoint's trainer state counts."""
    state = store.read_json(checkpoint / "trainer_state.json", "the trainer state", error=TrainingError)
    return int(state.get("num_input_tokens_seen") or 0) if isinstance(state, dict) else 0


def _report_rank(model: torch.nn.Module, tokens: int) -> None:
    """With $PRISM_RANK_REPORT_DIR set (tests), write this rank's parameter hash and token count."""
    folder = os.environ.get(RANK_REPORT_ENV)
    if not folder:
        return
    report = {
        "rank": distributed.rank(),
        "world_size": distributed.world_size(),
        "parameters_sha256": parameters_sha256(model),
        "tokens": tokens,
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    store.write_json(Path(folder) / f"rank-{distributed.rank()}.json", report)


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
