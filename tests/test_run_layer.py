"""The run layer and the run-folder layout: one owner for "where is the store / SAE / bundle".

Two bugs this layer fixes are pinned here end to end on a tiny GPT-2 (no hub, seconds):
* a run whose config sets `store.path` caches and trains, and then analyze, probe, steer and the
  browser must find that store (they used to open RUN/store);
* a multi-SAE run (train/<name>/final_sae) is analyzed, probed and listed by the browser per SAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from saekit.browser.bundle import Bundle
from support.runs import synthetic_docs, tiny_lm
from saekit.cli import main
from saekit.errors import ConfigError
from saekit.layout import RunFolder
from saekit.run.config import MultiConfig, RunConfig, load_run_config

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
TRAIN = {"total_steps": 6, "batch_size": 32, "log_every": 3, "checkpoint_every": 0, "progress_bar": False}
ANALYZE = {"chunk_rows": 256, "logit_lens": False}


def _corpus(tmp_path: Path) -> dict:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d["text"], "sentiment": d["labels"]["sentiment"]}) + "\n"
                            for d in synthetic_docs(80, seed=1, min_words=6)))
    return {"name": str(path), "label_fields": ["sentiment"], "min_chars": 1}


def _source(tmp_path: Path, hooks: list[str]) -> dict:
    return {"kind": "hf", "model": str(tiny_lm(tmp_path / "tiny_lm")), "hooks": hooks, "max_length": 16,
            "batch_size": 16}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- RunFolder ------------------------------------------------------------------------------------
def test_run_folder_answers_every_part_of_a_single_run(tmp_path):
    f = RunFolder(tmp_path / "r")
    assert f.store == tmp_path / "r" / "store" and f.train() == tmp_path / "r" / "train"
    assert f.final_sae() == tmp_path / "r" / "train" / "final_sae"
    assert (f.eval, f.probe, f.steer, f.bundle) == tuple(tmp_path / "r" / p for p in ("eval", "probe", "steer", "bundle"))
    assert f.explanations == tmp_path / "r" / "explanations" and f.config == tmp_path / "r" / "config.yaml"
    (f.final_sae()).mkdir(parents=True)
    assert f.sae_names() == [] and f.per_sae() == [f] and f.require_one_sae() is f


def test_run_folder_reads_store_path_from_the_resolved_config(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    _write(root / "config.yaml", {"name": "r", "store": {"path": str(tmp_path / "elsewhere")}})
    assert RunFolder(root).store == tmp_path / "elsewhere"
    assert RunFolder(root, store_path=tmp_path / "given").store == tmp_path / "given"  # the caller's config wins
    cfg = RunConfig.from_dict({"output_dir": str(root)})
    assert cfg.store_dir == root / "store"  # a config without store.path ignores an older config.yaml


def test_run_folder_of_a_multi_run_is_scoped_per_sae(tmp_path):
    root = tmp_path / "m"
    for name in ("b", "a"):
        (root / "train" / name / "final_sae").mkdir(parents=True)
    f = RunFolder(root)
    assert f.sae_names() == ["a", "b"] and f.is_multi
    a = f.for_sae("a")
    assert a.final_sae() == root / "train" / "a" / "final_sae"
    assert (a.bundle, a.eval, a.probe) == (root / "bundle" / "a", root / "eval" / "a", root / "probe" / "a")
    assert a.label == "m/a" and [x.sae for x in f.per_sae()] == ["a", "b"]
    with pytest.raises(ConfigError, match="expected one of the run's SAEs"):
        f.for_sae("c")
    with pytest.raises(ConfigError, match="multi-SAE run"):
        f.require_one_sae()


def test_load_run_config_returns_the_kind_the_file_describes(tmp_path):
    single = _write(tmp_path / "s.yaml", {"name": "s", "sae": {"architecture": "topk", "d_sae": 8, "k": 2}})
    multi = _write(tmp_path / "m.yaml", {"name": "m", "saes": [{"name": "a", "sae": {"architecture": "topk", "d_sae": 8, "k": 2}}]})
    assert type(load_run_config(single)) is RunConfig and type(load_run_config(multi)) is MultiConfig
    with pytest.raises(ConfigError, match="unknown key 'saez'"):
        load_run_config(_write(tmp_path / "bad.yaml", {"saez": []}))


# -- the two bugs ---------------------------------------------------------------------------------
def _dashboard_common(monkeypatch, roots: list[Path]):
    monkeypatch.syspath_prepend(str(DASHBOARDS))
    monkeypatch.setenv("SAEKIT_RUNS", ":".join(str(r) for r in roots))
    from views import common, reports

    return common, reports


def test_run_with_store_path_is_analyzed_probed_steered_and_browsed(tmp_path, one_thread, monkeypatch, capsys):
    run, store = tmp_path / "run", tmp_path / "shared_store"
    config = _write(tmp_path / "cfg.yaml", {
        "name": "sp", "output_dir": str(run), "corpus": _corpus(tmp_path), "source": _source(tmp_path, ["transformer.h.1"]),
        "store": {"path": str(store), "docs_per_shard": 32}, "sae": {"architecture": "topk", "d_sae": 24, "k": 3},
        "train": TRAIN, "eval": {"holdout": 0.2}, "analyze": ANALYZE})
    assert main(["cache", str(config)]) == 0 and main(["train", str(config)]) == 0
    assert not (run / "store").exists() and store.is_dir()
    assert main(["analyze", str(run)]) == 0
    assert Bundle(run / "bundle").manifest["n_rows"] > 0
    assert main(["probe", str(run), "--label", "sentiment", "--ks", "1,2", "--max-rows", "400"]) == 0
    assert json.loads((run / "probe" / "report.json").read_text())["label"] == "sentiment"
    assert main(["steer", str(run), "--prompt", "the cat", "--feature", "1", "--alpha", "2", "--greedy",
                 "--max-new-tokens", "3"]) == 0
    assert len(list((run / "steer").glob("steer-*.json"))) == 1
    common, reports = _dashboard_common(monkeypatch, [run])
    (folder,) = common.run_folders()
    assert folder.store == store and common.load_bundle(folder).d_sae == 24


def test_multi_sae_run_is_analyzed_probed_and_browsed_per_sae(tmp_path, one_thread, monkeypatch):
    from saekit.run.multi import train_multi

    run = tmp_path / "multi"
    cfg = MultiConfig.from_dict({
        "name": "multi", "output_dir": str(run), "corpus": _corpus(tmp_path),
        "source": _source(tmp_path, ["transformer.h.0", "transformer.h.1"]), "store": {"docs_per_shard": 32},
        "train": TRAIN, "analyze": ANALYZE,
        "saes": [{"name": "early", "hook": "transformer.h.0", "sae": {"architecture": "topk", "d_sae": 16, "k": 2}},
                 {"name": "late", "hook": "transformer.h.1", "sae": {"architecture": "topk", "d_sae": 24, "k": 3}}]})
    train_multi(cfg)
    assert RunFolder(run).sae_names() == ["early", "late"]
    assert main(["analyze", str(run)]) == 0
    hooks = {n: Bundle(run / "bundle" / n).manifest for n in ("early", "late")}
    assert {n: (m["d_sae"], m["hook"]) for n, m in hooks.items()} == \
        {"early": (16, "transformer.h.0"), "late": (24, "transformer.h.1")}
    assert main(["probe", str(run), "--label", "sentiment", "--ks", "1", "--max-rows", "400"]) == 0
    assert all((run / "probe" / n / "report.json").exists() for n in ("early", "late"))
    common, reports = _dashboard_common(monkeypatch, [run])
    labels = common.run_labels(common.run_folders())
    assert list(labels) == ["multi/early", "multi/late"]
    assert common.load_bundle(labels["multi/late"]).d_sae == 24
    assert reports.probe_files(labels["multi/early"]) == [run / "probe" / "early" / "report.json"]


def test_cli_import_errors_are_errors_not_missing_commands(monkeypatch):
    """Every stage module registers its sub-commands; a broken one fails the parser instead of vanishing."""
    from saekit import cli

    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"cache", "train", "eval", "analyze", "browse", "probe", "steer", "mdl-select", "run"} <= names

    class Broken:
        @staticmethod
        def register(sub):
            raise ImportError("a broken stage module")

    monkeypatch.setattr(cli, "MODULES", (*cli.MODULES, Broken))
    with pytest.raises(ImportError, match="broken stage"):
        cli.build_parser()
