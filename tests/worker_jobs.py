"""Fine-tuning jobs run by a real `Worker` in the test process (local job store, file store and adapter
registry under one data dir), for tests that need many jobs' numbers, not the HTTP surface."""
from __future__ import annotations

from pathlib import Path

from loraplex.config import Settings
from loraplex.training.files import FileStore
from loraplex.training.jobs import JobRecord, new_job_id
from loraplex.training.local_jobs import LocalJobStore
from loraplex.training.worker import RegistryPublisher, Worker


class WorkerJobs:
    def __init__(self, model_dir: Path, data_dir: Path, tenant: str = "acme", max_lora_rank: int = 16):
        self.settings = Settings(model=str(model_dir), data_dir=data_dir, device="cpu", dtype="float32",
                                 max_lora_rank=max_lora_rank, log_format="text")
        self.tenant = tenant
        self.files = FileStore(data_dir, 1 << 24, 100_000)
        self.store = LocalJobStore(data_dir)
        self.publisher = RegistryPublisher(self.settings, Path(model_dir))
        self.worker = Worker(self.settings, self.store, self.files, Path(model_dir), self.publisher)
        self.registry = self.publisher.runtime.registry.store

    def upload(self, data: bytes, name: str = "train.jsonl") -> str:
        return self.files.create(self.tenant, name, "fine-tune", data).id

    def run(self, training_file: str, hyperparameters: dict, **fields) -> JobRecord:
        job = JobRecord(id=new_job_id(), tenant=self.tenant, model="m", created_at=0, order=0,
                        training_file=training_file, hyperparameters=hyperparameters, **fields)
        self.store.create(job, max_active_per_tenant=100)
        self.worker.run_job(self.store.claim(self.worker.worker_id))
        return self.store.get(job.id)

    def messages(self, job_id: str) -> list[str]:
        return [event["message"] for event in self.store.events(job_id)]

    def close(self) -> None:
        self.publisher.close()
        self.store.close()
