"""Issue 16: the top-k SAE's optional retrieval-aware loss and the bootstrap's cached, stacked weights."""

from __future__ import annotations

import pytest
import torch

from saekit.errors import ConfigError
from saekit.eval.bootstrap import Bootstrap, fvu_from_sums, resample_weights
from saekit.eval.retrieval import recall_at_k
from saekit.sae.base import ForwardOutput, SparseCode
from saekit.sae.topk import TopKConfig, TopKSAE, similarity_loss


def _rows(n=32, d=8, seed=0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_similarity_loss_is_zero_for_the_input_and_its_positive_multiples(kind):
    x = _rows()
    assert float(similarity_loss(x, x.clone(), kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity_loss(x, 3.0 * x, kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity_loss(x, x + 0.5 * _rows(seed=1), kind)) > 1e-3


def test_similarity_loss_mse_known_answer():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos 0
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos 1/sqrt(2)
    assert float(similarity_loss(x, r, "mse")) == pytest.approx(0.5, rel=1e-6)


def test_similarity_loss_kl_prefers_the_right_neighbours():
    """Swapping which row is a query's nearest neighbour costs more than a small isotropic error."""
    x = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    swapped = x[[0, 2, 1, 3]].clone()
    swapped[0] = x[0]
    noisy = x + 0.01 * _rows(4, 3)
    assert float(similarity_loss(x, swapped)) > 10 * float(similarity_loss(x, noisy))


def test_loss_adds_the_similarity_term_scaled_by_the_mean_squared_norm():
    cfg = TopKConfig.from_dict({"d_in": 2, "d_sae": 4, "k": 1, "sim_coef": 0.5, "sim_loss": "mse", "aux_coef": 0})
    sae = TopKSAE(cfg)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    recon = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    code = SparseCode(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), 4)
    out = sae.loss(x, ForwardOutput(recon, code))
    assert out.parts["mse"] == pytest.approx(0.5) and out.parts["sim"] == pytest.approx(0.5)
    assert float(out.total) == pytest.approx(0.5 + 0.5 * 1.0 * 0.5)  # mean ||x||^2 = 1


def test_default_loss_has_no_similarity_term_and_unknown_kind_is_refused():
    sae = TopKSAE(TopKConfig.from_dict({"d_in": 8, "d_sae": 16, "k": 2}))
    x = _rows(16, 8)
    assert "sim" not in sae.loss(x, sae(x)).parts
    with pytest.raises(ConfigError, match="sim_loss"):
        TopKConfig.from_dict({"d_in": 8, "d_sae": 16, "k": 2, "sim_loss": "cosine"})


def test_optimising_the_kl_loss_moves_reconstructions_towards_the_right_neighbours():
    """Gradient descent on the loss alone, from a noisy copy, raises recall@3 of the rows."""
    x = _rows(64, 6, seed=2)
    r = (x + 1.0 * _rows(64, 6, seed=3)).requires_grad_(True)
    before = recall_at_k(x, r.detach(), 3)
    opt = torch.optim.Adam([r], lr=0.05)
    for _ in range(150):
        loss = similarity_loss(x, r, "kl", 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert recall_at_k(x, r.detach(), 3) > before + 0.2


def test_cached_float32_weights_match_the_float64_reference():
    g = torch.Generator().manual_seed(0)
    stats = {"sse": torch.rand(300, generator=g), "sumsq": 2 + torch.rand(300, generator=g),
             "sum_x": torch.randn(300, 5, generator=g), "n": torch.ones(300)}
    boot = Bootstrap(300, 200, seed=4)
    got = boot.values(fvu_from_sums, stats)
    W = resample_weights(300, 200, 4 * 1_000_003)  # the one chunk's seed, float64
    want = fvu_from_sums({k: W @ v.double() for k, v in stats.items()})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    again = boot.values(fvu_from_sums, stats)
    assert torch.equal(got, again) and boot._kept is not None and boot._kept.dtype == torch.float32


def test_many_chunks_are_redrawn_identically_each_call():
    boot = Bootstrap(50, resamples=30, seed=1)
    boot.chunk = 7
    stats = {"a": torch.arange(50.0), "n": torch.ones(50)}
    first = boot.values(lambda s: s["a"] / s["n"], stats)
    assert boot._kept is None and torch.equal(first, boot.values(lambda s: s["a"] / s["n"], stats))
