"""Write every loadable interop fixture back out as a SAELens folder with saekit (saekit's venv).

    python scripts/interop_roundtrip.py tests/fixtures/interop OUT

makes OUT/<fixture>/sae (saekit's `save_sae(..., format="saelens")`) and OUT/<fixture>/reference.safetensors
(the peer's outputs). scripts/make_interop_fixtures.py check-roundtrip then loads each with SAELens, in the
throwaway venv, and records the comparison in tests/fixtures/interop/saelens_roundtrip.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import saekit
from saekit.sae.formats import save_sae


def main(fixtures: Path, out: Path) -> None:
    index = json.loads((fixtures / "index.json").read_text())
    for name, entry in sorted(index["fixtures"].items()):
        if entry["refused_key"]:
            continue
        sae = saekit.load_sae(fixtures / entry["path"])
        save_sae(sae, out / name / "sae", format="saelens")
        shutil.copy(fixtures / "reference" / f"{name}.safetensors", out / name / "reference.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
