"""Fine-tuning hyperparameters: OpenAI's three (each may be "auto"), the LoRA shape, the transfer
strategy (which layers, layer-wise learning-rate decay, weight decay, rsLoRA), validation and early
stopping, and a seed.

`Hyperparameters` is what a client sends; `resolve(num_examples)` turns every "auto" into a number and
returns `ResolvedHyperparameters`, what a job reports back and the trainer runs with.

Learning rate: `BASE_LEARNING_RATE * learning_rate_multiplier`, with a short linear warmup then linear
decay to 0. The base is 3e-4, inside the usual 1e-4..1e-3 LoRA range for real-size models; the tiny
random-weight demo model needs the top multiplier (10, i.e. 3e-3) to learn the keyword example in 250 steps.

Transfer defaults are the safe ones: LoRA on every layer and projection, one learning rate, no weight
decay, alpha/r scaling; a held-out 10% of the training file when no validation file is given; early
stopping after 3 epochs without a better validation loss, keeping the best epoch's weights.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from loraplex.engine.model import LORA_MODULES
from loraplex.errors import LoraplexError

AUTO = "auto"
Auto = Literal["auto"]

BASE_LEARNING_RATE = 3e-4
DEFAULT_N_EPOCHS = 3
DEFAULT_BATCH_SIZE = 8
DEFAULT_TARGET_MODULES = LORA_MODULES  # every projection: LoRA on all linear layers learns most per rank
MAX_N_EPOCHS = 50
MAX_BATCH_SIZE = 64
MAX_LEARNING_RATE_MULTIPLIER = 10.0
MAX_LORA_R = 64
MAX_LORA_DROPOUT = 0.5
MAX_SEED = 2**31 - 1
MAX_STEPS = 100_000  # a bound on any job, whatever the epochs and dataset size say
MAX_WEIGHT_DECAY = 1.0
MAX_VALIDATION_SPLIT = 0.5
DEFAULT_VALIDATION_SPLIT = 0.1
MIN_EXAMPLES_TO_SPLIT = 10  # fewer: nothing is held out (too few to train on and to judge with)
DEFAULT_EARLY_STOPPING_PATIENCE = 3
AUTO_EXAMPLES_SEEN = 1500  # auto n_epochs: about this many examples trained on in all
MAX_AUTO_N_EPOCHS = 20
AUTO_FULL_RATE_EXAMPLES = 20_000  # auto learning rate: the base rate from this many examples up
MAX_LAYERS = 1024
# Presets for `target_modules`: LoRA on the attention or on the MLP projections only.
MODULE_PRESETS = {
    "all": LORA_MODULES,
    "attention": tuple(m for m in LORA_MODULES if m in ("q_proj", "k_proj", "v_proj", "o_proj")),
    "mlp": tuple(m for m in LORA_MODULES if m in ("gate_proj", "up_proj", "down_proj")),
}
OPENAI_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier")
DEFAULT_MAX_FORGETTING_RATIO = 2.0  # reference perplexity may at most double before promotion is refused
MAX_FORGETTING_RATIO = 1e6
DEFAULT_REPLAY_FRACTION = 0.25  # a continued job with replay data: a quarter as many replayed as new examples
MAX_REPLAY_FRACTION = 1.0
DEFAULT_BETA = 0.1  # DPO: how far the policy may move from the reference (larger: stays closer)
MAX_BETA = 10.0
# What a job trains: LoRA; DoRA (LoRA + a learned magnitude per output feature); prompt tuning (learned
# input embeddings prepended to every prompt, the model untouched).
LORA, DORA, PROMPT_TUNING = "lora", "dora", "prompt_tuning"
ADAPTER_TYPES = (LORA, DORA, PROMPT_TUNING)
DEFAULT_NUM_VIRTUAL_TOKENS = 8
MAX_NUM_VIRTUAL_TOKENS = 128
EXTENSION_FIELDS = (
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "layers_to_transform",
    "top_k_layers", "layer_lr_decay", "weight_decay", "early_stopping_patience", "validation_split",
    "early_stopping_min_delta", "max_forgetting_ratio", "replay_fraction", "beta", "adapter_type", "num_virtual_tokens",
    "quantization", "gradient_checkpointing",
)
QUANTIZATIONS = ("none", "int8", "nf4")  # the frozen base while training (QLoRA: nf4); auto: the server's
SHAPE_FIELDS = ("lora_r", "lora_alpha", "target_modules", "use_rslora", "layers_to_transform", "top_k_layers",
                "adapter_type", "num_virtual_tokens")


class HyperparameterError(LoraplexError, ValueError):
    """`param` names the offending field, for an OpenAI-style `param` in the error envelope."""

    status = 400
    code = "invalid_hyperparameters"

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}", param)
        self.reason = message


@dataclass(frozen=True)
class ResolvedHyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    seed: int
    num_steps: int  # optimizer steps the job will run: ceil(examples / batch) * epochs, capped by max_steps
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    layers_to_transform: tuple[int, ...] | None = None  # None: every layer
    layer_lr_decay: float = 1.0  # layer l of L trains at lr * decay ** (L - 1 - l)
    weight_decay: float = 0.0  # decoupled, on the LoRA factors: pulls W' back towards the pre-trained W
    early_stopping_patience: int = DEFAULT_EARLY_STOPPING_PATIENCE  # 0: never stop early
    early_stopping_min_delta: float = 0.0  # an epoch counts as better only if it lowers the loss by more
    max_forgetting_ratio: float = DEFAULT_MAX_FORGETTING_RATIO  # reference perplexity adapter / base
    replay_fraction: float = 0.0  # replayed examples per epoch, as a share of the training examples
    beta: float = DEFAULT_BETA  # DPO only
    adapter_type: str = LORA  # prompt_tuning: the LoRA fields above are unused
    num_virtual_tokens: int = 0  # prompt_tuning only
    quantization: str = "none"  # the frozen base while training: none | int8 | nf4 (QLoRA)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int | Auto = AUTO  # auto: auto_n_epochs(dataset size)
    batch_size: int | Auto = AUTO  # auto: DEFAULT_BATCH_SIZE, or the dataset size if smaller
    learning_rate_multiplier: float | Auto = AUTO  # auto: auto_learning_rate_multiplier(size)
    lora_r: int = 8
    lora_alpha: int | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps, whatever n_epochs says
    use_rslora: bool = False
    layers_to_transform: tuple[int, ...] | None = None  # layer indices (0 = nearest the embeddings)
    top_k_layers: int | None = None  # "freeze shallow, tune deep": LoRA on the k layers nearest the output
    layer_lr_decay: float = 1.0
    weight_decay: float = 0.0
    early_stopping_patience: int | Auto = AUTO  # auto: DEFAULT_EARLY_STOPPING_PATIENCE epochs
    validation_split: float | Auto = AUTO  # share held out when there is no validation file; auto: 0.1
    early_stopping_min_delta: float = 0.0
    max_forgetting_ratio: float | Auto = AUTO  # auto: DEFAULT_MAX_FORGETTING_RATIO
    replay_fraction: float | Auto = AUTO  # auto: DEFAULT_REPLAY_FRACTION when there is replay data
    beta: float | Auto = AUTO  # DPO; auto: DEFAULT_BETA
    adapter_type: str = LORA
    num_virtual_tokens: int | None = None  # prompt_tuning; None: DEFAULT_NUM_VIRTUAL_TOKENS
    quantization: str | Auto = AUTO  # auto: the base as the server loads it (LORAPLEX_QUANTIZATION)
    gradient_checkpointing: bool = False

    @classmethod
    def from_request(cls, requested: dict, seed: int, max_steps: int | None = None) -> Hyperparameters:
        """From a job's requested dict (absent fields keep their defaults); `target_modules` may be a preset."""
        given = {k: v for k, v in requested.items() if k in OPENAI_FIELDS + EXTENSION_FIELDS and v is not None}
        modules = given.get("target_modules")
        if isinstance(modules, str):
            if modules not in MODULE_PRESETS:
                raise HyperparameterError("target_modules", f"unknown preset {modules!r}; use one of {list(MODULE_PRESETS)} or a list")
            given["target_modules"] = MODULE_PRESETS[modules]
        for name in ("target_modules", "layers_to_transform"):
            if isinstance(given.get(name), list):
                given[name] = tuple(given[name])
        return cls(**given, seed=seed, max_steps=max_steps)

    def num_held_out(self, num_examples: int) -> int:
        """Examples split off the training file for validation when the job has no validation file."""
        share = DEFAULT_VALIDATION_SPLIT if self.validation_split == AUTO else float(self.validation_split)
        if share <= 0 or num_examples < MIN_EXAMPLES_TO_SPLIT:
            return 0
        return max(1, round(share * num_examples))

    def validate(self, max_lora_rank: int = MAX_LORA_R) -> None:
        """Raise HyperparameterError for the first bad field. `max_lora_rank`: the serving engine's limit."""
        _check_int_or_auto("n_epochs", self.n_epochs, 1, MAX_N_EPOCHS)
        _check_int_or_auto("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_multiplier(self.learning_rate_multiplier)
        _check_int("lora_r", self.lora_r, 1, min(MAX_LORA_R, max_lora_rank))
        if self.lora_alpha is not None:
            _check_int("lora_alpha", self.lora_alpha, 1, 16 * MAX_LORA_R)
        _check_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout <= MAX_LORA_DROPOUT:
            raise HyperparameterError("lora_dropout", f"must be between 0 and {MAX_LORA_DROPOUT}")
        _check_target_modules(self.target_modules)
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1, MAX_STEPS)
        _check_transfer(self)
        _check_adapter_type(self)
        if self.quantization != AUTO and self.quantization not in QUANTIZATIONS:
            raise HyperparameterError("quantization", f"must be one of {list(QUANTIZATIONS)} or \"auto\"")
        if not isinstance(self.gradient_checkpointing, bool):
            raise HyperparameterError("gradient_checkpointing", "must be true or false")

    def resolve(self, num_examples: int, max_lora_rank: int = MAX_LORA_R,
                num_layers: int | None = None, has_replay: bool = False) -> ResolvedHyperparameters:
        """Validate, then replace every "auto" for a dataset of `num_examples` examples and a model of
        `num_layers` layers (None: layer indices are checked by the trainer, which knows the model)."""
        self.validate(max_lora_rank)
        if num_examples < 1:
            raise HyperparameterError("training_file", "the dataset holds no usable example")
        batch_size = min(DEFAULT_BATCH_SIZE, num_examples) if self.batch_size == AUTO else self.batch_size
        n_epochs = auto_n_epochs(num_examples) if self.n_epochs == AUTO else self.n_epochs
        multiplier = (auto_learning_rate_multiplier(num_examples) if self.learning_rate_multiplier == AUTO
                      else float(self.learning_rate_multiplier))
        replay_fraction = self._replay_fraction(has_replay)
        num_replayed = round(replay_fraction * num_examples)
        num_steps = math.ceil((num_examples + num_replayed) / batch_size) * n_epochs
        if self.max_steps is not None:
            num_steps = min(num_steps, self.max_steps)
        if num_steps > MAX_STEPS:
            raise HyperparameterError("n_epochs", f"the job would run {num_steps} steps, more than {MAX_STEPS}")
        return ResolvedHyperparameters(
            n_epochs=n_epochs,
            batch_size=batch_size,
            learning_rate_multiplier=multiplier,
            learning_rate=BASE_LEARNING_RATE * multiplier,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r,
            lora_dropout=float(self.lora_dropout),
            target_modules=tuple(sorted(set(self.target_modules), key=LORA_MODULES.index)),
            seed=self.seed,
            num_steps=num_steps,
            use_rslora=self.use_rslora,
            layers_to_transform=self._layers(num_layers),
            layer_lr_decay=float(self.layer_lr_decay),
            weight_decay=float(self.weight_decay),
            early_stopping_patience=(DEFAULT_EARLY_STOPPING_PATIENCE if self.early_stopping_patience == AUTO
                                     else self.early_stopping_patience),
            early_stopping_min_delta=float(self.early_stopping_min_delta),
            max_forgetting_ratio=(DEFAULT_MAX_FORGETTING_RATIO if self.max_forgetting_ratio == AUTO
                                  else float(self.max_forgetting_ratio)),
            replay_fraction=replay_fraction,
            beta=DEFAULT_BETA if self.beta == AUTO else float(self.beta),
            adapter_type=self.adapter_type,
            num_virtual_tokens=self._num_virtual_tokens(),
            quantization="none" if self.quantization == AUTO else self.quantization,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def _num_virtual_tokens(self) -> int:
        if self.adapter_type != PROMPT_TUNING:
            return 0
        return DEFAULT_NUM_VIRTUAL_TOKENS if self.num_virtual_tokens is None else self.num_virtual_tokens

    def _replay_fraction(self, has_replay: bool) -> float:
        if self.replay_fraction == AUTO:
            return DEFAULT_REPLAY_FRACTION if has_replay else 0.0
        if self.replay_fraction > 0 and not has_replay:
            raise HyperparameterError("replay_fraction", "there is no replay data: give replay_file, or continue "
                                      "training an adapter whose training file you still own")
        return float(self.replay_fraction)

    def _layers(self, num_layers: int | None) -> tuple[int, ...] | None:
        if self.top_k_layers is not None:
            if num_layers is None:
                raise HyperparameterError("top_k_layers", "cannot be resolved without the model's number of layers")
            if self.top_k_layers > num_layers:
                raise HyperparameterError("top_k_layers", f"the model has {num_layers} layers, got {self.top_k_layers}")
            return tuple(range(num_layers - self.top_k_layers, num_layers))
        if self.layers_to_transform is None:
            return None
        if num_layers is not None and max(self.layers_to_transform) >= num_layers:
            raise HyperparameterError("layers_to_transform", f"the model has layers 0..{num_layers - 1}, got {list(self.layers_to_transform)}")
        return tuple(sorted(set(self.layers_to_transform)))


def auto_n_epochs(num_examples: int) -> int:
    """Enough epochs that a small dataset is seen AUTO_EXAMPLES_SEEN times in all, between 3 and 20:
    a 150-row task gets 10 epochs, a 10,000-row one 3. Early stopping ends a run that needs fewer."""
    return max(DEFAULT_N_EPOCHS, min(MAX_AUTO_N_EPOCHS, math.ceil(AUTO_EXAMPLES_SEEN / num_examples)))


def auto_learning_rate_multiplier(num_examples: int) -> float:
    """Fewer examples mean fewer steps to learn in, so a higher rate: 10x the base below 200 examples,
    falling as 1/sqrt(size) to 1x at 20,000. The best epoch is kept, so an overshoot late costs nothing."""
    return float(min(MAX_LEARNING_RATE_MULTIPLIER, max(1.0, math.sqrt(AUTO_FULL_RATE_EXAMPLES / num_examples))))


def learning_rate_at(step: int, num_steps: int, peak: float) -> float:
    """Linear warmup over the first 5% of steps (at least 1), then linear decay towards 0. `step` is 0-based."""
    warmup = max(1, round(0.05 * num_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    remaining = max(1, num_steps - warmup)
    return peak * max(0.0, 1.0 - (step - warmup) / remaining)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(param: str, value, low: int, high: int) -> None:
    if not _is_int(value):
        raise HyperparameterError(param, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise HyperparameterError(param, f"must be between {low} and {high}, got {value}")


def _check_int_or_auto(param: str, value, low: int, high: int) -> None:
    if value != AUTO:
        _check_int(param, value, low, high)


def _check_number(param: str, value) -> None:
    if not (isinstance(value, int | float) and not isinstance(value, bool)) or not math.isfinite(value):
        raise HyperparameterError(param, f"must be a number, got {value!r}")


def _check_range(param: str, value, low: float, high: float) -> None:
    _check_number(param, value)
    if not low <= value <= high:
        raise HyperparameterError(param, f"must be between {low:g} and {high:g}, got {value}")


def _check_multiplier(value) -> None:
    if value == AUTO:
        return
    _check_number("learning_rate_multiplier", value)
    if not 0 < value <= MAX_LEARNING_RATE_MULTIPLIER:
        raise HyperparameterError(
            "learning_rate_multiplier", f"must be > 0 and <= {MAX_LEARNING_RATE_MULTIPLIER:g}, got {value}"
        )


def _check_target_modules(modules) -> None:
    if isinstance(modules, str) or not isinstance(modules, tuple | list) or not modules:
        raise HyperparameterError("target_modules", f"must be a non-empty list drawn from {list(LORA_MODULES)}")
    unknown = [m for m in modules if m not in LORA_MODULES]
    if unknown:
        raise HyperparameterError("target_modules", f"unknown modules {unknown}; choose from {list(LORA_MODULES)}")


def _check_transfer(hp: Hyperparameters) -> None:
    if not isinstance(hp.use_rslora, bool):
        raise HyperparameterError("use_rslora", f"must be true or false, got {hp.use_rslora!r}")
    if hp.layers_to_transform is not None and hp.top_k_layers is not None:
        raise HyperparameterError("layers_to_transform", "give layers_to_transform or top_k_layers, not both")
    if hp.layers_to_transform is not None:
        layers = hp.layers_to_transform
        if isinstance(layers, str) or not isinstance(layers, tuple | list) or not layers or len(layers) > MAX_LAYERS:
            raise HyperparameterError("layers_to_transform", "must be a non-empty list of layer indices")
        for layer in layers:
            _check_int("layers_to_transform", layer, 0, MAX_LAYERS - 1)
    if hp.top_k_layers is not None:
        _check_int("top_k_layers", hp.top_k_layers, 1, MAX_LAYERS)
    _check_number("layer_lr_decay", hp.layer_lr_decay)
    if not 0 < hp.layer_lr_decay <= 1:
        raise HyperparameterError("layer_lr_decay", f"must be > 0 and <= 1, got {hp.layer_lr_decay}")
    _check_number("weight_decay", hp.weight_decay)
    if not 0 <= hp.weight_decay <= MAX_WEIGHT_DECAY:
        raise HyperparameterError("weight_decay", f"must be between 0 and {MAX_WEIGHT_DECAY:g}, got {hp.weight_decay}")
    _check_int_or_auto("early_stopping_patience", hp.early_stopping_patience, 0, MAX_N_EPOCHS)
    _check_range("early_stopping_min_delta", hp.early_stopping_min_delta, 0.0, 10.0)
    if hp.max_forgetting_ratio != AUTO:
        _check_range("max_forgetting_ratio", hp.max_forgetting_ratio, 1.0, MAX_FORGETTING_RATIO)
    if hp.replay_fraction != AUTO:
        _check_range("replay_fraction", hp.replay_fraction, 0.0, MAX_REPLAY_FRACTION)
    if hp.beta != AUTO:
        _check_number("beta", hp.beta)
        if not 0 < hp.beta <= MAX_BETA:
            raise HyperparameterError("beta", f"must be > 0 and <= {MAX_BETA:g}, got {hp.beta}")
    if hp.validation_split != AUTO:
        _check_number("validation_split", hp.validation_split)
        if not 0 <= hp.validation_split <= MAX_VALIDATION_SPLIT:
            raise HyperparameterError("validation_split", f"must be between 0 and {MAX_VALIDATION_SPLIT:g}, got {hp.validation_split}")


def _check_adapter_type(hp: Hyperparameters) -> None:
    if not isinstance(hp.adapter_type, str) or hp.adapter_type not in ADAPTER_TYPES:
        raise HyperparameterError("adapter_type", f"must be one of {list(ADAPTER_TYPES)}, got {hp.adapter_type!r}")
    if hp.num_virtual_tokens is None:
        return
    if hp.adapter_type != PROMPT_TUNING:
        raise HyperparameterError("num_virtual_tokens", "applies to adapter_type \"prompt_tuning\" only")
    _check_int("num_virtual_tokens", hp.num_virtual_tokens, 1, MAX_NUM_VIRTUAL_TOKENS)
