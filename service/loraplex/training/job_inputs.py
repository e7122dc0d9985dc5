"""Everything a job trains and is judged on, gathered by the worker before training:

- the training examples and the validation examples (the validation file, or a seeded held-out share
  of the training file, split here so the contamination audit sees exactly what is scored);
- for a continued job (`parent_model`), the parent adapter's directory, the replay examples (the
  `replay_file`, else the parent job's training file while the tenant still owns it) and the parent's
  validation data (its validation file or its held-out share), for the forgetting measure;
- the incumbent: the version the job's adapter name serves now, the champion the new one must beat.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from loraplex.training.datasets import ParsedDataset
from loraplex.training.evaluation import split_held_out
from loraplex.training.errors import FileNotFound
from loraplex.training.files import FileStore
from loraplex.training.hyperparams import Hyperparameters
from loraplex.training.jobs import JobRecord, JobStore, parent_job


@dataclass(frozen=True)
class JobInputs:
    train: ParsedDataset
    validation: ParsedDataset | None
    validation_source: str  # "file" | "split" | "none"
    num_examples_in_file: int
    replay: ParsedDataset | None = None
    replay_source: str | None = None  # a file id
    parent_dir: Path | None = None
    parent_validation: ParsedDataset | None = None


def adapter_name(job: JobRecord) -> str:
    """The name the job publishes under: its suffix, else its parent's name (a continued adapter of the
    tenant's own gets a new version), else ft-<job id>."""
    if job.suffix:
        return job.suffix
    if job.parent_model and job.parent_model.startswith(f"{job.tenant}/"):
        return job.parent_model.split("/", 1)[1].split("@", 1)[0]
    return f"ft-{job.id[6:14]}"


def load_inputs(job: JobRecord, files: FileStore, store: JobStore, hp: Hyperparameters, parent_dir: Path | None,
                should_stop: Callable[[], bool] | None = None) -> JobInputs:
    """Every file the job reads, parsed again; PreparationStopped when `should_stop()` says so."""
    files = _Stoppable(files, should_stop)
    train = files.dataset(files.get(job.tenant, job.training_file, param="training_file"))
    num_in_file = len(train)
    train, validation, source = _with_validation(files, job.tenant, train, job.validation_file, hp)
    inputs = JobInputs(train, validation, source, num_in_file, parent_dir=parent_dir)
    if job.replay_file:
        replay = files.dataset(files.get(job.tenant, job.replay_file, param="replay_file"))
        inputs = replace(inputs, replay=replay, replay_source=job.replay_file)
    previous = parent_job(store, job.tenant, job.parent_model) if job.parent_model else None
    if previous is None:
        return inputs
    try:
        parent_train = files.dataset(files.get(job.tenant, previous.training_file, param="training_file"))
        parent_hp = Hyperparameters.from_request(previous.hyperparameters, previous.seed)
        parent_train, parent_valid, _ = _with_validation(files, job.tenant, parent_train, previous.validation_file, parent_hp)
    except FileNotFound:  # the tenant deleted the parent's files: no replay from them, no forgetting measure
        return inputs
    if inputs.replay is None and hp.replay_fraction != 0:
        inputs = replace(inputs, replay=parent_train, replay_source=previous.training_file)
    return replace(inputs, parent_validation=parent_valid)


class _Stoppable:
    """A FileStore whose parses ask `should_stop` (every file a job reads can be 32 MB)."""

    def __init__(self, files: FileStore, should_stop: Callable[[], bool] | None):
        self.files, self.should_stop = files, should_stop

    def get(self, *args, **kwargs):
        return self.files.get(*args, **kwargs)

    def dataset(self, record) -> ParsedDataset:
        return self.files.dataset(record, self.should_stop)


def _with_validation(files: FileStore | _Stoppable, tenant: str, train: ParsedDataset, validation_file: str | None,
                     hp: Hyperparameters) -> tuple[ParsedDataset, ParsedDataset | None, str]:
    if validation_file:
        return train, files.dataset(files.get(tenant, validation_file, param="validation_file")), "file"
    num_held_out = hp.num_held_out(len(train))
    if not num_held_out:
        return train, None, "none"
    return *split_held_out(train, num_held_out, hp.seed), "split"
