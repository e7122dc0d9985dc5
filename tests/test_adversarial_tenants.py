"""Adversarial tenants: globex (and acme, the other way) tries every route with every spelling of the
other tenant's ids. For each, the answer about a real foreign resource must be byte-identical (status,
headers, body; request ids and the echoed id masked) to the answer about one that never existed and one
that was deleted; listings never show foreign items; the owner's resources are unchanged afterwards;
and the two answers are not told apart by their timing either.

tests/test_tenants.py already proves the basic 404s for five adapter spellings; this suite widens that
to every route, every kind of id (adapters, files, jobs) and every spelling in `tests/adversarial.py`.
"""
from __future__ import annotations

import json
import uuid

import httpx
import pytest

from loraplex.api.app import create_app
from loraplex.config import Settings
from loraplex.registry.auth import Principal
from loraplex.training.jobs import SUCCEEDED
from tests.adversarial import (
    ADAPTER_ID_FORMS, OPAQUE_ID_FORMS, Probe, RawClient, assert_envelope, interleaved_medians, path_quote,
    serve_in_thread, snapshot,
)
from tests.tenant_fixtures import KEYS, adapter_files, auth, tenant_engine, upload  # noqa: F401

TRAIN = b"".join(b'{"prompt": "Q%d", "completion": " A"}\n' % i for i in range(8))
GEN = {"max_tokens": 2, "temperature": 0}
# Same-length names, so that masking the echoed id is all the normalization there is.
SECRET, NEVER, ERASED = "secret", "sekret", "erased"
TIMING_PAIRS = 120
MAX_MEDIAN_RATIO = 2.0  # either way
MAX_MEDIAN_DIFF_S = 0.003
MAX_IN_PROCESS_DIFF_S = 20e-6


@pytest.fixture(scope="module")
def tenant_settings(tmp_path_factory) -> Settings:
    """tenant_fixtures' settings, with no worker: jobs stay as this suite puts them."""
    return Settings(
        model="demo", data_dir=tmp_path_factory.mktemp("adversarial-data"), device="cpu", dtype="float32",
        max_model_len=256, max_num_seqs=8, max_loras=2, max_lora_rank=8, max_adapter_bytes=2_000_000,
        api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"],
        start_local_worker=False, max_jobs_per_tenant=5, log_level="warning",
    )


@pytest.fixture(scope="module")
def app(tenant_settings, tenant_engine):  # noqa: F811
    return create_app(tenant_settings, tenant_engine)


@pytest.fixture(scope="module")
def url(app):
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    """httpx for setup and listings (it normalizes paths, so probes go through `raw`)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def raw(url):
    raw = RawClient(url)
    yield raw
    raw.close()


def _file(client, who: str) -> str:
    response = client.post("/v1/files", headers=auth(who), data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", TRAIN)})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _job(client, who: str, file_id: str) -> str:
    response = client.post("/v1/fine_tuning/jobs", headers=auth(who),
                           json={"model": "demo", "training_file": file_id, "hyperparameters": {"n_epochs": 1}})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _unused_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@pytest.fixture(scope="module")
def world(app, client, adapter_files):  # noqa: F811
    """Both tenants own an adapter `secret` (two versions), a training file and two jobs (one queued,
    one succeeded with a checkpoint); each also deleted an adapter, a file and has ids never used."""
    c = client
    ids: dict[str, dict] = {}
    for seed, tenant in ((11, "acme"), (21, "globex")):
        assert upload(c, tenant, SECRET, adapter_files(seed)).status_code == 201
        assert upload(c, tenant, SECRET, adapter_files(seed + 1)).status_code == 201
        assert upload(c, tenant, ERASED, adapter_files(seed + 2)).status_code == 201
        assert c.delete(f"/v1/adapters/{tenant}/{ERASED}", headers=auth(tenant)).status_code == 200
        file_id, erased_file = _file(c, tenant), _file(c, tenant)
        assert c.delete(f"/v1/files/{erased_file}", headers=auth(tenant)).status_code == 200
        queued, done = _job(c, tenant, file_id), _job(c, tenant, file_id)
        checkpoint = {"id": f"ftckpt-{uuid.uuid4().hex[:24]}", "created_at": 1, "step_number": 4, "metrics": {"train_loss": 1.0},
                      "fine_tuned_model_checkpoint": f"{tenant}/{SECRET}@1", "fine_tuning_job_id": done}
        app.state.job_store.update(done, status=SUCCEEDED, finished_at=2, fine_tuned_model=f"{tenant}/{SECRET}@1",
                                     checkpoints=[checkpoint])
        app.state.job_store.add_event(done, {"id": f"ftevent-{uuid.uuid4().hex[:24]}", "created_at": 2, "level": "info",
                                              "message": "Fine-tuning job succeeded.", "type": "message", "data": None})
        ids[tenant] = {"file": file_id, "erased_file": erased_file, "missing_file": _unused_id("file"),
                       "job": queued, "done_job": done, "missing_job": _unused_id("ftjob")}
    made = upload(c, "admin", "public", adapter_files(31), tenant="globex", shared="true")
    assert made.status_code == 201, made.text
    return ids


def _owned_state(client, tenant: str, ids: dict) -> dict:
    """Everything a tenant can read about its own resources (compared before and after the attack)."""
    c, h = client, auth(tenant)
    adapter = c.get(f"/v1/adapters/{tenant}/{SECRET}", headers=h).json()
    old = c.get(f"/v1/adapters/{tenant}/{SECRET}@1", headers=h).json()
    for record in (adapter, old):
        record.pop("residency")  # the owner's own traffic moves it between tiers
    completion = c.post("/v1/completions", headers=h, json={"model": f"{tenant}/{SECRET}", "prompt": "The cat", **GEN,
                                                             "max_tokens": 6, "ignore_eos": True})
    return {
        "adapter": adapter, "v1": old, "tokens": completion.json()["choices"][0]["text"],
        "file": c.get(f"/v1/files/{ids['file']}", headers=h).json(),
        "content": c.get(f"/v1/files/{ids['file']}/content", headers=h).content,
        "jobs": {j: c.get(f"/v1/fine_tuning/jobs/{ids[j]}", headers=h).json() for j in ("job", "done_job")},
        "events": c.get(f"/v1/fine_tuning/jobs/{ids['done_job']}/events", headers=h).json(),
        "checkpoints": c.get(f"/v1/fine_tuning/jobs/{ids['done_job']}/checkpoints", headers=h).json(),
    }


# --- probes ---------------------------------------------------------------------------------------------
def adapter_probes(adapter_id: str) -> dict[str, Probe]:
    """Every route that takes an adapter id: in the JSON body as sent, in the path percent-quoted."""
    in_path = path_quote(adapter_id)
    chat = [{"role": "user", "content": "hi"}]
    tgi_parameters = {"adapter_id": adapter_id, "max_new_tokens": 2}
    return {
        "completions": Probe("POST", "/v1/completions", {"model": adapter_id, "prompt": "hi", **GEN}),
        "completions stream": Probe("POST", "/v1/completions", {"model": adapter_id, "prompt": "hi", "stream": True, **GEN}),
        "chat": Probe("POST", "/v1/chat/completions", {"model": adapter_id, "messages": chat, **GEN}),
        "chat stream": Probe("POST", "/v1/chat/completions", {"model": adapter_id, "messages": chat, "stream": True, **GEN}),
        "tgi generate": Probe("POST", "/generate", {"inputs": "hi", "parameters": tgi_parameters}),
        "tgi generate_stream": Probe("POST", "/generate_stream", {"inputs": "hi", "parameters": tgi_parameters}),
        "tgi compat": Probe("POST", "/", {"inputs": "hi", "parameters": tgi_parameters}),
        "get": Probe("GET", f"/v1/adapters/{in_path}"),
        "model card": Probe("GET", f"/v1/models/{in_path}"),
        "delete": Probe("DELETE", f"/v1/adapters/{in_path}"),
        **{action: Probe("POST", f"/v1/adapters/{in_path}/{action}") for action in ("pin", "unpin", "load", "evict")},
        "mode": Probe("POST", f"/v1/adapters/{in_path}/mode", {"mode": "merged"}),
    }


def file_probes(file_id: str, own_file: str) -> dict[str, Probe]:
    in_path = path_quote(file_id)
    job = {"model": "demo", "hyperparameters": {"n_epochs": 1}}
    return {
        "get": Probe("GET", f"/v1/files/{in_path}"),
        "content": Probe("GET", f"/v1/files/{in_path}/content"),
        "delete": Probe("DELETE", f"/v1/files/{in_path}"),
        "training_file": Probe("POST", "/v1/fine_tuning/jobs", {**job, "training_file": file_id}),
        "validation_file": Probe("POST", "/v1/fine_tuning/jobs", {**job, "training_file": own_file, "validation_file": file_id}),
        "after": Probe("GET", f"/v1/files?after={path_quote(file_id)}"),
    }


def job_probes(job_id: str) -> dict[str, Probe]:
    in_path = path_quote(job_id)
    return {
        "get": Probe("GET", f"/v1/fine_tuning/jobs/{in_path}"),
        "events": Probe("GET", f"/v1/fine_tuning/jobs/{in_path}/events"),
        "checkpoints": Probe("GET", f"/v1/fine_tuning/jobs/{in_path}/checkpoints"),
        "cancel": Probe("POST", f"/v1/fine_tuning/jobs/{in_path}/cancel"),
        "after": Probe("GET", f"/v1/fine_tuning/jobs?after={path_quote(job_id)}"),
    }


def assert_indistinguishable(raw: RawClient, who: str, candidates: dict[str, str], probes_for) -> int:
    """Send every probe for every candidate id as `who`; all candidates must read alike. Returns the count."""
    num_sent = 0
    snapshots: dict[str, dict] = {}
    for label, identifier in candidates.items():
        for route, probe in probes_for(identifier).items():
            response = probe.send(raw, auth(who))
            num_sent += 1
            assert response.status_code < 500, (route, label, identifier, response.text)
            assert_envelope(response) if response.status_code >= 400 else None
            snapshots.setdefault(route, {})[label] = snapshot(response, identifier)
    for route, by_label in snapshots.items():
        first_label, first = next(iter(by_label.items()))
        for label, other in by_label.items():
            assert other == first, f"{route}: {label} {other} differs from {first_label} {first}"
    return num_sent


# --- the attack -------------------------------------------------------------------------------------------
def test_every_spelling_of_a_foreign_adapter_reads_like_a_missing_one(client, raw, world):
    before = _owned_state(client, "acme", world["acme"])
    num_sent = 0
    for form_name, form in ADAPTER_ID_FORMS.items():
        candidates = {
            "foreign": form("acme", SECRET), "never existed": form("acme", NEVER), "deleted": form("acme", ERASED),
            "no such tenant": form("acne", SECRET),
        }
        try:
            num_sent += assert_indistinguishable(raw, "globex", candidates, adapter_probes)
        except AssertionError as exc:
            raise AssertionError(f"id form {form_name!r}: {exc}") from None
    assert num_sent > 2000
    assert _owned_state(client, "acme", world["acme"]) == before  # nothing deleted, pinned, merged, evicted


def test_the_other_way_round_and_same_names_in_both_tenants(raw, world):
    """acme probing globex: both own `secret`, so the name alone must not help either."""
    for form_name in ("tenant/name", "tenant/name@1", "tenant/name@2", "%2F", "UPPER", "dotdot %2E", "long name"):
        form = ADAPTER_ID_FORMS[form_name]
        candidates = {"foreign": form("globex", SECRET), "never existed": form("globex", NEVER),
                      "deleted": form("globex", ERASED)}
        assert_indistinguishable(raw, "acme", candidates, adapter_probes)


def test_only_canonical_ids_reach_the_owners_adapter(raw, world):
    """No alias (case folding, Unicode normalization, double decoding, dot segments, a trailing newline)
    resolves: what the owner cannot reach by a spelling, nobody else can either. In a path, `%2F` is
    `/` (one percent-decoding, as HTTP says); in a JSON body it is just a `%`."""
    canonical = {"tenant/name", "tenant/name@1", "tenant/name@2", "%2F", "%2f", "%2F@1"}
    for form_name, form in ADAPTER_ID_FORMS.items():
        adapter_id = form("acme", SECRET)
        got = raw.request("GET", f"/v1/adapters/{path_quote(adapter_id)}", auth("acme")).status_code
        used = raw.request("POST", "/v1/completions", auth("acme"), {"model": adapter_id, "prompt": "hi", **GEN})
        assert got == (200 if form_name in canonical else 404), form_name
        is_json_canonical = form_name in {"tenant/name", "tenant/name@1", "tenant/name@2"}  # no URL decoding in bodies
        assert used.status_code in ((200,) if is_json_canonical else (400, 404)), (form_name, used.text)


def test_shared_adapters_are_usable_but_not_manageable_by_others(client, world):
    c = client
    assert c.post("/v1/completions", headers=auth("acme"), json={"model": "globex/public", "prompt": "hi", **GEN}).status_code == 200
    refused = c.delete("/v1/adapters/globex/public", headers=auth("acme"))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert c.get("/v1/adapters/globex/public", headers=auth("globex")).status_code == 200


def test_admin_actions_refuse_tenants_alike_whatever_the_id(raw, world):
    """pin/unpin/load/evict/mode are the admin's: a tenant gets the same 403 for its own, a foreign and a
    missing adapter, so these routes are no oracle either."""
    for action in ("pin", "unpin", "load", "evict", "mode"):
        answers = set()
        for adapter_id in ("acme/secret", "globex/secret", "globex/sekret", "nobody/x", "%2E%2E"):
            response = raw.request("POST", f"/v1/adapters/{adapter_id}/{action}", auth("acme"),
                                   {"mode": "merged"} if action == "mode" else None)
            assert response.status_code == 403, (action, adapter_id, response.text)
            answers.add(response.content)
        assert len(answers) == 1, answers


def test_every_spelling_of_a_foreign_file_reads_like_a_missing_one(client, raw, world):
    acme, globex = world["acme"], world["globex"]
    before = _owned_state(client, "acme", acme)
    for form_name, form in OPAQUE_ID_FORMS.items():
        candidates = {"foreign": form(acme["file"]), "never existed": form(globex["missing_file"]),
                      "deleted": form(acme["erased_file"])}
        try:
            assert_indistinguishable(raw, "globex", candidates, lambda i: file_probes(i, globex["file"]))
        except AssertionError as exc:
            raise AssertionError(f"file id form {form_name!r}: {exc}") from None
    assert _owned_state(client, "acme", acme) == before


def test_every_spelling_of_a_foreign_job_reads_like_a_missing_one(client, raw, world):
    acme, globex = world["acme"], world["globex"]
    before = _owned_state(client, "acme", acme)
    for form_name, form in OPAQUE_ID_FORMS.items():
        candidates = {"foreign queued": form(acme["job"]), "foreign succeeded": form(acme["done_job"]),
                      "never existed": form(globex["missing_job"])}
        try:
            assert_indistinguishable(raw, "globex", candidates, job_probes)
        except AssertionError as exc:
            raise AssertionError(f"job id form {form_name!r}: {exc}") from None
    after = _owned_state(client, "acme", acme)
    assert after == before and after["jobs"]["job"]["status"] == "queued"  # the cancel attempts did nothing


def test_foreign_event_ids_in_pagination_read_like_missing_ones(client, world):
    acme_events = client.get(f"/v1/fine_tuning/jobs/{world['acme']['done_job']}/events", headers=auth("acme")).json()
    foreign_event = acme_events["data"][0]["id"]
    own_job = world["globex"]["done_job"]
    answers = {
        label: snapshot(client.get(f"/v1/fine_tuning/jobs/{own_job}/events", params={"after": event_id},
                                          headers=auth("globex")), event_id)
        for label, event_id in (("foreign", foreign_event), ("missing", f"ftevent-{uuid.uuid4().hex[:24]}"))
    }
    assert answers["foreign"] == answers["missing"] and answers["foreign"].status == 400


def test_uploading_for_another_tenant_is_refused_alike_whether_it_exists_or_not(client, world, adapter_files):  # noqa: F811
    for tenant in ("acme", "acne"):
        refused = upload(client, "globex", "x", adapter_files(41), tenant=tenant)
        assert refused.status_code == 403, refused.text
        file_refused = client.post("/v1/files", headers=auth("globex"), data={"purpose": "fine-tune", "tenant": tenant},
                                          files={"file": ("t.jsonl", TRAIN)})
        assert file_refused.status_code == 403
    assert upload(client, "globex", "x", adapter_files(41), tenant="acme").content == \
        upload(client, "globex", "x", adapter_files(41), tenant="acne").content


def _all_pages(client, who: str, path: str, limit: int = 1) -> list[str]:
    """Every id of a paginated listing, walking `after` one page at a time."""
    ids, after = [], None
    while True:
        params = {"limit": limit, **({"after": after} if after else {})}
        page = client.get(path, headers=auth(who), params=params).json()
        ids += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            return ids
        after = ids[-1]


def test_listings_never_show_foreign_items(client, world):
    c = client
    acme_ids = {f"acme/{SECRET}", world["acme"]["file"], world["acme"]["job"], world["acme"]["done_job"]}
    for path in ("/v1/adapters", "/v1/files", "/v1/fine_tuning/jobs"):
        globex_sees = _all_pages(c, "globex", path)
        assert not acme_ids & set(globex_sees), (path, globex_sees)
        assert all(not i.startswith("acme/") for i in globex_sees)
        assert set(_all_pages(c, "globex", path, limit=100)) == set(globex_sees)
    assert set(_all_pages(c, "globex", "/v1/adapters")) == {f"globex/{SECRET}", "globex/public"}
    models = [m["id"] for m in c.get("/v1/models", headers=auth("globex")).json()["data"]]
    assert sorted(models) == sorted(["demo", f"globex/{SECRET}", "globex/public"])
    assert set(_all_pages(c, "globex", "/v1/files")) >= {world["globex"]["file"]}
    admin_sees = set(_all_pages(c, "admin", "/v1/adapters", limit=100)) | set(_all_pages(c, "admin", "/v1/files", limit=100))
    assert {f"acme/{SECRET}", f"globex/{SECRET}", world["acme"]["file"], world["globex"]["file"]} <= admin_sees
    # a foreign id as the `after` cursor of an adapter listing is just a position in the sort order
    after_foreign = c.get("/v1/adapters", headers=auth("globex"), params={"after": f"acme/{SECRET}"})
    after_missing = c.get("/v1/adapters", headers=auth("globex"), params={"after": f"acme/{NEVER}"})
    assert after_foreign.status_code == 200 and after_foreign.json() == after_missing.json()


def test_probing_does_not_warm_the_resolution_cache(app, world):
    """A foreign lookup never fills (or reads) the event-loop cache of resolved adapters, so a foreign
    adapter takes the same path as a missing one even right after its owner used it."""
    registry = app.state.registry
    acme, globex = Principal("acme", False), Principal("globex", False)
    registry.forget("acme", SECRET)
    registry.lora_request(acme, f"acme/{SECRET}")
    assert registry.cached_lora_request(acme, f"acme/{SECRET}") is not None
    assert registry.cached_lora_request(globex, f"acme/{SECRET}") is None
    with pytest.raises(Exception) as refused:
        registry.lora_request(globex, f"acme/{SECRET}@1")
    assert type(refused.value).__name__ == "AdapterNotFound"
    assert registry.cached_lora_request(acme, f"acme/{SECRET}@1") is None  # the probe did not remember it


class CountingIndex:
    """The real index, with the adapters whose records were read (`get`) noted."""

    def __init__(self, index):
        self.index, self.read = index, []

    def get(self, tenant, name, version):
        self.read.append(f"{tenant}/{name}")
        return self.index.get(tenant, name, version)

    def __getattr__(self, attribute):
        return getattr(self.index, attribute)


def test_foreign_ids_are_refused_before_any_record_is_read(app, world):
    """Authorization comes first, on the id alone: globex's lookups of acme's private adapter (latest,
    a version, a deleted one) read no record of it, exactly as for one that never existed; a shared
    adapter of another tenant is still read and usable."""
    registry = app.state.registry
    acme, globex = Principal("acme", False), Principal("globex", False)
    counting = CountingIndex(registry.store.index)
    registry.store.index = counting
    try:
        for adapter_id in (f"acme/{SECRET}", f"acme/{SECRET}@1", f"acme/{ERASED}", f"acme/{NEVER}", "nobody/x"):
            with pytest.raises(Exception) as refused:
                registry.resolve(globex, adapter_id)
            assert type(refused.value).__name__ == "AdapterNotFound" and str(refused.value) == str(type(refused.value)(adapter_id))
        assert counting.read == []
        assert registry.resolve(acme, "globex/public").shared and counting.read == ["globex/public"]
        assert registry.resolve(acme, f"acme/{SECRET}").tenant == "acme"
    finally:
        registry.store.index = counting.index


def test_foreign_and_missing_ids_resolve_in_the_same_time_in_process(app, world):
    """Without HTTP's noise: `resolve` for acme's private adapter and for a missing one, as globex,
    interleaved 2,000 times. Reading the record first made the foreign one ~70 us slower."""
    registry, globex = app.state.registry, Principal("globex", False)

    def refused(adapter_id):
        def call():
            try:
                registry.resolve(globex, adapter_id)
            except Exception as exc:
                assert type(exc).__name__ == "AdapterNotFound"
        return call

    for attempt in range(3):
        foreign_s, missing_s = interleaved_medians(refused(f"acme/{SECRET}"), refused(f"acme/{NEVER}"), 2000)
        if abs(foreign_s - missing_s) < MAX_IN_PROCESS_DIFF_S:
            break
    print(f"\nresolve medians in process: foreign {foreign_s * 1e6:.1f} us, missing {missing_s * 1e6:.1f} us")
    assert abs(foreign_s - missing_s) < MAX_IN_PROCESS_DIFF_S, (foreign_s, missing_s)


# --- timing -------------------------------------------------------------------------------------------------
def _timing_cases(c, world) -> dict:
    acme, globex = world["acme"], world["globex"]

    def complete(model):
        return lambda: c.post("/v1/completions", headers=auth("globex"), json={"model": model, "prompt": "hi", **GEN})

    def get(path):
        return lambda: c.get(path, headers=auth("globex"))

    owner_uses_it = lambda: c.get(f"/v1/models/acme/{SECRET}", headers=auth("acme"))  # noqa: E731  keeps its cache warm
    return {
        "completions model": (complete(f"acme/{SECRET}"), complete(f"acme/{NEVER}"), owner_uses_it),
        "GET /v1/adapters/{id}": (get(f"/v1/adapters/acme/{SECRET}"), get(f"/v1/adapters/acme/{NEVER}"), None),
        "GET /v1/models/{id}": (get(f"/v1/models/acme/{SECRET}"), get(f"/v1/models/acme/{NEVER}"), None),
        "GET /v1/files/{id}": (get(f"/v1/files/{acme['file']}"), get(f"/v1/files/{globex['missing_file']}"), None),
        "GET /v1/fine_tuning/jobs/{id}": (get(f"/v1/fine_tuning/jobs/{acme['done_job']}"),
                                          get(f"/v1/fine_tuning/jobs/{globex['missing_job']}"), None),
    }


def test_foreign_and_missing_ids_take_the_same_time(client, world):
    """Medians of interleaved requests (foreign-existing vs never-existed) per route. Tolerances fit a
    noisy 2-core VM: each median within 2x of the other and less than 3 ms apart. A route is measured up
    to 3 times: a real difference is systematic and fails every time, while a burst of load from
    elsewhere (medians of 40 ms instead of 2 ms were seen in CI) passes on a quieter try. The figures are
    printed (`pytest -s`) and quoted in the README."""
    figures = {}
    for route, (foreign, missing, before_pair) in _timing_cases(client, world).items():
        for _ in range(10):  # warm-up: first requests on a route pay for lazy setup
            foreign(), missing()
        for attempt in range(3):
            foreign_s, missing_s = interleaved_medians(foreign, missing, TIMING_PAIRS, before_pair)
            figures[route] = {"foreign_ms": round(foreign_s * 1e3, 3), "missing_ms": round(missing_s * 1e3, 3),
                              "attempts": attempt + 1}
            if _indistinguishable(foreign_s, missing_s):
                break
    print("\nforeign vs missing medians:", json.dumps(figures, indent=1))
    for route, figure in figures.items():
        foreign_s, missing_s = figure["foreign_ms"] / 1e3, figure["missing_ms"] / 1e3
        assert 1 / MAX_MEDIAN_RATIO <= foreign_s / missing_s <= MAX_MEDIAN_RATIO, (route, figure)
        assert abs(foreign_s - missing_s) < MAX_MEDIAN_DIFF_S, (route, figure)


def _indistinguishable(foreign_s: float, missing_s: float) -> bool:
    return 1 / MAX_MEDIAN_RATIO <= foreign_s / missing_s <= MAX_MEDIAN_RATIO and abs(foreign_s - missing_s) < MAX_MEDIAN_DIFF_S
