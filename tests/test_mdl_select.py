"""MDL model selection (issue 5 item 3): config strictness, selection rules, and the planted-data result."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from saekit.errors import ConfigError
from saekit.cli.mdl import cmd_mdl_select
from saekit.run.mdl_select import (
    MDLSelectConfig,
    run_mdl_select,
    select_by_reconstruction,
    select_mdl,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mdl_select_synthetic.yaml"


def _base(tmp_path) -> dict:
    data = yaml.safe_load(CONFIG.read_text())
    data["output_dir"] = str(tmp_path / "out")
    return data


@pytest.mark.parametrize("where", ["top", "data", "synthetic", "grid", "train"])
def test_unknown_keys_raise(tmp_path, where):
    data = _base(tmp_path)
    target = {"top": data, "data": data["data"], "synthetic": data["data"]["synthetic"], "grid": data["grid"],
              "train": data["train"]}[where]
    target["bogus_key"] = 1
    with pytest.raises(ConfigError, match="bogus_key"):
        MDLSelectConfig.from_dict(data)


def test_config_cross_checks(tmp_path):
    data = _base(tmp_path)
    MDLSelectConfig.from_dict(data)  # the shipped config is valid
    bad = _base(tmp_path)
    bad["data"]["store"] = "runs/x"
    with pytest.raises(ConfigError, match="exactly one of 'synthetic' and 'store'"):
        MDLSelectConfig.from_dict(bad)
    bad = _base(tmp_path)
    bad["sae"]["d_sae"] = 8
    with pytest.raises(ConfigError, match="d_sae"):
        MDLSelectConfig.from_dict(bad)
    bad = _base(tmp_path)
    bad["grid"] = {"widths": [], "ks": []}
    with pytest.raises(ConfigError, match="nothing to compare"):
        MDLSelectConfig.from_dict(bad)


def _row(name, width, k, dl, fvu, fvu_at_dl=None):
    return {"name": name, "width": width, "k": k, "dl_bits": dl, "fvu": fvu,
            "fvu_at_dl": fvu if fvu_at_dl is None else fvu_at_dl}


def test_selection_rules_known_answers():
    rows = [_row("a", 32, 2, 10.0, 0.30), _row("b", 64, 2, 14.0, 0.08), _row("c", 128, 2, 15.0, 0.06),
            _row("d", 64, 3, 20.0, 0.04), _row("e", 128, 3, 14.0, 0.05, fvu_at_dl=0.2)]
    assert select_mdl(rows, 0.1)["name"] == "b"  # a is shorter but over budget; e over budget once quantised
    assert select_mdl(rows, 0.05)["name"] == "d"
    assert select_mdl(rows, 0.01) is None
    assert select_mdl(rows, 1.0)["name"] == "a"
    rows.append(_row("f", 256, 2, 14.0, 0.08))  # a DL tie goes to the narrower dictionary
    assert select_mdl(rows, 0.1)["name"] == "b"
    by_k = select_by_reconstruction(rows)
    assert by_k[2]["name"] == "c" and by_k[3]["name"] == "d"


def test_planted_data_mdl_picks_true_width_reconstruction_picks_wider(tmp_path, one_thread):
    """The paper's feature-splitting argument on data from a known 64-atom dictionary (about 2 active per
    row). Every SAE is BatchTopK, so the widths compete at exactly the same L0."""
    data = _base(tmp_path)
    data["grid"]["ks"] = [2, 3]
    result = run_mdl_select(MDLSelectConfig.from_dict(data))
    best = result["mdl_choice"]
    assert best is not None and best["width"] == result["data"]["true_width"] == 64, result["rows"]
    assert best["k"] == 2  # also the true L0
    rows = {r["name"]: r for r in result["rows"]}
    for k in (2, 3):
        # at fixed L0 a wider dictionary reconstructs better, but its description is longer
        assert result["reconstruction_choice_by_k"][str(k)]["width"] > 64
        assert rows[f"w64_k{k}"]["fvu"] > min(rows[f"w{w}_k{k}"]["fvu"] for w in (128, 256))
        assert rows[f"w64_k{k}"]["dl_bits"] < min(rows[f"w{w}_k{k}"]["dl_bits"] for w in (128, 256))
        assert abs(rows[f"w64_k{k}"]["l0"] - k) < 0.1
    assert not rows["w32_k2"]["within_budget"]  # too narrow: cannot meet the budget at low L0
    out = Path(data["output_dir"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["mdl_choice"]["name"] == best["name"]
    assert "◀ MDL" in (out / "results.md").read_text()
    assert (out / "mdl_select.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_takes_trained_folders_and_reuses_grid(tmp_path, one_thread, capsys):
    data = _base(tmp_path)
    data["grid"] = {"widths": [16], "ks": [2]}
    data["train"]["total_steps"] = 50
    data["data"]["synthetic"].update(n_train=2048, n_heldout=512)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rc = cmd_mdl_select(SimpleNamespace(config=str(cfg_path), output_dir=None, fvu_budget=10.0))
    assert rc == 0 and "MDL selects w16_k2" in capsys.readouterr().out
    folder = Path(data["output_dir"]) / "saes" / "w16_k2"
    mtime = (folder / "final_sae" / "sae_weights.safetensors").stat().st_mtime_ns
    first = json.loads((Path(data["output_dir"]) / "results.json").read_text())["rows"]
    # second run: the grid point is loaded, not retrained; an extra folder (another SAE: the grid
    # point with its encoder halved, so its codes and bits differ) is taken as it is
    import torch

    from saekit.sae.registry import load_sae, save_sae

    extra = load_sae(folder)
    with torch.no_grad():
        extra.W_enc.mul_(0.5)
    save_sae(extra, tmp_path / "extra_sae")
    data["saes"] = [str(tmp_path / "extra_sae")]
    cfg_path.write_text(yaml.safe_dump(data))
    rc = cmd_mdl_select(SimpleNamespace(config=str(cfg_path), output_dir=None, fvu_budget=1e-9))
    assert rc == 1  # nothing within an impossible budget
    assert (folder / "final_sae" / "sae_weights.safetensors").stat().st_mtime_ns == mtime
    rows = json.loads((Path(data["output_dir"]) / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["w16_k2", "extra_sae"]
    assert rows[0]["dl_bits"] == pytest.approx(first[0]["dl_bits"], rel=1e-12)  # the same SAE, reloaded
    assert rows[1]["dl_bits"] != pytest.approx(rows[0]["dl_bits"], rel=1e-3)  # the extra one measured itself
    assert rows[1]["fvu"] > rows[0]["fvu"]


def test_store_data_leaves_outliers_out_of_training_and_measurement(tmp_path):
    """Issue 24: on a store, the grid trains and is measured without the massive-activation rows."""
    from saekit.run.mdl_select import DataConfig, load_selection_data
    from saekit.store.reader import ActivationStore
    from support.planted import planted_store

    path = planted_store(tmp_path / "store", every=4)
    store = ActivationStore(path)
    flagged = store.outlier_mask()
    assert flagged.any()
    kept = load_selection_data(DataConfig(store=str(path), heldout_fraction=0.25))
    allr = load_selection_data(DataConfig(store=str(path), heldout_fraction=0.25, exclude_outliers=False))
    assert kept.description["outliers_left_out_of_training"] > 0
    assert kept.description["train_rows"] + kept.description["outliers_left_out_of_training"] == \
        allr.description["train_rows"]
    big = float(store[flagged.nonzero().squeeze(1)].norm(dim=1).min())
    assert kept.heldout_ND.norm(dim=1).max() < big <= allr.heldout_ND.norm(dim=1).max()
    rows = kept.train_batches(64, 0).next_batch()
    assert rows.norm(dim=1).max() < big


def test_quickstart_config_runs_on_a_store_and_plots_the_frontier(tmp_path, one_thread):
    """configs/mdl_select_quickstart.yaml (the README's real-store example), shrunk to a tiny store."""
    from saekit.run.mdl_select import pareto_frontier
    from support.planted import planted_store

    data = yaml.safe_load((ROOT / "configs" / "mdl_select_quickstart.yaml").read_text())
    MDLSelectConfig.from_dict(data)  # the shipped config is valid as printed
    data["data"]["store"] = str(planted_store(tmp_path / "store", every=4))
    data["output_dir"] = str(tmp_path / "out")
    data["grid"] = {"widths": [16, 32], "ks": [2]}
    data["train"].update(total_steps=30, batch_size=64, log_every=10)
    data["fvu_budget"] = 10.0
    result = run_mdl_select(MDLSelectConfig.from_dict(data))
    assert result["data"]["exclude_outliers"] and result["mdl_choice"] is not None
    front = pareto_frontier(result["rows"])
    assert front and result["mdl_choice"]["name"] in {r["name"] for r in front}  # MDL's pick is on the frontier
    assert (Path(data["output_dir"]) / "mdl_select.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_frontier_known_answer():
    from saekit.run.mdl_select import pareto_frontier

    rows = [_row("a", 1, 1, 100, 0.1), _row("b", 1, 1, 80, 0.2), _row("c", 1, 1, 90, 0.3), _row("d", 1, 1, 50, 0.4)]
    assert [r["name"] for r in pareto_frontier(rows)] == ["a", "b", "d"]  # c: b is both shorter and better
