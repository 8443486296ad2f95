"""MDL model selection on planted synthetic data (issue 5; Ayonrinde et al. 2024): prints the table, then one JSON line.

Trains the grid of configs/mdl_select_synthetic.yaml (top-k SAEs, BatchTopK so every width has the
same L0) on rows drawn from a known dictionary of 64 features, measures each SAE's description
length and error on held-out rows, and compares the MDL choice (shortest DL within the FVU budget)
with selection by reconstruction at fixed L0 (lowest FVU at each k).

    python scripts/mdl_demo.py [--config configs/mdl_select_synthetic.yaml] [--output-dir DIR] [--fvu-budget B]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from saekit.run.mdl_select import MDLSelectConfig, format_table, run_mdl_select

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mdl_select_synthetic.yaml"))
    ap.add_argument("--output-dir", default=None, help="default: a temporary folder")
    ap.add_argument("--fvu-budget", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small SAEs: 1 is fastest on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = yaml.safe_load(Path(args.config).read_text())
    if args.fvu_budget is not None:
        data["fvu_budget"] = args.fvu_budget
    with tempfile.TemporaryDirectory() as tmp:
        data["output_dir"] = args.output_dir or tmp
        t0 = time.perf_counter()
        result = run_mdl_select(MDLSelectConfig.from_dict(data))
        seconds = time.perf_counter() - t0
    print(format_table(result))
    best = result["mdl_choice"]
    recon = {k: r["width"] for k, r in result["reconstruction_choice_by_k"].items()}
    print(json.dumps({
        "true_width": result["data"].get("true_width"),
        "true_l0": round(result["data"].get("true_l0_heldout", float("nan")), 3),
        "fvu_budget": result["fvu_budget"],
        "mdl_width": best["width"] if best else None, "mdl_k": best["k"] if best else None,
        "mdl_dl_bits": round(best["dl_bits"], 3) if best else None,
        "recon_width_by_k": recon,
        "budget_sweep": {str(b["fvu_budget"]): b["width"] for b in result["budget_sweep"]},
        "n_saes": len(result["rows"]), "seconds": round(seconds, 1),
    }))


if __name__ == "__main__":
    main()
