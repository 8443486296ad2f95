"""Run folders for SAEs you already have (issue 15): a run config with `sae: {from: PATH}` skips training,
puts the SAE into the run's final SAE place in saekit format (its foreign metadata kept), and goes through
eval -> probe -> analyze, so the browser lists a SAELens JumpReLU SAE and a dictionary_learning BatchTopK SAE
next to a saekit run. All three share one tiny store (d_in 16, written by the store writer) through
`store.path`; the foreign runs go through `saekit run`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from streamlit.testing.v1 import AppTest

import saekit
from saekit.cli import main
from saekit.errors import ConfigError, ModelMismatchError
from saekit.layout import RunFolder
from saekit.run.config import load_run_config
from saekit.run.stages import analyze_stage, eval_stage, run_all, save_resolved, train_run
from saekit.sae.formats import detect
from support.interop import DL_BATCHTOPK, FIXTURES, HOOK, SAELENS_JUMPRELU, fitted_store, fitted_vectors

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")
ORIGINS = {"saelens_jumprelu": (SAELENS_JUMPRELU, "saelens", "saelens_jumprelu"),
           "dl_batchtopk": (DL_BATCHTOPK, "dictionary_learning", "dictionary_learning_batchtopk")}


def run_config(root: Path, name: str, store: Path, sae: dict, **extra) -> Path:
    """A run config YAML over the shared store (its model is the tiny GPT-2 folder next to it)."""
    data = {"name": name, "output_dir": str(root / "runs" / name),
            "source": {"kind": "hf", "model": str(store.parent / "toy-model"), "hooks": [HOOK]},
            "store": {"path": str(store)}, "sae": sae,
            "eval": {"splice_docs": 0, "description_length": False},
            "probe": {"label": "sentiment", "ks": [1, 2], "max_rows": 200},
            "analyze": {"top_examples": 4, "context": 3}, **extra}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two foreign runs through `saekit run`, and a saekit run trained on the same store."""
    root = tmp_path_factory.mktemp("foreign")
    vectors = fitted_vectors([saekit.load_sae(SAELENS_JUMPRELU), saekit.load_sae(DL_BATCHTOPK)])
    store = fitted_store(root / "data", vectors)
    configs = [run_config(root, name, store, {"from": str(src)}) for name, (src, _, _) in ORIGINS.items()]
    assert main(["run", *map(str, configs)]) == 0
    ours = load_run_config(run_config(root, "saekit_topk", store, {"architecture": "topk", "d_sae": 32, "k": 4},
                                      train={"total_steps": 60, "batch_size": 128, "progress_bar": False}))
    save_resolved(ours)
    train_run(ours)
    eval_stage(ours)
    analyze_stage(ours)
    return {"root": root, "store": store, **{n: root / "runs" / n for n in [*ORIGINS, "saekit_topk"]}}


@pytest.mark.parametrize("name", list(ORIGINS))
def test_imported_sae_is_saekit_format_with_its_metadata(runs, name):
    src, fmt, reference = ORIGINS[name]
    final = RunFolder(runs[name]).final_sae()
    assert detect(final) == "saekit"
    meta = json.loads((final / "metadata.json").read_text())
    assert meta["format"] == fmt and meta["source"].startswith(str(src.resolve()))  # the folder, or its ae.pt
    sae = saekit.load_sae(runs[name] / "train")
    assert sae.metadata.format == fmt and sae.metadata.extra == saekit.load_sae(src).metadata.extra
    ref = load_file(FIXTURES / "reference" / f"{reference}.safetensors")  # the peer's own outputs
    with torch.no_grad():
        torch.testing.assert_close(sae.eval()(ref["x"]).recon, ref["recon"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(ORIGINS))
def test_foreign_run_went_through_eval_probe_analyze(runs, name):
    folder = RunFolder(runs[name])
    report = json.loads((folder.eval / "report.json").read_text())
    assert report["preflight"]["fvu"] < 1 and report["preflight"]["hook_match"].startswith("same activation")
    assert report["reconstruction"]["fvu"] < 1 and report["sae"]["d_in"] == 16
    probe = json.loads((folder.probe / "report.json").read_text())
    assert probe["label"] == "sentiment" and probe["preflight"]["forced"] == []
    manifest = json.loads((folder.bundle / "saekit_manifest.json").read_text())
    assert manifest["sae"]["origin"] == ORIGINS[name][1] and manifest["preflight"]["fvu"] < 1
    assert manifest["d_sae"] == 32 and manifest["has_token_text"]


def test_the_browser_lists_foreign_runs_next_to_a_saekit_run(runs, monkeypatch):
    names = ["saelens_jumprelu", "dl_batchtopk", "saekit_topk"]
    monkeypatch.setenv("SAEKIT_RUNS", ":".join(str(runs[n]) for n in names))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and list(at.selectbox(key="run").options) == names
    for name in names:
        at.selectbox(key="run").set_value(name).run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        captions = " ".join(c.value for c in at.sidebar.caption)
        origin = ORIGINS[name][1] if name in ORIGINS else None
        assert (f"from {origin} files" in captions) if origin else ("from " not in captions)
        assert any(b.key and b.key.startswith("open_") for b in at.button)  # the feature list shows features


def test_from_config_takes_only_its_own_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"only keys.*\['architecture'\]"):
        load_run_config(run_config(tmp_path, "x", tmp_path / "store", {"from": "a", "architecture": "topk"}))
    with pytest.raises(ConfigError, match="sae.force: expected bool"):
        load_run_config(run_config(tmp_path, "y", tmp_path / "store", {"from": "a", "force": "yes"}))
    cfg = load_run_config(run_config(tmp_path, "z", tmp_path / "store", {"from": "a", "force": True}))
    assert cfg.imports_sae and not cfg.train
    with pytest.raises(ConfigError, match="nothing to train"):
        train_run(cfg)


def test_wrong_model_refused_before_import_then_forced(runs, tmp_path):
    """The shared store's model folder renamed: the SAE's 'toy-model' no longer matches; `force: true` (the
    run-config form of --force) accepts the alias and every report records it."""
    other = tmp_path / "data"
    vectors = fitted_vectors([saekit.load_sae(DL_BATCHTOPK)])
    store = fitted_store(other, vectors, model="toy-model-renamed")
    (other / "toy-model").symlink_to(other / "toy-model-renamed")  # run_config's source.model
    cfg = load_run_config(run_config(tmp_path, "alias", store, {"from": str(DL_BATCHTOPK)}))
    with pytest.raises(ModelMismatchError, match="toy-model-renamed"):
        run_all(cfg)
    assert not cfg.folder.final_sae().exists()
    cfg = load_run_config(run_config(tmp_path, "alias", store, {"from": str(DL_BATCHTOPK), "force": True}))
    result = run_all(cfg)
    assert "toy-model-renamed" in result["report"]["preflight"]["forced"][0]
    assert json.loads((cfg.folder.probe / "report.json").read_text())["preflight"]["forced"]
    assert json.loads((cfg.folder.bundle / "saekit_manifest.json").read_text())["preflight"]["forced"]


def test_a_from_run_without_a_store_caches_it_then_refuses_other_inputs(tmp_path, capsys):
    """No store yet: `saekit run` caches one with the config's model (a random tiny GPT-2 named like the
    fixture's model, at the fixture's hook), then the preflight finds the SAE reconstructs those activations
    far worse than their mean and refuses before anything is written into train/."""
    from support.runs import tiny_lm

    model = tiny_lm(tmp_path / "toy-model", d_model=16)
    data = {"name": "uncached", "output_dir": str(tmp_path / "run"), "corpus": {"max_docs": 30},
            "source": {"kind": "hf", "model": str(model), "hooks": [HOOK], "max_length": 32},
            "sae": {"from": str(DL_BATCHTOPK)}, "eval": {"splice_docs": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    assert "InputMismatchError" in capsys.readouterr().err
    folder = RunFolder(tmp_path / "run")
    assert saekit.ActivationStore(folder.store).complete
    assert folder.config.exists() and not folder.train().exists()
