"""Browser-test helpers for the console: Debian's Chromium driven by Playwright, and a recorder of what a
page did (every request and response, dialogs, console messages, script errors).

Playwright's own browser download does not work offline, so it launches the Chromium that
scripts/ensure_chromium.sh installs (`make test` runs it first).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Request, Response, sync_playwright

CHROMIUM = os.environ.get("LORAPLEX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 20_000


def launch_browser():
    """(playwright, browser); the caller stops both."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} is missing: run `bash scripts/ensure_chromium.sh` (make test does)")
    playwright = sync_playwright().start()
    return playwright, playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@dataclass
class Recorder:
    """What one page did, for the assertions on the network log and on scripts that should not run."""

    page: Page
    requests: list[Request] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def attach(self) -> "Recorder":
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("response", lambda response: self.responses.append(response))
        self.page.on("dialog", self._on_dialog)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        return self

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    def hosts(self) -> set[str]:
        return {urlsplit(r.url).hostname or r.url for r in self.requests}

    def bodies(self) -> list[tuple[str, str]]:
        """(url, body text) of every response the page got (streams included); each must be readable."""
        return [(response.url, response.text()) for response in self.responses]

    def assert_local_only(self) -> None:
        assert self.requests, "the page made no request"
        assert self.hosts() == {"127.0.0.1"}, self.hosts()


def open_console(browser: Browser, base_url: str, key: str | None, view: str = "adapters") -> Recorder:
    """A fresh browser context (its own sessionStorage) on /console#/<view>, the key typed and entered."""
    context = browser.new_context(base_url=base_url)
    context.set_default_timeout(TIMEOUT_MS)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
    page = context.new_page()
    recorder = Recorder(page).attach()
    page.goto(f"/console#/{view}")
    page.wait_for_selector("#whoami:not(:empty)")
    if key is not None:
        page.focus("#key-input")
        page.keyboard.type(key)
        page.keyboard.press("Enter")  # the key form works from the keyboard
        page.wait_for_function("() => document.getElementById('whoami').textContent.startsWith('Signed in') "
                               "|| document.getElementById('error').textContent !== ''")
    return recorder


def close(recorder: Recorder) -> None:
    recorder.page.context.close()
