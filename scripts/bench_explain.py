"""Benchmark of `saekit explain`: ngram explanations (keyword-judge detection and fuzzing included) for
every latent of a run, in seconds, and its peak memory against the number of latents.

Prints ONE JSON line. Each measurement runs in a fresh subprocess so its peak RSS (VmHWM) is its own:
one explains a quarter of the latents, one all of them; memory that is flat in the number of latents
shows as a growth ratio near 1. Inside each subprocess, after the same warm-up (imports, bundle opened
and verified), the public API path (`saekit.run.explain.explain_run`) is interleaved with a reference
pass that only reads and parses the same feature records (the floor any record-based explainer pays).
Nothing is written into the run: outputs go to a temporary folder and the bundle is not touched.

    python scripts/bench_explain.py RUN [--fraction 0.25]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(run: str, n: int | None) -> dict:
    """Warm up, then reference parse / API explain / reference parse; seconds and peak RSS."""
    from saekit.analysis.explain.protocol import ExplainConfig
    from saekit.browser.bundle import Bundle, bundle_path
    from saekit.run.explain import explain_run

    bundle = Bundle(bundle_path(run))
    feats = list(range(n)) if n is not None and n < bundle.d_sae else None

    def reference() -> float:
        t0 = time.perf_counter()
        sum(1 for _ in bundle.iter_records(feats))
        return time.perf_counter() - t0

    ref = [reference()]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = explain_run(run, ExplainConfig(embedding_features=0), features=feats, out=out, attach=False)[0]
        api = time.perf_counter() - t0
    ref.append(reference())
    return {"latents": n or bundle.d_sae, "seconds": api, "reference_parse_seconds": min(ref),
            "peak_rss_mb": _vm("VmHWM") / 2**20, "explained": summary["explained"], "skipped": summary["skipped"],
            "detection": summary["scores"].get("detection", {}).get("mean"),
            "fuzzing": summary["scores"].get("fuzzing", {}).get("mean")}


def spawn(run: str, n: int | None) -> dict:
    cmd = [sys.executable, __file__, run, "--child", str(n if n is not None else -1)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="run folder with a browser bundle")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of latents of the smaller measurement")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.run, None if args.child < 0 else args.child)))
        return
    full = spawn(args.run, None)
    part = spawn(args.run, max(1, int(full["latents"] * args.fraction)))
    print(json.dumps({
        "bench": "explain_ngram", "run": Path(args.run).name, "latents": full["latents"],
        "seconds": round(full["seconds"], 2), "target_seconds": 60, "within_target": full["seconds"] <= 60,
        "reference_parse_seconds": round(full["reference_parse_seconds"], 2),
        "ratio_to_parse": round(full["seconds"] / max(full["reference_parse_seconds"], 1e-9), 2),
        "latents_per_second": round(full["latents"] / full["seconds"], 1),
        "peak_rss_mb": round(full["peak_rss_mb"], 1), "peak_rss_mb_at_fraction": round(part["peak_rss_mb"], 1),
        "fraction_latents": part["latents"], "rss_growth_ratio": round(full["peak_rss_mb"] / part["peak_rss_mb"], 3),
        "explained": full["explained"], "skipped": full["skipped"],
        "mean_detection": full["detection"], "mean_fuzzing": full["fuzzing"]}))


if __name__ == "__main__":
    main()
