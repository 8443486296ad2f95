"""Benchmark of the browser bundle: build time per 100k store rows, peak memory, and the median time
to assemble one feature page's data from the bundle (target < 200 ms for a 200k-row store).

Prints ONE JSON line. Builds run in fresh subprocesses so each peak RSS (VmHWM) is its own; the
reference is a 50k-row store built the same way, so memory growth with store size shows as a ratio.

    python scripts/bench_browser.py [--rows 200000] [--ref-rows 50000] [--d-sae 512] [--k 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_build(run: str, chunk_rows: int) -> dict:
    """Build the run's bundle in this process; report time and peak RSS above the pre-build RSS."""
    from saekit.analysis.features import AnalyzeConfig
    from saekit.browser.build import build_bundle

    base = _vm("VmRSS")
    t0 = time.perf_counter()
    build_bundle(run, AnalyzeConfig(chunk_rows=chunk_rows))
    return {"seconds": time.perf_counter() - t0, "peak_growth_mb": (_vm("VmHWM") - base) / 2**20}


def build_in_subprocess(run: Path, chunk_rows: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_browser as b; "
            f"print(json.dumps(b.measure_build({str(run)!r}, {chunk_rows})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def page_times(bundle_dir: Path, n: int = 200) -> list[float]:
    """Seconds to open one feature's data (record + its list row), over `n` features spread over d_sae."""
    from saekit.browser.bundle import Bundle

    b = Bundle(bundle_dir)
    _ = b.table  # the list table is loaded once per app process
    step = max(1, b.d_sae // n)
    times = []
    for f in range(0, b.d_sae, step)[:n]:
        t0 = time.perf_counter()
        rec = b.feature(f)
        _ = b.table.iloc[f]
        assert rec["feature"] == f
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--ref-rows", type=int, default=50_000)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--chunk-rows", type=int, default=8192)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))  # the synthetic run builder is test support, not library code
    from tests.support.runs import synthetic_llm_run
    from saekit.layout import RunFolder

    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for name, rows in (("ref", args.ref_rows), ("main", args.rows)):
            run = synthetic_llm_run(Path(tmp) / name, rows, d_sae=args.d_sae, k=args.k)
            res[name] = {"rows": rows, **build_in_subprocess(run, args.chunk_rows)}
        bundle = RunFolder(Path(tmp) / "main").bundle
        times = page_times(bundle)
        bundle_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20
    out = {
        "bench": "browser_bundle", "rows": args.rows, "d_sae": args.d_sae, "k": args.k,
        "build_s_per_100k_rows": round(res["main"]["seconds"] / args.rows * 1e5, 3),
        "build_s": round(res["main"]["seconds"], 2), "build_s_ref": round(res["ref"]["seconds"], 2),
        "peak_growth_mb": round(res["main"]["peak_growth_mb"], 1),
        "peak_growth_mb_ref": round(res["ref"]["peak_growth_mb"], 1),
        "peak_ratio_vs_ref": round(res["main"]["peak_growth_mb"] / max(res["ref"]["peak_growth_mb"], 1e-9), 3),
        "rows_ratio_vs_ref": round(args.rows / args.ref_rows, 3),
        "page_ms_median": round(statistics.median(times) * 1e3, 3),
        "page_ms_p95": round(sorted(times)[int(0.95 * (len(times) - 1))] * 1e3, 3),
        "page_target_ms": 200, "bundle_mb": round(bundle_mb, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
