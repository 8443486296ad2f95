"""The preflight (issue 15): an SAE meeting a store it was not made for is refused with a named error naming
both sides — wrong model, wrong hook, wrong d_in, inputs it reconstructs worse than their mean — while the
same activation under another tool's hook name, a model-name alias under `force`, and missing metadata pass.

The SAEs are the peer-made fixtures (tests/fixtures/interop); the stores are written by the store writer
(tests/support/interop.py: token vectors fitted so the fixtures read them well, FVU < 1)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import saekit
from saekit.cli import main
from saekit.errors import (DInMismatchError, HookMismatchError, InputMismatchError, ModelMismatchError,
                           PreflightError, ShapeMismatchError)
from saekit.eval.preflight import check_model_hook, preflight, same_model
from saekit.sources.hooks import hook_site
from saekit.store.locate import store_for_hook
from saekit.store.writer import StoreConfig, cache_activations
from support.interop import DL_BATCHTOPK, GEMMASCOPE, SAELENS_JUMPRELU, ScaledSource, fitted_store, fitted_vectors
from support.runs import llm_spec, synthetic_docs, synthetic_llm_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saes():
    return {"jumprelu": saekit.load_sae(SAELENS_JUMPRELU), "batchtopk": saekit.load_sae(DL_BATCHTOPK)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, saes):
    """The matching store, and one store per thing that can be wrong."""
    root = tmp_path_factory.mktemp("preflight")
    fit = fitted_vectors(list(saes.values()))
    paths = {"ok": fitted_store(root / "ok", fit),
             "model": fitted_store(root / "model", fit, model="other-model"),
             "hook": fitted_store(root / "hook", fit, hook="transformer.h.0"),
             "d_in": fitted_store(root / "d_in", fitted_vectors([], d_in=8)),
             "scale": fitted_store(root / "scale", fit, scale=0.05)}
    return {k: store_for_hook(p, None) for k, p in paths.items()}


def test_hook_site_reads_every_convention():
    assert hook_site("blocks.1.hook_resid_post") == (1, "resid_post")  # TransformerLens / SAELens
    assert hook_site("resid_post_layer_1") == (1, "resid_post")  # dictionary_learning
    assert hook_site("transformer.h.1") == (1, "resid_post")  # HF module path: a layer's output
    assert hook_site("model.layers.12") == (12, "resid_post")
    assert hook_site("layers.3") == (3, "resid_post")  # sparsify hookpoint
    assert hook_site("model.layers.3.mlp") == (3, "mlp_out")
    assert hook_site("blocks.2.hook_mlp_out") == (2, "mlp_out")
    assert hook_site("blocks.2.hook_resid_pre") == (2, "resid_pre") != hook_site("blocks.2.hook_resid_post")
    assert hook_site("embeddings") is None and hook_site("model.norm") is None


def test_a_cache_root_of_several_hooks_opens_the_sae_hooks_store(saes, tmp_path):
    """An SAE from another tool names its hook in that tool's convention; the root's store of the same
    (layer, site) is the one it reads."""
    spec = llm_spec("toy-model", "transformer.h.0", 16) | {"hooks": ["transformer.h.0", "transformer.h.1"],
                                                           "d_in": {"transformer.h.0": 16, "transformer.h.1": 16}}
    source = ScaledSource(spec, fitted_vectors(list(saes.values())))
    cache_activations(source, synthetic_docs(20), tmp_path, StoreConfig(docs_per_shard=64))
    assert store_for_hook(tmp_path, "blocks.1.hook_resid_post").hook == "transformer.h.1"
    assert store_for_hook(tmp_path, "resid_post_layer_0").hook == "transformer.h.0"
    assert preflight(saes["batchtopk"], store_for_hook(tmp_path, saes["batchtopk"].cfg.hook_name)).fvu < 1


def test_model_aliases_by_last_path_component():
    assert same_model("google/gemma-2-2b", "/models/gemma-2-2b")
    assert same_model("toy-model", "/tmp/x/toy-model/")
    assert not same_model("gemma-2-2b", "gemma-2-2b-it")


@pytest.mark.parametrize("name", ["jumprelu", "batchtopk"])
def test_matching_store_passes_with_a_first_fvu(saes, stores, name):
    record = preflight(saes[name], stores["ok"])
    assert record.hook_match == "same activation (layer 1 resid_post)"  # the store says transformer.h.1
    assert 0 <= record.fvu < 1 and record.rows == min(2048, len(stores["ok"]))
    assert record.forced == [] and record.warnings == []
    assert record.sae.startswith(("saelens SAE", "dictionary_learning SAE"))


@pytest.mark.parametrize("name", ["jumprelu", "batchtopk"])
def test_wrong_base_model_is_refused_naming_both(saes, stores, name):
    with pytest.raises(ModelMismatchError, match="'toy-model'.*'.*other-model'.*--force"):
        preflight(saes[name], stores["model"])


def test_force_passes_the_model_check_and_is_recorded(saes, stores):
    record = preflight(saes["jumprelu"], stores["model"], force=True)
    assert len(record.forced) == 1 and "other-model" in record.forced[0] and "toy-model" in record.forced[0]
    assert record.fvu < 1
    assert "FORCED" in record.summary()


@pytest.mark.parametrize("name", ["jumprelu", "batchtopk"])
def test_wrong_hook_is_refused_naming_both(saes, stores, name):
    with pytest.raises(HookMismatchError, match=r"layer 1 resid_post.*'transformer\.h\.0' \(layer 0 resid_post\)"):
        preflight(saes[name], stores["hook"])
    with pytest.raises(HookMismatchError):  # force is for a model alias, not for another activation
        preflight(saes[name], stores["hook"], force=True)


def test_a_steering_hook_must_be_the_checked_activation(saes, stores):
    record = preflight(saes["jumprelu"], stores["ok"])
    check_model_hook(record, "transformer.h.1")  # the store's name for the SAE's blocks.1.hook_resid_post
    check_model_hook(record, "blocks.1.hook_resid_post")
    with pytest.raises(HookMismatchError, match=r"'blocks\.1\.hook_resid_post'.*'transformer\.h\.0'"):
        check_model_hook(record, "transformer.h.0")


def test_wrong_d_in_is_refused_even_with_force(saes, stores):
    with pytest.raises(DInMismatchError, match="d_in=16.*d_in=8"):
        preflight(saes["jumprelu"], stores["d_in"], force=True)
    assert issubclass(DInMismatchError, ShapeMismatchError) and issubclass(DInMismatchError, PreflightError)


@pytest.mark.parametrize("name", ["jumprelu", "batchtopk"])
def test_mis_normalised_inputs_are_refused_by_the_first_fvu(saes, stores, name):
    """The same activations 20x smaller than the SAE expects (an input normalisation the store lacks)."""
    with pytest.raises(InputMismatchError, match=r"FVU \d.*> 1.*other inputs.*normalisation"):
        preflight(saes[name], stores["scale"], force=True)


def test_missing_metadata_is_a_warning_not_a_refusal(saes, stores):
    sae = saekit.load_sae(SAELENS_JUMPRELU)
    sae.cfg.model_name = sae.cfg.hook_name = ""
    sae.cfg.hook_layer = -1
    record = preflight(sae, stores["model"])  # the other model's store: nothing to compare the name with
    assert record.fvu < 1 and record.hook_match == "unchecked (no hook name)"
    assert any("names no model" in w for w in record.warnings)
    assert any("names no hook" in w for w in record.warnings)
    sae.cfg.hook_layer = 0  # a layer but no hook name (dictionary_learning without submodule_name)
    with pytest.raises(HookMismatchError, match="layer 0.*layer 1"):
        preflight(sae, stores["ok"])


def test_gemmascope_without_metadata_still_meets_the_fvu_check(stores):
    """A Gemma Scope npz names no model or hook: no name check refuses it, but this random-weight fixture
    reconstructs the store worse than its mean, which the first FVU catches."""
    sae = saekit.load_sae(GEMMASCOPE)
    assert sae.cfg.model_name == "" and sae.cfg.hook_name == ""
    with pytest.raises(InputMismatchError):
        preflight(sae, stores["ok"])


def test_cli_eval_refuses_then_forces(stores, tmp_path, capsys):
    args = ["eval", str(SAELENS_JUMPRELU), "--store", str(stores["model"].path), "--out", str(tmp_path / "ev")]
    assert main(args) == 2
    assert "ModelMismatchError" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    out = capsys.readouterr().out
    assert "preflight: FVU" in out and "FORCED past: model" in out
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["preflight"]["forced"] and report["preflight"]["fvu"] < 1
    assert report["preflight"]["sae_hook"] == "blocks.1.hook_resid_post"


def test_cli_eval_refuses_mis_normalised_and_wrong_hook(stores, tmp_path, capsys):
    for store, error in (("scale", "InputMismatchError"), ("hook", "HookMismatchError"), ("d_in", "DInMismatchError")):
        assert main(["eval", str(DL_BATCHTOPK), "--store", str(stores[store].path), "--out", str(tmp_path)]) == 2
        assert error in capsys.readouterr().err


def _readme_block() -> str:
    """The python block of the README's "Use an SAE you already have" section."""
    section = (ROOT / "README.md").read_text().split("## Use an SAE you already have", 1)[1]
    return re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)


def _run_block(block: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=cwd, env=env)


def test_readme_block_runs_on_a_peer_sae(stores, tmp_path):
    """The README's three lines with the paths supplied: a SAELens JumpReLU folder and a store of its hook."""
    block = _readme_block()
    mine = block.replace("runs/quickstart-smollm2/train", str(SAELENS_JUMPRELU)).replace(
        "runs/quickstart-smollm2/store", str(stores["ok"].path))
    assert mine != block
    proc = _run_block(mine, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight: FVU 0." in proc.stdout and "same activation (layer 1 resid_post)" in proc.stdout
    wrong = mine.replace(str(stores["ok"].path), str(stores["hook"].path))
    proc = _run_block(wrong, tmp_path)
    assert proc.returncode != 0 and "HookMismatchError" in proc.stderr


def test_readme_block_runs_as_printed(tmp_path, one_thread):
    synthetic_llm_run(tmp_path / "runs" / "quickstart-smollm2", n_rows=3000, d_sae=64, k=4, d_in=32)
    proc = _run_block(_readme_block(), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight: FVU" in proc.stdout
