"""Evaluation metrics: reconstruction known answers (docs/RELIABILITY.md 33), streaming exactness,
densities, ground-truth recovery, retrieval fidelity, and the report (strict JSON, table, figures)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from saekit.data.synthetic import planted_features
from saekit.errors import ConfigError, ShapeMismatchError
from saekit.eval import ground_truth as gt
from saekit.eval.reconstruction import (
    ReconstructionAccumulator,
    density_histogram,
    explained_variance,
    firing_counts,
    fvu,
    latent_density,
    reconstruction_metrics,
)
from saekit.eval.report import attach_downstream, evaluate_sae, plot_fvu_vs_l0, write_comparison, write_report
from saekit.eval.report_text import compare_table, format_report
from saekit.eval.retrieval import nearest_neighbours, recall_at_k, retrieval_metrics
from saekit.sae.base import SparseCode


def strict_loads(text: str):
    def bad(c):
        raise ValueError(f"non-strict JSON constant {c}")
    return json.loads(text, parse_constant=bad)


def code_for(n, d_sae=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(n)])
    return SparseCode(idx, torch.rand(n, k, generator=g) + 0.1, d_sae)


# ---------------------------------------------------------------------------------------------
# reconstruction
# ---------------------------------------------------------------------------------------------
def test_known_answers_mean_prediction_and_perfect():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) + torch.tensor([3.0, -2.0, 10.0, 0.0, 1.0])
    mean_pred = x.double().mean(0).expand_as(x)
    assert explained_variance(x, mean_pred) == pytest.approx(0.0, abs=1e-12)
    assert fvu(x, mean_pred) == pytest.approx(1.0, abs=1e-12)
    assert explained_variance(x, x) == 1.0 and fvu(x, x) == 0.0
    # around the mean, not zero: predicting zeros for data with a large mean is far worse than FVU 1
    assert fvu(x, torch.zeros_like(x)) > 5
    noisy = x + 0.3 * torch.randn(x.shape, generator=g)
    assert fvu(noisy, x) == pytest.approx(1 - explained_variance(noisy, x), abs=1e-15)


def test_streaming_equals_one_shot_and_is_exact_for_large_means():
    g = torch.Generator().manual_seed(1)
    # a large offset with a tiny spread: E[x^2] - E[x]^2 would lose the variance in float64
    x = (1e4 + 1e-2 * torch.randn(3000, 6, generator=g, dtype=torch.float64))
    recon = x + 1e-3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    code = code_for(3000, seed=1)
    acc = ReconstructionAccumulator(6, 8)
    for s in range(0, 3000, 257):
        acc.update(x[s:s + 257], recon[s:s + 257], SparseCode(code.indices[s:s + 257], code.values[s:s + 257], 8))
    streamed = acc.result()
    one = reconstruction_metrics(x, recon, code)
    tv = float((x - x.mean(0)).pow(2).sum())
    exact_fvu = float((x - recon).pow(2).sum()) / tv
    assert streamed["fvu"] == pytest.approx(exact_fvu, rel=1e-9)
    assert one["fvu"] == pytest.approx(exact_fvu, rel=1e-9)
    assert streamed["n_rows"] == 3000
    for key in ("mse", "cosine_mean", "shrinkage_mean", "l0_mean", "dead_fraction"):
        assert streamed[key] == pytest.approx(one[key], rel=1e-9)
    assert streamed["l0_histogram"] == one["l0_histogram"]


def test_cosine_shrinkage_l0_and_histogram():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 4, generator=g)
    idx = torch.tensor([[0, 1, 2]] * 100)
    vals = torch.tensor([[1.0, 0.0, 0.0]] * 50 + [[1.0, 2.0, 3.0]] * 50)  # L0 1 on half, 3 on half
    m = reconstruction_metrics(x, 0.5 * x, SparseCode(idx, vals, 5))
    assert m["shrinkage_mean"] == pytest.approx(0.5)
    assert m["cosine_mean"] == pytest.approx(1.0)
    assert m["l0_mean"] == pytest.approx(2.0) and m["l0_std"] == pytest.approx(1.0)
    assert m["l0_histogram"]["counts"] == [0, 50, 0, 50]


def test_density_dead_and_dense_latents():
    # latent 0 every row, latent 1 on 1 of 100 rows, latents 2..4 never; zero-valued slots point
    # at latent 4 and must not count as firing
    n = 100
    idx = torch.tensor([[0, 1]] + [[0, 4]] * (n - 1))
    vals = torch.tensor([[1.0, 1.0]] + [[1.0, 0.0]] * (n - 1))
    code = SparseCode(idx, vals, 5)
    counts = firing_counts(code)
    assert counts.tolist() == [100, 1, 0, 0, 0]
    dens = latent_density(counts, n)
    assert dens.tolist() == [1.0, 0.01, 0.0, 0.0, 0.0]
    assert not torch.isnan(latent_density(counts, 0)).any()
    m = reconstruction_metrics(torch.randn(n, 3), torch.randn(n, 3), code)
    assert m["dead_fraction"] == pytest.approx(3 / 5)
    assert m["dense_fraction"] == pytest.approx(1 / 5)
    h = m["density_histogram"]
    assert h["dead"] == 3 and h["live"] == 2 and sum(h["counts"]) == 2
    edges = h["log10_edges"]
    assert edges[0] <= -2 and edges[-1] == 0.0 and len(edges) == len(h["counts"]) + 1
    # the latent with density 1 (log10 = 0) lands in the last bin, density 0.01 in the first-ish
    assert h["counts"][-1] == 1


def test_density_histogram_all_dead_is_finite():
    h = density_histogram(torch.zeros(4, dtype=torch.float64), 10)
    assert h["dead"] == 4 and sum(h["counts"]) == 0


def test_constant_input_gives_null_fvu_in_strict_json():
    x = torch.ones(10, 3)
    m = reconstruction_metrics(x, x, code_for(10))
    assert math.isnan(m["fvu"])
    from saekit.artifacts import dumps_json
    assert strict_loads(dumps_json(m))["fvu"] is None


def test_shape_mismatch_is_named():
    with pytest.raises(ShapeMismatchError, match="recon"):
        fvu(torch.zeros(3, 2), torch.zeros(3, 3))
    acc = ReconstructionAccumulator(2, 8)
    with pytest.raises(ShapeMismatchError, match="d_sae"):
        acc.update(torch.zeros(3, 2), torch.zeros(3, 2), code_for(3, d_sae=9))


# ---------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------
def test_ground_truth_perfect_recovery_up_to_permutation_and_scale():
    D = planted_features(10, d_in=16, n_features=12, seed=0).D_FD
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    W = torch.cat([D[perm] * 3.0, torch.randn(4, 16)])  # extra latents do not hurt recovery
    m = gt.ground_truth_metrics(W, D)
    assert m["mean_max_cosine"] == pytest.approx(1.0)
    assert m["fraction_recovered"] == 1.0
    assert m["mcc"] == pytest.approx(1.0)
    rnd = gt.ground_truth_metrics(torch.randn(12, 16, generator=torch.Generator().manual_seed(5)), D)
    assert rnd["mcc"] < 0.6 and rnd["fraction_recovered"] == 0.0


def test_mcc_is_optimal_one_to_one_matching():
    g = torch.Generator().manual_seed(3)
    D, W = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    C = gt.cosine_matrix(D, W).abs().numpy()
    best = max(np.mean([C[i, p[i]] for i in range(5)]) for p in itertools.permutations(range(5)))
    assert gt.mcc(W, D) == pytest.approx(best)
    # one latent close to two atoms: max-cos counts it twice, the matching only once
    D2 = torch.eye(2, 3)
    W2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert gt.ground_truth_metrics(W2, D2)["mean_max_cosine"] == pytest.approx(1 / math.sqrt(2))
    assert gt.mcc(W2, D2) == pytest.approx((1 / math.sqrt(2)) / 2)


def test_ground_truth_shape_errors():
    with pytest.raises(ShapeMismatchError):
        gt.ground_truth_metrics(torch.randn(4, 5), torch.randn(3, 6))


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------
def test_recall_is_one_for_identical_and_low_for_random():
    g = torch.Generator().manual_seed(4)
    E = torch.randn(300, 16, generator=g)
    assert recall_at_k(E, E.clone(), k=10) == 1.0
    r = retrieval_metrics(E, E.clone())
    assert r["recall_at_k"] == 1.0 and r["cosine_mean"] == pytest.approx(1.0) and r["k"] == 10
    rnd = recall_at_k(E, torch.randn(300, 16, generator=g), k=10)
    assert rnd < 0.15
    noisy = recall_at_k(E, E + 0.3 * torch.randn(E.shape, generator=g), k=10)
    assert rnd < noisy < 1.0


def test_neighbours_exclude_self_and_chunking_does_not_change_them():
    g = torch.Generator().manual_seed(5)
    E = torch.randn(97, 8, generator=g)
    nn_big = nearest_neighbours(E, 5)
    nn_small = nearest_neighbours(E, 5, max_elements=100)  # one query row per chunk
    assert torch.equal(nn_big, nn_small)
    assert not (nn_big == torch.arange(97)[:, None]).any()
    sims = torch.nn.functional.normalize(E, dim=1) @ torch.nn.functional.normalize(E, dim=1).T
    sims.fill_diagonal_(-2)
    assert torch.equal(nn_big.sort(1).values, sims.topk(5, dim=1).indices.sort(1).values)
    R = E + 0.2 * torch.randn(E.shape, generator=g)
    assert recall_at_k(E, R, 5) == recall_at_k(E, R, 5, max_elements=50)


def test_retrieval_small_corpus_clips_k():
    E = torch.randn(4, 3)
    r = retrieval_metrics(E, E)
    assert r["k"] == 3 and r["recall_at_k"] == 1.0
    with pytest.raises(ShapeMismatchError):
        recall_at_k(E, E, k=4)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_sae():
    from saekit.sae.topk import TopKConfig, TopKSAE

    data = planted_features(600, d_in=16, n_features=24, avg_active=3, seed=0)
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=32, k=4, aux_coef=0.0))
    with torch.no_grad():  # half the latents on the true atoms, so recovery and reconstruction are non-trivial
        sae.W_dec[:24] = data.D_FD
        sae.W_enc[:, :24] = data.D_FD.T
    return sae, data


def test_evaluate_sae_report_is_consistent_and_strict_json(planted_sae, tmp_path):
    sae, data = planted_sae
    x = data.x_ND
    batches = [x[s:s + 100] for s in range(0, 600, 100)]
    rep = evaluate_sae(sae, batches, description_length=True, dl_precisions=(2, 4, 6),
                       true_dictionary_GD=data.D_FD, retrieval_rows=200)
    assert rep["n_rows"] == 600
    with torch.no_grad():
        out = sae(x)
    assert rep["reconstruction"]["fvu"] == pytest.approx(fvu(x, out.recon), rel=1e-9)
    assert rep["sparsity"]["l0_mean"] <= 4
    assert rep["ground_truth"]["fraction_recovered"] == 1.0
    rt = rep["retrieval"]
    assert rt["n_docs"] == 200 and rt["k"] == 10
    assert rt["recall_at_k"] == pytest.approx(recall_at_k(x[:200], out.recon[:200], k=10), abs=1e-12)
    assert rt["recall_at_k"] > 3 * 10 / 199  # far above random neighbours: the planted SAE reconstructs well
    dl = rep["description_length"]
    assert dl["error_path"].startswith("affine") and len(dl["sweep"]) == 3 and dl["n_rows"] == 600
    assert dl["unquantised"]["fvu"] == pytest.approx(rep["reconstruction"]["fvu"], rel=1e-6)
    assert rep["downstream"] == {}
    attach_downstream(rep, "splice_in", {"ce_loss_delta": 0.1})
    paths = write_report(rep, tmp_path / "eval")
    parsed = strict_loads(paths["json"].read_text())
    assert parsed["downstream"]["splice_in"]["ce_loss_delta"] == 0.1
    assert parsed["sparsity"]["density_histogram"]["dead"] == round(rep["sparsity"]["dead_fraction"] * 32)
    for key in ("l0_histogram", "feature_density"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = paths["table"].read_text()
    assert "FVU" in table and "Description length" in table and "splice_in" in table


def test_evaluate_sae_batching_invariance_and_sources(planted_sae):
    sae, data = planted_sae
    x = data.x_ND[:300]
    whole = evaluate_sae(sae, [x])
    tuples = evaluate_sae(sae, lambda: ((x[s:s + 7], None, None, None) for s in range(0, 300, 7)))
    limited = evaluate_sae(sae, [x, x], max_rows=300)
    for rep in (tuples, limited):
        assert rep["n_rows"] == 300
        # the SAE's float32 matmuls differ by batch shape in the last bits; the metrics add nothing
        assert rep["reconstruction"]["fvu"] == pytest.approx(whole["reconstruction"]["fvu"], rel=1e-6)
        assert rep["sparsity"]["l0_histogram"] == whole["sparsity"]["l0_histogram"]
    assert whole["description_length"] is None and whole["ground_truth"] is None
    assert sae.training  # mode restored


def test_evaluate_sae_refuses_one_shot_iterator_for_dl(planted_sae):
    sae, data = planted_sae
    with pytest.raises(ConfigError, match="two passes"):
        evaluate_sae(sae, iter([data.x_ND]), description_length=True)
    with pytest.raises(ShapeMismatchError, match="d_in"):
        evaluate_sae(sae, [torch.zeros(3, 5)])


def test_compare_table_and_fvu_vs_l0_figure(planted_sae, tmp_path):
    sae, data = planted_sae
    a = evaluate_sae(sae, [data.x_ND])
    b = evaluate_sae(sae, [data.x_ND * 0 + 1.0])  # constant input: FVU undefined -> "-" / null
    table = compare_table({"planted": a, "constant": b})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["run", "rows", "L0", "FVU"]
    assert lines[2].startswith("planted") and lines[3].startswith("constant")
    assert "-" in lines[3].split()
    paths = write_comparison({"planted": a, "constant": b}, tmp_path)
    assert strict_loads(paths["json"].read_text())["constant"]["reconstruction"]["fvu"] is None
    assert plot_fvu_vs_l0({"a": a}, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert "explained variance" in format_report(a)


def test_dl_falls_back_to_generic_decode_for_non_affine_decoders(planted_sae):
    from saekit.sae.topk import TopKSAE

    sae, data = planted_sae

    class SquashedTopK(TopKSAE):  # a decoder that is not affine in the code values, declared so
        decoder_is_affine = False

        def _decode_flat(self, code):
            return torch.tanh(super()._decode_flat(code))

    other = SquashedTopK(sae.cfg)
    other.load_state_dict(sae.state_dict())
    rep = evaluate_sae(other, [data.x_ND[:200]], description_length=True, dl_precisions=(2, 6))
    dl = rep["description_length"]
    assert dl["error_path"] == "sae.decode per precision"
    assert dl["unquantised"]["fvu"] == pytest.approx(rep["reconstruction"]["fvu"], rel=1e-6)
    assert dl["sweep"][0]["fvu_increase"] > dl["sweep"][1]["fvu_increase"]
