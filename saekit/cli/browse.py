"""CLI logic of `saekit analyze RUN` (build the browser bundle) and `saekit browse RUN...` (open the app).

`saekit/cli/__init__.py` wires `add_*_arguments` / `cmd_*` in; printing happens only here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (with store/ and train/final_sae/)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="store rows encoded per chunk")
    parser.add_argument("--top-examples", type=int, default=None, help="top-activating examples per feature")
    parser.add_argument("--no-logit-lens", action="store_true", help="skip the logit lens (no model load)")
    parser.add_argument("--device", default=None, help="device for encoding (cpu, cuda)")
    parser.add_argument("--out", default=None, help="bundle folder (default RUN/bundle)")


def cmd_analyze(args: argparse.Namespace) -> int:
    from saekit.analysis.features import AnalyzeConfig
    from saekit.browser.build import build_bundle, read_bundle_manifest, run_analyze_config

    run = Path(args.run)
    fields = run_analyze_config(run).to_dict()
    overrides = {"chunk_rows": args.chunk_rows, "top_examples": args.top_examples, "device": args.device,
                 "logit_lens": False if args.no_logit_lens else None}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    cfg = AnalyzeConfig.from_dict(fields, where="analyze")
    out = build_bundle(run, cfg, out=args.out)
    m = read_bundle_manifest(out)
    print(f"bundle {out}: {m['d_sae']} features ({m['dead']} dead) over {m['n_rows']:,} rows in {m['build_seconds']:.1f} s")
    print(f"open it with: saekit browse {run}")
    return 0


def add_browse_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders with a bundle (LLM and embedding runs side by side)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Streamlit's, 8501)")
    parser.add_argument("--print-command", action="store_true", help="print the streamlit command instead of running it")


def browse_command(runs: list[str], port: int | None = None) -> list[str]:
    """The `streamlit run` command line, bound to 127.0.0.1 (never exposed beyond this machine)."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if port:
        cmd += ["--server.port", str(port)]
    return cmd + ["--", *[str(Path(r).resolve()) for r in runs]]


def cmd_browse(args: argparse.Namespace) -> int:
    if not APP.exists():
        print(f"error: the app is not next to this saekit install (expected {APP}); run from a source checkout",
              file=sys.stderr)
        return 2
    missing = [r for r in args.runs if not (Path(r) / "bundle").is_dir()]
    for r in missing:
        print(f"warning: {r} has no bundle yet; build it with `saekit analyze {r}`", file=sys.stderr)
    cmd = browse_command(args.runs, args.port)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    print(f"serving on http://127.0.0.1:{args.port or 8501}  (Ctrl-C to stop)")
    return subprocess.call(cmd, env={**os.environ})
