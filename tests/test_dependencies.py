"""The core install is enough to import the library: every optional extra (lm, lens, embeddings, data,
analysis, app) is imported lazily by the one function that needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXTRAS = ("transformers", "transformer_lens", "sentence_transformers", "datasets", "gguf", "sklearn",
          "matplotlib", "pandas", "streamlit", "pyarrow", "einops", "tokenizers", "huggingface_hub", "triton")

SCRIPT = """
import importlib, pkgutil, sys
BLOCK = set(sys.argv[1].split(","))
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"blocked optional extra: {name}")
sys.meta_path.insert(0, Blocker())
import saekit
for m in pkgutil.walk_packages(saekit.__path__, "saekit."):
    if m.name != "saekit.__main__":
        try:
            importlib.import_module(m.name)
        except Exception as e:
            print(m.name, repr(e))
"""


def test_every_module_imports_without_the_optional_extras():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(EXTRAS)], capture_output=True, text=True,
                         cwd=root, env={"PYTHONPATH": str(root), "PATH": ""}, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_a_blocked_extra_really_is_blocked():
    """The check above would pass vacuously if the blocker did nothing."""
    code = SCRIPT.split("import saekit")[0] + "import pandas\n"
    out = subprocess.run([sys.executable, "-c", code, "pandas"], capture_output=True, text=True)
    assert out.returncode != 0 and "blocked optional extra: pandas" in out.stderr
