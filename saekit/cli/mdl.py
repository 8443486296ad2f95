"""CLI logic of `saekit mdl-select CONFIG` (printing happens here)."""

from __future__ import annotations

from pathlib import Path

from saekit.config import read_yaml_mapping
from saekit.run.mdl_select import MDLSelectConfig, format_table, run_mdl_select


def add_mdl_select_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config (see configs/mdl_select_synthetic.yaml)")
    parser.add_argument("--output-dir", default=None, help="override the config's output_dir")
    parser.add_argument("--fvu-budget", type=float, default=None, help="override the config's fvu_budget")


def cmd_mdl_select(args) -> int:
    data = read_yaml_mapping(args.config, "an mdl-select config (see configs/mdl_select_synthetic.yaml)")
    if args.output_dir is not None:
        data["output_dir"] = args.output_dir
    if args.fvu_budget is not None:
        data["fvu_budget"] = args.fvu_budget
    result = run_mdl_select(MDLSelectConfig.from_dict(data, where=str(args.config)))
    print(format_table(result))
    print(f"wrote {Path(result['config']['output_dir']) / 'results.json'}")
    return 0 if result["mdl_choice"] is not None else 1


def register(sub) -> None:
    p = sub.add_parser("mdl-select", help="train/take a grid of SAEs and pick the minimum-description-length one")
    add_mdl_select_arguments(p)
    p.set_defaults(fn=cmd_mdl_select)
