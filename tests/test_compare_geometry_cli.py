"""`saekit geometry`, `saekit compare-features`, `saekit index` / `retrieve` end to end on tiny runs: the
files the browser pages read are written and hold what the commands measured."""

import json
from pathlib import Path

import pytest
import torch

from saekit.cli import main
from saekit.layout import RunFolder
from saekit.sae.registry import save_sae
from saekit.sources.base import SourceConfig
from saekit.sources.factory import make_source
from saekit.store.locate import store_for_hook
from saekit.store.writer import StoreConfig, cache_activations
from support.runs import make_sae, synthetic_docs, tiny_lm

HOOKS = ["transformer.h.0", "transformer.h.1"]


@pytest.fixture(scope="module")
def two_layer_run(tmp_path_factory) -> Path:
    """A run caching two hooks of the tiny GPT-2 over labelled documents, with an SAE on the second."""
    root = tmp_path_factory.mktemp("geo")
    model_dir = tiny_lm(root / "tiny_lm")
    run = root / "run"
    source = make_source(SourceConfig(kind="hf", model=str(model_dir), hooks=HOOKS, batch_size=32))
    cache_activations(source, synthetic_docs(160, 0), RunFolder(run).store, StoreConfig(docs_per_shard=64))
    store = store_for_hook(RunFolder(run).store, HOOKS[1])
    sae = make_sae(store.d_in, 64, 4, [], 0)
    sae.cfg.hook_name = HOOKS[1]
    with torch.no_grad():
        sae.b_dec.copy_(store[:].mean(0))
    save_sae(sae, RunFolder(run).final_sae())
    return run


def test_geometry_writes_layers_and_dictionary(two_layer_run, capsys):
    assert main(["geometry", str(two_layer_run), "--max-rows", "1500", "--resamples", "50", "--lobes", "2"]) == 0
    geo = RunFolder(two_layer_run).geometry
    layers = json.loads((geo / "layers.json").read_text())["layers"]
    assert [r["hook"] for r in layers] == HOOKS
    for r in layers:
        assert 0 <= r["isoscore"] <= 1 and r["twonn_dim"] > 0 and 1 <= r["effective_rank"] <= r["d"]
        assert r["probe"]["label"] == "sentiment" and 0 <= r["probe"]["accuracy"] <= 1
        assert r["probe"]["ci95"] is not None
    sae = json.loads((geo / "sae.json").read_text())
    assert len(sae["eigenvalues"]) == 32 and sae["power_law"]["alpha"] is not None
    assert len(sae["lobes"]["sizes"]) == 2 and sum(sae["lobes"]["sizes"]) == len(sae["lobes"]["latents"])
    assert (geo / "layers.png").stat().st_size > 0 and (geo / "spectrum.png").stat().st_size > 0
    assert "IsoScore" in capsys.readouterr().out


def test_compare_features_of_a_run_with_itself_matches_every_live_latent(two_layer_run, tmp_path):
    assert main(["compare-features", str(two_layer_run), str(two_layer_run), "--out", str(tmp_path),
                 "--threshold", "0.99"]) == 0
    res = json.loads((tmp_path / "compare.json").read_text())
    s = res["summary"]
    assert s["level"] == "token" and s["share_matched"] == 1.0 and s["svcca"] > 0.999
    assert all(p["a"] == p["b"] for p in res["pairs"])
    assert (tmp_path / "compare.png").exists()


@pytest.mark.slow
def test_index_and_retrieve_on_a_minilm_run(tmp_path, capsys):
    from support.runs import tiny_embedding_run

    run = tiny_embedding_run(tmp_path / "emb", synthetic_docs(300, 1), d_sae=64, k=8, dead=(), one_shot=2)
    assert main(["index", str(run), "--queries", "30", "--ks", "2,8", "--reranks", "0,300", "--resamples", "50"]) == 0
    pareto = json.loads((RunFolder(run).retrieval / "pareto.json").read_text())
    full = [p for p in pareto["points"] if p["rerank"] == 300]
    assert pareto["n_docs"] == 300 and all(p["recall@10"] == 1.0 for p in full)
    assert main(["retrieve", str(run), "--query", "the happy dog runs", "--top-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "query: 'the happy dog runs'" in out and out.count("doc ") >= 3


def _write_pareto(run: Path) -> None:
    """A real (tiny) sweep's table and plot, as `saekit index` writes them."""
    from saekit.cli.retrieval import plot_pareto, sweep_table
    from saekit.artifacts import atomic_write_json
    from saekit.retrieval import SparseIndex, pareto_sweep

    sae = make_sae(16, 64, 8, [], 0).eval()
    x_ND = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        code = sae.encode(x_ND)
    index = SparseIndex.from_codes(code.indices, code.values, 64, dense_ND=x_ND)
    table = sweep_table(pareto_sweep(index, sae, list(range(20)), [2, 8], (0, 50)), 50, 0)
    out = RunFolder(run).retrieval
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "pareto.json", {"n_docs": 200, "d_sae": 64, "dense_flops_per_query": 6400.0,
                                            "points": table})
    plot_pareto(table, 6400.0, out / "pareto.png")


def test_browser_pages_twins_geometry_retrieval(two_layer_run, monkeypatch):
    import sys

    from streamlit.testing.v1 import AppTest

    assert main(["geometry", str(two_layer_run), "--max-rows", "1500", "--resamples", "0", "--lobes", "2"]) == 0
    assert main(["compare-features", str(two_layer_run), str(two_layer_run), "--threshold", "0.99"]) == 0
    _write_pareto(two_layer_run)
    monkeypatch.setenv("SAEKIT_RUNS", str(two_layer_run))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    app = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")
    at = AppTest.from_file(app, default_timeout=120).run()
    assert {"Twins", "Geometry", "Retrieval"} <= set(at.radio(key="view").options)
    for view in ("Twins", "Geometry", "Retrieval"):
        at.radio(key="view").set_value(view).run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
    at.radio(key="view").set_value("Twins").run()
    live = json.loads(next(RunFolder(two_layer_run).compare.glob("*/compare.json")).read_text())["pairs"][0]["a"]
    at.number_input(key="twins_feature").set_value(live).run()
    assert any("has a twin" in m.value and f"#{live}" in m.value for m in at.markdown)
    at.radio(key="view").set_value("Geometry").run()
    assert any("power law" in m.value for m in at.markdown) and len(at.dataframe) >= 2
