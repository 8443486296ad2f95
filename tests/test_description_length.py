"""Description length (MDL-SAE): known answers and vectorised == per-latent reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saekit.errors import ConfigError
from saekit.eval.description_length_reference import description_length_reference
from saekit.eval.description_length import (
    DescriptionLengthAccumulator,
    LatentValueRange,
    binary_entropy_bits,
    description_length,
)
from saekit.sae.base import SparseCode

PRECISIONS = (1, 2, 3, 4, 6, 8)


def random_code(n=600, k=6, d_sae=40, seed=0, p_zero=0.2):
    g = torch.Generator().manual_seed(seed)
    # skewed latent frequencies, distinct indices per row
    w = torch.arange(1, d_sae + 1, dtype=torch.float64).pow(-0.7)
    idx_NK = torch.multinomial(w.expand(n, d_sae), k, replacement=False, generator=g)
    vals_NK = torch.rand(n, k, generator=g) * 3 * (torch.rand(n, k, generator=g) > p_zero)
    return SparseCode(idx_NK, vals_NK, d_sae)


def linear_decoder(d_sae, d_in, seed=1):
    g = torch.Generator().manual_seed(seed)
    W_FD = torch.randn(d_sae, d_in, generator=g)
    b_D = torch.randn(d_in, generator=g)

    def decode(code: SparseCode) -> torch.Tensor:
        k = code.indices.shape[-1]
        out = F.embedding_bag(code.indices.reshape(-1, k), W_FD, per_sample_weights=code.values.reshape(-1, k),
                              mode="sum")
        return out.reshape(*code.indices.shape[:-1], d_in) + b_D

    return W_FD, decode


def data(n=600, k=6, d_sae=40, d_in=12, seed=0):
    code = random_code(n, k, d_sae, seed)
    W_FD, decode = linear_decoder(d_sae, d_in)
    recon = decode(code)
    x = recon + 0.05 * torch.randn(recon.shape, generator=torch.Generator().manual_seed(seed + 7))
    return code, x, recon, W_FD, decode


def batches_of(code, x, recon, size):
    n = code.indices.shape[0]
    return [(SparseCode(code.indices[s:s + size], code.values[s:s + size], code.d_sae), x[s:s + size],
             None if recon is None else recon[s:s + size]) for s in range(0, n, size)]


def test_binary_entropy_known_values():
    h = binary_entropy_bits(torch.tensor([0.0, 1.0, 0.5, 0.25]))
    assert h[0] == 0 and h[1] == 0
    assert h[2] == pytest.approx(1.0)
    assert h[3] == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


def test_never_firing_code_costs_nothing():
    code = SparseCode(torch.randint(0, 10, (50, 3)), torch.zeros(50, 3), 10)
    out = description_length([code], 10, PRECISIONS)
    assert out["activity_bits_per_row"] == 0.0
    assert all(e["value_bits_per_row"] == 0.0 and e["dl_bits_per_row"] == 0.0 for e in out["sweep"])
    assert out["l0_mean"] == 0.0


def test_latent_firing_every_row_costs_no_activity_bits():
    n = 64
    # latent 0 fires on every row with a constant value; latent 1 on half the rows
    idx = torch.tensor([[0, 1]] * n)
    vals = torch.stack([torch.full((n,), 2.0), (torch.arange(n) % 2).float()], 1)
    out = description_length([SparseCode(idx, vals, 3)], 3, PRECISIONS, per_latent=True)
    act = out["per_latent"]["activity_bits_F"]
    assert act[0] == 0.0  # fires always
    assert act[1] == pytest.approx(1.0)  # p = 1/2
    assert act[2] == 0.0  # never fires
    assert out["activity_bits_per_row"] == pytest.approx(1.0)
    # constant values (latent 0) and a single distinct value (latent 1) need no value bits
    assert torch.all(out["per_latent"]["value_bits_PF"] == 0)


def test_value_bits_known_answer_and_exact_levels():
    # one latent, always on, values on 4 equally spaced levels, equally often: 2 bits at b >= 2,
    # 1 bit at b = 1 (two bins of equal mass); b = 2 reproduces the values exactly
    n = 400
    vals = (1.0 + (torch.arange(n) % 4).float()).reshape(n, 1)
    code = SparseCode(torch.zeros(n, 1, dtype=torch.long), vals, 1)
    W_FD = torch.ones(1, 3)
    x = vals * torch.ones(1, 3) + torch.tensor([0.1, -0.2, 0.3])
    recon = vals * torch.ones(1, 3)
    out = description_length([(code, x, recon)], 1, (1, 2, 3), decoder_FD=W_FD)
    bits = {e["bits"]: e for e in out["sweep"]}
    # b = 1: u = (v - 1) / 3 = 0, 1/3, 2/3, 1 rounds to bins 0, 0, 1, 1 -> two equally likely bins
    assert bits[2]["value_bits_per_row"] == pytest.approx(2.0)
    assert bits[3]["value_bits_per_row"] == pytest.approx(2.0)
    assert bits[1]["value_bits_per_row"] == pytest.approx(1.0)
    assert bits[2]["fvu_increase"] == pytest.approx(0.0, abs=1e-9)
    assert bits[1]["fvu_increase"] > 0
    assert out["activity_bits_per_row"] == 0.0


def test_dl_grows_with_precision_and_error_shrinks():
    code, x, recon, W_FD, _ = data()
    out = description_length(batches_of(code, x, recon, 128), code.d_sae, PRECISIONS, decoder_FD=W_FD)
    dls = [e["dl_bits_per_row"] for e in out["sweep"]]
    inc = [e["fvu_increase"] for e in out["sweep"]]
    assert all(b > a for a, b in zip(dls, dls[1:]))
    assert all(b < a for a, b in zip(inc, inc[1:]))
    l0 = float(code.l0().double().mean())
    for e in out["sweep"]:
        assert e["flat_value_bits_per_row"] == pytest.approx(l0 * e["bits"])
        assert e["value_bits_per_row"] <= e["flat_value_bits_per_row"] + 1e-9  # entropy <= b bits
        assert e["fvu"] == pytest.approx(out["unquantised"]["fvu"] + e["fvu_increase"])


def test_selection_is_min_dl_within_tolerance():
    code, x, recon, W_FD, _ = data()
    bs = batches_of(code, x, recon, 200)
    tight = description_length(bs, code.d_sae, PRECISIONS, decoder_FD=W_FD, fvu_tolerance=1e-4)
    loose = description_length(bs, code.d_sae, PRECISIONS, decoder_FD=W_FD, fvu_tolerance=10.0)
    none = description_length(bs, code.d_sae, PRECISIONS, decoder_FD=W_FD, fvu_tolerance=-1.0)
    ok = [e for e in tight["sweep"] if e["fvu_increase"] <= 1e-4]
    assert tight["selected_bits"] == min(ok, key=lambda e: e["dl_bits_per_row"])["bits"]
    assert tight["selected_bits"] > loose["selected_bits"] == PRECISIONS[0]
    assert none["selected_bits"] is None and none["dl_bits_per_row"] is None and not none["within_tolerance"]


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_equals_reference(seed):
    code, x, recon, W_FD, decode = data(seed=seed)
    ref = description_length_reference(code.indices, code.values, code.d_sae, PRECISIONS, x_ND=x,
                                       decode_fn=decode, per_latent=True)
    fast = description_length(batches_of(code, x, recon, 97), code.d_sae, PRECISIONS, decoder_FD=W_FD,
                              per_latent=True)
    generic = description_length(lambda: iter(batches_of(code, x, None, 250)), code.d_sae, PRECISIONS,
                                 decode_fn=decode, per_latent=True)
    small_chunks = description_length(batches_of(code, x, recon, 300), code.d_sae, PRECISIONS, decoder_FD=W_FD,
                                      error_chunk=5, per_latent=True)  # many gathered blocks, row-parallel
    for out in (fast, generic, small_chunks):
        assert out["activity_bits_per_row"] == pytest.approx(ref["activity_bits_per_row"], rel=1e-12)
        assert torch.equal(out["per_latent"]["counts_F"], ref["per_latent"]["counts_F"])
        torch.testing.assert_close(out["per_latent"]["activity_bits_F"], ref["per_latent"]["activity_bits_F"],
                                   rtol=1e-12, atol=1e-12, check_dtype=False)
        torch.testing.assert_close(out["per_latent"]["value_bits_PF"], ref["per_latent"]["value_bits_PF"],
                                   rtol=1e-10, atol=1e-12, check_dtype=False)
        assert out["unquantised"]["fvu"] == pytest.approx(ref["unquantised"]["fvu"], rel=1e-6)
        for a, b in zip(out["sweep"], ref["sweep"]):
            assert a["dl_bits_per_row"] == pytest.approx(b["dl_bits_per_row"], rel=1e-12)
            assert a["fvu_increase"] == pytest.approx(b["fvu_increase"], rel=1e-3, abs=1e-9)
        assert out["selected_bits"] == ref["selected_bits"]


def test_bits_do_not_depend_on_batching():
    code = random_code(n=500, seed=3)
    one = description_length([code], code.d_sae, PRECISIONS)
    many = description_length([SparseCode(code.indices[s:s + 33], code.values[s:s + 33], code.d_sae)
                               for s in range(0, 500, 33)], code.d_sae, PRECISIONS)
    for a, b in zip(one["sweep"], many["sweep"]):
        assert a["dl_bits_per_row"] == pytest.approx(b["dl_bits_per_row"], rel=1e-12)
    assert one.get("unquantised") is None and one["selected_bits"] is None  # bits only: no error, no selection


def test_three_dim_codes_are_flattened():
    code = random_code(n=120, seed=4)
    code3 = SparseCode(code.indices.reshape(10, 12, -1), code.values.reshape(10, 12, -1), code.d_sae)
    a = description_length([code], code.d_sae, PRECISIONS)
    b = description_length([code3], code.d_sae, PRECISIONS)
    assert a["n_rows"] == b["n_rows"] == 120
    assert a["sweep"] == b["sweep"]


def test_one_shot_iterator_and_bad_config_are_refused():
    code = random_code(n=50)
    with pytest.raises(ConfigError, match="two passes"):
        description_length(iter([code]), code.d_sae)
    with pytest.raises(ConfigError, match="precisions"):
        description_length([code], code.d_sae, (0, 2))
    with pytest.raises(ConfigError, match="precisions"):
        description_length([code], code.d_sae, (3, 3))
    r = LatentValueRange(code.d_sae)
    r.update(code)
    with pytest.raises(ConfigError, match="max_hist_entries"):
        DescriptionLengthAccumulator(r.lo_F, r.hi_F, (8, 12), max_hist_entries=1000)


def test_latent_value_range_ignores_inactive_slots():
    idx = torch.tensor([[0, 1], [0, 2], [1, 2]])
    vals = torch.tensor([[1.0, 0.0], [3.0, 0.5], [0.0, 2.0]])
    r = LatentValueRange(4)
    r.update(SparseCode(idx, vals, 4))
    assert r.counts_F.tolist() == [2, 0, 2, 0]
    assert r.lo_F.tolist() == [1.0, 0.0, 0.5, 0.0]
    assert r.hi_F.tolist() == [3.0, 0.0, 2.0, 0.0]
