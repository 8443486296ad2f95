"""The browser knows a matryoshka SAE's prefix levels (issue 23): levels in the bundle, the list filters by
level, the feature page links a general latent to the later-level latents that refine it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from saekit.analysis.features import AnalyzeConfig
from saekit.analysis.hierarchy import refinements, sae_levels
from saekit.browser.build import build_bundle
from saekit.browser.bundle import Bundle
from saekit.layout import RunFolder
from saekit.sae.registry import create, save_sae
from saekit.store.reader import ActivationStore
from support.runs import synthetic_llm_run

WIDTHS = [4, 12, 32]


def test_refinements_point_from_general_to_later_levels_only():
    W = torch.eye(6)
    W[4] = torch.tensor([1.0, 0, 0, 0, 0.2, 0])  # level-2 latent 4 refines latent 0 (level 0)
    W[2] = torch.tensor([0.9, 0, 1.0, 0, 0, 0])  # level-1 latent 2 too, less closely
    level = torch.tensor([0, 0, 1, 1, 2, 2])
    out = refinements(W, level, n=3, min_cos=0.3)
    assert [c for c, _ in out[0]] == [4, 2]
    assert all(level[c] > level[f] for f, kids in out.items() for c, _ in kids)
    assert 4 not in out and 5 not in out  # the last level refines nothing
    assert sae_levels(create({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2})) is None


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    run = synthetic_llm_run(tmp_path_factory.mktemp("m") / "run", 600, d_sae=32, k=4, tokens_per_doc=20)
    store = ActivationStore(RunFolder(run).store)
    sae = create({"architecture": "matryoshka", "d_in": store.d_in, "d_sae": 32, "k": 4, "matryoshka_widths": WIDTHS})
    with torch.no_grad():
        sae.b_dec.copy_(store[:].mean(0))
        sae.W_dec[20] = torch.nn.functional.normalize(sae.W_dec[1] + 0.3 * sae.W_dec[20], dim=0)
    save_sae(sae, RunFolder(run).final_sae())
    bundle = Bundle(build_bundle(run, AnalyzeConfig(top_examples=4, context=3, logit_lens=False)))
    bundle.run_dir = run
    return bundle


def test_bundle_records_levels_and_refinements(bundle):
    table = bundle.table
    assert table["level"].tolist() == [0] * 4 + [1] * 8 + [2] * 20
    rec = bundle.feature(1)
    assert rec["level"] == 0 and rec["refined_by"][0][0] == 20 and rec["refined_by"][0][1] > 0.9
    assert all(0.0 <= r[2] <= 1.0 for r in rec["refined_by"])
    assert bundle.feature(25)["refined_by"] == []


def test_feature_list_filters_by_level(bundle):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dashboards"))
    from views.feature_list import filter_levels

    df = bundle.table
    assert filter_levels(df, [0])["feature"].tolist() == [0, 1, 2, 3]
    assert len(filter_levels(df, [1, 2])) == 28 and filter_levels(df, None) is df
    assert filter_levels(pd.DataFrame({"level": [-1, -1]}), None).shape[0] == 2


def test_app_filters_levels_and_links_refinements(monkeypatch, bundle):
    import sys
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEKIT_RUNS", str(bundle.run_dir))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    at.multiselect(key="levels").set_value([0]).run()
    assert not at.exception and any("4 of 32 features match" in c.value for c in at.caption)
    at.radio(key="view").set_value("Feature").run()
    at.number_input(key="feature").set_value(1).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Prefix level 0" in m.value for m in at.markdown)
    at.button(key="refined_20").click().run()
    assert at.number_input(key="feature").value == 20
