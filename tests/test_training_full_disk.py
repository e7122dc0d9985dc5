"""The local job store on a really full volume (a tmpfs filled to the last byte; needs root, else skipped),
issue 20 findings 13 and 14: a claim that cannot write leaves the job queued and claimable (a real
`loraplex worker` waits it out and then runs the job), and an event that cannot be written leaves no half
line behind; a torn line already there is skipped, so events and the report keep answering."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.server_process import REPO_ROOT
from tests.test_faults import TRAIN, eventually, fill, mounted_tmpfs


def _job(file_id: str = "file-" + "0" * 24):
    from loraplex.training.jobs import JobRecord, new_job_id

    now = time.time_ns()
    return JobRecord(id=new_job_id(), tenant="acme", model="demo", training_file=file_id, created_at=now // 10**9,
                     order=now, hyperparameters={"n_epochs": 1, "batch_size": 4, "lora_r": 4})


def test_a_full_disk_at_claim_leaves_the_job_queued_and_a_worker_runs_it_later(tmp_path, demo_model_dir):
    from loraplex.registry.versioned_store import VersionedAdapterStore
    from loraplex.training.files import FileStore
    from loraplex.training.local_jobs import LocalJobStore

    with mounted_tmpfs(tmp_path / "volume", "2m") as volume:
        data_dir = volume / "data"
        VersionedAdapterStore(data_dir)  # the dirs a worker's registry would create
        store = LocalJobStore(data_dir)
        record = FileStore(data_dir, 1 << 20, 1000).create("acme", "t.jsonl", "fine-tune", TRAIN)
        job = store.create(_job(record.id), max_active_per_tenant=2)
        filler = fill(volume)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "service"), "LORAPLEX_DATA_DIR": str(data_dir),
               "LORAPLEX_MODEL": str(demo_model_dir), "LORAPLEX_LOG_FORMAT": "text", "LORAPLEX_TRAIN_THREADS": "1"}
        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "loraplex", "worker"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        try:
            assert eventually(lambda: "cannot claim a job now" in log_path.read_text(), 120, 0.2), log_path.read_text()
            assert worker.poll() is None  # the worker waits; it does not exit
            assert store.get(job.id).status == "queued" and list((data_dir / ".jobs" / "queue").iterdir())
            filler.unlink()
            assert eventually(lambda: store.get(job.id).status != "queued", 30, 0.2), log_path.read_text()
            assert store.get(job.id).worker_id.endswith(f":{worker.pid}")
        finally:
            worker.kill()
            worker.wait()
            store.close()


def test_a_full_disk_mid_event_leaves_no_torn_line_and_a_torn_line_is_skipped(tmp_path):
    from loraplex.training.jobs import make_event
    from loraplex.training.local_jobs import LocalJobStore
    from loraplex.training.report import build_report

    with mounted_tmpfs(tmp_path / "volume", "1m") as volume:
        store = LocalJobStore(volume)
        job = store.create(_job(), max_active_per_tenant=2)
        store.add_event(job.id, make_event("Step 1/2: training loss=1.0", data={"step": 1, "train_loss": 1.0}))
        events_file = volume / ".jobs" / "events" / f"{job.id}.jsonl"
        before = events_file.read_bytes()
        filler = fill(volume, leave_bytes=4096)  # a page: room for part of the next event only
        with pytest.raises(OSError):
            store.add_event(job.id, make_event("x" * 20_000))
        assert events_file.read_bytes() == before  # cut back: no half line
        filler.unlink()
        with open(events_file, "ab") as out:  # what a crash mid-append by an older version left
            out.write(b'{"id": "ftevent-torn", "message": "Step 2/2: trai')
        store.add_event(job.id, make_event("The job has successfully completed."))
        events = store.events(job.id)
        assert [e["message"] for e in events] == ["Step 1/2: training loss=1.0", "The job has successfully completed."]
        report = build_report(store.get(job.id), events)
        assert json.dumps(report)
        store.close()
