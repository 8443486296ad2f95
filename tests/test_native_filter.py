"""The certified bf16 pre-filter (`saekit.sae.kernels.native_filter`): an exact float32 row-wise top-k.

The filter's result must be the top-k of float32 pre-activations over ALL latents: the same index set as
a float64 reference wherever the k-th and (k+1)-th values are further apart than float32 rounding, ties
to the lower latent index, and gradients identical to the dense float32 path's. Two tests show that a
bound too tight would be caught: adversarial data on which the bound is nearly attained, and a shrunk
constant (the test-only `C_SCALE`) that then selects the wrong latent.
"""

import pytest
import torch

from saekit.hardware import cpu_has_bf16
from saekit.sae.kernels import native, native_filter
from saekit.sae.kernels.sparse import sparse_encode, topk_select

needs_filter = pytest.mark.skipif(not (cpu_has_bf16() and native.library() is not None),
                                  reason="no bf16 instructions or no C compiler: the filter never runs")


@pytest.fixture(autouse=True)
def _filter_on(monkeypatch):
    monkeypatch.delenv("SAEKIT_BF16_FILTER", raising=False)
    monkeypatch.setattr(native_filter, "C_SCALE", 1.0)
    native_filter.reset_stats()


def f64_pre(x, W, b):
    return x.double() @ W.double() + b.double()


def rounding_tol(x, W, b):
    """Per element, twice what float32 evaluation of x . w + b can be off by (gamma_D sum |x_i w_i| + |b| eps):
    two float32 evaluations in different orders differ by at most this."""
    D = x.shape[1]
    return 2 * ((D + 2) * 2.0 ** -24 * (x.double().abs() @ W.double().abs()) + 2.0 ** -23 * b.double().abs())


def filtered(x, W, b, k):
    out = native_filter.topk(x, W, b, k)
    assert out is not None, "the filter should apply here"
    return out[0], out[1]


def assert_valid_topk(x, W, b, k, vals, idx, strict=False):
    """`idx` is a top-k of the float32 pre-activations: its values are the float64 ones within rounding, and
    no unselected latent beats a selected one by more than rounding. `strict`: the same set as float64."""
    ref, tol = f64_pre(x, W, b), rounding_tol(x, W, b)
    assert torch.allclose(vals.double(), ref.gather(1, idx), rtol=0, atol=float(tol.max()))
    assert (idx.sort(1).values.diff(dim=1) > 0).all(), "indices repeat within a row"
    chosen = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, idx, True)
    worst_in = torch.where(chosen, ref + tol, torch.inf).min(1).values
    best_out = torch.where(chosen, -torch.inf, ref - tol).max(1).values
    assert (best_out <= worst_in).all()
    if strict:
        assert torch.equal(idx.sort(1).values, ref.topk(k, dim=1).indices.sort(1).values)


def random_case(B=256, D=64, F=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(D, F, generator=g) / D ** 0.5, torch.randn(F, generator=g) * 0.1


@needs_filter
def test_random_data_gives_the_float64_top_k():
    x, W, b = random_case()
    vals, idx = filtered(x, W, b, 16)
    ref = f64_pre(x, W, b).topk(17, dim=1).values
    assert ((ref[:, 15] - ref[:, 16]) > rounding_tol(x, W, b).max()).all()  # no float32 ties: sets must agree
    assert_valid_topk(x, W, b, 16, vals, idx, strict=True)
    s = native_filter.summary()
    assert s["path"] == "bf16_filter" and 16 <= s["candidates_per_row"] < 1024


@needs_filter
def test_near_ties_around_the_kth_value():
    """300 latents within 1e-6 relative of each other: the bf16 values cannot order them, float32 can."""
    x, W, b = random_case(B=128, F=1024, seed=1)
    W[:, 100:400] = W[:, 100:101] * (1 + 1e-6 * torch.randn(1, 300))
    b[100:400] = 3.0  # the tied group holds every row's top-k
    vals, idx = filtered(x, W, b, 24)
    assert_valid_topk(x, W, b, 24, vals, idx)
    assert native_filter.summary()["candidates_per_row"] > 150  # near-tied latents are all candidates


@needs_filter
def test_the_bound_admits_thousands_of_candidates():
    x, W, b = random_case(B=1024, F=4096, seed=2)  # 2^22 pre-activations: large enough for the guard
    W = W[:, :1] + 1e-3 * W  # every latent within ~0.1 % of the same value
    b = torch.zeros(4096)
    vals, idx = filtered(x, W, b, 32)
    assert_valid_topk(x, W, b, 32, vals, idx)
    assert native_filter.summary()["candidates_per_row"] > 1000
    for _ in range(native_filter.RETRY_AFTER):  # past GIVE_UP_FRACTION: the next calls take the dense path
        assert native_filter.topk(x, W, b, 32) is None
    assert native_filter.topk(x, W, b, 32) is not None  # then it tries again


@needs_filter
def test_duplicate_latents_tie_to_the_lower_index():
    """Columns 128..255 copy 0..127 (and their bias): float32 values tie exactly in pairs, so with k = 7 the
    fourth pair is split, and the lower index wins (the order: value descending, then index ascending)."""
    x, W, b = random_case(B=128, F=256, seed=3)
    W[:, 128:], b[128:] = W[:, :128], b[:128]
    vals, idx = filtered(x, W, b, 7)
    order = f64_pre(x, W, b).sort(dim=1, descending=True, stable=True).indices  # ties keep index order
    assert torch.equal(idx.sort(1).values, order[:, :7].sort(1).values)
    assert (idx < 128).sum(1).eq(4).all()  # three whole pairs and the lower copy of the fourth


@needs_filter
@pytest.mark.parametrize("k", [1, 1024])
def test_k_edges(k):
    x, W, b = random_case(B=64, F=1024, seed=4)
    vals, idx = filtered(x, W, b, k)
    assert_valid_topk(x, W, b, k, vals, idx, strict=(k == 1))
    if k == 1024:
        assert torch.equal(idx.sort(1).values, torch.arange(1024).expand(64, -1))


@needs_filter
def test_zero_rows():
    x, W, b = random_case(B=64, F=512, seed=5)
    x[:32] = 0
    vals, idx = filtered(x, W, b, 8)
    assert torch.equal(idx[:32].sort(1).values, b.topk(8).indices.sort().values.expand(32, -1))
    assert torch.equal(vals[:32].sort(1).values, b.topk(8).values.sort().values.expand(32, -1))
    vals, idx = filtered(x, W, torch.zeros(512), 8)  # zero rows, zero bias: all tie at 0 -> latents 0..7
    assert torch.equal(idx[:32].sort(1).values, torch.arange(8).expand(32, -1))


def adversarial_case(D=64):
    """x = (+1, -1, ...); column 0's entries round to 1.0 in bf16 with the largest errors in one direction
    (1 + 2^-8 - 2^-20 rounds down, 1 - 2^-9 + 2^-21 rounds up): its bf16 pre-activation is 0, its true one
    32 * (2^-8 + 2^-9 - 3 * 2^-21) ~ 0.1875. Columns 1..31 are exact in bf16 (x_i * m * 2^-11): 0.03125 .. 0.125."""
    x = torch.tensor([1.0, -1.0] * (D // 2)).expand(4, D).contiguous()
    W = torch.zeros(D, 32)
    W[0::2, 0], W[1::2, 0] = 1 + 2.0 ** -8 - 2.0 ** -20, 1 - 2.0 ** -9 + 2.0 ** -21
    for m in range(1, 32):
        W[:, m] = x[0] * (m % 4 + 1) * 2.0 ** -11
    return x, W, torch.zeros(32)


def bound_elementwise(x, W, b):
    """The bound of the module docstring, in float64, on the bf16 product torch computes."""
    D = x.shape[1]
    cst = native_filter.bound_constants(D)
    p = native_filter.bf16_product(x, W).double()
    nx, nw = x.double().norm(dim=1, keepdim=True), W.double().norm(dim=0)
    e = cst["c"] * nx * nw + cst["u_rel"] * p.abs() + cst["a_rel"] * b.double().abs() \
        + cst["tiny_const"] + cst["tiny_per_norm"] * (nx + nw.max())
    return p + b.double(), e


@needs_filter
def test_the_bound_holds_elementwise_and_is_nearly_attained():
    x, W, b = adversarial_case()
    p, e = bound_elementwise(x, W, b)
    err = (p - f64_pre(x, W, b)).abs()
    assert (err <= e).all()
    assert (err[:, 0] >= 0.3 * e[:, 0]).all()  # within ~3x of the true error: a 100x smaller c fails
    xr, Wr, br = random_case(B=128, F=512, seed=6)
    p, e = bound_elementwise(xr, Wr, br)
    assert ((p - f64_pre(xr, Wr, br)).abs() <= e).all()


@needs_filter
def test_a_bound_too_tight_is_detected(monkeypatch):
    x, W, b = adversarial_case()
    vals, idx = filtered(x, W, b, 1)
    assert (idx[:, 0] == 0).all()  # column 0 is the true top-1 though its bf16 value is the smallest
    assert_valid_topk(x, W, b, 1, vals, idx, strict=True)
    monkeypatch.setattr(native_filter, "C_SCALE", 0.01)
    vals, idx = filtered(x, W, b, 1)
    assert (idx[:, 0] != 0).all()
    with pytest.raises(AssertionError):
        assert_valid_topk(x, W, b, 1, vals, idx, strict=True)


@needs_filter
def test_non_finite_rows_take_the_dense_path():
    x, W, b = random_case(B=64, F=512, seed=7)
    x[3, 5] = float("nan")
    assert native_filter.topk(x, W, b, 8) is None
    x[3, 5] = float("inf")
    assert native_filter.topk(x, W, b, 8) is None


def encode_and_grads(x, W, b_enc, b_dec, k, weight_F):
    params = [t.clone().requires_grad_(True) for t in (x, W, b_enc, b_dec)]
    vals, idx = sparse_encode(*params, topk_select(k))
    (vals * weight_F[idx]).sum().backward()  # a per-latent weight: independent of the order within a row
    return vals.detach(), idx, [p.grad for p in params]


@needs_filter
def test_sparse_encode_gradients_equal_the_dense_paths(monkeypatch):
    x, W, b = random_case(B=256, F=1024, seed=8)
    b_dec, weight = 0.1 * torch.randn(64), torch.randn(1024)
    v1, i1, g1 = encode_and_grads(x, W, b, b_dec, 16, weight)
    assert native_filter.summary()["path"] == "bf16_filter"
    monkeypatch.setenv("SAEKIT_BF16_FILTER", "0")
    native_filter.reset_stats()
    v0, i0, g0 = encode_and_grads(x, W, b, b_dec, 16, weight)
    assert native_filter.summary()["path"] == "dense_fp32"
    o1, o0 = i1.sort(1), i0.sort(1)
    assert torch.equal(o1.values, o0.values)
    assert torch.allclose(v1.gather(1, o1.indices), v0.gather(1, o0.indices), rtol=1e-5, atol=1e-6)
    for a, c in zip(g1, g0):
        assert torch.allclose(a, c, rtol=0, atol=1e-6)


def train_codes(steps=6, seed=0):
    from saekit.sae.topk import TopKConfig, TopKSAE

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(steps + 1, 512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    sae = TopKSAE(TopKConfig(d_in=64, d_sae=1024, k=16, seed=0))
    sae.init_from_data(X[0])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for x in X[:-1]:
        opt.zero_grad()
        sae.loss(x, sae(x)).total.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    with torch.no_grad():
        code = sae.encode(X[-1])
        pre = (X[-1].double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    return code.indices.sort(1).values, pre


@needs_filter
def test_training_gives_the_same_codes_as_with_the_filter_off(monkeypatch):
    """Rows may differ only where the k-th and (k+1)-th pre-activations are within 1e-4 (relative) of each
    other: the two runs' weights drift apart by float32 rounding (different summation orders, ~1e-7 a step)."""
    idx1, pre = train_codes()
    assert native_filter.summary()["path"] == "bf16_filter"
    monkeypatch.setenv("SAEKIT_BF16_FILTER", "0")
    idx0, _ = train_codes()
    differ = (idx1 != idx0).any(1)
    top = pre.topk(17, dim=1).values
    near_tie = (top[:, 15] - top[:, 16]) <= 1e-4 * top[:, 15].abs()
    assert differ.float().mean() < 0.02
    assert not (differ & ~near_tie).any()


def test_the_switch_and_the_constants(monkeypatch):
    assert 2.0 ** -7 < native_filter.bound_constants(512)["c"] < 1.01 * 2.0 ** -7 + 2.0 ** -14
    monkeypatch.setenv("SAEKIT_BF16_FILTER", "0")
    assert not native_filter.enabled()
    x, W, b = random_case(B=8, F=64)
    assert native_filter.topk(x, W, b, 4) is None


def aux_loss_and_grads(seed=0):
    """One training forward of a TopKSAE whose latents 0..299 count as dead: AuxK reads their pre-activations
    (with the filter, recomputed in float32 for those columns only)."""
    from saekit.sae.topk import TopKConfig, TopKSAE

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    sae = TopKSAE(TopKConfig(d_in=64, d_sae=1024, k=16, aux_k=32, dead_tokens_threshold=10, seed=0))
    sae.tokens_since_fired[:300] = 100
    out = sae.loss(x, sae(x))
    out.total.backward()
    return out.parts, [p.grad.clone() for p in sae.parameters()]


@needs_filter
def test_auxk_with_the_filter_equals_the_dense_path(monkeypatch):
    parts1, g1 = aux_loss_and_grads()
    assert native_filter.summary()["path"] == "bf16_filter"
    monkeypatch.setenv("SAEKIT_BF16_FILTER", "0")
    parts0, g0 = aux_loss_and_grads()
    assert parts1.keys() == parts0.keys() and any("aux" in key for key in parts1)
    for key in parts1:
        assert parts1[key] == pytest.approx(parts0[key], rel=1e-5, abs=1e-6), key
    for a, c in zip(g1, g0):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-6)


@needs_filter
def test_the_result_does_not_depend_on_the_thread_count():
    x, W, b = random_case(B=1200, D=64, F=2048, seed=9)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            vals, idx = filtered(x, W, b, 16)
            order = idx.sort(1)
            outs.append((order.values, vals.gather(1, order.indices)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])  # bitwise
