"""End to end in a real browser: `streamlit run` on 127.0.0.1, headless Debian Chromium driven by
playwright (never `playwright install`): search for a feature, open its page, see the highlighted
example, save a screenshot (tests/artifacts/browser_feature.png); find a feature by its explanation
(`saekit explain`)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from saekit.analysis.explain.protocol import ExplainConfig
from saekit.analysis.features import AnalyzeConfig
from saekit.browser.build import build_bundle
from saekit.browser.bundle import Bundle
from saekit.cli.browse import browse_command
from saekit.run.explain import explain_run
from support.runs import tiny_run

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("SAEKIT_CHROMIUM", "/usr/bin/chromium")  # the override exists for test_ci_strictness
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def browser_required() -> bool:
    """CI (and anyone who sets SAEKIT_REQUIRE_BROWSER=1) must not pass without a real browser."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("SAEKIT_REQUIRE_BROWSER") == "1"


def unavailable(reason: str):
    if browser_required():
        pytest.fail(f"{reason}; the real-browser test is required here (CI or SAEKIT_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer on {url}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("the playwright package is missing (pip install -e '.[test]')")
    run = tiny_run(tmp_path_factory.mktemp("e2e") / "llm", dead=(0, 1, 2), one_shot=3)
    build_bundle(run, AnalyzeConfig(top_examples=4, context=3))
    explain_run(run, ExplainConfig(embedding_features=0, min_examples=2))
    port = free_port()
    cmd = browse_command([str(run)], port)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    env = {**os.environ, "SAEKIT_RUNS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, run
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_search_open_feature_and_see_highlighted_example(served):
    from playwright.sync_api import expect, sync_playwright

    url, run = served
    rec = Bundle(run).feature(3)
    token = rec["top"][0]["tokens"][rec["top"][0]["center"]]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser_feature.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            search = page.get_by_label("Search (token, text, label or promoted token; #id for a feature)")
            search.wait_for(timeout=60_000)
            search.fill(token)
            search.press("Enter")
            sort = page.get_by_role("combobox", name="Sort by")
            sort.click()
            page.get_by_role("option", name="density (low first)").click()
            button = page.get_by_role("button", name=f"#3 · {token}")
            button.wait_for(timeout=30_000)
            button.click()
            example = page.locator(".saekit-example").first
            example.wait_for(timeout=30_000)
            expect(example).to_contain_text(token)
            spans = example.locator("span.saekit-tok").evaluate_all(
                "els => els.map(e => [e.textContent, getComputedStyle(e).backgroundColor])")
            shaded = [text for text, bg in spans if bg.replace(" ", "") == "rgb(255,130,0)"]  # alpha 1
            assert shaded == [token], spans
            page.get_by_text("Open a feature").wait_for(state="detached")  # the list page's stale elements are gone
            page.wait_for_timeout(500)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.exists() and shot.stat().st_size > 10_000


def test_search_box_finds_a_feature_by_its_explanation(served):
    from playwright.sync_api import sync_playwright

    url, run = served
    table = Bundle(run).explanations
    named = table[(table["skipped"] == "") & table["explanation"].str.startswith('"')]
    counts = named["explanation"].value_counts()
    row = named[named["explanation"].map(counts) == 1].iloc[0]  # an explanation only one feature has
    f, text = int(row["feature"]), str(row["explanation"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            search = page.get_by_role("textbox", name="Search explanations")
            search.wait_for(timeout=60_000)
            search.fill(text)
            search.press("Enter")
            page.get_by_text("1 of ").wait_for(timeout=30_000)
            page.get_by_role("button", name=f"#{f} · ").first.wait_for(timeout=30_000)
        finally:
            browser.close()
