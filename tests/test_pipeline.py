"""The main job end to end on the embedded defaults, at toy sizes."""

import json
import subprocess
import sys

import pytest
import yaml

from saekit.run.config import RunConfig
from saekit.run.stages import run_all
from saekit.sae.registry import load_sae

pytestmark = pytest.mark.slow


def _cfg(tmp_path, kind: str) -> RunConfig:
    source = {"kind": "embedding", "batch_size": 64} if kind == "embedding" else \
        {"kind": "hf", "hooks": ["model.layers.6"], "max_length": 32, "batch_size": 16}
    return RunConfig.from_dict({
        "name": f"tiny-{kind}", "output_dir": str(tmp_path / kind),
        "corpus": {"max_docs": 240 if kind == "embedding" else 60},
        "source": source, "store": {"docs_per_shard": 64},
        "sae": {"architecture": "topk", "d_sae": 256, "k": 8},
        "train": {"total_steps": 40, "batch_size": 64, "log_every": 10, "checkpoint_every": 20,
                  "normalize_activations": "expected_average_only_in", "progress_bar": False},
        "eval": {"holdout": 0.2, "splice_docs": 6, "retrieval_rows": 40},
        "probe": {"label": "sentiment", "ks": [1, 2], "max_rows": 2000} if kind == "embedding" else {},
    })


def sae_width(cfg) -> int:
    return int(cfg.sae["d_sae"])


def test_embedding_run_end_to_end(tmp_path, capsys):
    cfg = _cfg(tmp_path, "embedding")
    result = run_all(cfg)
    report = json.loads((cfg.run_dir / "eval" / "report.json").read_text())  # strict JSON
    assert report["n_rows"] == report["run"]["heldout_rows"] > 0
    assert 0 < report["reconstruction"]["fvu"] < 1
    assert report["sparsity"]["l0_mean"] <= 8
    rt = report["retrieval"]
    assert rt["n_docs"] == 40 and rt["k"] == 10
    assert rt["k"] / (rt["n_docs"] - 1) < rt["recall_at_k"] <= 1  # better than random neighbours
    assert (cfg.run_dir / "bundle").is_dir() and result["bundle"]
    lines = (cfg.run_dir / "explanations" / "explanations.jsonl").read_text().splitlines()  # the explain stage
    assert len(lines) == sae_width(cfg) and result["explanations"][0]["explained"] > 0
    probe = json.loads((cfg.run_dir / "probe" / "report.json").read_text())
    assert probe["label"] == "sentiment" and set(probe["train_doc_ids"]).isdisjoint(probe["test_doc_ids"])
    sae = load_sae(cfg.run_dir / "train")
    assert sae.cfg.hook_name == "sentence_embedding" and sae.cfg.model_name.endswith("all-MiniLM-L6-v2")
    # the eval and compare stages from the CLI: a table on the terminal, strict JSON and figures on disk
    from saekit.cli import main

    assert main(["eval", str(cfg.run_dir)]) == 0
    assert main(["eval", str(cfg.run_dir / "train" / "final_sae"), "--store", str(cfg.run_dir / "store"),
                 "--out", str(tmp_path / "bare_eval")]) == 0
    assert json.loads((tmp_path / "bare_eval" / "report.json").read_text())["n_rows"] == 240
    assert main(["compare", str(cfg.run_dir), str(tmp_path / "bare_eval"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and "recall@10" in out
    assert any(p.suffix == ".png" for p in (cfg.run_dir / "eval").iterdir())
    # running again resumes everything and changes nothing
    again = run_all(cfg)
    assert again["report"]["reconstruction"]["fvu"] == pytest.approx(result["report"]["reconstruction"]["fvu"])


def test_llm_run_reports_loss_recovered(tmp_path):
    cfg = _cfg(tmp_path, "hf")
    result = run_all(cfg)
    splice = result["report"]["downstream"]["splice_in"]
    assert splice["ce_zero_ablation"] > splice["ce_spliced"] >= splice["ce_clean"] - 1e-3
    assert splice["loss_recovered"] is not None and splice["loss_recovered"] > 0


def test_cli_names_bad_config_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "sae": {"architecture": "topk"}, "trian": {}}))
    proc = subprocess.run([sys.executable, "-m", "saekit", "cache", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'trian'" in proc.stderr and "'train'" in proc.stderr
