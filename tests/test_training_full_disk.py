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

import httpx
import pytest

from tests.server_process import REPO_ROOT, ServerProcess
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


@pytest.mark.slow
def test_through_the_server_a_volume_full_mid_training_keeps_events_and_report_answering(tmp_path, demo_model_dir):
    """Finding 14 end to end: a real server and its worker process, the data volume (a tmpfs) filled to the
    last byte while the job logs steps. The append that no longer fits fails part-way; events and report keep
    answering 200 while the volume is full and after, and every line of the events file stays whole."""
    from tests.test_faults import SERVER_SETTINGS, _worker_pids_of, auth, upload_file

    with mounted_tmpfs(tmp_path / "volume", "3m") as volume:
        server = ServerProcess(volume / "data", tmp_path / "server.log", model=str(demo_model_dir), served_model_name="demo",
                               start_local_worker="true", **{**SERVER_SETTINGS, "job_stale_after_s": 5})
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=30) as c:
                long_set = b"".join(b'{"prompt": "Q%d: what colour?", "completion": " zebra"}\n' % i for i in range(100))
                file_id = upload_file(c, "acme", long_set).json()["id"]
                job = c.post("/v1/fine_tuning/jobs", headers=auth("acme"), json={
                    "model": "demo", "training_file": file_id, "suffix": "torn",
                    "hyperparameters": {"n_epochs": 3, "batch_size": 1, "lora_r": 8}}).json()
                url = f"/v1/fine_tuning/jobs/{job['id']}"

                def steps() -> int:
                    events = c.get(f"{url}/events", headers=auth("acme"), params={"limit": 100})
                    assert events.status_code == 200, events.text
                    return sum(e["type"] == "metrics" for e in events.json()["data"])

                assert eventually(lambda: steps() >= 2, 120, 0.2), (tmp_path / "server.log").read_text()
                filler = fill(volume)  # to the last byte: the next append that needs a new page fails part-way
                for _ in range(10):  # the worker keeps trying to append meanwhile
                    time.sleep(0.5)
                    steps()
                    assert c.get(f"{url}/report", headers=auth("acme")).status_code == 200
                filler.unlink()
                done = eventually(lambda: c.get(url, headers=auth("acme")).json()["status"]
                                  in ("succeeded", "failed", "cancelled"), 90, 0.5)
                assert done, c.get(url, headers=auth("acme")).json()
                assert steps() >= 2 and c.get(f"{url}/report", headers=auth("acme")).status_code == 200
            events_file = volume / "data" / ".jobs" / "events" / f"{job['id']}.jsonl"
            lines = events_file.read_bytes().splitlines()
            assert lines and all(json.loads(line) for line in lines)  # no torn line left behind
            assert "events kept until the job store answers" in (tmp_path / "server.log").read_text()  # appends did fail
        finally:
            server.stop()
            for pid in _worker_pids_of(server.proc.pid):
                os.kill(pid, 9)
