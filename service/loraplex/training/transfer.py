"""Transfer-learning choices for one run: where LoRA goes, how fast each layer learns, which epoch to keep.

- `peft_config`: PEFT's config for the resolved hyperparameters: a LoraConfig (layers_to_transform
  restricts LoRA to chosen layers; rsLoRA scales by alpha/sqrt(r); DoRA adds a learned magnitude per
  output feature) or a PromptTuningConfig (learned virtual tokens, started from the embeddings of a
  text so that they begin where real tokens live).
- `param_groups`: one optimizer group per decoder layer so layer-wise learning-rate decay
  (eta_l = eta_0 * decay^(L-1-l)) trains deep layers fastest; weight decay on the LoRA factors pulls
  B·A, and so W', back towards the pre-trained W (the L2-SP idea, with W as the anchor).
- `BestEpoch`: early stopping on validation loss that remembers the best epoch's LoRA weights.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from loraplex.training.hyperparams import DORA, PROMPT_TUNING, ResolvedHyperparameters

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


PROMPT_INIT_TEXT = "Answer the question that follows as in the examples."  # tokenized, repeated to length


def peft_config(hp: ResolvedHyperparameters, model_dir: str | None = None):
    """LoRA, DoRA or prompt tuning; `model_dir` (its tokenizer) starts the virtual tokens from a text."""
    if hp.adapter_type == PROMPT_TUNING:
        from peft import PromptTuningConfig

        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": PROMPT_INIT_TEXT,
                "tokenizer_name_or_path": str(model_dir)} if model_dir is not None else {}
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=hp.num_virtual_tokens, **init)
    return lora_config(hp)


def lora_config(hp: ResolvedHyperparameters):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        layers_to_transform=list(hp.layers_to_transform) if hp.layers_to_transform is not None else None,
        layers_pattern="layers" if hp.layers_to_transform is not None else None,
        use_rslora=hp.use_rslora,
        use_dora=hp.adapter_type == DORA,
        bias="none",  # the engine serves A/B pairs (and DoRA's magnitudes) only: no biases, no modules_to_save
    )


def layer_of(param_name: str) -> int | None:
    match = _LAYER_INDEX.search(param_name)
    return int(match[1]) if match else None


def param_groups(model, hp: ResolvedHyperparameters, num_layers: int) -> list[dict]:
    """Trainable (LoRA) parameters grouped by decoder layer, each with its `lr_scale`."""
    by_layer: dict[int | None, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_layer.setdefault(layer_of(name), []).append(param)
    groups = []
    for layer, params in sorted(by_layer.items(), key=lambda item: -1 if item[0] is None else item[0]):
        depth_from_top = 0 if layer is None else num_layers - 1 - layer
        groups.append({"params": params, "lr_scale": hp.layer_lr_decay ** depth_from_top, "layer": layer,
                       "weight_decay": hp.weight_decay})
    return groups


@dataclass
class EpochScore:
    epoch: int
    step: int
    train_loss: float
    valid_loss: float
    valid_token_accuracy: float  # DPO: preference accuracy
    valid_reward_margin: float | None = None  # DPO only
    score: Any = None  # the evaluation.Score behind it (per-example losses, for the paired bootstrap)


@dataclass
class BestEpoch:
    """Tracks validation loss per epoch; `should_stop` after `patience` epochs without an improvement larger
    than `min_delta` (0: never stop)."""

    patience: int
    min_delta: float = 0.0
    history: list[EpochScore] = field(default_factory=list)
    best: EpochScore | None = None
    best_state: dict[str, torch.Tensor] | None = None

    def update(self, score: EpochScore, trainable: dict[str, torch.nn.Parameter]) -> bool:
        """Record `score`; True if it is the best so far (its weights are copied)."""
        self.history.append(score)
        if self.best is not None and not score.valid_loss < self.best.valid_loss - self.min_delta:
            return False
        self.best = score
        self.best_state = {name: param.detach().clone() for name, param in trainable.items()}
        return True

    @property
    def epochs_since_best(self) -> int:
        return 0 if self.best is None else self.history[-1].epoch - self.best.epoch

    def should_stop(self) -> bool:
        return self.patience > 0 and self.epochs_since_best >= self.patience

    def restore_best(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        if self.best_state is None:
            return
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(self.best_state[name])


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
