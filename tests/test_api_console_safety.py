"""The console under hostile strings and bad input, checked for accessibility (axe-core) and driven from
the keyboard, in Debian's Chromium against the real server of tests/console_server.py."""
from __future__ import annotations

import httpx
from axe_playwright_python.sync_playwright import Axe

from tests.console_browser import Recorder, close, open_console
from tests.console_server import KEYS, MAX_FILE_BYTES, auth

IMG = "<img src=x onerror=alert(1)>"
SCRIPT = '"><script>alert(2)</script>'
HOSTILE_LINE = ('{"prompt": "%s %s", "completion": " x"}\n' % (IMG, SCRIPT.replace('"', '\\"'))).encode() * 4
VIEWS = ["adapters", "jobs", "playground", "ops"]


def assert_no_script_ran(rec: Recorder) -> None:
    page = rec.page
    assert rec.dialogs == [] and rec.page_errors == [], (rec.dialogs, rec.page_errors)
    assert not [m for m in rec.console if "Content Security Policy" in m], rec.console  # nothing was even tried
    assert page.locator("main img, main script, #error img, #error script").count() == 0


def test_hostile_strings_render_as_text(console_server, console_browser, adapter_files) -> None:
    """(e) an adapter file name, a job suffix and a training-file line holding markup stay text."""
    upload = httpx.post(f"{console_server.url}/v1/files", data={"purpose": "fine-tune"}, headers=auth("acme"),
                        files={"file": (f"{IMG}.jsonl", HOSTILE_LINE)})
    assert upload.status_code == 200, upload.text
    rec = open_console(console_browser, console_server.url, KEYS["acme"])
    page = rec.page
    page.fill("#upload-name", IMG)
    page.set_input_files("#upload-files", files=[{"name": f"{IMG}.safetensors", "mimeType": "application/octet-stream",
                                                   "buffer": adapter_files["adapter_model.safetensors"]}])
    assert IMG in page.inner_text("#upload-chosen")
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#error:not(:empty)")
    assert f"{IMG}.safetensors" in page.inner_text("#error")  # the API's message quotes the file name
    page.goto("/console#/jobs")
    page.locator("#file-list tr", has_text=upload.json()["filename"]).get_by_role("button").click()
    preview = page.locator("pre.file-preview")
    assert IMG in preview.inner_text() and '\\"><script>alert(2)</script>' in preview.inner_text()
    assert IMG in page.inner_text("#file-list")
    page.set_input_files("#job-training-file", files=[{"name": "ok.jsonl", "mimeType": "application/jsonl",
                                                       "buffer": HOSTILE_LINE}])
    page.fill("#job-suffix", SCRIPT[:40])
    page.click("#job-form button[type=submit]")
    page.wait_for_selector("#error:not(:empty)")
    assert "suffix" in page.inner_text("#error")
    assert_no_script_ran(rec)
    rec.assert_local_only()
    close(rec)


def test_bad_input_shows_the_api_message(console_server, console_browser) -> None:
    """A wrong key, a non-JSONL file, a too-large upload, a refused job and a failed job: the API's own
    message in the page, and no file left behind by a refused start."""
    wrong = open_console(console_browser, console_server.url, "not-a-key")
    expected = httpx.get(f"{console_server.url}/v1/me", headers={"Authorization": "Bearer not-a-key"}).json()
    assert wrong.page.inner_text("#error") == expected["error"]["message"]
    close(wrong)
    before = httpx.get(f"{console_server.url}/v1/files", headers=auth("acme")).json()["data"]
    rec = open_console(console_browser, console_server.url, KEYS["acme"], "jobs")
    page = rec.page
    for name, content in (("notes.jsonl", b"this is not json\n"), ("big.jsonl", b'{"prompt": "a", "completion": " b"}\n' * (MAX_FILE_BYTES // 30))):
        page.set_input_files("#job-training-file", files=[{"name": name, "mimeType": "application/jsonl", "buffer": content}])
        page.click("#job-form button[type=submit]")
        page.wait_for_selector("#error:not(:empty)")
        api = httpx.post(f"{console_server.url}/v1/files", data={"purpose": "fine-tune"}, headers=auth("acme"),
                         files={"file": (name, content)})
        assert api.status_code in (400, 413)
        assert page.inner_text("#error") == api.json()["error"]["message"]
    page.set_input_files("#job-training-file", files=[{"name": "ok.jsonl", "mimeType": "application/jsonl",
                                                       "buffer": b'{"prompt": "a", "completion": " b"}\n' * 4}])
    page.fill("#job-epochs", "-1")
    page.click("#job-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('n_epochs')")
    assert httpx.get(f"{console_server.url}/v1/files", headers=auth("acme")).json()["data"] == before, "nothing half-uploaded"
    close(rec)
    rec = open_console(console_browser, console_server.url, KEYS["globex"], f"jobs/{console_server.failed_job_id}")
    rec.page.wait_for_function("() => document.getElementById('job-status')?.textContent === 'failed'", timeout=90_000)
    job = httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{console_server.failed_job_id}", headers=auth("globex")).json()
    assert job["error"]["message"] in rec.page.inner_text("#job-error")
    close(rec)


def test_every_view_passes_axe(console_server, console_browser) -> None:
    """(g) no critical or serious axe-core violation on any view, as the admin (who sees every control) and
    before a key is entered (axe's script ships inside the Python package: no network)."""
    rec = open_console(console_browser, console_server.url, None)
    check_axe(rec.page, "no key")
    rec.page.fill("#key-input", KEYS["admin"])
    rec.page.press("#key-input", "Enter")
    rec.page.wait_for_selector("#whoami:has-text('admin')")
    for view in VIEWS + [f"jobs/{console_server.failed_job_id}"]:
        rec.page.goto(f"/console#/{view}")
        rec.page.wait_for_selector("main h1")
        rec.page.wait_for_load_state("networkidle")
        check_axe(rec.page, view)
    rec.assert_local_only()
    close(rec)


def check_axe(page, view: str) -> None:
    results = Axe().run(page, options={"resultTypes": ["violations"]})
    bad = [v for v in results.response["violations"] if v["impact"] in ("critical", "serious")]
    assert bad == [], (view, results.generate_report())


def check_ops_glance(page, url: str) -> None:
    """The admin's glance: slots from /metrics (read with the admin key), tiers from the adapter list."""
    page.goto("/console#/ops")
    page.wait_for_selector("#ops-tiers table")
    metrics = httpx.get(f"{url}/metrics", headers=auth("admin")).text
    value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert page.inner_text("#ops-slots .value") == f"{value['loraplex_adapters_resident']:g} / {value['loraplex_adapter_slots']:g}"
    adapters = httpx.get(f"{url}/v1/adapters?limit=100", headers=auth("admin")).json()["data"]
    for tier in {a["residency"] for a in adapters}:
        count = sum(a["residency"] == tier for a in adapters)
        assert page.locator("#ops-tiers tr", has_text=tier).locator("td").nth(1).inner_text() == str(count)


def tab_reaches(page, target_id: str, limit: int = 80) -> None:
    page.focus("body")
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == target_id:
            return
    raise AssertionError(f"Tab never reached #{target_id}")


def test_admin_actions_from_the_keyboard(console_server, console_browser, adapter_files) -> None:
    """(g) every control is reachable with Tab; pin and a confirmed delete done with the keyboard only."""
    files = [("files", (name, data)) for name, data in adapter_files.items()]
    for _ in range(2):  # two versions
        assert httpx.post(f"{console_server.url}/v1/adapters", data={"name": "keyed"}, files=files, headers=auth("acme")).status_code == 201
    rec = open_console(console_browser, console_server.url, KEYS["admin"])
    page = rec.page
    row = page.locator("#adapter-list tr", has_text="acme/keyed")
    row.wait_for()
    page.evaluate("""() => document.querySelectorAll('main button, main input, main select, main a, nav a')
                         .forEach((node, i) => { if (!node.id) node.id = `control-${i}`; })""")
    controls = page.evaluate("() => [...document.querySelectorAll('main button, main input, main select, nav a')].map((n) => n.id)")
    page.focus("body")
    reached = set()
    for _ in range(len(controls) + 10):  # one pass of Tab through the page
        page.keyboard.press("Tab")
        reached.add(page.evaluate("() => document.activeElement.id"))
    assert set(controls) <= reached, set(controls) - reached
    tab_reaches(page, row.get_by_role("button", name="Pin").get_attribute("id"))
    page.keyboard.press("Enter")
    page.locator("#adapter-list tr", has_text="acme/keyed").get_by_role("button", name="Unpin").wait_for()
    assert httpx.get(f"{console_server.url}/v1/adapters/acme/keyed", headers=auth("admin")).json()["pinned"] is True
    row.get_by_role("button", name="Show versions of acme/keyed").press("Enter")
    versions = row.locator("ul").inner_text()
    for v in (1, 2):
        sha = httpx.get(f"{console_server.url}/v1/adapters/acme/keyed@{v}", headers=auth("acme")).json()["sha256"]
        assert f"@{v}: {sha[:12]}" in versions
    check_ops_glance(page, console_server.url)
    page.goto("/console#/adapters")
    delete = page.locator("#adapter-list tr", has_text="acme/keyed").get_by_role("button", name="Delete acme/keyed")
    delete.focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Enter")  # the confirmation button has the focus
    page.locator("#adapter-list tr", has_text="acme/keyed").wait_for(state="detached")
    assert httpx.get(f"{console_server.url}/v1/adapters/acme/keyed", headers=auth("admin")).status_code == 404
    rec.assert_local_only()
    close(rec)


def test_cancel_a_job_from_the_keyboard(console_server, console_browser) -> None:
    """The job page's cancel button, pressed with Enter, cancels the job (queued or running)."""
    upload = httpx.post(f"{console_server.url}/v1/files", data={"purpose": "fine-tune"}, headers=auth("acme"),
                        files={"file": ("long.jsonl", b'{"prompt": "Q", "completion": " A"}\n' * 40)}).json()
    job = httpx.post(f"{console_server.url}/v1/fine_tuning/jobs", headers=auth("acme"), json={
        "model": "demo", "training_file": upload["id"], "hyperparameters": {"n_epochs": 50, "batch_size": 1}}).json()
    rec = open_console(console_browser, console_server.url, KEYS["acme"], f"jobs/{job['id']}")
    rec.page.focus("#cancel-job")
    rec.page.keyboard.press("Enter")
    rec.page.wait_for_function("() => document.getElementById('job-status')?.textContent === 'cancelled'", timeout=60_000)
    assert httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{job['id']}", headers=auth("acme")).json()["status"] == "cancelled"
    assert rec.page.locator("#cancel-job").count() == 0
    close(rec)
