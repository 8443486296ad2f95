"""Layer geometry and dictionary structure: known answers for IsoScore, TwoNN, effective rank, norm
statistics, the power-law fit and co-occurrence lobes."""

import math

import pytest
import torch

from saekit.analysis.geometry import (cooccurrence_lobes, decoder_spectrum, effective_rank, isoscore,
                                      norm_statistics, phi_coefficients, power_law_fit, twonn_dimension)
from saekit.errors import ShapeMismatchError

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def test_isoscore_is_one_for_isotropic_gaussian():
    s = isoscore(torch.randn(20000, 10, generator=G(0)))
    assert s["isoscore"] > 0.99 and s["fraction"] > 0.99


@pytest.mark.parametrize("d", [4, 16, 64])
def test_isoscore_fraction_is_one_over_d_on_one_axis(d):
    X = torch.zeros(500, d)
    X[:, 0] = torch.randn(500, generator=G(1))
    s = isoscore(X)
    assert s["fraction"] == pytest.approx(1 / d, abs=1e-9) and s["isoscore"] == pytest.approx(0.0, abs=1e-9)


def test_isoscore_falls_with_anisotropy():
    X = torch.randn(5000, 8, generator=G(2))
    assert isoscore(X * torch.tensor([4.0, 1, 1, 1, 1, 1, 1, 1]))["isoscore"] < isoscore(X)["isoscore"] - 0.2


def test_twonn_recovers_a_planted_five_dimensional_subspace():
    Z = torch.randn(3000, 5, generator=G(3))
    Q = torch.linalg.qr(torch.randn(50, 5, generator=G(4)))[0]
    X = Z @ Q.T + 3.0
    assert abs(twonn_dimension(X) - 5) <= 1
    assert abs(twonn_dimension(torch.randn(3000, 2, generator=G(5)) @ torch.randn(2, 30, generator=G(6))) - 2) <= 1


def test_effective_rank_known_values():
    X = torch.zeros(100, 8)
    i = torch.arange(100)
    X[i, i % 4] = torch.where((i // 4) % 2 == 0, 1.0, -1.0)  # four centred, orthogonal, equal columns
    assert effective_rank(X) == pytest.approx(4.0, rel=0.05)  # four equal singular values
    X1 = torch.randn(100, 1, generator=G(7)) @ torch.randn(1, 8, generator=G(8))
    assert effective_rank(X1) == pytest.approx(1.0, abs=1e-6)


def test_norm_statistics_and_anisotropy():
    same = torch.ones(50, 4) * torch.arange(1, 51)[:, None].float()
    s = norm_statistics(same)
    assert s["mean_cosine"] == pytest.approx(1.0) and s["norm_max"] == pytest.approx(100.0)
    assert abs(norm_statistics(torch.randn(4000, 64, generator=G(9)))["mean_cosine"]) < 0.01
    with pytest.raises(ShapeMismatchError):
        norm_statistics(torch.zeros(1, 3))


def test_power_law_fit_recovers_the_exponent():
    eig = torch.arange(1, 501, dtype=torch.float64) ** -1.3
    fit = power_law_fit(eig)
    assert fit["alpha"] == pytest.approx(1.3, abs=1e-6) and fit["r2"] == pytest.approx(1.0)


def test_decoder_spectrum_of_an_isotropic_dictionary_is_flat():
    eig = decoder_spectrum(torch.randn(20000, 8, generator=G(10)))
    assert eig.shape == (8,) and float(eig.max() / eig.min()) < 1.2
    assert float(eig.sum()) == pytest.approx(1.0, rel=0.01)  # unit rows: total variance ~ 1


def test_cooccurrence_lobes_find_planted_groups():
    g = G(11)
    topic = torch.randint(0, 3, (3000,), generator=g)
    fires = torch.zeros(3000, 30, dtype=torch.bool)
    for t in range(3):  # latents 10t..10t+9 fire (often) only in documents of topic t
        rows = topic == t
        fires[rows, 10 * t:10 * t + 10] = torch.rand(int(rows.sum()), 10, generator=g) < 0.6
    res = cooccurrence_lobes(fires, n_lobes=3, top_latents=30)
    lobe_of = dict(zip(res["latents"], res["lobe"]))
    for t in range(3):
        assert len({lobe_of[f] for f in range(10 * t, 10 * t + 10)}) == 1
    assert len(set(lobe_of.values())) == 3 and res["within_phi"] > res["between_phi"]
    phi = phi_coefficients(fires[:, :2])
    assert phi[0, 0] == pytest.approx(1.0) and not math.isnan(float(phi[0, 1]))
