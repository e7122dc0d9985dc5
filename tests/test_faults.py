"""Faults against real processes and real filesystems: Redis killed under load and restarted, the server
SIGKILLed and restarted on its data dir, a full volume and a read-only one.

Already proven elsewhere, not repeated here: a killed/frozen Redis at the index level
(test_registry_redis.py), the in-process Redis outage (test_replicas.py), a worker SIGKILLed mid-job
failing its job as `worker_lost` (test_fine_tuning_api.py), jobs and files surviving a clean restart
(test_fine_tuning_api.py).

Error statuses chosen here: a full volume is 507 `insufficient_storage` (the request is fine and a retry
will not help until space is freed), a volume that cannot be written is 503 `storage_unavailable`.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisServer, answers_ping, require_redis_server
from tests.server_process import ServerProcess

KEYS = {"acme": "key-acme", "globex": "key-globex", "admin": "key-admin"}
SERVER_SETTINGS = dict(api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"],
                       max_lora_rank=8, max_model_len=256, max_num_seqs=8, log_level="warning",
                       worker_heartbeat_s=0.5, job_stale_after_s=10)
TRAIN = b"".join(b'{"prompt": "Q%d: what colour?", "completion": " zebra"}\n' % i for i in range(16))
GREEDY = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
ENVELOPE = {"message", "type", "param", "code"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def envelope(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == ENVELOPE and error["message"], response.text
    return error


def eventually(check, timeout_s: float = 10.0, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def adapter_bytes(demo_model_dir, tmp_path_factory):
    """adapter_bytes(seed) -> the multipart parts of a small adapter upload."""
    from loraplex.models.demo import make_demo_adapter

    root = tmp_path_factory.mktemp("fault-adapters")

    def parts(seed: int) -> list:
        out = root / f"a{seed}"
        if not out.exists():
            make_demo_adapter(demo_model_dir, out, r=4, seed=seed)
        return [("files", (name, (out / name).read_bytes())) for name in ("adapter_config.json", "adapter_model.safetensors")]

    return parts


def upload_adapter(client: httpx.Client, who: str, name: str, parts: list) -> httpx.Response:
    return client.post("/v1/adapters", headers=auth(who), data={"name": name}, files=parts)


def upload_file(client: httpx.Client, who: str, data: bytes = TRAIN) -> httpx.Response:
    return client.post("/v1/files", headers=auth(who), data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", data)})


def create_job(client: httpx.Client, who: str, file_id: str) -> httpx.Response:
    return client.post("/v1/fine_tuning/jobs", headers=auth(who), json={
        "model": "demo", "training_file": file_id, "suffix": f"ft{uuid.uuid4().hex[:6]}",
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "lora_r": 4}})


def complete(client: httpx.Client, who: str, model: str) -> httpx.Response:
    return client.post("/v1/completions", headers=auth(who), json={"model": model, "prompt": "Once", **GREEDY})


def data_files(data_dir: Path) -> set[str]:
    """Every file under the data dir but the lock files (what a refused write must leave unchanged)."""
    return {str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
            if p.is_file() and ".locks" not in p.parts and p.name != "filler.bin"}


# --- Redis killed and restarted under load ---------------------------------------------------------------
class PersistentRedis(RedisServer):
    """What docker-compose and k8s run: an append-only file, so a restarted Redis has its data back."""

    def start(self) -> None:
        assert self._process is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                   "--appendfsync", "always", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not answers_ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {self.log_tail()}")
            time.sleep(0.02)


@pytest.fixture
def persistent_redis(tmp_path):
    server = PersistentRedis(require_redis_server(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


class LoadThread:
    """Completions on `models` in a loop, each result kept as (seconds since start, model, status, latency)."""

    def __init__(self, url: str, models: list[str]):
        self.url, self.models = url, models
        self.results: list[tuple[float, str, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> LoadThread:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                model = self.models[i % len(self.models)]
                began = time.monotonic()
                try:
                    status = complete(client, "acme", model).status_code
                except httpx.HTTPError:
                    status = 0
                self.results.append((began - self.started, model, status, time.monotonic() - began))
                i += 1


RUNTIME_FIELDS = ("residency", "pinned", "merge_mode")  # where an adapter sits now, not what is stored


def _listings(client: httpx.Client) -> dict:
    """What each caller lists (adapters without their runtime residency)."""
    def items(who: str, path: str) -> list[dict]:
        data, after = [], None
        while True:  # every page
            page = client.get(path, headers=auth(who), params={"limit": 100, **({"after": after} if after else {})}).json()
            data += page["data"]
            if not page["has_more"]:
                return [{k: v for k, v in item.items() if k not in RUNTIME_FIELDS} for item in data]
            after = data[-1]["id"]

    return {who: {path: items(who, path) for path in ("/v1/adapters", "/v1/files", "/v1/fine_tuning/jobs")}
            for who in ("acme", "globex", "admin")}


@pytest.mark.redis
def test_redis_killed_under_load_serves_known_adapters_503s_the_registry_and_recovers(
        persistent_redis, tmp_path, adapter_bytes):
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir, tmp_path / "server.log", redis_url=persistent_redis.url, start_local_worker="false",
                           **SERVER_SETTINGS)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert upload_adapter(c, "acme", "steady", adapter_bytes(1)).status_code == 201
            assert upload_adapter(c, "globex", "other", adapter_bytes(2)).status_code == 201
            assert c.post("/v1/adapters/acme/steady/load", headers=auth("admin")).status_code == 200
            job = create_job(c, "acme", upload_file(c, "acme").json()["id"])
            assert job.status_code == 200, job.text
            before = _listings(c)
            expected_text = complete(c, "acme", "acme/steady").json()["choices"][0]["text"]

            with LoadThread(server.url, ["acme/steady", "demo"]) as load:
                time.sleep(1.0)
                persistent_redis.stop()  # SIGKILL
                down_at = time.monotonic() - load.started
                assert complete(c, "acme", "acme/steady").json()["choices"][0]["text"] == expected_text
                for path, code in (("/v1/adapters", "registry_unavailable"), ("/v1/adapters/acme/steady", "registry_unavailable"),
                                   ("/v1/fine_tuning/jobs", "job_store_unavailable")):
                    refused = c.get(path, headers=auth("acme"))
                    assert refused.status_code == 503 and envelope(refused)["code"] == code, (path, refused.text)
                on_disk = data_files(data_dir)
                refused = upload_adapter(c, "acme", "steady", adapter_bytes(3))
                assert refused.status_code == 503 and envelope(refused)["code"] == "registry_unavailable"
                assert data_files(data_dir) == on_disk  # the refused upload left nothing behind
                assert complete(c, "acme", "acme/never-seen").status_code == 503
                # another tenant's adapter that this replica knows reads exactly like an unknown one
                foreign, missing = complete(c, "globex", "acme/steady"), complete(c, "globex", "acme/stealth")
                assert foreign.status_code == missing.status_code == 503
                assert foreign.content.replace(b"steady", b"X") == missing.content.replace(b"stealth", b"X")
                assert c.get("/v1/files", headers=auth("acme")).status_code == 200  # files live on the volume
                assert c.get("/healthz").status_code == 200
                time.sleep(2.0)  # longer than the 2 s resolution cache: the load now reads the index each time
                persistent_redis.start()  # same port, its append-only file
                up_at = time.monotonic() - load.started
                assert eventually(lambda: c.get("/v1/adapters", headers=auth("acme")).status_code == 200, 15)
                recovered_at = time.monotonic() - load.started
                time.sleep(0.5)

            assert server.proc.poll() is None  # no restart
            assert _listings(c) == before  # nothing lost
            assert upload_adapter(c, "acme", "steady", adapter_bytes(3)).json()["version"] == 2
            assert eventually(lambda: complete(c, "acme", "acme/steady").json()["choices"][0]["text"] != expected_text, 5)
    finally:
        server.stop()
    outage = [r for r in load.results if down_at <= r[0] <= up_at]
    assert len(outage) >= 10 and all(r[2] == 200 for r in load.results), [r for r in load.results if r[2] != 200][:5]
    print(f"\nRedis outage {up_at - down_at:.1f} s: {len(outage)} completions during it, all 200, slowest "
          f"{max(r[3] for r in outage) * 1000:.0f} ms; registry back {recovered_at - up_at:.2f} s after Redis")


# --- SIGKILL and restart on the same data dir --------------------------------------------------------------
class Writer(threading.Thread):
    """Uploads adapters (or files) until the server dies; remembers which ones were acknowledged."""

    def __init__(self, url: str, kind: str, parts: list):
        super().__init__(daemon=True)
        self.url, self.kind, self.parts = url, kind, parts
        self.acknowledged: list[str] = []
        self.num_sent = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while True:
                try:
                    self.num_sent += 1
                    if self.kind == "adapter":
                        name = f"inflight-{self.num_sent}"
                        if upload_adapter(client, "acme", name, self.parts).status_code == 201:
                            self.acknowledged.append(f"acme/{name}")
                    else:
                        made = upload_file(client, "globex")
                        if made.status_code == 200:
                            self.acknowledged.append(made.json()["id"])
                except httpx.HTTPError:
                    return  # the server is gone


def _worker_pids_of(server_pid: int) -> list[int]:
    """`loraplex worker` processes started by the server (children, or orphans once it died)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if b"worker" in cmdline and b"loraplex" in cmdline and ppid in (server_pid, 1):
                pids.append(int(entry.name))
    return pids


def test_an_embedded_worker_ends_with_its_sigkilled_server_and_gives_its_job_back(tmp_path):
    """Without this, every crash and restart of a server left one more `loraplex worker` holding torch."""
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir, tmp_path / "server.log", start_local_worker="true", **SERVER_SETTINGS)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            file_id = upload_file(c, "acme", TRAIN * 8).json()["id"]
            job_id = c.post("/v1/fine_tuning/jobs", headers=auth("acme"), json={
                "model": "demo", "training_file": file_id, "hyperparameters": {"n_epochs": 50, "batch_size": 1}}).json()["id"]
            running = eventually(lambda: c.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth("acme")).json()["status"] == "running",
                                 timeout_s=60, interval_s=0.2)
            assert running
        workers = _worker_pids_of(server.proc.pid)
        assert len(workers) == 1
        server.proc.kill()
        server.proc.wait()
        assert eventually(lambda: not Path(f"/proc/{workers[0]}").exists()
                          or "State:\tZ" in Path(f"/proc/{workers[0]}/status").read_text(), timeout_s=15, interval_s=0.2)
    finally:
        server.stop()
        for pid in _worker_pids_of(server.proc.pid):
            os.kill(pid, 9)
    from loraplex.training.local_jobs import LocalJobStore

    store = LocalJobStore(data_dir)
    assert store.get(job_id).status == "queued"  # given back, as on SIGTERM: the next worker runs it
    assert "queued again" in store.events(job_id)[-1]["message"]


@pytest.mark.parametrize("with_worker", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["queued-job-stays-queued", "queued-job-runs"])
def test_sigkill_and_restart_lose_nothing_and_queued_jobs_still_run(tmp_path, adapter_bytes, with_worker):
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir, tmp_path / "first.log", start_local_worker="false", **SERVER_SETTINGS)
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=30) as c:
            for who, name, seed in (("acme", "alpha", 1), ("acme", "alpha", 2), ("acme", "beta", 3), ("acme", "gone", 4),
                                    ("globex", "gamma", 5)):
                assert upload_adapter(c, who, name, adapter_bytes(seed)).status_code == 201
            assert c.delete("/v1/adapters/acme/gone", headers=auth("acme")).status_code == 200
            acme_file, gone_file = upload_file(c, "acme").json()["id"], upload_file(c, "acme").json()["id"]
            assert c.delete(f"/v1/files/{gone_file}", headers=auth("acme")).status_code == 200
            queued = create_job(c, "acme", acme_file).json()["id"]
            cancelled = create_job(c, "acme", acme_file).json()["id"]
            assert c.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel", headers=auth("acme")).json()["status"] == "cancelled"
            texts = {m: complete(c, "acme", m).json()["choices"][0]["text"] for m in ("acme/alpha@1", "acme/alpha", "acme/beta")}
            before = _listings(c)
            contents = {acme_file: c.get(f"/v1/files/{acme_file}/content", headers=auth("acme")).content}

            writers = [Writer(first.url, "adapter", adapter_bytes(6)), Writer(first.url, "file", [])]
            for writer in writers:
                writer.start()
            time.sleep(1.5)  # uploads in flight
            first.proc.kill()  # SIGKILL: no drain, no cleanup
            first.proc.wait()
            for writer in writers:
                writer.join(timeout=30)
        assert all(writer.acknowledged for writer in writers)
    finally:
        first.stop()

    second = ServerProcess(data_dir, tmp_path / "second.log", start_local_worker=str(with_worker).lower(), **SERVER_SETTINGS)
    try:
        second.wait_ready()
        with httpx.Client(base_url=second.url, timeout=30) as c:
            after = _listings(c)
            adapters_writer, files_writer = writers
            # everything from before the kill is there, unchanged; acknowledged in-flight writes too
            for who in ("acme", "globex", "admin"):
                for path, items in before[who].items():
                    if path == "/v1/fine_tuning/jobs":
                        continue  # compared below: the restarted server's worker runs the queued job
                    new = [item for item in after[who][path] if item not in items]
                    lost = [item for item in items if item not in after[who][path]]
                    assert not lost, (who, path, lost, after[who][path])
                    new_ids = {item["id"] for item in new if not item["id"].startswith("file-")}  # files: checked whole below
                    assert new_ids <= {f"acme/inflight-{i}" for i in range(1, adapters_writer.num_sent + 1)}, new_ids
            assert {f"acme/{n}" for n in ("alpha", "beta")} | set(adapters_writer.acknowledged) <= \
                {a["id"] for a in after["acme"]["/v1/adapters"]}
            assert set(files_writer.acknowledged) <= {f["id"] for f in after["globex"]["/v1/files"]}
            assert {m: complete(c, "acme", m).json()["choices"][0]["text"] for m in texts} == texts
            assert c.get(f"/v1/files/{acme_file}/content", headers=auth("acme")).content == contents[acme_file]
            # whatever the kill interrupted is whole or absent: every listed adapter serves, every file reads
            for adapter in after["acme"]["/v1/adapters"]:
                assert complete(c, "acme", adapter["id"]).status_code == 200, adapter["id"]
            for record in after["globex"]["/v1/files"]:
                assert c.get(f"/v1/files/{record['id']}/content", headers=auth("globex")).content == TRAIN
            assert c.get(f"/v1/fine_tuning/jobs/{cancelled}", headers=auth("acme")).json()["status"] == "cancelled"
            print(f"\nSIGKILL during {adapters_writer.num_sent} adapter and {files_writer.num_sent} file uploads: "
                  f"{len(adapters_writer.acknowledged)} + {len(files_writer.acknowledged)} acknowledged, all there "
                  "after the restart, every listed adapter serves and every listed file reads whole")
            if not with_worker:  # no worker anywhere: the job is still queued, exactly as it was
                assert after["acme"]["/v1/fine_tuning/jobs"] == before["acme"]["/v1/fine_tuning/jobs"]
                return

            def finished():
                job = c.get(f"/v1/fine_tuning/jobs/{queued}", headers=auth("acme")).json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = eventually(finished, timeout_s=120, interval_s=0.5)
            assert job and job["status"] == "succeeded", job
            assert complete(c, "acme", job["fine_tuned_model"]).status_code == 200
    finally:
        second.stop()
        for pid in _worker_pids_of(second.proc.pid):
            os.kill(pid, 9)


def test_what_a_kill_left_in_staging_and_trash_is_swept_at_the_next_start(tmp_path):
    """A put killed mid-way leaves a staging dir, a delete killed before its rmtree a trash dir: invisible
    to every reader, but disk space lost for good. The next start removes them (fresh staging dirs stay:
    on a shared volume another replica may be writing one)."""
    from loraplex.registry.versioned_store import STAGING_LEFTOVER_AGE_S, VersionedAdapterStore

    VersionedAdapterStore(tmp_path)
    old_put, fresh_put = tmp_path / ".staging" / "put-old", tmp_path / ".staging" / "put-fresh"
    killed_delete = tmp_path / ".trash" / "acme.gone.0123"
    for directory in (old_put, fresh_put, killed_delete):
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    long_ago = time.time() - STAGING_LEFTOVER_AGE_S - 60
    os.utime(old_put, (long_ago, long_ago))
    VersionedAdapterStore(tmp_path)  # a restart
    assert not old_put.exists() and not killed_delete.exists() and fresh_put.exists()


# --- a full volume, a read-only volume ----------------------------------------------------------------------
@contextmanager
def mounted_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'mount failed'}): "
                    "run as root (or with CAP_SYS_ADMIN) for the full-volume and read-only-volume tests")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(volume: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file until the volume is full (minus about `leave_bytes`)."""
    filler = volume / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    if leave_bytes:
        os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler


@pytest.fixture
def volume_app(tmp_path, demo_model_dir):
    """In-process app whose data dir is a 2 MB tmpfs (the model stays outside it; jobs on a 1 MB one inside)."""
    from fastapi.testclient import TestClient

    from loraplex.api.app import create_app
    from loraplex.config import Settings
    from loraplex.engine_factory import build_engine

    with mounted_tmpfs(tmp_path / "volume", "2m") as volume, mounted_tmpfs(volume / "data" / ".jobs", "1m"):
        # The job store holds a lock file open for writing, and Linux refuses to remount a filesystem read-only
        # while any file on it is open for writing: jobs get a volume of their own.
        settings = Settings(model=str(demo_model_dir), served_model_name="demo", data_dir=volume / "data", device="cpu",
                            dtype="float32", max_loras=2, start_local_worker=False, **SERVER_SETTINGS)
        engine = build_engine(settings)
        engine.start()
        try:
            with TestClient(create_app(settings, engine)) as client:
                yield client, volume
        finally:
            engine.shutdown()


def test_a_full_volume_is_507_leaves_nothing_half_written_and_recovers(volume_app, adapter_bytes):
    c, volume = volume_app
    data_dir = volume / "data"
    assert upload_adapter(c, "acme", "kept", adapter_bytes(1)).status_code == 201
    file_id = upload_file(c, "acme").json()["id"]
    on_disk = data_files(data_dir)
    weights_size = len(adapter_bytes(2)[1][1][1])

    for leave_bytes in (0, weights_size // 2):  # full, then room for the config but not all of the weights
        filler, jobs_filler = fill(volume, leave_bytes), fill(data_dir / ".jobs", leave_bytes)
        refused = upload_adapter(c, "acme", "new", adapter_bytes(2))
        assert refused.status_code == 507, refused.text
        assert envelope(refused)["code"] == "insufficient_storage" and "full" in envelope(refused)["message"]
        assert data_files(data_dir) == on_disk and not list((data_dir / ".staging").iterdir())
        if not leave_bytes:  # a training file and a job record are small enough for the partly full volume
            refused = upload_file(c, "acme")
            assert refused.status_code == 507 and envelope(refused)["code"] == "insufficient_storage", refused.text
            refused = create_job(c, "acme", file_id)
            assert refused.status_code == 507 and envelope(refused)["code"] == "insufficient_storage", refused.text
        # the server stays healthy: reads and generation work
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert complete(c, "acme", "acme/kept").status_code == 200
        assert c.get("/v1/adapters", headers=auth("acme")).status_code == 200
        filler.unlink()
        jobs_filler.unlink()
        leftovers = data_files(data_dir) - on_disk
        assert not {p for p in leftovers if "/.files/" in f"/{p}" or p.startswith("acme/")}, leftovers

    assert upload_adapter(c, "acme", "new", adapter_bytes(2)).status_code == 201  # space back: no restart needed
    assert upload_file(c, "acme").status_code == 200


def test_a_read_only_volume_is_503_and_reads_keep_working(volume_app, adapter_bytes):
    c, volume = volume_app
    assert upload_adapter(c, "acme", "kept", adapter_bytes(1)).status_code == 201
    file_id = upload_file(c, "acme").json()["id"]
    remount(volume, "ro")
    try:
        for refused in (upload_adapter(c, "acme", "new", adapter_bytes(2)), upload_file(c, "acme"),
                        c.delete("/v1/adapters/acme/kept", headers=auth("acme")),
                        c.delete(f"/v1/files/{file_id}", headers=auth("acme"))):
            assert refused.status_code == 503, refused.text
            assert envelope(refused)["code"] == "storage_unavailable", refused.text
        assert complete(c, "acme", "acme/kept").status_code == 200
        assert c.get("/v1/adapters/acme/kept", headers=auth("acme")).status_code == 200
        assert c.get(f"/v1/files/{file_id}/content", headers=auth("acme")).content == TRAIN
    finally:
        remount(volume, "rw")
    assert upload_adapter(c, "acme", "new", adapter_bytes(2)).status_code == 201
    assert c.delete("/v1/adapters/acme/kept", headers=auth("acme")).status_code == 200


@pytest.mark.slow
def test_a_volume_that_fills_up_while_training_fails_the_job_cleanly(tmp_path, demo_model_dir):
    """The worker cannot write (checkpoints, the adapter, even the job record): while the volume is full no
    state can change, and once space is back the job ends failed (never stuck), nothing is published."""
    with mounted_tmpfs(tmp_path / "volume", "3m") as volume:
        server = ServerProcess(volume / "data", tmp_path / "server.log", model=str(demo_model_dir), served_model_name="demo",
                               start_local_worker="true", **{**SERVER_SETTINGS, "job_stale_after_s": 5})
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=30) as c:
                long_set = b"".join(b'{"prompt": "Q%d: what colour?", "completion": " zebra"}\n' % i for i in range(100))
                file_id = upload_file(c, "acme", long_set).json()["id"]
                job = c.post("/v1/fine_tuning/jobs", headers=auth("acme"), json={
                    "model": "demo", "training_file": file_id, "suffix": "full",
                    "hyperparameters": {"n_epochs": 3, "batch_size": 1, "lora_r": 8}}).json()

                def status():
                    return c.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth("acme")).json()

                assert eventually(lambda: status()["status"] == "running", 90, 0.2), status()
                filler = fill(volume)
                time.sleep(5)  # the worker hits the full volume
                assert status()["status"] == "running"  # nothing can be written meanwhile, not even "failed"
                filler.unlink()
                done = eventually(lambda: status() if status()["status"] in ("succeeded", "failed", "cancelled") else None,
                                  60, 0.5)
                assert done and done["status"] == "failed", done
                assert done["error"]["message"], done
                assert c.get("/v1/adapters/acme/full", headers=auth("acme")).status_code == 404
                assert c.get("/healthz").status_code == 200
                print("\njob on a full volume:", json.dumps(done["error"]))
        finally:
            server.stop()
            for pid in _worker_pids_of(server.proc.pid):
                os.kill(pid, 9)
