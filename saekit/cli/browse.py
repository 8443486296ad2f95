"""CLI logic of `saekit analyze RUN` (build the browser bundle) and `saekit browse RUN...` (open the app).

`register` adds both sub-commands; printing happens only here. Which SAEs a run holds and where
their bundles go is `saekit.layout.RunFolder`'s answer; building them is `saekit.run.stages.analyze_run`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from saekit.errors import MissingArtifactError
from saekit.layout import RunFolder

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (its store and trained SAE; every SAE of a multi-SAE run)")
    parser.add_argument("--sae", default=None, help="only this SAE of a multi-SAE run")
    parser.add_argument("--chunk-rows", type=int, default=None, help="store rows encoded per chunk")
    parser.add_argument("--top-examples", type=int, default=None, help="top-activating examples per feature")
    parser.add_argument("--no-logit-lens", action="store_true", help="skip the logit lens (no model load)")
    parser.add_argument("--device", default=None, help="device for encoding (cpu, cuda)")
    parser.add_argument("--out", default=None, help="bundle folder (default: the run's bundle folder)")
    parser.add_argument("--force", action="store_true",
                        help="run even when the SAE's model name differs from the store's (an alias); recorded")


def cmd_analyze(args: argparse.Namespace) -> int:
    from saekit.analysis.features import AnalyzeConfig
    from saekit.browser.build import read_bundle_manifest
    from saekit.eval.preflight import format_preflight
    from saekit.run.stages import analyze_config_for, analyze_run

    folder = RunFolder(Path(args.run))
    folder = folder.for_sae(args.sae) if getattr(args, "sae", None) else folder
    fields = analyze_config_for(folder).to_dict()
    overrides = {"chunk_rows": args.chunk_rows, "top_examples": args.top_examples, "device": args.device,
                 "logit_lens": False if args.no_logit_lens else None}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    for out in analyze_run(folder, AnalyzeConfig.from_dict(fields, where="analyze"), out=args.out, force=args.force):
        m = read_bundle_manifest(out)
        print(format_preflight(m["preflight"]))
        print(f"bundle {out}: {m['d_sae']} features ({m['dead']} dead) over {m['n_rows']:,} rows "
              f"in {m['build_seconds']:.1f} s")
    print(f"open it with: saekit browse {args.run}")
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


def require_bundles(run: str) -> None:
    """Each SAE of the run has its bundle; else a named error that names `saekit analyze RUN`."""
    for folder in RunFolder(Path(run)).require_run().per_sae():
        if not folder.bundle.is_dir():
            raise MissingArtifactError(f"{run}: expected a feature-browser bundle at {folder.bundle}, found none",
                                       fix=f"saekit analyze {run}")


def cmd_browse(args: argparse.Namespace) -> int:
    if not APP.exists():
        raise MissingArtifactError(f"expected the feature-browser app at {APP}, found none (saekit browse runs "
                                   "from a source checkout)")
    for run in args.runs:
        require_bundles(run)
    cmd = browse_command(args.runs, args.port)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    print(f"serving on http://127.0.0.1:{args.port or 8501}  (Ctrl-C to stop)")
    return subprocess.call(cmd, env={**os.environ})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="build the feature-browser bundle of a run (one per SAE)")
    add_analyze_arguments(p)
    p.set_defaults(fn=cmd_analyze)
    p = sub.add_parser("browse", help="open the Streamlit feature browser on runs (127.0.0.1)")
    add_browse_arguments(p)
    p.set_defaults(fn=cmd_browse)
