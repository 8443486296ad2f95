"""MP-SAE: pursuit invariants, fast path == naive oracle, adaptive sparsity, persistence, hierarchy."""

from __future__ import annotations

import pytest
import torch

from saekit.data.hierarchical import hierarchical_features
from saekit.errors import ConfigError
from saekit.sae import load_sae, save_sae
from saekit.sae.matching_pursuit import MatchingPursuitSAE, MPConfig
from saekit.sae.kernels.mp import (MPCoefficients, PursuitOptions, gram_matrix, naive_pursuit, select_atoms)

D_IN, D_SAE = 12, 40


def make(dtype="float64", **kw) -> MatchingPursuitSAE:
    sae = MatchingPursuitSAE(MPConfig(d_in=D_IN, d_sae=D_SAE, dtype=dtype, **kw))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae


def rows(n=16, dtype=torch.float64, seed=100):  # not 0: the dictionary is drawn from seed 0
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def residual_norms(sae, x, steps):
    return torch.stack([(x - sae.decode(sae.encode(x, k=t))).norm(dim=-1) for t in range(1, steps + 1)], -1)


@pytest.mark.parametrize("nonneg", [True, False])
def test_residual_norm_non_increasing(nonneg):
    sae = make(nonneg=nonneg)
    norms = residual_norms(sae, rows(), 10)
    assert (norms[:, 1:] <= norms[:, :-1] + 1e-9).all()
    assert (norms[:, -1] < norms[:, 0]).all()


def test_threshold_mode_respects_max_iters():
    sae = make(stop_mode="threshold", residual_threshold=0.0, max_iters=5, k=3)
    code = sae.encode(rows())
    assert code.indices.shape[-1] <= 5 and int(code.l0().max()) <= 5
    with pytest.raises(ConfigError, match="max_iters"):
        MPConfig(d_in=4, d_sae=8, k=9, max_iters=4).validate()


@pytest.mark.parametrize("mode", ["fixed", "threshold"])
def test_terminates_with_duplicate_and_zero_atoms(mode):
    sae = make(stop_mode=mode, k=30, max_iters=30, residual_threshold=1e-3)
    with torch.no_grad():
        sae.W_dec[1:10] = sae.W_dec[0]  # duplicates
        sae.W_dec[10:20] = 0.0  # zero-norm atoms
    x = rows()
    code = sae.encode(x)
    assert int(code.l0().max()) <= 30 and torch.isfinite(code.values).all()
    assert torch.isfinite(sae(x).recon).all()


@pytest.mark.parametrize("nonneg", [True, False])
@pytest.mark.parametrize("gram", [True, False])
def test_fast_selection_equals_naive_pursuit(nonneg, gram):
    torch.manual_seed(0)
    W = torch.randn(64, 16, dtype=torch.float64)
    W = W / W.norm(dim=-1, keepdim=True)
    x = torch.randn(50, 16, dtype=torch.float64)
    opts = PursuitOptions(mode="fixed", steps=12, nonneg=nonneg)
    idx_ref, alpha_ref, _ = naive_pursuit(x, W, opts)
    sel = select_atoms(x, W, opts, gram_matrix(W) if gram else None, chunk_rows=7)
    alpha = MPCoefficients.apply(x, W, sel.idx_NK, sel.active_NK)
    assert torch.equal(sel.idx_NK, idx_ref)
    torch.testing.assert_close(alpha, alpha_ref, atol=1e-5, rtol=0)


def test_block_gram_matches_dense():
    W = torch.randn(300, 8, dtype=torch.float64)
    torch.testing.assert_close(gram_matrix(W, block=64), W @ W.T)


@pytest.mark.parametrize("nonneg", [True, False])
def test_gradients_equal_naive_unrolled_pursuit(nonneg):
    sae = make(nonneg=nonneg, k=6)
    x = rows(8)
    out = sae(x)
    (out.recon - x).pow(2).sum().backward()
    fast = [sae.W_dec.grad.clone(), sae.b_dec.grad.clone()]
    W, b = sae.W_dec.detach().clone().requires_grad_(), sae.b_dec.detach().clone().requires_grad_()
    _, alpha, _ = naive_pursuit(x - b, W, sae.pursuit_options())
    idx = naive_pursuit(x - b, W, sae.pursuit_options())[0]
    recon = (alpha[..., None] * W[idx]).sum(1) + b
    (recon - x).pow(2).sum().backward()
    torch.testing.assert_close(fast[0], W.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(fast[1], b.grad, atol=1e-10, rtol=1e-8)


def test_mp_coefficients_gradcheck():
    torch.manual_seed(1)
    W = torch.randn(10, 5, dtype=torch.float64)
    W = (W / W.norm(dim=-1, keepdim=True)).requires_grad_()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    sel = select_atoms(x.detach(), W.detach(), PursuitOptions("fixed", 4), gram_matrix(W.detach()))
    assert torch.autograd.gradcheck(lambda x, W: MPCoefficients.apply(x, W, sel.idx_NK, sel.active_NK), (x, W))


def test_adaptive_mode_uses_fewer_atoms_on_easy_rows():
    sae = make(stop_mode="threshold", residual_threshold=1e-6, max_iters=D_IN * 2, k=4)
    with torch.no_grad():
        sae.b_dec.zero_()
    easy = 2.0 * sae.W_dec.detach()[:8]  # one atom explains each row exactly
    hard = rows(8)
    out = sae(torch.cat([easy, hard]))
    l0 = out.code.l0()
    assert (l0[:8] == 1).all() and (l0[8:] > 1).all()
    assert float(out.aux["l0_min"]) == 1 and float(out.aux["l0_max"]) == int(l0.max())
    # the same weights in fixed mode, changed at inference
    assert (sae.encode(hard, stop_mode="fixed", k=3).l0() <= 3).all()
    assert (sae.with_sparsity(k=2, stop_mode="fixed").encode(hard).l0() <= 2).all()


def test_relative_threshold_stops_early():
    sae = make(stop_mode="threshold", residual_threshold=0.5, relative_threshold=True, max_iters=30,
               nonneg=False, stop_on_duplicate_support=False)
    x = rows()
    code = sae.encode(x)
    res = (x - sae.decode(code)).norm(dim=-1) / (x - sae.b_dec).norm(dim=-1)
    assert (res < 0.5 + 1e-9).all() and float(code.l0().float().mean()) < 30


@pytest.mark.parametrize("shape", [(D_IN,), (5, D_IN), (2, 3, D_IN)])
def test_shapes_and_forward_equals_decode_encode(shape):
    sae = make(dtype="float32", k=4)
    x = torch.randn(*shape)
    out = sae(x)
    assert out.recon.shape == shape and out.code.dense().shape == (*shape[:-1], D_SAE)
    torch.testing.assert_close(out.recon, sae.decode(sae.encode(x)), atol=1e-6, rtol=0)


def test_folded_copy_raises_and_save_load_roundtrip(tmp_path):
    sae = make(k=5)
    with pytest.raises(NotImplementedError, match="folding is not valid"):
        sae.folded_copy()
    x = rows()
    before = sae.encode(x)
    save_sae(sae, tmp_path / "mp")
    loaded = load_sae(tmp_path / "mp")
    assert loaded.cfg == sae.cfg and set(loaded.state_dict()) == {"W_dec", "b_dec"}
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t)
    after = loaded.encode(x)
    assert torch.equal(before.indices, after.indices) and torch.equal(before.values, after.values)


def test_gram_never_stale_after_weight_change():
    sae = make(k=5, gram="always")
    x = rows()
    sae.encode(x)  # builds the Gram matrix
    other = make(k=5, seed=3)
    sae.load_state_dict(other.state_dict())
    assert torch.equal(sae.encode(x).indices, other.encode(x).indices)
    with torch.no_grad():
        sae.W_dec.mul_(-1)  # in-place change, as an optimizer step does
    other.load_state_dict(sae.state_dict())
    assert torch.equal(sae.encode(x).indices, other.encode(x).indices)


def test_gram_built_under_inference_mode_does_not_break_the_next_training_step():
    """A Gram matrix cached inside torch.inference_mode is an inference tensor: the refresh after the
    next optimizer step (outside inference mode) must not write into it (issue 21)."""
    sae = make(k=5, gram="always")
    with torch.inference_mode():
        sae.encode(rows())
    sae.train()
    out = sae(rows())
    out.recon.sum().backward()
    with torch.no_grad():
        sae.W_dec.add_(0.01)
    sae.after_optimizer_step()  # refreshes the Gram matrix
    fresh = make(k=5, gram="never")
    fresh.load_state_dict(sae.state_dict())
    sae.eval()
    assert torch.equal(sae.encode(rows()).indices, fresh.encode(rows()).indices)


def test_training_callbacks_keep_unit_atoms_and_revive_dead():
    sae = make(k=3, revive_after_tokens=1)
    sae.train()
    x = rows(32)
    sae.init_from_data(x)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    W0 = sae.W_dec.detach().clone()
    out = sae(x)
    sae.loss(x, out).total.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE, dtype=torch.float64))
    unused = torch.ones(D_SAE, dtype=torch.bool)
    unused[out.code.indices[out.code.values != 0]] = False
    moved = 1 - (sae.W_dec.detach() * W0).sum(-1)
    assert unused.any() and (moved[unused] > 1e-3).all()  # dead atoms were pulled to residuals


def test_atom_dropout_hides_atoms_in_training_only():
    sae = make(k=4, atom_dropout=0.5)
    x = rows()
    sae.train()
    torch.manual_seed(0)
    trained_idx = sae(x).code.indices
    sae.eval()
    plain = make(k=4)
    plain.load_state_dict(sae.state_dict())
    assert torch.equal(sae.encode(x).indices, plain.encode(x).indices)
    assert not torch.equal(trained_idx, plain.encode(x).indices)
    assert trained_idx.shape == (16, 4)


def test_hierarchical_data_is_conditionally_orthogonal():
    data = hierarchical_features(2000, 16, n_parents=4, children_per_parent=3, p_parent=0.3, seed=1,
                                 dtype=torch.float64)
    P = data.parents_PD[data.child_parent_C]
    torch.testing.assert_close((data.children_CD * P).sum(-1), torch.full((12,), 0.8, dtype=torch.float64))
    resid = (data.children_CD - 0.8 * P).reshape(4, 3, 16)
    gram = resid @ resid.transpose(1, 2)
    torch.testing.assert_close(gram, 0.36 * torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    child_fires = (data.child_codes_NC != 0).reshape(-1, 4, 3).any(-1)
    assert child_fires.any() and (data.parent_fires_NP | ~child_fires).all()
    torch.testing.assert_close(data.x_ND, data.codes_NF @ data.D_FD)


def test_hierarchical_data_sibling_correlation():
    data = hierarchical_features(100, 16, n_parents=3, children_per_parent=4, child_parent_cos=0.0, sibling_cos=0.5,
                                 seed=2, dtype=torch.float64)
    C_PCD = data.children_CD.reshape(3, 4, 16)
    gram = C_PCD @ C_PCD.transpose(1, 2)
    torch.testing.assert_close(gram, 0.5 + 0.5 * torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    torch.testing.assert_close((C_PCD * data.parents_PD[:, None]).sum(-1), torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="sibling_cos"):
        hierarchical_features(10, 16, n_parents=1, children_per_parent=2, sibling_cos=1.0)


def test_mp_recovers_conditionally_orthogonal_children_better_than_topk(tmp_path):
    """Costa et al. claim (i), at equal L0, same trainer, same data: children that fire only with
    their parent and are orthogonal to it and to each other (the paper's toy-tree geometry)."""
    from saekit.eval.ground_truth import max_cosine_per_atom
    from saekit.sae.topk import TopKConfig, TopKSAE
    from saekit.store.batches import TensorBatches
    from saekit.train import TrainConfig, train

    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = hierarchical_features(8192, 64, n_parents=16, children_per_parent=4, parents_per_row=2,
                                 child_parent_cos=0.0, seed=0)
    cfg = TrainConfig(total_steps=500, batch_size=256, lr=3e-3, decay="none", checkpoint_every=0,
                      progress_bar=False, log_every=500, deterministic=False)
    result = {}
    for name, sae in (("mp", MatchingPursuitSAE(MPConfig(d_in=64, d_sae=160, k=4))),
                      ("topk", TopKSAE(TopKConfig(d_in=64, d_sae=160, k=4)))):
        run = train(sae, TensorBatches(data.x_ND, 256), cfg, tmp_path / name)
        loaded = load_sae(run.final_sae)  # MP saves unfolded and reloads
        assert loaded.cfg.k == 4  # the same L0 budget
        W = loaded.W_dec.detach()
        x = data.x_ND[:2048]
        with torch.no_grad():
            fvu = float((loaded(x).recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        child = max_cosine_per_atom(W, data.children_CD)
        result[name] = (float(child.mean()), float((child > 0.9).double().mean()),
                        float(max_cosine_per_atom(W, data.parents_PD).mean()), fvu)
    (mp_child, mp_frac, mp_parent, mp_fvu), (tk_child, tk_frac, tk_parent, tk_fvu) = result["mp"], result["topk"]
    assert mp_child > 0.95 and mp_child > tk_child + 0.03 and mp_frac > tk_frac, result
    assert mp_parent >= tk_parent - 0.03 and mp_fvu < tk_fvu, result
