"""saekit.retrieval.SparseIndex: the inverted index ranks exactly as the brute-force sparse dot product,
re-ranking recovers exact dense order, truncation keeps the largest values, steering moves results."""

import pytest
import torch

from saekit.analysis.steering import FeatureEdit
from saekit.errors import ConfigError, ShapeMismatchError
from saekit.retrieval import SparseIndex, dense_top, pareto_sweep, recall_ndcg, truncate_code
from saekit.sae.registry import create


def _codes(n=400, d_sae=64, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    v_NK = torch.rand(n, k, generator=g, dtype=torch.float64)
    i_NK = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(n)])
    v_NK[::7, -1] = 0  # some rows with an inactive slot
    Z_NF = torch.zeros(n, d_sae, dtype=torch.float64).scatter_add_(1, i_NK, v_NK)
    return i_NK, v_NK, Z_NF


@pytest.mark.parametrize("normalize", [False, True])
def test_index_ranking_equals_brute_force_sparse_dot_product(normalize):
    i_NK, v_NK, Z_NF = _codes()
    index = SparseIndex.from_codes(i_NK, v_NK, 64, normalize=normalize)
    if normalize:
        Z_NF = Z_NF / Z_NF.norm(dim=1, keepdim=True)
    for q in range(0, 400, 37):
        z_F = Z_NF[q] * 3.0
        nz = z_F.nonzero().reshape(-1)
        hits = index.search((nz, z_F[nz]), top_n=25)
        ref = (Z_NF @ z_F).topk(25)
        assert [r for r, _ in hits] == ref.indices.tolist()
        assert torch.allclose(torch.tensor([s for _, s in hits], dtype=torch.float64), ref.values)
        s_N, touched = index.scores(nz, z_F[nz])
        assert torch.allclose(s_N, Z_NF @ z_F)
        assert touched == int((Z_NF[:, nz] != 0).sum())  # only the postings of the active latents


def test_postings_are_csr_and_codes_round_trip():
    i_NK, v_NK, Z_NF = _codes()
    index = SparseIndex.from_codes(i_NK, v_NK, 64)
    assert index.postings.layout == torch.sparse_csr
    assert index.nnz == int((v_NK != 0).sum())
    ci, cv = index.codes()
    assert torch.equal(torch.zeros_like(Z_NF).scatter_add_(1, ci, cv), Z_NF)


def test_truncate_keeps_the_largest_values():
    i_NK = torch.tensor([[3, 1, 7, 2]])
    v_NK = torch.tensor([[0.5, 2.0, 1.0, 0.1]])
    ti, tv = truncate_code(i_NK, v_NK, 2)
    assert ti.tolist() == [[1, 7]] and tv.tolist() == [[2.0, 1.0]]
    with pytest.raises(ConfigError):
        truncate_code(i_NK, v_NK, 0)


def test_exclude_and_rerank_give_the_exact_dense_order():
    sae = create({"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 8, "seed": 0}).eval()
    x_ND = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        code = sae.encode(x_ND)
    index = SparseIndex.from_codes(code.indices, code.values, 64, dense_ND=x_ND)
    unit = x_ND / x_ND.norm(dim=1, keepdim=True)
    hits = index.search((code.indices[5], code.values[5]), top_n=10, rerank=300, query_D=x_ND[5], exclude=5)
    assert [r for r, _ in hits] == dense_top(unit, x_ND[5], 10, exclude=5)
    assert 5 not in [r for r, _ in index.search((code.indices[5], code.values[5]), top_n=10, exclude=5)]
    with pytest.raises(ConfigError):
        SparseIndex.from_codes(code.indices, code.values, 64).search((code.indices[5], code.values[5]), rerank=5)


def test_pareto_sweep_is_perfect_with_full_rerank_and_counts_flops():
    sae = create({"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 8, "seed": 0}).eval()
    x_ND = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        code = sae.encode(x_ND)
    index = SparseIndex.from_codes(code.indices, code.values, 64, dense_ND=x_ND)
    pts = pareto_sweep(index, sae, list(range(20)), ks=[2, 8], reranks=(0, 200))
    full = [p for p in pts if p.rerank == 200]
    assert all(p.summary()["recall@10"] == 1.0 and p.summary()["ndcg@10"] == pytest.approx(1.0) for p in full)
    k2, k8 = (p for p in pts if p.rerank == 0)
    assert 2 * 16 * 64 < k2.flops_per_query < k8.flops_per_query  # encoding + 2 per posting; more postings at k=8


def test_recall_ndcg_known_values():
    assert recall_ndcg([1, 2, 3], [1, 2, 3]) == (1.0, pytest.approx(1.0))
    r, n = recall_ndcg([9, 2, 8], [1, 2, 3])
    assert r == pytest.approx(1 / 3) and 0 < n < 1
    assert recall_ndcg([7, 8, 9], [1, 2, 3]) == (0.0, 0.0)


def test_steered_search_on_the_index_brings_in_the_feature():
    sae = create({"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 4, "seed": 0}).eval()
    x_ND = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        code = sae.encode(x_ND)
    index = SparseIndex.from_codes(code.indices, code.values, 64)
    counts = torch.bincount(code.indices[code.values > 0], minlength=64)
    f = int(counts.argmax())
    q = next(j for j in range(300) if f not in code.indices[j][code.values[j] > 0].tolist())
    out = index.steered_search(sae, x_ND[q], [FeatureEdit(f, "add", alpha=100.0)], top_n=5)
    has_f = {j for j in range(300) if f in code.indices[j][code.values[j] > 0].tolist()}
    assert all(r in has_f for r, _ in out["after"]) and out["entered"]
    same = index.steered_search(sae, x_ND[q], [], top_n=5)
    assert same["before"] == same["after"]
    with pytest.raises(ConfigError):
        index.steered_search(sae, x_ND[q], [FeatureEdit(64, "add", alpha=1.0)])


def test_shape_mismatch_is_named():
    with pytest.raises(ShapeMismatchError):
        SparseIndex.from_codes(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3), 8)
