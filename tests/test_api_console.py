"""The web console in a real browser (Debian's Chromium through Playwright) against a real `loraplex serve`:
upload an adapter by drag and drop, train one with a live loss curve, compare it with the base in the
playground, and a second tenant who sees none of it. tests/test_api_console_safety.py covers hostile
strings, bad input, accessibility and the keyboard on the same server.
"""
from __future__ import annotations

import hashlib
import json
import re

import httpx
import pytest

from tests.console_browser import close, open_console
from tests.console_server import KEYS, REPO_ROOT, auth

from fastapi.testclient import TestClient

from loraplex.api.app import create_app
from loraplex.config import Settings
from loraplex.registry.validation import adapter_digest

# 40 keyword examples (36 train, 4 held out): 27 steps at batch 4, long enough to watch, short to wait for.
KEYWORDS = b"".join((REPO_ROOT / "adapters" / "examples" / "keywords_train.jsonl").read_bytes().splitlines(True)[:40])
PROMPT = "Review: The staff were friendly.\nSentiment:"


def test_csp_and_local_assets(console_server) -> None:
    """(f) every console response carries a CSP that allows no inline script and no other origin."""
    for path in ("/console", "/console/static/js/app.js", "/console/static/vendor/uplot/uPlot.esm.js"):
        response = httpx.get(console_server.url + path)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["script-src"] == "'self'" and directives["default-src"] == "'none'"
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    page = httpx.get(console_server.url + "/console").text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "no inline script"
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "no third-party origin"
    assert httpx.get(console_server.url + "/console/static/../config.py").status_code == 404


def test_console_can_be_turned_off(tmp_path) -> None:
    """LORAPLEX_CONSOLE=false: no page, no assets (the app is built without starting its engine)."""
    off = TestClient(create_app(Settings(console=False, data_dir=tmp_path)))
    assert off.get("/console").status_code == 404 and off.get("/console/static/js/api.js").status_code == 404
    assert off.get("/console").json()["error"]["type"]
    assert TestClient(create_app(Settings(data_dir=tmp_path))).get("/console").status_code == 200


def drop_files(page, selector: str, files: dict[str, bytes]) -> None:
    """A real drop event whose DataTransfer holds `files` (what dragging them from a file manager gives)."""
    payload = {name: list(data) for name, data in files.items()}
    transfer = page.evaluate_handle("""(files) => {
        const transfer = new DataTransfer();
        for (const [name, bytes] of Object.entries(files)) transfer.items.add(new File([new Uint8Array(bytes)], name));
        return transfer;
    }""", payload)
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_upload_by_drop_lists_sha256(console_server, console_browser, adapter_files, state) -> None:
    """(a) a tenant's key, a dropped PEFT folder's two files, the adapter listed with the files' digest."""
    rec = open_console(console_browser, console_server.url, KEYS["acme"])
    page = rec.page
    page.fill("#upload-name", "dropped")
    drop_files(page, "#drop-zone", adapter_files)
    assert "adapter_config.json" in page.inner_text("#upload-chosen")
    page.focus("#upload-form button[type=submit]")
    page.keyboard.press("Enter")
    row = page.locator("#adapter-list tr", has_text="acme/dropped")
    row.wait_for()
    expected = adapter_digest(adapter_files["adapter_config.json"],
                              hashlib.sha256(adapter_files["adapter_model.safetensors"]).hexdigest())
    assert row.locator("code.sha256").inner_text() == expected
    assert httpx.get(f"{console_server.url}/v1/adapters/acme/dropped", headers=auth("acme")).json()["sha256"] == expected
    state["adapter_sha256"] = expected
    row.get_by_role("button", name="Copy model id acme/dropped").press("Enter")
    assert page.evaluate("() => navigator.clipboard.readText()") == "acme/dropped"
    rec.assert_local_only()
    close(rec)


def test_job_curve_updates_live_then_evaluation(console_server, console_browser, state) -> None:
    """(b) start a job from the page; >= 3 loss points appear while it runs (no reload); then the decision."""
    rec = open_console(console_browser, console_server.url, KEYS["acme"], "jobs")
    page = rec.page
    page.set_input_files("#job-training-file", files=[{"name": "keywords.jsonl", "mimeType": "application/jsonl", "buffer": KEYWORDS}])
    for selector, value in (("#job-suffix", "kw"), ("#job-epochs", "3"), ("#job-batch", "4"), ("#job-lr", "10")):
        page.fill(selector, value)
    page.evaluate("window.__sameDocument = true")
    page.click("#job-form button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]
    state["job_id"] = job_id
    page.wait_for_function("""() => Number(document.getElementById('loss-chart').dataset.trainPoints || 0) >= 3
                              && document.getElementById('job-status').textContent === 'running'""", timeout=90_000)
    api_job = httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{job_id}", headers=auth("acme")).json()
    assert api_job["status"] == "running", "the points appeared while the job was still running"
    assert page.locator("#loss-chart canvas").count() >= 1
    page.wait_for_function("() => document.getElementById('job-status').textContent === 'succeeded'", timeout=120_000)
    assert page.evaluate("window.__sameDocument") is True, "the page was never reloaded"
    job = httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{job_id}", headers=auth("acme")).json()
    evaluation = job["evaluation"]
    decision = page.inner_text("#promotion-decision")
    assert decision == ("Promoted" if evaluation["promoted"] else "Not promoted")
    section = page.inner_text("#job-evaluation")
    assert evaluation["reason"] in section and f"{evaluation['gain']:.4f}" in section
    report = httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{job_id}/report", headers=auth("acme")).json()
    assert page.locator("#loss-chart").get_attribute("data-train-points") == str(len(report["train_curve"]))
    state["fine_tuned_model"] = job["fine_tuned_model"]
    rec.assert_local_only()
    close(rec)


def test_playground_streams_two_models_like_the_api(console_server, console_browser, state) -> None:
    """(c) base and the new adapter side by side, streamed, equal to /v1/completions for the same request."""
    rec = open_console(console_browser, console_server.url, KEYS["acme"], "playground")
    page = rec.page
    adapter = state["fine_tuned_model"]  # "acme/kw@1": a version is typed as it is named in the API
    page.fill("#model-a", "demo")
    page.fill("#model-b", adapter)
    page.fill("#pg-prompt", PROMPT)
    page.fill("#pg-max-tokens", "8")
    page.fill("#pg-temperature", "0")
    page.evaluate("""() => { window.__appends = [0, 0];
        [0, 1].forEach((i) => new MutationObserver((m) => { window.__appends[i] += m.length; })
          .observe(document.getElementById(`completion-${i}`), { childList: true })); }""")
    page.click("#playground-form button[type=submit]")
    page.wait_for_function("() => [0, 1].every((i) => document.getElementById(`completion-${i}`).dataset.done === 'true')")
    for index, model in enumerate(("demo", adapter)):
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        expected = httpx.post(f"{console_server.url}/v1/completions", json=body, headers=auth("acme"), timeout=60).json()
        assert page.locator(f"#completion-{index}").text_content() == expected["choices"][0]["text"], model
    assert all(n >= 2 for n in page.evaluate("window.__appends")), "each column grew chunk by chunk"
    curl = page.inner_text("#curl-snippet")
    sent = json.loads(re.search(r"-d '(.*)'", curl, re.S).group(1))
    assert sent == {"model": "demo", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    assert KEYS["acme"] not in curl + page.inner_text("#openai-snippet"), "the key is never shown"
    rec.assert_local_only()
    close(rec)


def test_other_tenant_sees_nothing(console_server, console_browser, state) -> None:
    """(d) globex's key: none of acme's adapters, jobs or files, in the page or in any response it got."""
    acme_files = httpx.get(f"{console_server.url}/v1/files", headers=auth("acme")).json()["data"]
    secrets = {"acme/", state["job_id"], state["adapter_sha256"], *(f["id"] for f in acme_files)}
    rec = open_console(console_browser, console_server.url, KEYS["globex"])
    page = rec.page
    page.wait_for_selector("#adapter-list p, #adapter-list table")
    for view, ready in (("jobs", "#file-list p, #file-list table"), ("playground", "#curl-snippet")):
        page.goto(f"/console#/{view}")
        page.wait_for_selector(ready)
        for secret in secrets:
            assert secret not in page.inner_text("body"), (view, secret)
    assert "tenant globex" in page.inner_text("#whoami")
    for url, body in rec.bodies():
        for secret in secrets:
            assert secret not in body and secret not in url, (url, secret)
    rec.assert_local_only()
    # Opening acme's job by its URL: the same 404 as for a job that does not exist, shown in the page.
    page.goto(f"/console#/jobs/{state['job_id']}")
    page.wait_for_function("() => document.getElementById('error').textContent !== ''")
    missing = httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{state['job_id']}", headers=auth("globex"))
    assert missing.status_code == 404
    assert page.inner_text("#error") == missing.json()["error"]["message"]
    close(rec)


@pytest.fixture(scope="module")
def state() -> dict:
    return {}
