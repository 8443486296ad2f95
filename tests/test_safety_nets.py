"""The checks that guard the other checks (issue 14): ruff runs, CI cannot pass without a real
browser, `make test` shows why tests were skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    """Includes the banned-api rule (pickle, torch.load) of docs/RELIABILITY.md 12 over every code folder."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "saekit", "tests", "scripts", "dashboards"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _browser_test(tmp_path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SAEKIT_REQUIRE_BROWSER")}
    env.update(SAEKIT_CHROMIUM=str(tmp_path / "no-chromium"), **env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_browser_e2e.py"], capture_output=True, text=True, cwd=ROOT, env=env)


def test_browser_test_skips_locally_but_fails_where_required(tmp_path):
    local = _browser_test(tmp_path)
    assert local.returncode == 0 and "SKIPPED" in local.stdout and "no-chromium is missing" in local.stdout, local.stdout
    for env in ({"SAEKIT_REQUIRE_BROWSER": "1"}, {"CI": "true"}):
        required = _browser_test(tmp_path, **env)
        assert required.returncode == 1, (env, required.stdout[-2000:])
        assert "the real-browser test is required here" in required.stdout and "SKIPPED" not in required.stdout


def test_ci_stops_when_chromium_cannot_be_installed(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-get").write_text("#!/bin/sh\necho 'E: no network' >&2\nexit 100\n")
    (fake / "make").write_text(f"#!/bin/sh\ntouch {tmp_path / 'make-ran'}\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SAEKIT_CHROMIUM": str(tmp_path / "none")}
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "could not install chromium" in proc.stderr, proc.stderr
    assert not (tmp_path / "make-ran").exists()
    # with a browser present, CI requires the browser test and runs make test
    (tmp_path / "chromium").write_text("#!/bin/sh\n")
    (tmp_path / "chromium").chmod(0o755)
    (fake / "make").write_text(f"#!/bin/sh\necho \"$SAEKIT_REQUIRE_BROWSER $*\" > {tmp_path / 'make-ran'}\n")
    env["SAEKIT_CHROMIUM"] = str(tmp_path / "chromium")
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "make-ran").read_text().split() == ["1", "test"]


def test_make_test_reports_skip_reasons():
    lines = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if "-m pytest" in ln]
    assert len(lines) >= 2 and all(" -rs" in ln for ln in lines), lines
