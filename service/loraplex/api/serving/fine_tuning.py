"""Fine-tuning jobs: check a request against the files, the model and the limits, then enqueue it.

Nothing here trains: the job goes into the `JobStore` and a worker process picks it up. Everything a
worker would refuse later (unknown file, bad hyperparameters, too many steps) is refused here first, so
a bad request is a 400 at once, not a job that fails minutes later.
"""
from __future__ import annotations

import secrets
import time
from typing import Any

from loraplex.api.errors import InvalidParameter
from loraplex.api.schemas.fine_tuning import (
    CheckpointPublic, CheckpointsPublic, FineTuningJobCreate, FineTuningJobPublic, FineTuningJobsPublic,
    HyperparametersIn, JobEventPublic, JobEventsPublic,
)
from loraplex.api.serving.files import paginate, visible_tenant
from loraplex.config import Settings
from loraplex.registry.auth import Principal
from loraplex.registry.versioned_store import is_id_part
from loraplex.training.files import FINE_TUNE, FileStore
from loraplex.training.hyperparams import EXTENSION_FIELDS, MAX_SEED, OPENAI_FIELDS, HyperparameterError, Hyperparameters
from loraplex.training.report import build_report
from loraplex.training.jobs import JobNotFound, JobRecord, JobStore, new_job_id, request_cancel


def create(store: JobStore, files: FileStore, settings: Settings, principal: Principal, model_name: str,
           num_layers: int, body: FineTuningJobCreate) -> FineTuningJobPublic:
    if body.model != model_name:
        raise InvalidParameter(f"model must be the served base model {model_name!r}, got {body.model!r}", param="model")
    training = files.get(visible_tenant(principal), body.training_file, param="training_file")
    if training.purpose != FINE_TUNE:
        raise InvalidParameter(f"{training.id} has purpose {training.purpose!r}, not {FINE_TUNE!r}", param="training_file")
    if body.validation_file:
        files.get(training.tenant, body.validation_file, param="validation_file")  # same owner as the training file
    if body.suffix is not None and not is_id_part(body.suffix):
        raise InvalidParameter("suffix must match [a-z0-9][a-z0-9_.-]{0,39}: it names the adapter", param="suffix")
    requested = _requested_hyperparameters(body)
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
    _check_hyperparameters(requested, seed, training.num_examples, num_layers, settings)
    now = time.time_ns()
    job = JobRecord(
        id=new_job_id(), tenant=training.tenant, model=body.model, training_file=training.id,
        validation_file=body.validation_file, suffix=body.suffix, seed=seed, created_at=now // 10**9, order=now,
        hyperparameters=requested, force_promotion=body.force_promotion,
    )
    return to_public(store.create(job, settings.max_jobs_per_tenant))


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
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )


def _requested_hyperparameters(body: FineTuningJobCreate) -> dict[str, Any]:
    """`method.supervised.hyperparameters` wins over the legacy top-level `hyperparameters`."""
    given = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    chosen = given or body.hyperparameters or HyperparametersIn()
    return {name: value for name, value in chosen.model_dump().items() if value is not None}


def _check_hyperparameters(requested: dict[str, Any], seed: int, num_examples: int, num_layers: int,
                           settings: Settings) -> None:
    try:
        hp = Hyperparameters.from_request(requested, seed)
        resolved = hp.resolve(num_examples, settings.max_lora_rank, num_layers)
    except (HyperparameterError, TypeError) as exc:
        param = getattr(exc, "param", None) or "hyperparameters"
        raise InvalidParameter(str(exc), param=param, code="invalid_hyperparameters") from None
    unservable = sorted(set(resolved.target_modules) - set(settings.lora_target_module_list))
    if unservable:
        raise InvalidParameter(f"target_modules: this server cannot serve adapters on {unservable}",
                               param="target_modules", code="invalid_hyperparameters")
    if resolved.num_steps > settings.max_train_steps:
        raise InvalidParameter(f"n_epochs: the job would run {resolved.num_steps} steps, more than the limit of "
                               f"{settings.max_train_steps}", param="n_epochs", code="invalid_hyperparameters")
