"""The dashboard, in a real headless Chromium against `stepline dev`.

`stepline dev tests/dashboard_app.py --port 0` runs a worker and the API with
the dashboard on a fresh SQLite log; Selenium drives the page. Runs are
triggered over the HTTP API while the page is open, so what the tests see
arrives through the live stream, not a reload.

The browser is Debian's `chromium` + `chromium-driver` (scripts/browser.sh
installs them; `make test` runs it first). Without them the browser tests
skip, except under CI=true, where they fail, as a missing Kafka broker does.

Screenshots of the main pages go to $STEPLINE_SCREENSHOTS when set (the
README's are made with STEPLINE_SCREENSHOTS=docs/screenshots), else to a
temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import stepline as sl
from stepline.server import ServeConfig, create_app
from stepline.server.dashboard import add_dashboard_routes

from .conftest import IN_CI

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "tests" / "dashboard_app.py"
WAIT_S = 20


# --- the files, without a browser ---------------------------------------------------


async def test_the_page_and_its_files_are_served_and_nothing_else() -> None:
    app = web.Application()
    add_dashboard_routes(app)
    async with TestClient(TestServer(app)) as client:
        index = await client.get("/")
        assert index.status == 200 and index.content_type == "text/html"
        html = await index.text()
        assert '<script type="module" src="/static/app.js">' in html
        assert "default-src 'self'" in index.headers["Content-Security-Policy"]
        for name in re.findall(r'/static/([\w.-]+)', html):
            assert (await client.get(f"/static/{name}")).status == 200, name
        app_js = await client.get("/static/app.js")
        assert app_js.content_type == "text/javascript"
        # Every module the entry point imports, and theirs, is served.
        seen, todo = set(), ["app.js"]
        while todo:
            name = todo.pop()
            seen.add(name)
            resp = await client.get(f"/static/{name}")
            assert resp.status == 200, name
            todo += [m for m in re.findall(r'from "\./([\w-]+\.js)"', await resp.text()) if m not in seen]
        assert {"api.js", "runs.js", "run.js", "timeline.js", "pages.js", "retry.js", "util.js", "history.js"} <= seen
        for bad in ("/static/..%2F__init__.py", "/static/__init__.py", "/static/missing.js", "/static/.hidden.js"):
            assert (await client.get(bad)).status == 404, bad


async def test_the_api_tells_the_page_whether_it_needs_a_token() -> None:
    for auth in (True, False):
        config = ServeConfig("t0ken" if auth else None, {}, auth_required=auth)
        app = create_app(sl.Client(f"memory://info-{auth}"), config)
        async with TestClient(TestServer(app)) as client:
            info = await client.get("/v1/info")  # no Authorization header: it must answer anyway
            assert info.status == 200
            assert await info.json() == {"auth": auth, "version": sl.__version__}
            assert (await client.get("/")).status == 200  # the page itself holds no data
            if auth:
                assert (await client.get("/v1/runs")).status == 401


# --- a browser --------------------------------------------------------------------


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and {what}")
    pytest.skip(f"{what} (a failure under CI=true, a skip otherwise)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (it is in the test extras: pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        _unavailable("no chromium / chromedriver on PATH (scripts/browser.sh installs Debian's packages)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1360,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    # A given driver path keeps Selenium Manager from looking for one online.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("STEPLINE_SCREENSHOTS")
    folder = (REPO / target) if target and not os.path.isabs(target) else Path(target or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Server:
    """`stepline dev` in a subprocess; `url` is the dashboard's address it printed."""

    def __init__(self, workdir: Path, *args: str, extra_env: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("STEPLINE_LOG", "STEPLINE_APP")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stepline.cli", *args],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        self.output: list[str] = []
        self._url: str | None = None
        self._found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)/?", line)
            if match and self._url is None:
                self._url = match.group(1) + "/"
                self._found.set()
        self._found.set()

    @property
    def url(self) -> str:
        if not self._found.wait(30) or self._url is None:
            self.stop()
            raise AssertionError("the server printed no address:\n" + "".join(self.output))
        return self._url

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            self.url + path.lstrip("/"), method=method,
            data=None if body is None else json.dumps(body).encode(), headers=headers,
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("dev")
    server = Server(workdir, "dev", str(APP), "--log", f"sqlite:///{workdir}/stepline.db", "--port", "0")
    try:
        server.url  # noqa: B018 -- waits for the address
        yield server
    finally:
        server.stop()


def wait(driver: Any, condition: Any, what: str, timeout: float = WAIT_S) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(condition, message=f"waiting for {what}")


def css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def settled(driver: Any, read: Any) -> Any:
    """`read(driver)`, read again when a refresh of the page replaced the elements under it."""
    return wait(driver, lambda d: (read(d),), "a read of the page")[0]


def text(driver: Any, selector: str) -> str:
    return str(settled(driver, lambda d: css(d, selector).text))


def css_all(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def row(run_id: str) -> str:
    return f'tr[data-testid="run-row"][data-run-id="{run_id}"]'


def row_status(driver: Any, run_id: str, status: str) -> bool:
    return css(driver, row(run_id)).get_attribute("data-status") == status


def open_page(driver: Any, dev: Server, hash_: str) -> None:
    """Load the dashboard at `hash_` and wait until its live stream is connected."""
    driver.get(dev.url + hash_)
    wait(driver, lambda d: css(d, "[data-testid=live-status]").get_attribute("data-state") == "live",
         "the live stream to connect")


def shoot(driver: Any, folder: Path, name: str) -> None:
    """The whole page (up to 2400 px tall), once running animations (a fresh row's highlight) are done."""
    driver.execute_script("document.getAnimations().forEach((a) => a.finish())")
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(full + 140, height), 2400))
    try:
        driver.save_screenshot(str(folder / f"{name}.png"))
    finally:
        driver.set_window_size(width, height)


# --- the tests --------------------------------------------------------------------


def test_a_triggered_run_appears_live_and_its_page_draws_steps_and_outputs(browser, dev, screenshots):
    driver = browser
    open_page(driver, dev, "#/runs")
    wait(driver, lambda d: css(d, "[data-testid=runs-table]"), "the runs table")
    driver.execute_script("window.__sameDocument = true")

    run_id = dev.call("POST", "/v1/tasks/greet/trigger", {"payload": {"name": "Ada"}, "tags": ["demo"]})["run_id"]
    wait(driver, lambda d: css(d, row(run_id)), "the new run's row, pushed by the stream")
    wait(driver, lambda d: row_status(d, run_id, "completed"), "the row to turn completed", timeout=30)
    assert driver.execute_script("return window.__sameDocument === true"), "the page reloaded"
    # Its child run arrived the same way.
    child_rows = [r for r in css_all(driver, 'tr[data-testid="run-row"]') if "make-avatar" in r.text]
    assert len(child_rows) == 1

    css(driver, row(run_id) + " [data-testid=run-link]").click()
    wait(driver, lambda d: d.find_element("css selector", "[data-testid=run-id]").text == run_id, "the run page")
    wait(driver, lambda d: css(d, "[data-testid=timeline]"), "the timeline")
    bars = css_all(driver, "[data-testid=timeline-bar]")
    by_lane: dict[str, list[str]] = {}
    for bar in bars:
        by_lane.setdefault(bar.get_attribute("data-lane"), []).append(bar.get_attribute("data-status"))
    # fetch_profile, render_message (failed once, then completed), the sleep, the child, send.
    assert by_lane["step-0"] == ["completed"]
    assert by_lane["step-1"] == ["failed", "completed"]
    assert by_lane["step-2"] == ["completed"]  # the sleep, resumed
    assert by_lane["step-3"] == ["completed"]  # the child run's wait
    assert by_lane["step-4"] == ["completed"]
    # Attempts: the one that failed, the retry delay, then the ones after the sleep and the child.
    assert by_lane["attempts"][:2] == ["failed", "delay"] and by_lane["attempts"][-1] == "completed"
    step0 = css(driver, 'details[data-testid=step][data-step="0"]')
    assert json.loads(step0.find_element("css selector", "[data-testid=step-output]").text) == {
        "name": "Ada", "plan": "pro"}
    step1 = css(driver, 'details[data-testid=step][data-step="1"]')
    assert "template service timed out" in step1.text  # the failed attempt's error
    assert "ConnectionError" in text(driver, "[data-testid=retries]")
    output = json.loads(text(driver, "[data-testid=run-output]"))
    assert output["message"] == "Welcome aboard, Ada (pro)" and output["sent"] is True
    assert "make-avatar" in text(driver, "[data-testid=children]")
    assert not css_all(driver, "[data-testid=cancel]") and not css_all(driver, "[data-testid=retry-panel]")
    shoot(driver, screenshots, "run")


def test_a_dead_letter_is_retried_from_the_page_with_an_edited_payload(browser, dev, screenshots):
    from selenium.webdriver.common.keys import Keys

    driver = browser
    open_page(driver, dev, "#/dead-letters")
    wait(driver, lambda d: css(d, "[data-testid=dead-letters-table]"), "the dead letters table")
    run_id = dev.call("POST", "/v1/tasks/charge/trigger", {"payload": {"amount": -5}})["run_id"]
    wait(driver, lambda d: row_status(d, run_id, "failed"), "the failed run among the dead letters")
    assert "ValueError: amount must not be negative" in css(driver, row(run_id)).text

    css(driver, row(run_id) + " [data-testid=edit-retry]").click()
    editor = wait(driver, lambda d: css(d, "[data-testid=retry-editor] [data-testid=retry-payload]"), "the editor")
    assert json.loads(editor.get_attribute("value")) == {"amount": -5}
    editor.send_keys(Keys.CONTROL, "a")
    editor.send_keys('{"amount": 5')
    wait(driver, lambda d: "Not valid JSON" in css(d, "[data-testid=retry-message]").text, "the JSON error")
    assert not css(driver, "[data-testid=retry-submit]").is_enabled()
    editor.send_keys("}")
    wait(driver, lambda d: css(d, "[data-testid=retry-submit]").is_enabled(), "the payload to be valid again")
    shoot(driver, screenshots, "dead-letters")

    css(driver, "[data-testid=retry-submit]").click()
    wait(driver, lambda d: row_status(d, run_id, "completed"), "the retried run to complete, live", timeout=30)
    assert not css_all(driver, row(run_id) + " [data-testid=dead-letter]")

    css(driver, row(run_id) + " [data-testid=run-link]").click()
    wait(driver, lambda d: css(d, "[data-testid=run-output]"), "the run's output")
    assert json.loads(text(driver, "[data-testid=run-output]")) == {"captured": 5, "currency": "EUR"}
    assert json.loads(text(driver, "[data-testid=run-payload]")) == {"amount": 5}
    markers = [m.get_attribute("data-kind") for m in css_all(driver, "[data-testid=timeline-marker]")]
    assert "retry" in markers  # the manual retry is on the timeline


def test_events_schedules_and_queues_show_what_the_server_knows(browser, dev, screenshots):
    driver = browser
    open_page(driver, dev, "#/events")
    event_id = dev.call("POST", "/v1/events", {"name": "user.signed_up", "data": {"email": "ada@example.com"}})[
        "event_id"]
    selector = f'tr[data-testid="event-row"][data-event-id="{event_id}"]'
    wait(driver, lambda d: css(d, selector + " [data-testid=run-link]"), "the event and the run it started")
    assert "welcome-email" in text(driver, selector)
    shoot(driver, screenshots, "events")

    css(driver, "[data-testid=nav-schedules]").click()
    wait(driver, lambda d: css(d, 'tr[data-testid="schedule-row"][data-task-id="nightly-report"]'), "the schedule")
    assert "0 3 * * *" in text(driver, "[data-testid=schedules-table]")
    shoot(driver, screenshots, "schedules")

    css(driver, "[data-testid=nav-queues]").click()
    queue = wait(driver, lambda d: css(d, 'tr[data-testid="queue-row"][data-queue="emails"]'), "the emails queue")
    assert queue.find_element("css selector", "[data-testid=queue-limit]").text == "5"
    shoot(driver, screenshots, "queues")

    # The README's picture of the list, with a dead letter among the runs so far.
    css(driver, "[data-testid=nav-runs]").click()
    failed = dev.call("POST", "/v1/tasks/charge/trigger", {"payload": {"amount": -1}, "tags": ["demo"]})["run_id"]
    wait(driver, lambda d: css(d, row(failed) + " [data-testid=dead-letter]"), "the new dead letter")
    shoot(driver, screenshots, "runs")


def test_live_inserts_keep_the_page_size_and_paging_loses_no_run(browser, dev):
    driver = browser
    before = {r["run_id"] for r in dev.call("GET", "/v1/runs?task=make-avatar&limit=500")["runs"]}
    open_page(driver, dev, "#/runs?task=make-avatar&limit=10")
    wait(driver, lambda d: css(d, "[data-testid=runs-table]"), "the runs table")
    with ThreadPoolExecutor(8) as pool:  # concurrent triggers share the log's group commits
        new = set(pool.map(lambda i: dev.call("POST", "/v1/tasks/make-avatar/trigger",
                                              {"payload": {"name": f"n{i}"}})["run_id"], range(14)))
    shown = lambda d: [r.get_attribute("data-run-id") for r in css_all(d, 'tr[data-testid="run-row"]')]  # noqa: E731
    # The newest 10 of them, all pushed by the stream; older ones fell off the page.
    wait(driver, lambda d: set(shown(d)) <= new and len(shown(d)) == 10 and all(
        row_status(d, r, "completed") for r in shown(d)), "the page to hold the 10 newest runs")
    page1 = shown(driver)
    css(driver, "[data-testid=page-older]").click()
    wait(driver, lambda d: "Page 2" in css(d, "[data-testid=runs-status]").text, "page 2")
    page2 = shown(driver)
    assert not set(page1) & set(page2)
    assert set(page1) | set(page2) == new | before


def test_with_auth_on_the_page_asks_for_the_token_and_keeps_it_for_the_tab(browser, tmp_path):
    driver = browser
    server = Server(tmp_path, "serve", "--log", f"sqlite:///{tmp_path}/stepline.db", "--port", "0",
                    "--api-token", "s3cret-token", "--console-logs")
    try:
        driver.get(server.url)
        driver.execute_script("sessionStorage.clear()")
        driver.refresh()
        field = wait(driver, lambda d: css(d, "[data-testid=token-input]").is_displayed()
                     and css(d, "[data-testid=token-input]"), "the token prompt")
        field.send_keys("wrong")
        css(driver, "[data-testid=token-submit]").click()
        wait(driver, lambda d: "refused" in css(d, "#token-error").text, "the refusal")
        css(driver, "[data-testid=token-input]").send_keys("s3cret-token")
        css(driver, "[data-testid=token-submit]").click()
        wait(driver, lambda d: css(d, "[data-testid=runs-empty]"), "the (empty) runs list")
        wait(driver, lambda d: css(d, "[data-testid=live-status]").get_attribute("data-state") == "live",
             "the stream, with the token in its query")
        # A reload in the same tab needs no second prompt.
        driver.refresh()
        wait(driver, lambda d: css(d, "[data-testid=runs-empty]"), "the runs list after a reload")
        assert not css(driver, "[data-testid=token-dialog]").is_displayed()
    finally:
        driver.execute_script("sessionStorage.clear()")
        server.stop()


# --- fork and shadow (engine/server/dashboard/static/history.js) ----------------------------


def _set_text(driver: Any, element: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text)


def test_a_checkpoint_is_forked_from_the_page_with_an_edited_output(browser, dev, screenshots):
    driver = browser
    run_id = dev.call("POST", "/v1/tasks/charge/trigger", {"payload": {"amount": 5}})["run_id"]
    open_page(driver, dev, f"#/runs/{run_id}")
    wait(driver, lambda d: d.find_element("css selector", "[data-testid=run-output]").text.strip().startswith("{"),
         "the run to complete", timeout=30)
    assert json.loads(text(driver, "[data-testid=run-output]")) == {"captured": 5, "currency": "EUR"}
    assert text(driver, "[data-testid=task-version]").startswith("code:")
    # Every checkpoint offers a fork; step 0 (validate) returned 5: say it had returned 7.
    assert len(css_all(driver, "[data-testid=fork-from-step]")) == 2
    css(driver, 'details[data-testid=step][data-step="0"] [data-testid=fork-from-step]').click()
    panel = wait(driver, lambda d: css(d, '[data-testid=fork-panel][data-step="0"]'), "the fork form")
    assert json.loads(css(driver, "[data-testid=fork-output]").get_attribute("value")) == 5
    output = css(driver, "[data-testid=fork-output]")
    _set_text(driver, output, "7,")
    wait(driver, lambda d: "Not valid JSON" in css(d, "[data-testid=fork-message]").text, "the JSON error")
    assert not css(driver, "[data-testid=fork-keep]").is_enabled()
    _set_text(driver, output, "7")
    wait(driver, lambda d: css(d, "[data-testid=fork-keep]").is_enabled(), "the output to be valid again")
    shoot(driver, screenshots, "fork")
    css(driver, "[data-testid=fork-keep]").click()
    link = wait(driver, lambda d: css(d, "[data-testid=fork-result] [data-testid=run-link]"), "the forked run's link")
    fork_id = css(driver, "[data-testid=fork-result]").get_attribute("data-run-id")
    assert fork_id and fork_id != run_id and panel.is_displayed()
    link.click()
    wait(driver, lambda d: css(d, "[data-testid=run-id]").text == fork_id, "the forked run's page")
    wait(driver, lambda d: d.find_element("css selector", "[data-testid=run-output]").text.strip().startswith("{"),
         "the fork to complete", timeout=30)
    # capture ran live with the edited price; validate was copied, not run.
    assert json.loads(text(driver, "[data-testid=run-output]")) == {"captured": 7, "currency": "EUR"}
    assert run_id in text(driver, "[data-testid=forked-from]") and "at step 1" in text(
        driver, "[data-testid=forked-from]")
    assert "copied from the run" in text(driver, 'details[data-testid=step][data-step="0"]')
    assert "copied from the run" not in text(driver, 'details[data-testid=step][data-step="1"]')
    state = dev.call("GET", f"/v1/runs/{fork_id}")
    assert [(s["step"], s["attempt"]) for s in state["steps"]] == [(0, 0), (1, 1)]

    # The shadow panel, against the server's own code: the same, step by step.
    css(driver, "[data-testid=shadow-run]").click()
    wait(driver, lambda d: css(d, "[data-testid=shadow-result]"), "the shadow diff")
    assert css(driver, "[data-testid=shadow-result]").get_attribute("data-diverged") == "false"
    assert [r.get_attribute("data-verdict") for r in css_all(driver, "[data-testid=shadow-step]")] == ["same", "same"]
    assert "(unchanged)" in text(driver, "[data-testid=shadow-versions]")
    # `stepline dev` runs without a token: it imports no module named over HTTP.
    css(driver, "[data-testid=shadow-module]").send_keys("dashboard_app")
    css(driver, "[data-testid=shadow-run]").click()
    wait(driver, lambda d: "Shadow refused" in css(d, "[data-testid=shadow-message]").text, "the refusal")
    assert "token" in text(driver, "[data-testid=shadow-message]")


def test_the_shadow_diff_of_a_run_against_new_code_shows_where_it_diverges(browser, tmp_path, screenshots):
    driver = browser
    token = "shadow-t0ken"
    db = f"sqlite:///{tmp_path}/stepline.db"
    env = {k: v for k, v in os.environ.items() if k not in ("STEPLINE_LOG", "STEPLINE_APP")}
    env["PYTHONPATH"] = str(REPO)  # the app modules import tests.apps.history_app
    app = str(REPO / "tests" / "apps" / "history_app.py")
    worker = subprocess.Popen([sys.executable, "-m", "stepline.cli", "worker", app, "--log", db],
                              cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    server = Server(tmp_path, "serve", "--app", app, "--log", db, "--port", "0", "--api-token", token,
                    "--shadow-path", str(REPO / "tests" / "apps"), "--console-logs",
                    extra_env={"PYTHONPATH": str(REPO)})
    try:
        run_id = server.call("POST", "/v1/tasks/greet/trigger", {"payload": {"name": "Ada"}}, token=token)["run_id"]
        driver.get(server.url)
        driver.execute_script("sessionStorage.clear()")
        driver.get(server.url + f"#/runs/{run_id}")
        field = wait(driver, lambda d: css(d, "[data-testid=token-input]").is_displayed()
                     and css(d, "[data-testid=token-input]"), "the token prompt")
        field.send_keys(token)
        css(driver, "[data-testid=token-submit]").click()
        wait(driver, lambda d: css(d, "[data-testid=run-id]").text == run_id, "the run page")
        wait(driver, lambda d: d.find_element("css selector", "[data-testid=run-output]").text.strip().startswith("{"),
             "the run to complete", timeout=30)

        css(driver, "[data-testid=shadow-module]").send_keys("history_app_v3")
        css(driver, "[data-testid=shadow-run]").click()
        wait(driver, lambda d: css(d, "[data-testid=shadow-result]"), "the shadow diff")
        result = css(driver, "[data-testid=shadow-result]")
        assert result.get_attribute("data-diverged") == "true"
        assert text(driver, "[data-testid=shadow-verdict]") == "diverges"
        [step] = css_all(driver, "[data-testid=shadow-step]")
        assert step.get_attribute("data-verdict") == "input-changed"
        assert '["Ada"]' in step.text and '["ADA"]' in step.text and "Hello, Ada" in step.text
        assert "First divergence: step 0 (compose) is called with" in text(driver, "[data-testid=shadow-first]")
        assert '{"message":"Hello, Ada!"}' in text(driver, "[data-testid=shadow-output]")
        assert "(changed)" in text(driver, "[data-testid=shadow-versions]")
        shoot(driver, screenshots, "shadow")

        # A module outside the shadow path is refused, and nothing changed on the log.
        _set_text(driver, css(driver, "[data-testid=shadow-module]"), "os")
        css(driver, "[data-testid=shadow-run]").click()
        wait(driver, lambda d: "no module 'os' under the shadow path" in css(d, "[data-testid=shadow-message]").text,
             "the refusal")
        history = server.call("GET", f"/v1/runs/{run_id}/history", token=token)["events"]
        assert [e["type"] for e in history][-1] == "RunCompleted"
    finally:
        driver.execute_script("sessionStorage.clear()")
        server.stop()
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(20)


def test_a_bulk_retry_of_the_filtered_list_counts_first_then_acts_once(browser, dev, screenshots):
    """The runs list's filter (tag + error type) is what the bulk action selects:
    a dry-run count is shown before anything happens, and confirming retries
    exactly those runs, once each."""
    driver = browser
    failing = [dev.call("POST", "/v1/tasks/charge/trigger", {"payload": {"amount": -i}, "tags": ["bulk-demo"]})["run_id"]
               for i in range(1, 4)]
    fine = dev.call("POST", "/v1/tasks/charge/trigger", {"payload": {"amount": 7}, "tags": ["bulk-demo"]})["run_id"]
    open_page(driver, dev, "#/runs?tag=bulk-demo&error_type=ValueError")
    for run_id in failing:
        wait(driver, lambda d, r=run_id: row_status(d, r, "failed"), "the failing runs to fail", timeout=30)
    assert not css_all(driver, row(fine)), "the list shows a run the filter excludes"

    css(driver, "[data-testid=bulk-retry]").click()
    wait(driver, lambda d: css(d, "[data-testid=bulk-confirm]").is_displayed(), "the dry-run count")
    message = css(driver, "[data-testid=bulk-message]")
    assert message.get_attribute("data-acted") == "3"
    assert message.text == "3 runs match. Retry 3 runs?"
    assert text(driver, "[data-testid=bulk-confirm]") == "Retry 3 runs"
    shoot(driver, screenshots, "bulk-retry")

    def retriggers(run_id: str) -> int:
        return sum(e["type"] == "RunRetriggered" for e in dev.call("GET", f"/v1/runs/{run_id}/history")["events"])

    assert [retriggers(r) for r in failing] == [0, 0, 0], "the dry run acted"
    css(driver, "[data-testid=bulk-confirm]").click()
    wait(driver, lambda d: css(d, "[data-testid=bulk-message]").get_attribute("data-state") == "done",
         "the bulk retry to be accepted")
    assert text(driver, "[data-testid=bulk-message]").startswith("Done: 3 runs retried")
    assert not css(driver, "[data-testid=bulk-confirm]").is_displayed()
    for run_id in failing:  # retried, they fail again (the amount is still negative)
        wait(driver, lambda d, r=run_id: retriggers(r) == 1 and row_status(d, r, "failed"),
             "the retried run to fail again", timeout=30)
    assert retriggers(fine) == 0
    assert dev.call("GET", f"/v1/runs/{fine}")["status"] == "completed"


# --- history as a debugger: time travel, diff, why (travel.js, diff.js, why.js) ------------


def _until_status(driver: Any, dev: Server, run_id: str, status: str) -> None:
    wait(driver, lambda d: dev.call("GET", f"/v1/runs/{run_id}")["status"] == status, f"{run_id} to be {status}",
         timeout=30)


def _steps_shown(driver: Any) -> list[str]:
    return settled(driver, lambda d: [e.get_attribute("data-step") for e in css_all(d, "details[data-testid=step]")])


def test_time_travel_shows_the_run_as_it_stood_at_an_earlier_checkpoint(browser, dev, screenshots):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver = browser
    run_id = dev.call("POST", "/v1/tasks/charge/trigger", {"payload": {"amount": 5}})["run_id"]
    _until_status(driver, dev, run_id, "completed")
    events = dev.call("GET", f"/v1/runs/{run_id}/history")["events"]
    validated = next(e["offset"] for e in events if e["type"] == "StepCompleted" and e["body"]["step"] == 0)
    open_page(driver, dev, f"#/runs/{run_id}")
    wait(driver, lambda d: css(d, "[data-testid=run-output]"), "the live run's output")
    assert _steps_shown(driver) == ["0", "1"]
    assert "live" in text(driver, "[data-testid=travel-at]")

    # Back to the checkpoint after step 0 (validate): running, one step, no output yet.
    Select(css(driver, "[data-testid=travel-checkpoint]")).select_by_value(str(validated))
    wait(driver, lambda d: css(d, "[data-testid=as-of-banner]").get_attribute("data-offset") == str(validated),
         "the page as of the checkpoint")
    assert text(driver, "[data-testid=status]") == "running"
    assert _steps_shown(driver) == ["0"]
    assert json.loads(text(driver, 'details[data-testid=step][data-step="0"] [data-testid=step-output]')) == 5
    assert not css_all(driver, "[data-testid=run-output]") and "Not finished yet." in driver.page_source
    # The past is read, not acted on: no cancel, no fork.
    assert not css_all(driver, "[data-testid=cancel]") and not css_all(driver, "[data-testid=fork-from-step]")
    # The events between the start (the checkpoint before) and this one, as the API has them.
    between = [e for e in events if events[0]["offset"] < e["offset"] <= validated]
    wait(driver, lambda d: [r.get_attribute("data-offset") for r in css_all(d, "[data-testid=travel-event]")]
         == [str(e["offset"]) for e in between], "the events between the two points")
    assert settled(driver, lambda d: [r.get_attribute("data-type") for r in css_all(d, "[data-testid=travel-event]")]
                   )[-1] == "StepCompleted"
    # A later "since" point is not offered: only points before the one shown.
    since = settled(driver, lambda d: [o.get_attribute("value")
                                       for o in Select(css(d, "[data-testid=travel-from]")).options])
    assert since == ["", str(events[0]["offset"])]
    Select(css(driver, "[data-testid=travel-from]")).select_by_value("")
    wait(driver, lambda d: css(d, "[data-testid=travel-event]").get_attribute("data-type") == "RunTriggered",
         "the events since the start")
    shoot(driver, screenshots, "time-travel")

    css(driver, "[data-testid=travel-live]").click()
    wait(driver, lambda d: not css_all(d, "[data-testid=as-of-banner]") and css_all(d, "[data-testid=run-output]"),
         "the live page again")
    assert text(driver, "[data-testid=status]") == "completed" and _steps_shown(driver) == ["0", "1"]
    # One event back with the slider: the last step done, the run not yet completed.
    assert settled(driver, lambda d: css(d, "[data-testid=travel-slider]").get_attribute("value")) == str(len(events) - 1)
    css(driver, "[data-testid=travel-slider]").send_keys(Keys.ARROW_LEFT)
    wait(driver, lambda d: css(d, "[data-testid=as-of-banner]").get_attribute("data-offset")
         == str(events[-2]["offset"]), "the page one event back")
    assert text(driver, "[data-testid=status]") == "running" and _steps_shown(driver) == ["0", "1"]
    assert not css_all(driver, "[data-testid=run-output]")


def test_a_fork_diffed_with_its_original_marks_the_edited_step_first(browser, dev, screenshots):
    driver = browser
    original = dev.call("POST", "/v1/tasks/charge/trigger", {"payload": {"amount": 5}})["run_id"]
    _until_status(driver, dev, original, "completed")
    fork = dev.call("POST", f"/v1/runs/{original}/fork", {"at_step": 1, "step_outputs": {"0": 7}})["run_id"]
    _until_status(driver, dev, fork, "completed")
    open_page(driver, dev, f"#/runs/{fork}")
    wait(driver, lambda d: css(d, "[data-testid=diff-original]"), "the fork's 'diff with its original'").click()
    wait(driver, lambda d: css(d, "[data-testid=diff-result]"), "the diff")
    assert settled(driver, lambda d: (css(d, "[data-testid=diff-result]").get_attribute("data-same"),
                                      css(d, "[data-testid=diff-result]").get_attribute("data-first"))) == ("false", "0")
    assert text(driver, "[data-testid=diff-first]") == "First divergence: step 0 (output)."
    rows = settled(driver, lambda d: [(r.get_attribute("data-step"), r.get_attribute("data-differs"),
                                       r.get_attribute("data-first"), r.text)
                                      for r in css_all(d, "[data-testid=diff-step]")])
    assert [r[:3] for r in rows] == [("0", "output", "true"), ("1", "input,output", "false")]
    assert rows[0][3].startswith("▶") and "5" in rows[0][3] and "7" in rows[0][3]
    assert '"captured":5' in rows[1][3] and '"captured":7' in rows[1][3]
    assert settled(driver, lambda d: [r.get_attribute("data-field")
                                      for r in css_all(d, "[data-testid=diff-run-field]")]) == ["output"]
    shoot(driver, screenshots, "diff")

    # Any other run by id: a different payload diverges before any step.
    other = dev.call("POST", "/v1/tasks/charge/trigger", {"payload": {"amount": 9}})["run_id"]
    _until_status(driver, dev, other, "completed")
    css(driver, "[data-testid=diff-other]").send_keys(other)
    css(driver, "[data-testid=diff-run]").click()
    wait(driver, lambda d: css(d, "[data-testid=diff-result]").get_attribute("data-first") == "payload",
         "the diff with the other run")
    assert text(driver, "[data-testid=diff-first]") == "First divergence: the run's payload."
    _set_text(driver, css(driver, "[data-testid=diff-other]"), "run_nope")
    css(driver, "[data-testid=diff-run]").click()
    wait(driver, lambda d: "Diff refused: no run with id 'run_nope'" in css(d, "[data-testid=diff-message]").text,
         "the refusal")


def test_the_why_panel_names_the_queue_place_the_holder_and_the_wait(browser, dev, screenshots):
    driver = browser
    holder = dev.call("POST", "/v1/tasks/exclusive/trigger", {"payload": {"seconds": 600}})["run_id"]
    _until_status(driver, dev, holder, "running")
    queued = dev.call("POST", "/v1/tasks/exclusive/trigger", {"payload": {"seconds": 600}})["run_id"]
    waiting = dev.call("POST", "/v1/tasks/await-payment/trigger", {"payload": {"order": "o-7"}})["run_id"]
    try:
        open_page(driver, dev, f"#/runs/{queued}")
        queue = "[data-testid=why-reason][data-kind=queue]"
        wait(driver, lambda d: css(d, queue), "the queue reason")
        assert "queued in 'one-slot': place 1 of 1; 1 run(s) hold its slots (its limit 1)" in text(driver, queue)
        assert settled(driver, lambda d: [a.text for a in css_all(d, f"{queue} [data-testid=why-holders] a")]) == [holder]
        assert text(driver, "[data-testid=status]") == "pending"
        shoot(driver, screenshots, "why")

        _until_status(driver, dev, waiting, "suspended")
        open_page(driver, dev, f"#/runs/{waiting}")
        wait_ = "[data-testid=why-reason][data-kind=wait]"
        wait(driver, lambda d: css(d, wait_), "the wait reason")
        assert "waiting at step 0 for an event 'payment.received' matching {\"order\": \"o-7\"}" in text(driver, wait_)
        assert css_all(driver, f"{wait_} [data-fact=since]") and css_all(driver, f"{wait_} [data-fact=timeout_at]")

        # A running run is not held: no panel.
        open_page(driver, dev, f"#/runs/{holder}")
        wait(driver, lambda d: css(d, "[data-testid=status]").text == "running", "the holder's page")
        assert not css_all(driver, "[data-testid=why-panel]")
    finally:
        for run_id in (queued, waiting, holder):
            dev.call("POST", f"/v1/runs/{run_id}/cancel", {})
