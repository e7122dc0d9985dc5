"""Train one LoRA adapter on a parsed dataset and write it where the engine can serve it.

One call, no framework: load the base model (fp32 on CPU, bf16 on CUDA), wrap it with PEFT (a fresh
LoRA, or a served adapter's weights to continue from), run AdamW over the LoRA weights only (one group
per layer) on the objective (next-token loss, or DPO on preference pairs), score every epoch on
validation data and keep the best epoch, then score the base model, the incumbent version and the
parent's validation data (`measurements`), and `save_pretrained` into a staging directory that is
renamed into place, so `out_dir` is either a complete adapter or absent. The caller (the job worker)
owns queueing, persistence and progress reporting; it observes a run through `on_event` and stops it
through `should_stop`, which is polled before every optimizer step.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loraplex.fsutil import staging_dir
from loraplex.training.datasets import (
    PREFERENCE, DatasetError, ParsedDataset, PreparationStopped, TokenizedDataset, tokenize_dataset,
)
from loraplex.training.evaluation import split_held_out
from loraplex.training.hyperparams import DORA, LORA, MAX_LORA_R, PROMPT_TUNING, Hyperparameters, ResolvedHyperparameters
from loraplex.training.measurements import Measurements, measure, parent_loss
from loraplex.training.objectives import SupervisedObjective
from loraplex.training.qlora import PeakMemory, load_base, on_served_base
from loraplex.training.train_loop import TrainEvent, TrainingCancelled, TrainLoop
from loraplex.training.transfer import BestEpoch, EpochScore, peft_config

__all__ = ["Continuation", "TrainEvent", "TrainResult", "TrainingCancelled", "train_lora"]

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 1024
PEFT_MODEL_CARD = "README.md"  # peft's template, noise in an adapter store


@dataclass(frozen=True)
class Continuation:
    """Where a run starts and what it must not forget: `init_adapter` (a served adapter's directory: its
    weights, rank and modules), `replay` (earlier examples mixed into every epoch) and
    `parent_validation` (the parent's validation data, scored before and after)."""

    init_adapter: Path | None = None
    replay: ParsedDataset | None = None
    parent_validation: ParsedDataset | None = None


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    num_steps: int
    final_loss: float  # mean loss over the last epoch's steps
    train_tokens: int  # tokens processed, all epochs (OpenAI's `trained_tokens`)
    elapsed_s: float  # model load to adapter written
    hyperparameters: ResolvedHyperparameters
    device: str
    num_examples: int  # trained on (after any held-out split)
    num_truncated: int  # examples cut to max_len
    num_dropped: int  # examples left with no trained token after truncation
    valid_loss: float | None = None  # the kept (best) epoch's, i.e. the written adapter's
    valid_token_accuracy: float | None = None  # DPO: preference accuracy
    checkpoints: tuple[Path, ...] = field(default=())
    validation_source: str = "none"  # "file" | "split" (held out of the training file) | "none"
    num_valid_examples: int = 0
    epochs: tuple[EpochScore, ...] = ()  # validation score after every epoch
    best_epoch: int | None = None
    best_step: int | None = None
    stopped_early: bool = False
    method: str = "supervised"
    initial_valid_loss: float | None = None  # before the first step: the starting weights (base or parent)
    num_replayed_per_epoch: int = 0
    measurements: Measurements = field(default_factory=Measurements)  # base, incumbent, forgetting
    peak_memory_bytes: int | None = None  # the job's peak: RSS on CPU, CUDA peak allocated on GPU
    peak_memory_kind: str = "rss_peak"


def train_lora(
    model_dir: Path,
    dataset: ParsedDataset,
    hp: Hyperparameters,
    out_dir: Path,
    on_event: Callable[[TrainEvent], None] = lambda event: None,
    should_stop: Callable[[], bool] = lambda: False,
    validation: ParsedDataset | None = None,
    *,
    on_epoch: Callable[[EpochScore], None] = lambda score: None,
    device: str = "auto",
    max_len: int = DEFAULT_MAX_LEN,
    checkpoint_every_epochs: int | None = None,
    max_lora_rank: int | None = None,
    continuation: Continuation = Continuation(),
    incumbent: Path | None = None,
    validation_source: str = "file",
    served_quantization: str | None = None,
) -> TrainResult:
    """Train on `dataset`, write the adapter to `out_dir` (which must not exist) and return what happened.

    A preference dataset trains with DPO, any other with next-token loss. Without `validation`, a share
    of `dataset` is held out (hp.validation_split). With validation data, every epoch is scored,
    training stops early after `early_stopping_patience` epochs without a validation loss lower by more
    than `early_stopping_min_delta`, the best epoch's weights are the ones written, and the base model
    and `incumbent` (the adapter version the name serves now) are scored on the same data for the
    promotion decision. `validation_source` says where given `validation` came from ("split": the
    caller held it out already). `served_quantization`: the base the adapter will be served on (the server's
    LORAPLEX_QUANTIZATION); a job trained on another (QLoRA on a full-precision server) is scored on it.
    Raises HyperparameterError / DatasetError before any heavy work,
    TrainingCancelled when stopped.
    """
    from transformers import AutoConfig, AutoTokenizer

    started = time.monotonic()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; adapters are written once")
    torch_device = _pick_device(device)
    peak = PeakMemory(torch_device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_config = AutoConfig.from_pretrained(model_dir)
    model_max_len = min(max_len, int(getattr(model_config, "max_position_embeddings", DEFAULT_MAX_LEN)))
    num_layers = int(model_config.num_hidden_layers)
    source = validation_source if validation is not None else "none"
    if validation is None and (num_held_out := hp.num_held_out(len(dataset))):
        dataset, validation, source = *split_held_out(dataset, num_held_out, hp.seed), "split"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hp_resolved = hp.resolve(len(dataset), max_lora_rank or MAX_LORA_R, num_layers, continuation.replay is not None)
    if continuation.init_adapter is not None:
        hp_resolved = inherit_shape(hp_resolved, continuation.init_adapter)
    try:  # a cancel is honoured while the data is tokenized too
        objective, data_stats = _objective(dataset, validation, continuation.replay, tokenizer, hp_resolved, pad_id,
                                           torch_device, model_max_len, should_stop)
    except PreparationStopped:
        raise TrainingCancelled(0) from None
    if not data_stats["has_validation"]:
        source = "none"
    with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
        torch.manual_seed(hp_resolved.seed)  # LoRA init and dropout
        model = _load_peft_model(model_dir, hp_resolved, torch_device, continuation.init_adapter)
        if should_stop():  # a cancel that arrived while the base loaded (it polls nothing)
            raise TrainingCancelled(0)
        loop = TrainLoop(model, hp_resolved, num_layers, objective, on_event, should_stop)
        objective.prepare(model, loop.check)
        initial = objective.evaluate(model, loop.check) if data_stats["has_validation"] else None
        parent_set = _parent_set(tokenizer, continuation.parent_validation, model_max_len)
        parent_before = parent_loss(model, parent_set, pad_id, torch_device, loop.check)
        tracker = BestEpoch(hp_resolved.early_stopping_patience, hp_resolved.early_stopping_min_delta)
        def save_checkpoint(epoch: int) -> Path:
            return _save_adapter(model, _checkpoint_dir(out_dir, epoch), replace=True)

        checkpoints = loop.run(save_checkpoint, checkpoint_every_epochs, data_stats["has_validation"], tracker, on_epoch)
        tracker.restore_best(loop.named_trainable)
        if served_quantization is not None and served_quantization != hp_resolved.quantization:
            model, tracker.best = on_served_base(model, model_dir, served_quantization, torch_device, objective,
                                                 tracker.best, loop.check)
        measurements = measure(model, objective, tokenizer, pad_id, torch_device, model_max_len, loop.check,
                               best=tracker.best, incumbent=incumbent, parent_set=parent_set, parent_before=parent_before)
    if should_stop():
        raise TrainingCancelled(loop.step)
    _save_adapter(model, out_dir)
    best = tracker.best  # its weights are the ones restored and written: its scores are the adapter's
    return TrainResult(
        out_dir=out_dir, num_steps=loop.step, final_loss=loop.last_epoch_loss, train_tokens=loop.num_tokens,
        elapsed_s=time.monotonic() - started, hyperparameters=hp_resolved, device=str(torch_device),
        num_examples=objective.num_examples, num_truncated=data_stats["num_truncated"],
        num_dropped=data_stats["num_dropped"], checkpoints=tuple(checkpoints), validation_source=source,
        num_valid_examples=data_stats["num_valid"], epochs=tuple(tracker.history),
        best_epoch=best and best.epoch, best_step=best and best.step, stopped_early=loop.stopped_early,
        valid_loss=best and best.valid_loss, valid_token_accuracy=best and best.valid_token_accuracy,
        method=objective.method, initial_valid_loss=initial and initial.loss,
        num_replayed_per_epoch=objective.num_replayed, measurements=measurements,
        peak_memory_bytes=peak.read(), peak_memory_kind=peak.kind,
    )


def inherit_shape(hp: ResolvedHyperparameters, adapter_dir: Path) -> ResolvedHyperparameters:
    """A continued adapter keeps its parent's kind and shape: rank, alpha, modules, layers and scaling, or
    its number of virtual tokens."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("peft_type") == "PROMPT_TUNING":
        return replace(hp, adapter_type=PROMPT_TUNING, num_virtual_tokens=int(config["num_virtual_tokens"]))
    layers = config.get("layers_to_transform")
    return replace(hp, adapter_type=DORA if config.get("use_dora") else LORA, lora_r=int(config["r"]),
                   lora_alpha=config["lora_alpha"],
                   target_modules=tuple(sorted(config["target_modules"])), use_rslora=bool(config.get("use_rslora")),
                   layers_to_transform=tuple(layers) if layers is not None else None)


def _objective(dataset, validation, replay, tokenizer, hp, pad_id, device, max_len, should_stop=None):
    """The run's objective and what tokenizing its data found."""
    if dataset.format == PREFERENCE:
        from loraplex.training.dpo import DpoObjective, tokenize_pairs

        valid = tokenize_pairs(tokenizer, validation, max_len) if validation is not None and len(validation) else None
        replay_pairs = tokenize_pairs(tokenizer, replay, max_len) if replay is not None else None
        objective = DpoObjective(tokenize_pairs(tokenizer, dataset, max_len), valid, replay_pairs, hp, pad_id, device)
        stats = {"num_truncated": 0, "num_dropped": 0, "num_valid": len(valid or ())}
    else:
        train = _tokenize_or_refuse(tokenizer, dataset, max_len, should_stop)
        valid = tokenize_dataset(tokenizer, validation, max_len, should_stop) if validation is not None else None
        valid = valid if valid is not None and valid.examples else None
        replay_set = tokenize_dataset(tokenizer, replay, max_len) if replay is not None else None
        objective = SupervisedObjective(train, valid, replay_set, hp, pad_id, device)
        stats = {"num_truncated": train.num_truncated, "num_dropped": train.num_dropped,
                 "num_valid": len(valid.examples) if valid else 0}
    return objective, {**stats, "has_validation": stats["num_valid"] > 0}


def _parent_set(tokenizer, parent_validation: ParsedDataset | None, max_len: int) -> TokenizedDataset | None:
    """The parent's validation data for the forgetting measure (next-token loss: not for preference pairs)."""
    if parent_validation is None or parent_validation.format == PREFERENCE:
        return None
    tokenized = tokenize_dataset(tokenizer, parent_validation, max_len)
    return tokenized if tokenized.examples else None


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _tokenize_or_refuse(tokenizer, dataset: ParsedDataset, max_len: int, should_stop=None) -> TokenizedDataset:
    tokenized = tokenize_dataset(tokenizer, dataset, max_len, should_stop)
    if not tokenized.examples:
        raise DatasetError([(0, f"every example loses all trained tokens when cut to {max_len} tokens")])
    if tokenized.num_dropped:
        log.warning("%d examples had no trained token left after truncation to %d", tokenized.num_dropped, max_len)
    return tokenized


def _load_peft_model(model_dir: Path, hp: ResolvedHyperparameters, device: torch.device, init_adapter: Path | None):
    from peft import PeftModel, get_peft_model

    base = load_base(model_dir, hp.quantization, hp.gradient_checkpointing, device)
    # PEFT keeps LoRA weights in fp32 over a bf16 base (autocast_adapter_dtype), so updates are not rounded away.
    if init_adapter is None:
        return get_peft_model(base, peft_config(hp, model_dir))
    # the parent's shape (hp inherited it), this job's dropout
    return PeftModel.from_pretrained(base, init_adapter, is_trainable=True, config=peft_config(hp))


def _checkpoint_dir(out_dir: Path, epoch: int) -> Path:
    return out_dir.with_name(f"{out_dir.name}.ckpt") / f"epoch-{epoch}"


def _save_adapter(model, out_dir: Path, replace: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors to a staging dir, then rename it to `out_dir`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / PEFT_MODEL_CARD).unlink(missing_ok=True)
        _make_world_readable(tmp)
        if replace and out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)  # atomic; fails if another writer got there first
    return out_dir



def _make_world_readable(root: Path) -> None:
    """mkdtemp makes 0700 dirs; a server running as another user must read the adapter."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
