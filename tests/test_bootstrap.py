"""Error bars (issue 16): the document bootstrap covers true values, resamples whole documents,
and `compare` does not rank SAEs on differences smaller than their noise."""

import math

import pytest
import torch

from saekit.artifacts import read_json
from saekit.data.synthetic import planted_features
from saekit.errors import ConfigError
from saekit.eval.bootstrap import (
    Bootstrap,
    GroupedSums,
    compare_figures,
    fvu_from_sums,
    loss_recovered_from_sums,
    mean_interval,
    resample_weights,
)
from saekit.eval.report import evaluate_sae
from saekit.eval.report_text import compare_reports, compare_table, format_report, format_seed_spread
from saekit.eval.retrieval import retrieval_metrics
from saekit.run.config import RunConfig
from saekit.run.seeds import run_seeds
from saekit.run.stages import train_stage
from saekit.sae.registry import create
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train
from support.planted import planted_store


def test_resample_weights_are_seeded_multinomial_counts():
    W = resample_weights(50, 200, seed=3)
    assert W.shape == (200, 50) and torch.all(W.sum(1) == 50)
    assert torch.equal(W, resample_weights(50, 200, seed=3)) and not torch.equal(W, resample_weights(50, 200, seed=4))
    with pytest.raises(ConfigError):
        resample_weights(0)


def test_chunked_weights_give_the_same_statistic_shape_and_reject_wrong_lengths():
    boot = Bootstrap(10, resamples=37, seed=0)
    boot.chunk = 5  # force several chunks of resamples
    v = boot.values(lambda s: s["a"] / s["n"], {"a": torch.arange(10.0), "n": torch.ones(10)})
    assert v.shape == (37,)
    with pytest.raises(ConfigError):
        boot.values(lambda s: s["a"], {"a": torch.ones(9)})


def _trial_fvu(seed: int, n_docs: int = 60, d: int = 6) -> tuple[float, list[float]]:
    """Documents of 3-12 rows; x ~ N(0, I), reconstruction error scale drawn per document from U(0.2, 1):
    the population FVU is E[s^2] = (1 - 0.2^3) / (3 * 0.8)."""
    g = torch.Generator().manual_seed(seed)
    sums = GroupedSums()
    for doc in range(n_docs):
        n = int(torch.randint(3, 13, (1,), generator=g))
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        s = 0.2 + 0.8 * float(torch.rand(1, generator=g))
        err = s * torch.randn(n, d, generator=g, dtype=torch.float64)
        unit = sums.units_for(torch.full((n,), doc), n)
        sums.add("n", unit, torch.ones(n))
        sums.add("sse", unit, err.pow(2).sum(-1))
        sums.add("sum_x", unit, x)
        sums.add("sumsq", unit, x.pow(2).sum(-1))
    t = sums.totals()
    point = float(fvu_from_sums({k: v.sum(0) for k, v in t.items()}))
    ci = Bootstrap(sums.n_units, 1000, seed).ci(fvu_from_sums, t)
    return point, ci


def test_intervals_cover_the_true_value_in_at_least_90_percent_of_200_trials():
    true = (1 - 0.2 ** 3) / (3 * 0.8)
    covered = 0
    for seed in range(200):
        point, (lo, hi) = _trial_fvu(seed)
        assert lo <= point <= hi
        covered += lo <= true <= hi
    assert covered >= 180, covered


def test_mean_interval_resamples_documents_not_rows():
    """Rows of one document share its value: a row bootstrap would be far too narrow."""
    g = torch.Generator().manual_seed(0)
    doc_means = torch.randn(30, generator=g)
    values = doc_means.repeat_interleave(20)
    units = torch.arange(30).repeat_interleave(20)
    by_doc = mean_interval(values, 1000, 0, units)
    by_row = mean_interval(values, 1000, 0)
    assert (by_doc[1] - by_doc[0]) > 3 * (by_row[1] - by_row[0])


def test_loss_recovered_from_sums_matches_the_definition():
    s = {"clean": torch.tensor([2.0]), "spliced": torch.tensor([3.0]), "zero_ablation": torch.tensor([6.0]),
         "n": torch.tensor([1.0])}
    assert float(loss_recovered_from_sums(s, "zero_ablation")) == pytest.approx(0.75)


def test_recall_of_an_identity_sae_is_one_with_a_degenerate_interval():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    rt = retrieval_metrics(x, x.clone(), k=10, resamples=500)
    assert rt["recall_at_k"] == 1.0 and rt["ci95"]["recall_at_k"] == [1.0, 1.0]
    sae = create({"architecture": "topk", "d_in": 16, "d_sae": 16, "k": 16, "seed": 0})
    with torch.no_grad():  # an exact identity: W_enc = W_dec = I, no bias, every latent kept
        sae.W_enc.copy_(torch.eye(16))
        sae.W_dec.copy_(torch.eye(16))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    rep = evaluate_sae(sae, [(x.abs(), torch.arange(300))], retrieval_rows=300)
    assert rep["retrieval"]["recall_at_k"] == 1.0
    assert rep["reconstruction"]["fvu"] == pytest.approx(0.0, abs=1e-9)


def _docs_data(n_docs: int = 150, rows: int = 16):
    """Training rows and held-out rows (150 documents of 16 rows) from one planted dictionary."""
    data = planted_features(2 * n_docs * rows, 16, 12, avg_active=2, seed=0, noise=0.3)
    x = data.x_ND.float()
    return x[: n_docs * rows], x[n_docs * rows:], torch.arange(n_docs).repeat_interleave(rows)


def _trained(seed: int, k: int, tmp_path, data: torch.Tensor):
    sae = create({"architecture": "topk", "d_in": 16, "d_sae": 64, "k": k, "seed": seed})
    torch.manual_seed(seed)
    cfg = TrainConfig(total_steps=400, batch_size=128, lr=3e-3, log_every=1000, checkpoint_every=10_000,
                      progress_bar=False)
    train(sae, TensorBatches(data, 128, seed=seed), cfg, tmp_path / f"s{seed}k{k}")
    return sae


def test_compare_calls_two_seeds_not_distinguishable_and_a_real_difference_distinguishable(tmp_path):
    train_x, held_x, held_doc = _docs_data()
    reports = {}
    for name, seed, k in (("seed0", 0, 4), ("seed1", 1, 4), ("k1", 0, 1)):
        sae = _trained(seed, k, tmp_path, train_x)
        reports[name] = evaluate_sae(sae, [(held_x[i: i + 512], held_doc[i: i + 512]) for i in range(0, len(held_x), 512)])
        assert reports[name]["bootstrap"]["n_units"] == 150 and reports[name]["bootstrap"]["unit"] == "document"
        lo, hi = reports[name]["reconstruction"]["ci95"]["fvu"]
        assert lo <= reports[name]["reconstruction"]["fvu"] <= hi
    seeds = {d["figure"]: d for d in compare_reports({"seed0": reports["seed0"], "seed1": reports["seed1"]})}
    assert seeds["FVU"]["distinguishable"] is False and seeds["FVU"]["detectable"] > 0
    ks = {d["figure"]: d for d in compare_reports({"seed0": reports["seed0"], "k1": reports["k1"]})}
    assert ks["FVU"]["distinguishable"] is True
    text = compare_table({"seed0": reports["seed0"], "seed1": reports["seed1"]})
    assert "FVU: seed1 - seed0" in text and "not distinguishable (smallest detectable difference" in text
    assert "95% CI" in format_report(reports["seed0"])


def test_compare_figures_overlap_rule():
    assert compare_figures(0.5, [0.4, 0.6], 0.55, [0.5, 0.6])["distinguishable"] is False
    far = compare_figures(0.5, [0.45, 0.55], 0.8, [0.75, 0.85])
    assert far["distinguishable"] is True and far["detectable"] == pytest.approx(0.1)
    assert compare_figures(0.5, None, 0.6, [0.5, 0.7])["distinguishable"] is None


def test_rows_without_doc_ids_fall_back_to_blocks():
    sae = create({"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 2, "seed": 0})
    rep = evaluate_sae(sae, [torch.randn(640, 8)])
    assert rep["bootstrap"]["unit"].startswith("block of") and rep["bootstrap"]["n_units"] == 10
    assert not math.isnan(rep["reconstruction"]["ci95"]["fvu"][0])


def test_seed_sweep_trains_each_seed_apart_and_reports_the_spread(tmp_path):
    """`--seeds 3` on a run of seed 3: seeds 4 and 5 train in RUN/seeds/seed-<s> on the main run's store."""
    store = planted_store(tmp_path / "store", every=0)
    cfg = RunConfig.from_dict({
        "name": "t", "output_dir": str(tmp_path / "run"), "seed": 3, "store": {"path": str(store)},
        "source": {"kind": "hf", "model": "m", "hooks": ["h"]}, "sae": {"architecture": "topk", "d_sae": 24, "k": 3},
        "train": {"total_steps": 12, "batch_size": 32, "progress_bar": False, "checkpoint_every": 0, "lr": 1e-3},
        "eval": {"holdout": 0.2, "splice_docs": 0, "description_length": False}})
    train_stage(cfg)
    spread = run_seeds(cfg, 3)
    assert spread["seeds"] == ["seed-3", "seed-4", "seed-5"]
    assert cfg.folder.seed_run(5).joinpath("eval", "report.json").exists()
    assert not cfg.folder.seed_run(4).joinpath("store").exists()  # the main run's store is shared
    fvu = spread["figures"]["FVU"]
    assert len(fvu["values"]) == 3 and fvu["min"] <= fvu["mean"] <= fvu["max"] and fvu["std"] > 0
    assert read_json(cfg.folder.seed_spread) == spread
    assert "Spread over 3 seeds" in format_seed_spread(spread)
