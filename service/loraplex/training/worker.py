"""The fine-tuning worker: claims queued jobs from the `JobStore`, trains them, publishes the adapter.

`loraplex worker` runs `Worker.run` in the foreground until SIGTERM. One job at a time per process: a
job owns the device while it trains. For each job: `validating_files` (re-read the files) -> `running`
(`train_lora`, every logged step an event, a heartbeat thread, `should_stop` polling the cancel flag)
-> publish through the adapter registry as `<tenant>/<suffix | ft-<id>>` (a new version if the name
exists; made the latest version only if it beat the base model on validation data, see `promotion`)
-> `succeeded` with `fine_tuned_model = <tenant>/<name>@<n>` and the `evaluation` record. The server picks the adapter up on
the next request that names it: no restart. Between jobs the worker also reaps stale jobs.

On SIGTERM a running job is given back to the queue (not failed): the next worker starts it over.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

from loraplex.config import Settings
from loraplex.registry.auth import Principal, can_use
from loraplex.registry.local_store import AdapterNotFound
from loraplex.registry.service import CONFIG_FILE, WEIGHTS_FILE
from loraplex.registry.versioned_store import AdapterVersion
from loraplex.training.datasets import DatasetError, PreparationStopped
from loraplex.training.errors import FileNotFound
from loraplex.training.files import FileStore
from loraplex.training.hyperparams import HyperparameterError, Hyperparameters
from loraplex.training.jobs import (
    CANCELLED, CLAIMED, FAILED, RUNNING, SUCCEEDED, JobRecord, JobStore, make_event, reap_stale,
)
from loraplex.training.job_store import build_job_store
from loraplex.training.contamination import audit, describe
from loraplex.training.job_inputs import adapter_name, load_inputs
from loraplex.training.promotion import evaluate_result
from loraplex.training.store_retry import STORE_ERRORS, EventBuffer, retry_store
from loraplex.training.supervisor import PARENT_PID_ENV
from loraplex.training.trainer import Continuation, TrainingCancelled, inherit_shape, train_lora  # cancelled: user, reaper, shutdown

log = logging.getLogger(__name__)

POLL_S = 0.5  # idle wait between claims, and the longest a cancel flag goes unread
PROGRESS_EVERY_S = 1.0  # job record step/estimate updates (events go out for every logged step)


class Worker:
    def __init__(self, settings: Settings, store: JobStore, files: FileStore, model_dir: Path, publisher):
        self.settings, self.store, self.files, self.model_dir = settings, store, files, Path(model_dir)
        self.publisher = publisher  # (job, adapter_dir) -> versioned adapter id
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.shutdown = threading.Event()
        self._next_reap = 0.0

    def run(self) -> None:
        _stop_when_parent_dies(self.shutdown)
        log.info("worker %s waiting for fine-tuning jobs", self.worker_id)
        while not self.shutdown.is_set():
            self._reap_now_and_then()
            try:
                job = self.store.claim(self.worker_id)
            except STORE_ERRORS as exc:  # the store is down or full: this worker waits, it does not exit
                log.warning("cannot claim a job now: %s", exc)
                job = None
            if job is None:
                self.shutdown.wait(POLL_S)
                continue
            self.run_job(job)

    def run_job(self, job: JobRecord) -> None:
        log.info("job %s claimed (tenant %s)", job.id, job.tenant)
        work_dir = self.settings.data_dir / ".jobs" / "work" / job.id
        shutil.rmtree(work_dir, ignore_errors=True)  # a previous attempt's leftovers
        progress = _Progress(self.store, job.id, self.shutdown)
        heartbeat = _Heartbeat(self.store, job.id, self.settings.worker_heartbeat_s)
        try:
            self._train_and_publish(job, work_dir, progress)
        except TrainingCancelled:
            self._stopped(job, progress)
        except (DatasetError, FileNotFound) as exc:  # a DatasetError's `param` is the upload's `file`
            param = exc.param if isinstance(exc, FileNotFound) and exc.param else "training_file"
            self._fail(job, "invalid_training_file", str(exc), param)
        except HyperparameterError as exc:
            self._fail(job, "invalid_hyperparameters", str(exc), exc.param)
        except Exception as exc:  # a bug, a device failure, a full disk: the job fails, the worker goes on
            log.exception("job %s failed", job.id)
            self._fail(job, "training_error", f"{type(exc).__name__}: {exc}", None)
        finally:
            heartbeat.stop()
            shutil.rmtree(work_dir, ignore_errors=True)

    def _train_and_publish(self, job: JobRecord, work_dir: Path, progress: _Progress) -> None:
        progress.send(make_event(f"Validating training file: {job.training_file}"))
        hp = Hyperparameters.from_request(job.hyperparameters, job.seed, self.settings.max_train_steps)
        if hp.quantization == "auto":  # the base as the server loads it: on a quantized server, QLoRA
            hp = dataclasses.replace(hp, quantization=self.settings.quantization)
        parent = self._lookup(job.parent_model) if job.parent_model else None
        if job.parent_model and (parent is None or not can_use(Principal(tenant=job.tenant, is_admin=False), parent)):
            raise HyperparameterError("model", f"{job.parent_model} was deleted or unshared after the job was created")
        try:  # a 32 MB file takes seconds to parse: a cancel in `validating_files` is honoured meanwhile
            inputs = load_inputs(job, self.files, self.store, hp, parent.path if parent else None, progress.should_stop)
        except PreparationStopped:
            raise TrainingCancelled(0) from None
        incumbent = self._lookup(f"{job.tenant}/{adapter_name(job)}")
        resolved = hp.resolve(len(inputs.train), self.settings.max_lora_rank, _num_layers(self.model_dir),
                              has_replay=inputs.replay is not None)
        if parent is not None:
            resolved = inherit_shape(resolved, parent.path)  # what train_lora will run with
        if retry_store(lambda: self.store.update(job.id, expect=CLAIMED, status=RUNNING, num_steps=resolved.num_steps,
                                                 resolved_hyperparameters=resolved.to_dict()), "start the job") is None:
            raise TrainingCancelled(0)  # cancelled or reaped meanwhile
        progress.send(make_event("Fine-tuning job started."))
        progress.send(make_event(_validation_message(inputs)))
        try:  # thousands of examples take seconds: a cancel is honoured meanwhile, as while tokenizing
            contamination = audit(inputs.train, inputs.validation, inputs.replay, progress.should_stop)
        except PreparationStopped:
            raise TrainingCancelled(0) from None
        if contamination is not None:
            level = "warn" if contamination["warned"] else "info"
            progress.send(make_event(describe(contamination), level=level))  # numbers: evaluation
        continuation = Continuation(inputs.parent_dir, inputs.replay, inputs.parent_validation)
        result = train_lora(self.model_dir, inputs.train, hp, work_dir / "adapter", on_event=progress.on_event,
                            should_stop=progress.should_stop, validation=inputs.validation, device=self.settings.device,
                            max_lora_rank=self.settings.max_lora_rank, on_epoch=progress.on_epoch,
                            continuation=continuation, incumbent=incumbent.path if incumbent else None,
                            validation_source=inputs.validation_source, served_quantization=self.settings.quantization)
        if progress.should_stop(force=True):
            raise TrainingCancelled(result.num_steps)
        evaluation = evaluate_result(result, force=job.force_promotion,
                                     incumbent_id=incumbent.versioned_id if incumbent else None,
                                     parent_model=job.parent_model)
        evaluation.update(contamination=contamination, replay_file=inputs.replay_source)
        adapter_id = retry_store(lambda: self.publisher(job, result.out_dir, evaluation["promoted"]), "publish the adapter")
        progress.events.drain()  # every step event before the status says done
        retry_store(lambda: self.store.update(
            job.id, expect=CLAIMED, status=SUCCEEDED, fine_tuned_model=adapter_id, trained_tokens=result.train_tokens,
            finished_at=int(time.time()), step=result.num_steps, estimated_finish=None,
            checkpoints=[_checkpoint(job, adapter_id, result)], evaluation=evaluation), "record the job's success")
        self._report_end(job, result, evaluation, adapter_id, progress)
        progress.events.drain()

    def _report_end(self, job: JobRecord, result, evaluation: dict, adapter_id: str, progress: _Progress) -> None:
        if result.stopped_early:
            progress.send(make_event(
                f"Early stopping after epoch {len(result.epochs)}: no better validation loss since epoch "
                f"{result.best_epoch}; kept epoch {result.best_epoch} (step {result.best_step})."))
        if evaluation["parent_forgetting"] is not None:
            progress.send(make_event(
                f"Forgetting: the parent's validation loss went {evaluation['parent_valid_loss_before']:.4f} -> "
                f"{evaluation['parent_valid_loss_after']:.4f}; reference-text perplexity x{evaluation['forgetting_ratio']:.3f}."))
        if result.peak_memory_bytes is not None:
            what = "CUDA peak allocated" if result.peak_memory_kind == "cuda_peak_allocated" else "peak RSS"
            progress.send(make_event(
                f"Peak memory: {result.peak_memory_bytes / 2**20:.1f} MiB ({what}); base "
                f"{result.hyperparameters.quantization}, gradient checkpointing "
                f"{'on' if result.hyperparameters.gradient_checkpointing else 'off'}."))
        level = "info" if evaluation["promoted"] else "warn"
        progress.send(make_event(f"Evaluation: {evaluation['reason']}.", level=level))
        progress.send(make_event(f"New fine-tuned model created: {adapter_id}"))
        progress.send(make_event("The job has successfully completed."))
        log.info("job %s succeeded: %s", job.id, adapter_id)

    def _lookup(self, adapter_id: str):
        """The adapter version `adapter_id` names now, or None (a publisher without a registry has none)."""
        lookup = getattr(self.publisher, "lookup", None)
        return lookup(adapter_id) if lookup is not None else None

    def _stopped(self, job: JobRecord, progress: _Progress) -> None:
        if self.shutdown.is_set() and not progress.is_cancel_requested:
            self.store.requeue(job.id)
            self.store.add_event(job.id, make_event("The worker shut down; the job was queued again."))
            return
        if self.store.update(job.id, expect=CLAIMED, status=CANCELLED, finished_at=int(time.time()),
                             estimated_finish=None) is not None:
            self.store.add_event(job.id, make_event("Fine-tuning job cancelled."))

    def _fail(self, job: JobRecord, code: str, message: str, param: str | None) -> None:
        """Recorded with its true reason, waiting out a short store outage (never left to the reaper's
        `worker_lost` if the store comes back in time)."""
        error = {"code": code, "message": message, "param": param}
        try:
            if retry_store(lambda: self.store.update(job.id, expect=CLAIMED, status=FAILED, error=error,
                                                     finished_at=int(time.time()), estimated_finish=None),
                           f"record the failure of job {job.id}") is not None:
                retry_store(lambda: self.store.add_event(job.id, make_event(f"Fine-tuning job failed: {message}",
                                                                            level="error")), "add an event")
        except Exception:  # the store stays unwritable (a full disk): stop beating, the reaper fails it
            log.exception("job %s: cannot record its failure (%s)", job.id, message)

    def _reap_now_and_then(self) -> None:
        if time.monotonic() < self._next_reap:
            return
        self._next_reap = time.monotonic() + max(1.0, self.settings.job_stale_after_s / 4)
        try:
            for job in reap_stale(self.store, self.settings.job_stale_after_s):
                log.warning("job %s failed: its worker %s stopped sending heartbeats", job.id, job.worker_id)
        except Exception:
            log.exception("reaping stale jobs failed")


class _Progress:
    """`on_event` and `should_stop` for `train_lora`: events out (kept in order while the store is
    unreachable, sent when it answers), the cancel flag in (read every POLL_S)."""

    def __init__(self, store: JobStore, job_id: str, shutdown: threading.Event):
        self.store, self.job_id, self.shutdown = store, job_id, shutdown
        self.events = EventBuffer(store, job_id)
        self.is_cancel_requested = False
        self._num_steps = 0
        self._next_check = 0.0
        self._next_progress = 0.0

    def should_stop(self, force: bool = False) -> bool:
        if self.shutdown.is_set() or self.is_cancel_requested:
            return True
        if force or time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + POLL_S
            try:
                job = self.store.get(self.job_id)
            except Exception as exc:  # the store is down: keep training, ask again next poll
                log.warning("cannot read job %s: %s", self.job_id, exc)
                return False
            self.is_cancel_requested = job.cancel_requested or job.status not in CLAIMED  # reaped: stop too
        return self.is_cancel_requested

    def on_epoch(self, score) -> None:
        data = {"step": score.step, "total_steps": self._num_steps, "epoch": score.epoch,
                "progress": round(score.step / max(1, self._num_steps), 4),
                "train_loss": round(score.train_loss, 6), "valid_loss": round(score.valid_loss, 6),
                "valid_mean_token_accuracy": round(score.valid_token_accuracy, 6)}
        message = (f"Epoch {score.epoch}: validation loss={score.valid_loss:.4f}, "
                   f"token accuracy={score.valid_token_accuracy:.3f}")
        if score.valid_reward_margin is not None:  # DPO: the accuracy is the share of pairs ranked right
            data.update(valid_preference_accuracy=round(score.valid_token_accuracy, 6),
                        valid_reward_margin=round(score.valid_reward_margin, 6))
            message = (f"Epoch {score.epoch}: validation DPO loss={score.valid_loss:.4f}, preference accuracy="
                       f"{score.valid_token_accuracy:.3f}, reward margin={score.valid_reward_margin:.3f}")
        self.send(make_event(message, data=data))

    def send(self, event: dict) -> None:
        self.events.add(event)

    def on_event(self, event) -> None:
        self._num_steps = event.num_steps_total
        progress = event.step / max(1, event.num_steps_total)
        data = {"step": event.step, "total_steps": event.num_steps_total, "epoch": event.epoch,
                "train_loss": round(event.loss, 6), "learning_rate": event.learning_rate,
                "progress": round(progress, 4), "elapsed_s": round(event.elapsed_s, 3)}
        message = f"Step {event.step}/{event.num_steps_total}: training loss={event.loss:.4f}"
        self.send(make_event(message, data=data))
        if time.monotonic() >= self._next_progress or event.step == event.num_steps_total:
            self._next_progress = time.monotonic() + PROGRESS_EVERY_S
            remaining_s = event.elapsed_s / max(1, event.step) * (event.num_steps_total - event.step)
            try:
                self.store.update(self.job_id, expect=(RUNNING,), step=event.step,
                                  estimated_finish=int(time.time() + remaining_s))
            except STORE_ERRORS as exc:  # only an estimate: the next one goes out a second later
                log.warning("cannot update the progress of job %s: %s", self.job_id, exc)


class _Heartbeat:
    """A daemon thread stamping the job every `interval_s` while it is claimed (training holds the GIL
    only in short stretches between torch ops, so the stamp keeps coming during a step)."""

    def __init__(self, store: JobStore, job_id: str, interval_s: float):
        self.store, self.job_id, self.interval_s = store, job_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.store.heartbeat(self.job_id)
            except Exception as exc:  # the store is down: the next beat may get through
                log.warning("heartbeat of %s failed: %s", self.job_id, exc)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class RegistryPublisher:
    """Publishes a trained adapter as a new version of `<tenant>/<name>` through the adapter registry."""

    def __init__(self, settings: Settings, model_dir: Path):
        from loraplex.registry.factory import build_registry
        from loraplex.registry.validation import model_dims_from_hf_config, module_shapes_from_hf_config

        allowed = set(settings.lora_target_module_list)
        hf_config = json.loads((Path(model_dir) / "config.json").read_text())
        shapes = module_shapes_from_hf_config(hf_config)
        dims = model_dims_from_hf_config(hf_config)
        self.runtime = build_registry(settings, {k: v for k, v in shapes.items() if k[1] in allowed}, dims)

    def lookup(self, adapter_id: str) -> AdapterVersion | None:
        """The version `adapter_id` (`t/n`: the latest) names now, None if there is none."""
        try:
            return self.runtime.registry.store.get_by_id(adapter_id)
        except AdapterNotFound:
            return None

    def __call__(self, job: JobRecord, adapter_dir: Path, promote: bool = True) -> str:
        name = adapter_name(job)
        files = {name_: (adapter_dir / name_).read_bytes() for name_ in (CONFIG_FILE, WEIGHTS_FILE)}
        admin = Principal(tenant=None, is_admin=True)
        record = self.runtime.registry.upload(admin, name, files, tenant=job.tenant, promote=promote)
        return record.versioned_id

    def close(self) -> None:
        self.runtime.close()


def _checkpoint(job: JobRecord, adapter_id: str, result) -> dict:
    """The published adapter as an OpenAI checkpoint: the kept (best) epoch's step and validation metrics."""
    metrics = {"step": result.best_step or result.num_steps, "train_loss": result.final_loss,
               "valid_loss": result.valid_loss, "valid_mean_token_accuracy": result.valid_token_accuracy,
               "full_valid_loss": result.valid_loss, "full_valid_mean_token_accuracy": result.valid_token_accuracy}
    return {"id": f"ftckpt-{job.id[6:]}", "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
            "fine_tuned_model_checkpoint": adapter_id, "fine_tuning_job_id": job.id,
            "step_number": result.best_step or result.num_steps, "metrics": metrics}




def _stop_when_parent_dies(shutdown: threading.Event) -> None:
    """An embedded worker ends with its server, even one killed with SIGKILL: its running job goes back
    to the queue (as on SIGTERM) and a restarted server starts a fresh worker, not a second one."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return

    def watch() -> None:
        while not shutdown.wait(POLL_S):
            if os.getppid() != int(parent):
                log.warning("the server (pid %s) is gone; this worker stops", parent)
                shutdown.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _validation_message(inputs) -> str:
    if inputs.validation_source == "file":
        return f"Validation: {len(inputs.validation)} examples from the validation file, scored after every epoch."
    if inputs.validation_source == "split":
        return (f"Validation: {len(inputs.validation)} of the {inputs.num_examples_in_file} training examples held out "
                f"(no validation file), scored after every epoch.")
    return "Validation: none (no validation file and too few examples to hold some out); no early stopping, no comparison."


def _set_train_threads(train_threads: int) -> None:
    import torch

    threads = train_threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    log.info("training with %d CPU threads", threads)


def _num_layers(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def run_worker(settings: Settings) -> int:
    """`loraplex worker`: the loop in the foreground until SIGTERM/SIGINT."""
    from loraplex.api.log_config import configure_logging
    from loraplex.engine_factory import resolve_model_path

    configure_logging(settings.log_level, settings.log_format)
    _set_train_threads(settings.train_threads)
    model_dir = Path(resolve_model_path(settings))
    store = build_job_store(settings)
    publisher = RegistryPublisher(settings, model_dir)
    files = FileStore(settings.data_dir, settings.max_file_bytes, settings.max_file_lines)
    worker = Worker(settings, store, files, model_dir, publisher)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.shutdown.set())
    try:
        worker.run()
    finally:
        publisher.close()
        store.close()
    log.info("worker %s stopped", worker.worker_id)
    return 0
