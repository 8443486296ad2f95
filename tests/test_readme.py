"""Every ```python block of README.md runs exactly as printed (issue 14), in a fresh interpreter
whose working directory holds a tiny `runs/quickstart-smollm2` (store + trained SAE) built from
the test-support fixtures, so the example's paths exist without the 5-minute quickstart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.runs import synthetic_llm_run

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 1 and all("saekit" in b for b in BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs_as_printed(i, tmp_path, one_thread):
    synthetic_llm_run(tmp_path / "runs" / "quickstart-smollm2", n_rows=3000, d_sae=64, k=4, d_in=32)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCKS[i]], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"README block {i} failed:\n{BLOCKS[i]}\n{proc.stderr[-3000:]}"
    if "runs/mine" in BLOCKS[i]:
        assert (tmp_path / "runs" / "mine" / "final_sae" / "sae_weights.safetensors").exists()
        assert (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().strip()
