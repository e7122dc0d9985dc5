"""Fine-tuning bodies (OpenAI's shape): FineTuningJobCreate / FineTuningJobPublic / ...sPublic, events, checkpoints.

LoRA and transfer-learning extensions (`lora_r`, `lora_alpha`, `lora_dropout`, `target_modules`,
`use_rslora`, `layers_to_transform`, `top_k_layers`, `layer_lr_decay`, `weight_decay`,
`early_stopping_patience`, `early_stopping_min_delta`, `validation_split`, `max_forgetting_ratio`,
`replay_fraction`) go *inside* the hyperparameters object, beside OpenAI's three, wherever that object is
sent: `method.supervised.hyperparameters`, `method.dpo.hyperparameters` (which adds `beta`) or the legacy
top-level `hyperparameters`. Values are checked by `training.hyperparams` (not here), so every bad value
is a 400 whose `param` is the field's own name. Every object forbids unknown fields: a misplaced or
misspelt field is a 400 naming its path, never silently ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class HyperparametersIn(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt hyperparameter is an error, not ignored

    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"
    lora_r: Any = None  # default 8
    lora_alpha: Any = None  # default 2 * lora_r
    lora_dropout: Any = None  # default 0.0
    target_modules: Any = None  # default: every projection the server can serve; or "attention" / "mlp" / "all"
    use_rslora: Any = None  # default false: scaling alpha/r; true: alpha/sqrt(r)
    layers_to_transform: Any = None  # default: every layer; a list of layer indices (0 = nearest the input)
    top_k_layers: Any = None  # LoRA on the k layers nearest the output only ("freeze shallow, tune deep")
    layer_lr_decay: Any = None  # default 1.0; layer l of L trains at lr * decay ** (L - 1 - l)
    weight_decay: Any = None  # default 0.0; on the LoRA factors, pulls W' towards the pre-trained W
    early_stopping_patience: Any = None  # default 3 epochs without a better validation loss; 0: off
    validation_split: Any = None  # default 0.1 held out when there is no validation_file; 0: none
    early_stopping_min_delta: Any = None  # default 0.0: an epoch is better only if it lowers the loss by more
    max_forgetting_ratio: Any = None  # default 2.0: reference perplexity adapter/base above it is not promoted
    replay_fraction: Any = None  # replayed examples per epoch / training examples; default 0.25 with replay data
    adapter_type: Any = None  # default "lora"; "dora" or "prompt_tuning"
    num_virtual_tokens: Any = None  # prompt_tuning: learned tokens prepended to the prompt; default 8
    quantization: Any = None  # the frozen base while training: "none" | "int8" | "nf4" (QLoRA); default: as served
    gradient_checkpointing: Any = None  # default false; true: recompute activations in backward (less memory)


class DpoHyperparametersIn(HyperparametersIn):
    beta: Any = None  # default 0.1


STRICT = ConfigDict(strict=True, extra="forbid")  # "seed": true is a 400, not coerced; unknown fields too


class SupervisedIn(BaseModel):
    model_config = STRICT

    hyperparameters: HyperparametersIn | None = None


class DpoIn(BaseModel):
    model_config = STRICT

    hyperparameters: DpoHyperparametersIn | None = None


class MethodIn(BaseModel):
    model_config = STRICT

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedIn | None = None
    dpo: DpoIn | None = None


class FineTuningJobCreate(BaseModel):
    model_config = STRICT

    model: str = Field(max_length=256, description="The served base model, or one of your adapters "
                       "`<tenant>/<name>[@<version>]` to continue training it (the result is a new version).")
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    replay_file: str | None = Field(None, max_length=64, description="Earlier examples mixed into every epoch "
                                    "(replay_fraction) so a continued adapter keeps what it knew.")
    suffix: str | None = Field(None, max_length=40, description="Adapter name: <tenant>/<suffix>; default ft-<job id>.")
    seed: int | None = None
    method: MethodIn | None = None
    hyperparameters: HyperparametersIn | None = None  # legacy placement, same fields
    integrations: list[Any] | None = None  # accepted for SDK compatibility, not used
    metadata: dict[str, str] | None = None
    force_promotion: bool = Field(False, description="Make the adapter the latest version of its name even if "
                                  "it does not beat the base model on the validation data.")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobPublic(BaseModel):
    id: str  # "ftjob-<hex>"
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    status: JobStatus
    fine_tuned_model: str | None  # "<tenant>/<name>@<version>", usable as `model` once succeeded
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    estimated_finish: int | None
    method: dict[str, Any]
    organization_id: str  # the tenant
    result_files: list[str] = []
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None
    force_promotion: bool = False
    evaluation: dict[str, Any] | None = None  # once succeeded: base vs adapter scores, forgetting, promotion
    parent_model: str | None = None  # continued training: the adapter version the job started from
    replay_file: str | None = None


class FineTuningJobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobPublic]
    has_more: bool


class JobEventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None  # metrics: step, total_steps, train_loss, learning_rate, progress


class JobEventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class CheckpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
