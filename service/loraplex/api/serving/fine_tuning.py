"""Fine-tuning jobs: check a request against the files, the model and the limits, then enqueue it.

Nothing here trains: the job goes into the `JobStore` and a worker process picks it up. Everything a
worker would refuse later (unknown file, bad hyperparameters, too many steps) is refused here first, so
a bad request is a 400 at once, not a job that fails minutes later.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from loraplex.api.errors import InvalidParameter
from loraplex.api.schemas.fine_tuning import (
    CheckpointPublic, CheckpointsPublic, FineTuningJobCreate, FineTuningJobPublic, FineTuningJobsPublic,
    HyperparametersIn, JobEventPublic, JobEventsPublic,
)
from loraplex.api.serving.files import paginate, visible_tenant
from loraplex.config import Settings
from loraplex.registry.adapter_kinds import SERVED_KINDS
from loraplex.registry.auth import Principal
from loraplex.registry.local_store import AdapterNotFound
from loraplex.registry.service import AdapterRegistry
from loraplex.registry.versioned_store import AdapterVersion, is_id_part
from loraplex.training.datasets import CHAT, PREFERENCE, PROMPT_COMPLETION
from loraplex.training.errors import FileNotFound, JobNotFound
from loraplex.training.files import FINE_TUNE, FileStore
from loraplex.training.hyperparams import (
    EXTENSION_FIELDS, MAX_SEED, OPENAI_FIELDS, PROMPT_TUNING, SHAPE_FIELDS, Hyperparameters,
)
from loraplex.training.jobs import (
    DPO, SUPERVISED, JobRecord, JobStore, new_job_id, parent_job, request_cancel,
)
from loraplex.training.report import build_report


@dataclass(frozen=True)
class ServedModel:
    """What a job is checked against: the served base model's name, depth and whether it has a chat template."""

    name: str
    num_layers: int
    has_chat_template: bool


def create(store: JobStore, files: FileStore, registry: AdapterRegistry, settings: Settings, principal: Principal,
           served: ServedModel, body: FineTuningJobCreate) -> FineTuningJobPublic:
    method = _method_type(body)
    training = files.get(visible_tenant(principal), body.training_file, param="training_file")
    if training.purpose != FINE_TUNE:
        raise InvalidParameter(f"{training.id} has purpose {training.purpose!r}, not {FINE_TUNE!r}", param="training_file")
    _check_format(training, method, served, "training_file")
    for param in ("validation_file", "replay_file"):
        if getattr(body, param):  # same owner as the training file, same form
            _check_format(files.get(training.tenant, getattr(body, param), param=param), method, served, param)
    if body.suffix is not None and not is_id_part(body.suffix):
        raise InvalidParameter("suffix must match [a-z0-9][a-z0-9_.-]{0,39}: it names the adapter", param="suffix")
    parent = _parent_adapter(registry, training.tenant, body.model, served, settings)
    requested = _requested_hyperparameters(body, method)
    if parent is not None and (shape := [name for name in SHAPE_FIELDS if name in requested]):
        raise InvalidParameter(f"{shape[0]}: a continued adapter keeps its parent's LoRA shape "
                               f"(rank {parent.rank}, modules {list(parent.target_modules)})", param=shape[0],
                               code="invalid_hyperparameters")
    has_replay = bool(body.replay_file) or (parent is not None and _parent_training_file(store, files, training.tenant, parent) is not None)
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
    _check_hyperparameters(requested, seed, training.num_examples, served.num_layers, settings, has_replay)
    now = time.time_ns()
    job = JobRecord(
        id=new_job_id(), tenant=training.tenant, model=body.model, training_file=training.id,
        validation_file=body.validation_file, suffix=body.suffix, seed=seed, created_at=now // 10**9, order=now,
        hyperparameters=requested, force_promotion=body.force_promotion, method=method,
        parent_model=parent.versioned_id if parent is not None else None, replay_file=body.replay_file,
    )
    return to_public(store.create(job, settings.max_jobs_per_tenant))


def _method_type(body: FineTuningJobCreate) -> str:
    method = body.method
    if method is None:
        return SUPERVISED
    other = DPO if method.type == SUPERVISED else SUPERVISED
    if getattr(method, other) is not None:
        raise InvalidParameter(f"method.type is {method.type!r} but method.{other} is given", param=f"method.{other}")
    if method.type == DPO and body.hyperparameters is not None:
        raise InvalidParameter("a dpo job takes its hyperparameters in method.dpo.hyperparameters", param="hyperparameters")
    return method.type


def _check_format(record, method: str, served: ServedModel, param: str) -> None:
    """The file's form must suit the method, and a chat or preference file needs the model's chat template."""
    wanted = (PREFERENCE,) if method == DPO else (PROMPT_COMPLETION, CHAT)
    if record.format not in wanted:
        raise InvalidParameter(f"{param} {record.id} holds {record.format} examples; a {method} job needs "
                               f"{' or '.join(wanted)}", param=param)
    if record.format in (CHAT, PREFERENCE) and not served.has_chat_template:
        raise InvalidParameter(f"{param} {record.id} holds chat messages, but the model {served.name!r} has no chat "
                               f"template to render them; use prompt/completion examples", param=param)


def _parent_adapter(registry: AdapterRegistry, tenant: str, model: str, served: ServedModel,
                    settings: Settings) -> AdapterVersion | None:
    """None for the base model; else the adapter version to continue, which the job's tenant must be able to use."""
    if model == served.name:
        return None
    if "/" not in model:
        raise InvalidParameter(f"model must be the served base model {served.name!r} or one of your adapters "
                               f"'<tenant>/<name>[@<version>]', got {model!r}", param="model")
    try:
        parent = registry.resolve(Principal(tenant=tenant, is_admin=False), model)
    except AdapterNotFound:
        raise InvalidParameter(f"model {model!r}: no such adapter usable by {tenant}", param="model") from None
    unservable = sorted(set(parent.target_modules) - set(settings.lora_target_module_list))
    if parent.rank > settings.max_lora_rank or unservable:
        raise InvalidParameter(f"model {model!r}: this server cannot train adapters of rank {parent.rank} on "
                               f"{list(parent.target_modules)}", param="model")
    return parent


def _parent_training_file(store: JobStore, files: FileStore, tenant: str, parent: AdapterVersion):
    """The training file of the tenant's own job that made `parent`, while the tenant still owns it (the default
    replay data). Another tenant's shared adapter brings none: its jobs and files are not this tenant's to read."""
    job = parent_job(store, tenant, parent.versioned_id) if parent.tenant == tenant else None
    if job is None:
        return None
    try:
        return files.get(tenant, job.training_file, param="replay_file")
    except FileNotFound:
        return None


def get(store: JobStore, principal: Principal, job_id: str) -> JobRecord:
    job = store.get(job_id)
    tenant = visible_tenant(principal)
    if tenant is not None and job.tenant != tenant:
        raise JobNotFound(job_id)  # another tenant's job reads like a missing one
    return job


def list_public(store: JobStore, principal: Principal, after: str | None, limit: int) -> FineTuningJobsPublic:
    page, has_more = paginate(store.list(visible_tenant(principal)), after, limit)
    return FineTuningJobsPublic(data=[to_public(job) for job in page], has_more=has_more)


def cancel(store: JobStore, principal: Principal, job_id: str) -> FineTuningJobPublic:
    get(store, principal, job_id)
    return to_public(request_cancel(store, job_id))


def events_public(store: JobStore, principal: Principal, job_id: str, after: str | None, limit: int) -> JobEventsPublic:
    get(store, principal, job_id)
    newest_first = list(reversed(store.events(job_id)))
    page, has_more = paginate(newest_first, after, limit)
    return JobEventsPublic(data=[JobEventPublic(**event) for event in page], has_more=has_more)


def checkpoints_public(store: JobStore, principal: Principal, job_id: str, after: str | None, limit: int) -> CheckpointsPublic:
    job = get(store, principal, job_id)
    page, has_more = paginate(list(reversed(job.checkpoints)), after, limit)
    data = [CheckpointPublic(**checkpoint) for checkpoint in page]
    return CheckpointsPublic(data=data, has_more=has_more, first_id=data[0].id if data else None,
                             last_id=data[-1].id if data else None)


def report(store: JobStore, principal: Principal, job_id: str) -> dict[str, Any]:
    return build_report(get(store, principal, job_id), store.events(job_id))


def to_public(job: JobRecord) -> FineTuningJobPublic:
    hyperparameters = {**job.hyperparameters}
    for name, value in (job.resolved_hyperparameters or {}).items():
        if name in OPENAI_FIELDS + EXTENSION_FIELDS:
            hyperparameters[name] = list(value) if isinstance(value, tuple) else value
    return FineTuningJobPublic(
        id=job.id, model=job.model, created_at=job.created_at, finished_at=job.finished_at, status=job.status,
        fine_tuned_model=job.fine_tuned_model, training_file=job.training_file, validation_file=job.validation_file,
        hyperparameters=hyperparameters, trained_tokens=job.trained_tokens, error=job.error, seed=job.seed,
        estimated_finish=job.estimated_finish, organization_id=job.tenant, user_provided_suffix=job.suffix,
        force_promotion=job.force_promotion, evaluation=job.evaluation,
        method={"type": job.method, job.method: {"hyperparameters": hyperparameters}},
        parent_model=job.parent_model, replay_file=job.replay_file,
    )


def _requested_hyperparameters(body: FineTuningJobCreate, method: str) -> dict[str, Any]:
    """`method.<type>.hyperparameters` wins over the legacy top-level `hyperparameters`."""
    section = getattr(body.method, method, None) if body.method else None
    given = section.hyperparameters if section is not None else None
    chosen = given or body.hyperparameters or HyperparametersIn()
    return {name: value for name, value in chosen.model_dump().items() if value is not None}


def _check_hyperparameters(requested: dict[str, Any], seed: int, num_examples: int, num_layers: int,
                           settings: Settings, has_replay: bool) -> None:
    try:
        hp = Hyperparameters.from_request(requested, seed)
        resolved = hp.resolve(num_examples, settings.max_lora_rank, num_layers, has_replay)
    except TypeError as exc:  # HyperparameterError maps itself (400 naming the field)
        raise InvalidParameter(str(exc), param="hyperparameters", code="invalid_hyperparameters") from None
    if resolved.adapter_type not in SERVED_KINDS:  # refused now, not after the training
        raise InvalidParameter(f"adapter_type: this server does not serve {resolved.adapter_type} adapters "
                               f"(it serves {sorted(SERVED_KINDS)})", param="adapter_type", code="invalid_hyperparameters")
    unservable = sorted(set(resolved.target_modules) - set(settings.lora_target_module_list))
    if unservable and resolved.adapter_type != PROMPT_TUNING:
        raise InvalidParameter(f"target_modules: this server cannot serve adapters on {unservable}",
                               param="target_modules", code="invalid_hyperparameters")
    if resolved.num_steps > settings.max_train_steps:
        raise InvalidParameter(f"n_epochs: the job would run {resolved.num_steps} steps, more than the limit of "
                               f"{settings.max_train_steps}", param="n_epochs", code="invalid_hyperparameters")
